"""The Hugging Face `transformers` view of a podtrain model: config, tensor names, tokenizer.

Pure mappings, no I/O: `interop/export.py` streams tensors through them. Dense models are
`LlamaForCausalLM`, MoE models `MixtralForCausalLM` or `Glm4MoeForCausalLM` (see `architecture`).
Our RoPE is already the rotate-half layout `transformers` uses, so q and k need no permutation;
only the head axes are flattened and the matrices transposed (`transformers` stores Linear
weights as (out, in)). GQA groups agree: query head n reads kv head n // (N / K) in both.

A model feature the target class cannot express raises ConfigError naming the feature, never a
silently different model.
"""

import dataclasses
import json

import numpy as np

from podtrain.data import tokenizer
from podtrain.train.config import Config, ConfigError

LLAMA = "LlamaForCausalLM"
MIXTRAL = "MixtralForCausalLM"
GLM4_MOE = "Glm4MoeForCausalLM"
MODEL_TYPES = {LLAMA: "llama", MIXTRAL: "mixtral", GLM4_MOE: "glm4_moe"}


# ---------------------------------------------------------------------------------------------
# Tensors. kind 'in':  ours (D, *out) <-> HF (prod(out), D);  'out': ours (*in, D) <-> HF (D, prod(in));
# 'vec': the same array.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One HF tensor and where it lives in our params: params[path][index] (index: the leading
    axes, () for a global, (layer,) in a stack of layers, (layer, expert) for an expert)."""

    hf: str
    path: str  # "" for an `empty` tensor
    index: tuple[int, ...]
    kind: str
    empty: tuple[int, ...] | None = None  # a zero-size tensor the class expects (shape), no parameter

    @property
    def stack(self) -> str:
        return self.path.split(".", 1)[0]

    @property
    def inner(self) -> str:
        return self.path.split(".", 1)[1]


ATTENTION = (
    ("input_layernorm.weight", "attn_norm.scale", "vec"),
    ("self_attn.q_proj.weight", "attn.wq", "in"),
    ("self_attn.k_proj.weight", "attn.wk", "in"),
    ("self_attn.v_proj.weight", "attn.wv", "in"),
    ("self_attn.o_proj.weight", "attn.wo", "out"),
    ("post_attention_layernorm.weight", "mlp_norm.scale", "vec"),
)
DENSE_MLP = (
    ("mlp.gate_proj.weight", "mlp.w_gate", "in"),
    ("mlp.up_proj.weight", "mlp.w_up", "in"),
    ("mlp.down_proj.weight", "mlp.w_down", "out"),
)


def to_hf_tensor(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "in":
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    if kind == "out":
        return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)
    return np.ascontiguousarray(x)


def from_hf_tensor(x: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of to_hf_tensor, onto our parameter's `shape`."""
    if kind == "vec":
        return np.ascontiguousarray(x.reshape(shape))
    return np.ascontiguousarray(x.T.reshape(shape))


def get_path(tree: dict, path: str):
    for key in path.split("."):
        tree = tree[key] if key in tree else tree[int(key)]  # nnx.List entries have int keys
    return tree


def _moe(cfg: Config):
    """cfg's MoE section when it has enabled experts, else None (dense)."""
    return cfg.model.moe if cfg.model.moe.enabled else None


def layer_slots(cfg: Config) -> list[tuple[int, str, int, str, bool]]:
    """(HF layer, our stack, index in that stack, path prefix inside it, is MoE) for each layer.

    Dense models stack every layer in `blocks`; MoE models stack model.moe.first_dense_layers dense
    layers in `blocks`, then units of one MoE block and model.moe.every - 1 dense blocks in `moe_units`.
    """
    moe = _moe(cfg)
    if moe is None:
        return [(i, "blocks", i, "", False) for i in range(cfg.model.num_layers)]
    slots = [(i, "blocks", i, "", False) for i in range(moe.first_dense_layers)]
    for j in range(cfg.model.num_layers - moe.first_dense_layers):
        unit, r = divmod(j, moe.every)
        prefix = "moe_block." if r == 0 else f"dense_{r - 1}."
        slots.append((moe.first_dense_layers + j, "moe_units", unit, prefix, r == 0))
    return slots


