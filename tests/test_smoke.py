import json
from pathlib import Path

import numpy as np

from podtrain.train import loop


def test_pretrain_writes_a_complete_run_dir(tiny_config):
    cfg = tiny_config()
    result = loop.pretrain(cfg)
    run = cfg.run.dir
    rows = [json.loads(line) for line in Path(run, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"step", "train_loss", "lr", "tokens_per_s", "mfu"} <= rows[-1].keys()
    assert "val_loss" in rows[1] and np.isclose(rows[-1]["val_loss"], result["val_loss"])
    evals = [r for r in rows if "val_loss" in r]
    assert len(evals) == 2 and all(r["val_bpb"] > 0 for r in evals)  # bits per UTF-8 byte, every eval line
    assert np.isclose(evals[-1]["val_bpb"], result["val_loss"] * 1.4427, rtol=0.05)  # ASCII: ~1 byte per char
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    for name in ("config.yaml", "tokenizer/podtrain.json", "loss.png"):
        assert Path(run, name).exists(), name
    assert any(Path(run, "tensorboard").iterdir())
