"""AdamW with linear warmup, cosine decay to min_lr, global-norm clipping, and a decay mask."""

import jax
import optax

from podtrain.train.config import TrainConfig

NO_DECAY = ("norm", "bias")  # parameter path parts that are never weight-decayed


def schedule(cfg: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.min_lr,
    )


def decay_mask(params):
    def decays(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        return not any(part in name for name in names for part in NO_DECAY)

    return jax.tree_util.tree_map_with_path(decays, params)


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
    )
