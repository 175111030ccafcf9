"""Typed, frozen model configuration. Validation names the field, the value and the fix."""

import dataclasses

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16")
SCAN_MODES = ("auto", "scan", "unroll")


def check(ok: bool, message: str) -> None:
    """Raise ValueError(message) unless ok: the validation idiom of the model and train configs."""
    if not ok:
        raise ValueError(message)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    check(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}")


def resolved_vocab(tokenizer_vocab: int, cfg_vocab: int, multiple: int) -> int:
    """The model's embedding rows: `cfg_vocab`, or for 0 the tokenizer's vocabulary rounded up to a
    multiple of `multiple`. Rows past the tokenizer's ids are never fed and never targets (Hugging
    Face models ship the same way). ValueError when `cfg_vocab` cannot hold every tokenizer id."""
    if cfg_vocab == 0:
        return -(-tokenizer_vocab // multiple) * multiple
    check(
        cfg_vocab >= tokenizer_vocab,
        f"model.vocab_size={cfg_vocab} is smaller than the tokenizer's {tokenizer_vocab} ids; set it to 0 to take "
        f"the tokenizer's (rounded up to model.vocab_multiple={multiple})",
    )
    return cfg_vocab


ROUTERS = ("softmax_topk", "sigmoid_bias")
DISPATCHES = ("dropless", "capacity")
DROPLESS_IMPLS = ("auto", "ragged", "blocked")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts MLPs (YAML section `model.moe`); num_experts=0 means a dense model.

    Layer i is MoE when i >= first_dense_layers and (i - first_dense_layers) % every == 0.
    """

    num_experts: int = 0  # E; 0: dense
    top_k: int = 2  # k
    expert_mlp_dim: int = 0  # F of each routed expert; 0: model.mlp_dim
    router: str = "softmax_topk"  # softmax_topk (Mixtral, Switch) | sigmoid_bias (DeepSeek-V3)
    normalize_topk: bool = True  # renormalize the k routing weights to sum to 1
    n_groups: int = 1  # group-limited routing: experts split into n_groups groups ...
    topk_groups: int = 1  # ... and tokens choose among the best topk_groups groups
    routed_scaling: float = 1.0  # routed output multiplier (DeepSeek-V3's routed_scaling_factor)
    num_shared_experts: int = 0
    shared_mlp_dim: int = 0  # F of each shared expert; 0: expert_mlp_dim
    every: int = 1  # one MoE layer every `every` layers ...
    first_dense_layers: int = 0  # ... after this many dense layers
    dispatch: str = "dropless"  # dropless | capacity
    dropless_impl: str = "auto"  # auto: ragged_dot on TPU/GPU, blocked on CPU
    block_size: int = 128  # rows per block of the blocked dropless path (128 measured best on CPU)
    capacity_factor_train: float = 1.25
    capacity_factor_eval: float = 2.0
    load_balance_coef: float = 0.0  # Switch load-balance loss
    z_loss_coef: float = 0.0  # ST-MoE router z-loss
    bias_update_rate: float = 0.0  # DeepSeek-V3 aux-loss-free balancing (sigmoid_bias router)
    router_init_std: float = 0.02

    def __post_init__(self):
        e, k = self.num_experts, self.top_k
        check(e >= 0, f"model.moe.num_experts={e} must be >= 0 (0: dense)")
        if not e:
            return
        check(1 <= k <= e, f"model.moe.top_k={k} must be in [1, model.moe.num_experts={e}]")
        check_choice("model.moe.router", self.router, ROUTERS)
        check_choice("model.moe.dispatch", self.dispatch, DISPATCHES)
        check_choice("model.moe.dropless_impl", self.dropless_impl, DROPLESS_IMPLS)
        check(self.n_groups >= 1, f"model.moe.n_groups={self.n_groups} must be >= 1")
        check(e % self.n_groups == 0, f"model.moe.n_groups={self.n_groups} must divide model.moe.num_experts={e}")
        check(
            1 <= self.topk_groups <= self.n_groups,
            f"model.moe.topk_groups={self.topk_groups} must be in [1, model.moe.n_groups={self.n_groups}]",
        )
        check(
            k <= self.topk_groups * (e // self.n_groups),
            f"model.moe.top_k={k} exceeds the {self.topk_groups * (e // self.n_groups)} experts in "
            f"model.moe.topk_groups={self.topk_groups} groups; raise model.moe.topk_groups",
        )
        for name in ("every", "block_size"):
            check(getattr(self, name) >= 1, f"model.moe.{name}={getattr(self, name)} must be >= 1")
        for name in ("first_dense_layers", "num_shared_experts", "expert_mlp_dim", "shared_mlp_dim"):
            check(getattr(self, name) >= 0, f"model.moe.{name}={getattr(self, name)} must be >= 0")
        for name in ("capacity_factor_train", "capacity_factor_eval"):
            check(getattr(self, name) > 0, f"model.moe.{name}={getattr(self, name)} must be > 0")
        for name in ("load_balance_coef", "z_loss_coef", "bias_update_rate"):
            check(getattr(self, name) >= 0, f"model.moe.{name}={getattr(self, name)} must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, i: int) -> bool:
        return self.enabled and i >= self.first_dense_layers and (i - self.first_dense_layers) % self.every == 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer (pre-norm RMSNorm, RoPE, GQA, SwiGLU)."""

    vocab_size: int = 0  # embedding rows; 0: the tokenizer's ids rounded up to vocab_multiple when the run starts
    vocab_multiple: int = 128  # so that the vocabulary axis shards evenly
    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 0  # 0: d_model // num_heads
    mlp_dim: int = 352
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype; parameters stay float32
    scan_layers: str = "auto"  # auto: lax.scan on TPU/GPU, unrolled on CPU
    remat: str = "none"
    attention_blocks: int = 0  # causal query blocks (model/kernels.py: attention); 0 = auto
    moe: MoEConfig = MoEConfig()  # num_experts=0: every MLP dense

    def __post_init__(self):
        for name in ("num_layers", "d_model", "num_heads", "num_kv_heads", "mlp_dim"):
            check(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be > 0")
        check(self.vocab_size >= 0, f"model.vocab_size={self.vocab_size} must be >= 0 (0: from the tokenizer)")
        check(self.vocab_multiple > 0, f"model.vocab_multiple={self.vocab_multiple} must be > 0")
        check(self.head_dim >= 0, f"model.head_dim={self.head_dim} must be >= 0 (0: d_model // num_heads)")
        if self.head_dim == 0:
            check(
                self.d_model % self.num_heads == 0,
                f"model.num_heads={self.num_heads} must divide model.d_model={self.d_model} (or set model.head_dim)",
            )
        check(
            self.num_heads % self.num_kv_heads == 0,
            f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}",
        )
        check(self.resolved_head_dim % 2 == 0, f"model.head_dim={self.resolved_head_dim} must be even for RoPE")
        check_choice("model.dtype", self.dtype, DTYPES)
        check_choice("model.scan_layers", self.scan_layers, SCAN_MODES)
        check_choice("model.remat", self.remat, REMAT_POLICIES)
        check(self.attention_blocks >= 0, f"model.attention_blocks={self.attention_blocks} must be >= 0 (0: auto)")
        if self.moe.enabled:
            rest = self.num_layers - self.moe.first_dense_layers
            check(
                rest >= self.moe.every and rest % self.moe.every == 0,
                f"model.moe.every={self.moe.every} must divide model.num_layers - model.moe.first_dense_layers = "
                f"{rest} (and leave at least one MoE layer)",
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def expert_dim(self) -> int:
        """Hidden size of each routed expert."""
        return self.moe.expert_mlp_dim or self.mlp_dim

    @property
    def shared_dim(self) -> int:
        """Hidden size of all shared experts together (one SwiGLU of that width)."""
        return self.moe.num_shared_experts * (self.moe.shared_mlp_dim or self.expert_dim)

    @property
    def num_moe_layers(self) -> int:
        return (self.num_layers - self.moe.first_dense_layers) // self.moe.every if self.moe.enabled else 0

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, PaLM convention (Chowdhery et al. 2022, appendix B).

        6 * N_matmul + 12 * L * (N*H) * T, where N_matmul counts every weight that takes part in
        a matmul (all non-embedding weights plus the V x D output head, tied or not; the
        embedding lookup is not a matmul) and the attention term counts the full T x T score
        and value products, causal mask or not. MoE layers count the router and the top_k routed
        plus the shared experts that each token passes through (active parameters).
        """
        h = self.resolved_head_dim
        attn = self.d_model * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.d_model * self.mlp_dim
        n_matmul = self.num_layers * (attn + mlp) + self.vocab_size * self.d_model
        moe = self.moe
        if moe.enabled:
            active = self.d_model * (moe.num_experts + 3 * (moe.top_k * self.expert_dim + self.shared_dim))
            n_matmul += self.num_moe_layers * (active - mlp)
        return 6.0 * n_matmul + 12.0 * self.num_layers * self.num_heads * h * seq_len