# MoE MLPs per architecture: (router entries, per-expert entries with {e}, shared-expert entries).
MOE_TENSORS = {
    MIXTRAL: (
        (("block_sparse_moe.gate.weight", "mlp.router", "in"),),
        (
            ("block_sparse_moe.experts.{e}.w1.weight", "mlp.w_gate", "in"),
            ("block_sparse_moe.experts.{e}.w3.weight", "mlp.w_up", "in"),
            ("block_sparse_moe.experts.{e}.w2.weight", "mlp.w_down", "out"),
        ),
        (),
    ),
    GLM4_MOE: (
        (("mlp.gate.weight", "mlp.router", "in"), ("mlp.gate.e_score_correction_bias", "mlp.bias", "vec")),
        (
            ("mlp.experts.{e}.gate_proj.weight", "mlp.w_gate", "in"),
            ("mlp.experts.{e}.up_proj.weight", "mlp.w_up", "in"),
            ("mlp.experts.{e}.down_proj.weight", "mlp.w_down", "out"),
        ),
        (
            ("mlp.shared_experts.gate_proj.weight", "mlp.shared_gate", "in"),
            ("mlp.shared_experts.up_proj.weight", "mlp.shared_up", "in"),
            ("mlp.shared_experts.down_proj.weight", "mlp.shared_down", "out"),
        ),
    ),
}


def tensor_plan(cfg: Config) -> list[Tensor]:
    """Every HF tensor of the exported model, globals first, then layer by layer.

    Paths address the parameters and buffers (the MoE router bias) merged into one tree.
    """
    m, arch = cfg.model, architecture(cfg)
    plan = [
        Tensor("model.embed_tokens.weight", "embed", (), "vec"),
        Tensor("model.norm.weight", "final_norm.scale", (), "vec"),
    ]
    if not m.tie_embeddings:
        plan.append(Tensor("lm_head.weight", "lm_head", (), "in"))
    for i, stack, at, prefix, is_moe in layer_slots(cfg):
        hf_prefix, ours = f"model.layers.{i}.", f"{stack}.{prefix}"
        plan += [Tensor(hf_prefix + name, ours + path, (at,), kind) for name, path, kind in ATTENTION]
        if not is_moe:
            plan += [Tensor(hf_prefix + name, ours + path, (at,), kind) for name, path, kind in DENSE_MLP]
            continue
        router, experts, shared = MOE_TENSORS[arch]
        plan += [Tensor(hf_prefix + name, ours + path, (at,), kind) for name, path, kind in router]
        for e in range(_moe(cfg).num_experts):
            plan += [Tensor(hf_prefix + name.format(e=e), ours + path, (at, e), kind) for name, path, kind in experts]
        if _moe(cfg).num_shared_experts:
            plan += [Tensor(hf_prefix + name, ours + path, (at,), kind) for name, path, kind in shared]
        else:  # Glm4Moe always builds a shared MLP: of width 0 it adds nothing
            plan += [
                Tensor(hf_prefix + name, "", (), kind, (0, m.d_model) if kind == "in" else (m.d_model, 0))
                for name, path, kind in shared
            ]
    return plan


# ---------------------------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------------------------


def _softmax_topk_mismatch(moe) -> str | None:
    """The first feature of a softmax_topk MoE that MixtralForCausalLM cannot express."""
    if not moe.normalize_topk:
        return "model.moe.normalize_topk=false (Mixtral renormalizes the top-k weights)"
    if moe.routed_scaling != 1.0:
        return f"model.moe.routed_scaling={moe.routed_scaling} (Mixtral has no routed scaling)"
    if moe.n_groups > 1 and moe.topk_groups < moe.n_groups:
        return f"group-limited routing model.moe.n_groups={moe.n_groups} model.moe.topk_groups={moe.topk_groups}"
    if moe.num_shared_experts:
        return f"model.moe.num_shared_experts={moe.num_shared_experts} (Mixtral has no shared experts)"
    if moe.first_dense_layers or moe.every != 1:
        return (
            f"dense layers among the MoE layers (model.moe.first_dense_layers={moe.first_dense_layers}, "
            f"model.moe.every={moe.every}; Mixtral's layers are all MoE)"
        )
    return None


