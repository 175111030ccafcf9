"""Every bad data input through the real CLI (`podtrain pretrain`, `podtrain data prepare`): exit
code 2, one stderr line naming the key, file or line, no traceback, and nothing on disk changed:
no run dir created, an existing one byte-identical, data files and caches untouched. A bad record
that only a Grain worker meets mid-run ends the run the same way (its run dir exists by then)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from podtrain.data import cache, pipeline, tokenizer
from podtrain.train import config as configs

from conftest import TINY, TINY_STEPS

LATE_FILES = 12  # one unit each: the run's first check reads 8 of them (train.batch_size=8 streams)


def snapshot(folder: Path, skip: str | None = None) -> dict:
    """path -> (size, mtime_ns, sha256) of every file under `folder` but `skip`, and every folder.

    A folder counts by its existence only: `data prepare` writes into a temporary folder that it
    removes when the corpus turns out bad, which changes the parent's mtime and nothing else."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if skip and rel.parts[0] == skip:
            continue
        if path.is_file():
            st = path.stat()
            out[str(rel)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            out[str(rel)] = "folder"
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Tiny corpora (good and bad), a corrupt tokenizer file, a byte-tokenizer cache, an existing
    run dir and the config file every case starts from."""
    root = tmp_path_factory.mktemp("bad_input")
    good, bad, late = root / "good", root / "bad", root / "late"
    for folder in (good, bad, late):
        folder.mkdir()
    for i in range(3):
        (good / f"part-{i}.jsonl").write_text("".join(json.dumps({"text": f"doc {i}.{j} hi"}) + "\n" for j in range(9)))
    (bad / "syntax.jsonl").write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": oops}\n')
    (bad / "nofield.jsonl").write_text('{"text": "fine"}\n{"body": "x", "id": 1}\n')
    latin1 = b'{"text": "fine"}\n{"text": "caf\xe9"}\n'
    (bad / "latin1.jsonl").write_bytes(latin1)
    (bad / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')

    base = configs.load(None, [
        *TINY, *TINY_STEPS, "mesh.devices=1", f"data.dataset={good}/part-*.jsonl", "data.tokenizer=byte",
        f"data.data_dir={root / 'tfds'}", f"data.cache={root / 'cache'}", f"run.dir={root / 'run'}",
    ])  # fmt: skip
    (root / "tiny.yaml").write_text(configs.dump(base))
    existing = root / "existing"
    (existing / "checkpoints").mkdir(parents=True)
    (existing / "config.yaml").write_text(configs.dump(base))
    (existing / "metrics.jsonl").write_text('{"step": 1, "train_loss": 5.0}\n')
    tokenizer.save_run(tokenizer.ByteTokenizer(), existing)

    # A bad line in a unit that the first check does not read: Grain's worker meets it mid-run.
    slots = pipeline._Slots((LATE_FILES,), (1.0,), base.train.seed).table()
    unit = slots[base.train.batch_size + 1][1]
    for i in range(LATE_FILES):
        text = json.dumps({"text": f"document number {i} says hi"}) + "\n" + ('{"text": broken\n' if i == unit else "")
        (late / f"d{i:02d}.jsonl").write_text(text)
    (late / "validation.txt").write_text("validation text here\n")

    byte_cache = cache.prepare(base.data)[0].folder
    train_in, _ = pipeline.inputs(base.data)
    char = tokenizer.from_config("char", lambda: pipeline.texts(train_in))
    return {
        "root": root, "good": good, "bad": bad, "late": late, "late_unit": unit, "latin1_offset": latin1.index(b"\xe9"),
        "byte_cache": byte_cache, "byte_fp": tokenizer.ByteTokenizer().fingerprint, "char_fp": char.fingerprint,
    }  # fmt: skip


def podtrain(world: dict, command: str, overrides: list[str]) -> subprocess.CompletedProcess:
    config = str(world["root"] / "tiny.yaml")
    return subprocess.run(
        [sys.executable, "-m", "podtrain.launch.cli", *command.split(), "--config", config, *overrides],
        cwd=world["root"], env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


MID_RUN = "bad line met by a worker mid-run"
# case: (overrides, what the line must hold); {good}, {bad}, ... are filled in from the world fixture
CASES = {
    "dataset=jsonl": (["data.dataset=jsonl"], ["data.dataset='jsonl' is not a dataset", "tfds:NAME"]),
    "unknown tfds": (
        ["data.dataset=tfds:imdb_reveiws"],
        ["data.dataset=tfds:imdb_reveiws", "did you mean tfds:imdb_reviews?"],
    ),
    "glob matches nothing": (
        ["data.dataset={good}/train-*.jsonl"],
        ["data.dataset={good}/train-*.jsonl matches no file"],
    ),
    "bad json line": (["data.dataset={bad}/syntax.jsonl"], ["{bad}/syntax.jsonl:3: not a JSON object"]),
    "no text field": (
        ["data.dataset={bad}/nofield.jsonl"],
        ["{bad}/nofield.jsonl:2: no field 'text' (fields: body, id)", "data.text_key"],
    ),
    "undecodable bytes": (
        ["data.dataset={bad}/latin1.jsonl"],
        ["{bad}/latin1.jsonl: byte offset {latin1_offset} is not UTF-8"],
    ),
    "tokenizer missing": (["data.tokenizer={bad}/missing.json"], ["data.tokenizer={bad}/missing.json: no such file"]),
    "tokenizer corrupt": (
        ["data.tokenizer={bad}/tokenizer.json"],
        ["data.tokenizer={bad}/tokenizer.json", "not a readable tokenizer.json"],
    ),
    "tokenizer past vocab_size": (
        ["model.vocab_size=128"],
        ["model.vocab_size=128 is smaller than the tokenizer's 257 ids"],
    ),
    "mixture weight 0": (
        ["data.mixture=[{{dataset: '{good}/part-*.jsonl', weight: 0}}]"],
        ["data.mixture[0].weight=0.0 must be > 0"],
    ),
    "mixture weight < 0": (
        ["data.mixture=[{{dataset: '{good}/part-0.jsonl'}}, {{dataset: '{good}/part-1.jsonl', weight: -1}}]"],
        ["data.mixture[1].weight=-1.0 must be > 0"],
    ),
    "cache of another tokenizer": (
        ["data.tokenizer=char", "data.cache={byte_cache}"],
        [
            "data.cache={byte_cache} was made with tokenizer byte {byte_fp16}",
            "this run's is char {char_fp16}",
            "podtrain data prepare",
            "delete {byte_cache}",
        ],
    ),
    MID_RUN: (
        ["data.dataset={late}/d*.jsonl", "data.validation={late}/validation.txt", "data.workers=1"]
        + ["run.dir={root}/late_run"],
        ["{late}/d{late_unit:02d}.jsonl:2: not a JSON object"],
    ),
}
# config errors are the same for every command; a cache is only read by training
NOT_PREPARE = ("dataset=jsonl", "mixture weight < 0", "tokenizer past vocab_size", "cache of another tokenizer")
PREPARE = [case for case in CASES if case not in NOT_PREPARE]
RUNS = [
    pytest.param(command, case, id=f"{command}: {case}", marks=[pytest.mark.slow] if case == MID_RUN else [])
    for command, cases in (("pretrain", CASES), ("data prepare", PREPARE))
    for case in cases
]  # the mid-run case compiles and runs a train step and starts a Grain worker


@pytest.mark.parametrize("command,case", RUNS)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, command, case):
    fill = world | {"byte_fp16": world["byte_fp"][:16], "char_fp16": world["char_fp"][:16]}
    overrides, words = ([s.format(**fill) for s in strings] for strings in CASES[case])
    mid_run = case == MID_RUN
    if not mid_run and list(CASES).index(case) % 2:  # every other case: a run dir that holds a run
        overrides.append(f"run.dir={world['root'] / 'existing'}")
    before = snapshot(world["root"], skip="late_run")
    result = podtrain(world, command, overrides)
    assert result.returncode == 2, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr is not one line:\n{result.stderr}"
    assert lines[0].startswith(f"podtrain {command}: error: "), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert snapshot(world["root"], skip="late_run") == before  # run dirs, data files and caches as they were
    if mid_run and command == "pretrain":
        assert (world["root"] / "late_run" / "config.yaml").exists()  # it did start: the error came from Grain
