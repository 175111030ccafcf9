"""Sampling with a KV cache ≡ recomputing the full context at every step (fp32, tiny models)."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from podtrain.inference import generate
from podtrain.model import ModelConfig, Transformer, init_cache

# A larger init_std than training uses makes the random model's next-token choices clear-cut,
# so greedy comparisons are not decided by float noise between two equally likely tokens.
CFG = ModelConfig(vocab_size=23, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, init_std=0.3)


def build(cfg: ModelConfig, seed: int = 0):
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=seed)))
    return graphdef, nnx.to_pure_dict(state)


def full_forward(graphdef, params, length: int = 32):
    """Logits (len(ids), V) of one sequence, recomputed from scratch without a cache. Padded at
    the end to one length so that it compiles once (padding cannot change earlier logits: see
    test_model's causality tests)."""
    fn = jax.jit(lambda p, tokens: nnx.merge(graphdef, p)(tokens[None])[0][0])

    def forward(ids):
        padded = np.zeros(length, np.int32)
        padded[: len(ids)] = ids
        return np.asarray(fn(params, padded))[: len(ids)]

    return forward


@pytest.mark.parametrize("scan_layers", ["scan", "unroll"])
def test_prefill_then_decode_logits_equal_full_forward(scan_layers):
    cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
    graphdef, params = build(cfg)
    batch, length, prefill, max_len = 2, 12, 5, 16
    tokens = jax.random.randint(jax.random.key(3), (batch, length), 0, cfg.vocab_size)
    expected = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])(params, tokens)

    call = jax.jit(lambda p, t, cache, i: nnx.merge(graphdef, p)(t, cache=cache, cache_index=i))
    cache = init_cache(cfg, batch, max_len)
    logits, cache = call(params, tokens[:, :prefill], cache, 0)
    got = [logits]
    for pos in range(prefill, length):
        logits, cache = call(params, tokens[:, pos : pos + 1], cache, pos)
        got.append(logits)
    got = np.concatenate(got, axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_greedy_generation_equals_argmax_of_full_recompute():
    graphdef, params = build(CFG)
    forward = full_forward(graphdef, params)
    prompt, new, window = [3, 1, 4, 1, 5], 11, 16  # stays inside the window: no cache refill
    got = generate.generate(graphdef, params, CFG, np.asarray(prompt), new, window, temperature=0)
    ids = list(prompt)
    for _ in range(new):
        logits = forward(ids)[-1]
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 1e-4, "near-tie: the comparison would test float noise"
        ids.append(int(np.argmax(logits)))
    assert got == ids[len(prompt) :]
    assert len(set(got)) > 1, "a constant output would not show that the context is used"


def test_greedy_generation_past_the_window_equals_recompute_of_the_kept_context():
    """When the trained context fills, generate keeps the last window // 2 tokens: each token must
    be the argmax of a full forward over exactly the tokens the cache holds."""
    graphdef, params = build(CFG)
    forward = full_forward(graphdef, params)
    prompt, new, window = [2, 7, 1, 8, 2, 8], 14, 8
    got = generate.generate(graphdef, params, CFG, np.asarray(prompt), new, window, temperature=0)
    ids = list(prompt)
    start = len(ids) - window // 2 if len(ids) >= window else 0
    for _ in range(new):
        ids.append(int(np.argmax(forward(ids[start:])[-1])))
        if len(ids) - start > window:  # the new token has no position left: rebuild the cache
            start = len(ids) - window // 2
    assert got == ids[len(prompt) :]


def test_top_k_1_sampling_is_greedy_and_seeds_are_reproducible():
    graphdef, params = build(CFG)
    prompt = np.asarray([5, 6, 7])
    greedy = generate.generate(graphdef, params, CFG, prompt, 10, 16, temperature=0)
    assert generate.generate(graphdef, params, CFG, prompt, 10, 16, temperature=1.0, top_k=1, seed=4) == greedy
    a = generate.generate(graphdef, params, CFG, prompt, 20, 32, temperature=1.0, seed=1)
    assert generate.generate(graphdef, params, CFG, prompt, 20, 32, temperature=1.0, seed=1) == a
    assert generate.generate(graphdef, params, CFG, prompt, 20, 32, temperature=1.0, seed=2) != a


def test_generation_ends_after_the_stop_id():
    graphdef, params = build(CFG)
    prompt = np.asarray([3, 1, 4, 1, 5])
    free = generate.generate(graphdef, params, CFG, prompt, 11, 16, temperature=0)
    stop = free[3]
    assert stop not in free[:3], "pick a stop id that first appears mid-way"
    assert generate.generate(graphdef, params, CFG, prompt, 11, 16, temperature=0, stop_id=stop) == free[:4]


def test_continuation_decodes_new_ids_with_the_prompt():
    """A SentencePiece-like decoder drops a leading word marker when new ids are decoded alone."""

    class Pieces:
        vocab = {0: "▁to", 1: "▁be", 2: "!"}

        def decode(self, ids):
            return "".join(self.vocab[i] for i in ids).replace("▁", " ").lstrip()

    assert generate.continuation(Pieces(), [0], [1, 2]) == " be!"