def architecture(cfg: Config) -> str:
    """The transformers class that computes exactly this model; ConfigError naming the feature
    that no supported class can express.

    softmax_topk (renormalized, no shared experts) -> Mixtral. sigmoid_bias (DeepSeek-V3 routing:
    sigmoid scores, bias-corrected and group-limited choice, routed scaling, shared experts,
    leading dense layers) -> Glm4Moe, which pairs that router with GQA attention like ours
    (DeepSeek-V3's own class has multi-head latent attention, which ours is not). Qwen3-MoE would
    fit softmax_topk without renormalization but adds q/k RMSNorm that podtrain lacks.
    """
    m, moe = cfg.model, _moe(cfg)
    if m.d_model % m.num_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} with model.num_heads={m.num_heads} (explicit model.head_dim): "
            f"transformers requires num_heads to divide d_model (hidden_size); this model cannot be exported"
        )
    if moe is None:
        return LLAMA
    if moe.router == "softmax_topk":
        mismatch = _softmax_topk_mismatch(moe)
        if mismatch:
            raise ConfigError(
                f"model.moe.router=softmax_topk with {mismatch}: {MIXTRAL} cannot express it, and Qwen3MoeForCausalLM "
                f"adds q/k RMSNorm that podtrain lacks; no transformers class computes this model"
            )
        return MIXTRAL
    if moe.every != 1:
        raise ConfigError(
            f"model.moe.every={moe.every}: {GLM4_MOE} has dense layers only before the MoE layers "
            f"(model.moe.first_dense_layers), not between them"
        )
    f = m.expert_dim
    if moe.num_shared_experts and (moe.shared_mlp_dim or f) != f:
        raise ConfigError(
            f"model.moe.shared_mlp_dim={moe.shared_mlp_dim}: {GLM4_MOE}'s shared experts have the routed experts' "
            f"width model.moe.expert_mlp_dim={f}; set them equal"
        )
    if moe.n_groups > 1 and moe.topk_groups < moe.n_groups and moe.num_experts // moe.n_groups < 2:
        raise ConfigError(
            f"model.moe.n_groups={moe.n_groups} leaves one expert per group: {GLM4_MOE} scores a group by its "
            f"two best experts"
        )
    return GLM4_MOE


def check_router_bias(cfg: Config, min_bias: float) -> None:
    """transformers masks the experts of excluded groups with 0, not -inf: with a negative
    selection score (sigmoid + bias < 0) an excluded expert could be chosen, so refuse."""
    moe = _moe(cfg)
    limited = moe is not None and moe.router == "sigmoid_bias" and moe.n_groups > 1 and moe.topk_groups < moe.n_groups
    if limited and min_bias < 0:
        raise ConfigError(
            f"group-limited routing (model.moe.n_groups={moe.n_groups}, model.moe.topk_groups={moe.topk_groups}) "
            f"with a negative router bias ({min_bias:.3g}): {GLM4_MOE} masks excluded groups with 0, not -inf, "
            f"so it could route differently"
        )


def _common_config(cfg: Config, arch: str) -> dict:
    m = cfg.model
    return {
        "architectures": [arch],
        "model_type": MODEL_TYPES[arch],
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.data.seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "rope_theta": m.rope_theta,  # transformers < 5 reads it here
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": m.init_std,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": "float32",
    }


def to_hf_config(cfg: Config) -> dict:
    """config.json for the model of `cfg`; ConfigError for what the target class cannot express."""
    arch = architecture(cfg)
    m, moe = cfg.model, _moe(cfg)
    out = _common_config(cfg, arch)
    if arch == LLAMA:
        out.update(intermediate_size=m.mlp_dim, mlp_bias=False, pretraining_tp=1)
    elif arch == MIXTRAL:
        out.update(
            intermediate_size=m.expert_dim,
            num_local_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            router_jitter_noise=0.0,
            sliding_window=None,
            output_router_logits=False,
            router_aux_loss_coef=moe.load_balance_coef,
        )
    else:
        out["rope_parameters"]["partial_rotary_factor"] = 1.0
        out.update(
            intermediate_size=m.mlp_dim,
            moe_intermediate_size=m.expert_dim,
            n_routed_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            n_shared_experts=moe.num_shared_experts,
            first_k_dense_replace=moe.first_dense_layers,
            n_group=moe.n_groups,
            topk_group=moe.topk_groups,
            norm_topk_prob=moe.normalize_topk,
            routed_scaling_factor=moe.routed_scaling,
            use_qk_norm=False,
            num_nextn_predict_layers=0,
            output_router_logits=False,
            router_aux_loss_coef=moe.load_balance_coef,
        )
    return out


def generation_config(cfg: Config, tok: tokenizer.Tokenizer | None = None) -> dict:
    """generation_config.json: greedy, stopping at the tokenizer's EOS (as `podtrain sample` does)."""
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id} if tok else {}
    return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **ids, "do_sample": False}


def _require(hf: dict, key: str, ok, fix: str) -> None:
    if not ok(hf.get(key)):
        raise ConfigError(f"config.json {key}={hf.get(key)!r}: {fix}")


def _rope_theta(hf: dict) -> float:
    rope = _rope(hf)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"config.json rope_parameters.rope_type={rope_type!r}: podtrain implements only default RoPE")
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


