"""Autoregressive sampling with a KV cache, from a run directory's latest checkpoint."""

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from podtrain.data import tokenizer
from podtrain.inference import weights
from podtrain.model import init_cache, moe
from podtrain.train import config as configs


def pick(logits_V: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Next token from float32 logits: greedy at temperature 0, else top-k sampling."""
    if temperature == 0:
        return jnp.argmax(logits_V, axis=-1)
    logits_V = logits_V / temperature
    if top_k:
        kth = jax.lax.top_k(logits_V, top_k)[0][..., -1:]
        logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
    return jax.random.categorical(key, logits_V, axis=-1)


def _call(graphdef, params, *args, **kwargs):
    model = nnx.merge(graphdef, params)
    model.eval()  # MoE: eval capacity factor
    return moe.call_with_stats(model, *args, **kwargs)[0]


@partial(jax.jit, static_argnums=(0,))
def _prefill(graphdef, params, tokens_BT, cache):
    logits_BTV, cache = _call(graphdef, params, tokens_BT, cache=cache, cache_index=0)
    return logits_BTV[:, -1], cache


@partial(jax.jit, static_argnums=(0, 6, 7))
def _decode(graphdef, params, token_B, pos, cache, key, temperature, top_k):
    """Feed one token at position `pos`; return the next token and the cache."""
    logits_BTV, cache = _call(graphdef, params, token_B[:, None], cache=cache, cache_index=pos)
    return pick(logits_BTV[:, -1], key, temperature, top_k), cache


def generate(
    graphdef,
    params,
    cfg_model,
    prompt_ids,
    max_new_tokens: int,
    window: int,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[int]:
    """Continue `prompt_ids` (batch 1) by up to `max_new_tokens`, ending after `stop_id` (EOS) when
    it comes. Positions stay below `window` (the trained context): when it fills, the cache is
    rebuilt from the last window // 2 tokens."""
    ids = [int(i) for i in prompt_ids][-window:] or [0]
    key = jax.random.key(seed)
    out = []

    def refill():
        ctx = ids[-(window // 2) :] if len(ids) >= window else ids
        cache = init_cache(cfg_model, 1, window)
        logits, cache = _prefill(graphdef, params, jnp.asarray([ctx], jnp.int32), cache)
        return logits, cache, len(ctx)

    logits, cache, pos = refill()
    token = pick(logits, jax.random.fold_in(key, 0), temperature, top_k)
    for i in range(max_new_tokens):
        out.append(int(token[0]))
        ids.append(out[-1])
        if i == max_new_tokens - 1 or out[-1] == stop_id:
            break
        if pos >= window:
            logits, cache, pos = refill()
            token = pick(logits, jax.random.fold_in(key, i + 1), temperature, top_k)
            continue
        token, cache = _decode(graphdef, params, token, pos, cache, jax.random.fold_in(key, i + 1), temperature, top_k)
        pos += 1
    return out


def load_run(run_dir: str | Path, step: int | None = None):
    """(config, tokenizer, graphdef, variables) of any run (pretraining, full, freeze or LoRA
    fine-tuning) on the first local device; variables are the model's parameters (LoRA factors
    merged) and its buffers (the MoE router bias), if it has any."""
    run = weights.load(run_dir, step, flag="--run")
    if run.tok is None:
        raise configs.ConfigError(
            f"--run {run_dir}: no {tokenizer.RUN_FOLDER}/ folder; sampling needs the run's tokenizer (import the "
            f"model with its tokenizer.json or tokenizer.model)"
        )
    return run.cfg, run.tok, run.graphdef, run.variables


def sample_run(run_dir, prompt: str, max_new_tokens: int, temperature=1.0, top_k=0, seed=0) -> str:
    if max_new_tokens < 0 or temperature < 0:
        bad = f"--max-new-tokens={max_new_tokens}" if max_new_tokens < 0 else f"--temperature={temperature}"
        raise configs.ConfigError(f"{bad} must be >= 0")
    cfg, tok, graphdef, params = load_run(run_dir)
    if not 0 <= top_k <= cfg.model.vocab_size:
        raise configs.ConfigError(f"--top-k={top_k} must be in [0, {cfg.model.vocab_size}] (0: no top-k filtering)")
    try:
        prompt_ids = tok.prompt(prompt)
    except ValueError as e:
        raise configs.ConfigError(f"--prompt: {e}") from None
    new = generate(
        graphdef,
        params,
        cfg.model,
        prompt_ids,
        max_new_tokens,
        cfg.data.seq_len,
        temperature,
        top_k,
        seed,
        stop_id=tok.eos_id,
    )
    return prompt + continuation(tok, prompt_ids, new)


def continuation(tok, prompt_ids, new: list[int]) -> str:
    """The text `new` adds after the prompt. Decoded together with the prompt where that extends the
    prompt's own decoding: alone, a SentencePiece word piece would lose its leading space."""
    before, full = tok.decode(prompt_ids), tok.decode([*prompt_ids, *new])
    return full[len(before) :] if full.startswith(before) else tok.decode(new)