def _rope(hf: dict) -> dict:
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def from_hf_config(hf: dict) -> dict:
    """{'model', 'data'} sections of a Config matching a transformers config.json (MoE: model.moe)."""
    archs = hf.get("architectures") or []
    arch = next((a for a, t in MODEL_TYPES.items() if t == hf.get("model_type")), None)
    if arch is None or archs not in ([], [arch]):
        raise ConfigError(
            f"config.json model_type={hf.get('model_type')!r} architectures={archs}: podtrain imports "
            f"{', '.join(MODEL_TYPES)}"
        )
    _require(hf, "hidden_act", lambda v: v in (None, "silu"), "podtrain's MLP is SwiGLU (silu)")
    _require(hf, "attention_bias", lambda v: not v, "podtrain's attention has no biases")
    _require(hf, "mlp_bias", lambda v: not v, "podtrain's MLP has no biases")
    _require(hf, "pretraining_tp", lambda v: v in (None, 1), "only pretraining_tp=1 is supported")
    _require(hf, "sliding_window", lambda v: v is None, "podtrain's attention is full causal attention")
    _require(hf, "use_qk_norm", lambda v: not v, "podtrain's attention has no q/k RMSNorm")
    if _rope(hf).get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(
            f"config.json rope_parameters.partial_rotary_factor={_rope(hf)['partial_rotary_factor']}: "
            f"podtrain rotates the whole head (1.0)"
        )
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    model = {
        "vocab_size": hf["vocab_size"],
        "num_layers": hf["num_hidden_layers"],
        "d_model": hidden,
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": 0 if head_dim * heads == hidden else head_dim,
        "mlp_dim": hf["intermediate_size"],
        "rope_theta": _rope_theta(hf),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": float(hf.get("initializer_range", 0.02)),
        "dtype": "float32",
    }
    moe = {}
    if arch == MIXTRAL:
        moe = {
            "num_experts": hf["num_local_experts"],
            "top_k": hf["num_experts_per_tok"],
            "router": "softmax_topk",
            "normalize_topk": True,
        }
    elif arch == GLM4_MOE:
        moe = {
            "num_experts": hf["n_routed_experts"],
            "top_k": hf["num_experts_per_tok"],
            "expert_mlp_dim": hf["moe_intermediate_size"],
            "router": "sigmoid_bias",
            "normalize_topk": bool(hf.get("norm_topk_prob", True)),
            "n_groups": hf.get("n_group") or 1,
            "topk_groups": hf.get("topk_group") or 1,
            "routed_scaling": float(hf.get("routed_scaling_factor", 1.0)),
            "num_shared_experts": hf.get("n_shared_experts") or 0,
            "first_dense_layers": hf.get("first_k_dense_replace") or 0,
        }
    if moe:
        moe.update(dispatch="dropless", load_balance_coef=float(hf.get("router_aux_loss_coef") or 0.0))
        model["moe"] = moe
    return {"model": model, "data": {"seq_len": int(hf.get("max_position_embeddings") or 2048)}}


# ---------------------------------------------------------------------------------------------
# Tokenizer: HF and SentencePiece runs carry their own files. A char or byte run exports as an
# equivalent tokenizer.json: characters are a BPE model with no merges (every character one token)
# and a Fuse decoder; bytes are GPT-2's byte-level BPE with no merges, byte b being id b; EOS is
# the special token after them, at our eos_id.
# ---------------------------------------------------------------------------------------------

TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "clean_up_tokenization_spaces": False,
    "model_max_length": None,
    "eos_token": tokenizer.EOS_TOKEN,
}


def _byte_chars() -> dict[int, str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def hf_tokenizer(tok: tokenizer.CharTokenizer | tokenizer.ByteTokenizer):
    """A `tokenizers.Tokenizer` giving the same ids as our char or byte tokenizer, EOS included."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if isinstance(tok, tokenizer.CharTokenizer):
        hf = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(tok.chars)}, merges=[]))
        hf.decoder = decoders.Fuse()
    else:
        chars = _byte_chars()
        hf = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(tokenizer.EOS_TOKEN, special=True, normalized=False)])
    if hf.token_to_id(tokenizer.EOS_TOKEN) != tok.eos_id:  # a vocabulary holding the EOS name as a character
        raise RuntimeError(f"exported EOS id {hf.token_to_id(tokenizer.EOS_TOKEN)} != ours {tok.eos_id}")
    return hf


def tokenizer_config(cfg: Config) -> dict:
    """tokenizer_config.json for `hf_tokenizer`'s tokenizer.json."""
    return {**TOKENIZER_CONFIG, "model_max_length": cfg.data.seq_len}


def read_json(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e})") from None
