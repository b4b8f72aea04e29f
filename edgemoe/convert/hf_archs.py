"""What each supported Hugging Face MoE architecture becomes in llama.cpp's GGUF terms.

One `ArchSpec` per HF `model_type`: the llama.cpp architecture, the hyperparameter keys it
reads, how checkpoint tensor names map to GGUF tensors, and the routing conventions llama.cpp
hard-codes for it (a checkpoint that disagrees is refused rather than converted wrongly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from gguf import MODEL_TENSOR as T

from edgemoe.errors import ConvertError

# HF name inside `model.layers.{i}.` (without .weight/.bias) -> GGUF tensor
_ATTN = {
    "input_layernorm": T.ATTN_NORM,
    "self_attn.q_proj": T.ATTN_Q,
    "self_attn.k_proj": T.ATTN_K,
    "self_attn.v_proj": T.ATTN_V,
    "self_attn.o_proj": T.ATTN_OUT,
    "self_attn.q_norm": T.ATTN_Q_NORM,
    "self_attn.k_norm": T.ATTN_K_NORM,
    "post_attention_layernorm": T.FFN_NORM,
}

_SHARED_EXPERT = {
    "mlp.shared_expert.gate_proj": T.FFN_GATE_SHEXP,
    "mlp.shared_expert.up_proj": T.FFN_UP_SHEXP,
    "mlp.shared_expert.down_proj": T.FFN_DOWN_SHEXP,
    "mlp.shared_expert_gate": T.FFN_GATE_INP_SHEXP,
}

# DeepSeek-V2: MLA attention, leading dense FFN layers, shared experts (deepseek2.py)
_MLA = {
    "input_layernorm": T.ATTN_NORM,
    "self_attn.q_proj": T.ATTN_Q,
    "self_attn.q_a_proj": T.ATTN_Q_A,
    "self_attn.q_a_layernorm": T.ATTN_Q_A_NORM,
    "self_attn.q_b_proj": T.ATTN_Q_B,
    "self_attn.kv_a_proj_with_mqa": T.ATTN_KV_A_MQA,
    "self_attn.kv_a_layernorm": T.ATTN_KV_A_NORM,
    "self_attn.o_proj": T.ATTN_OUT,
    "post_attention_layernorm": T.FFN_NORM,
    "mlp.gate_proj": T.FFN_GATE,
    "mlp.up_proj": T.FFN_UP,
    "mlp.down_proj": T.FFN_DOWN,
    "mlp.shared_experts.gate_proj": T.FFN_GATE_SHEXP,
    "mlp.shared_experts.up_proj": T.FFN_UP_SHEXP,
    "mlp.shared_experts.down_proj": T.FFN_DOWN_SHEXP,
}


@dataclass(frozen=True)
class Hparam:
    key: str          # a gguf.Keys template with {arch}
    value: object
    kind: str         # "u32", "f32", "bool" or "str"


@dataclass(frozen=True)
class Split:
    """One checkpoint tensor that llama.cpp wants as several (DeepSeek's kv_b_proj: k_b and v_b)."""

    parts: Tuple[T, ...]
    shapes: Callable[[dict, Tuple[int, ...]], Tuple[Tuple[int, ...], ...]]  # cfg, HF shape -> numpy shapes
    apply: Callable[[dict, object], Tuple[object, ...]]                     # cfg, HF array -> arrays


def _all_moe(cfg: dict) -> int:
    return 0


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    gguf_arch: str
    layer_map: Dict[str, T]
    router: str                              # HF name of the router inside the layer
    expert_prefix: str                       # HF prefix of per-expert tensors inside the layer
    expert_proj: Tuple[str, str, str]        # HF names of gate, up, down of one expert
    hparams: Callable[[dict], List[Hparam]]
    norm_topk_prob: Optional[bool]           # what llama.cpp assumes; None: not configurable
    permute_qk: bool = False                 # llama.cpp's llama arch rotates interleaved pairs
    splits: Dict[str, Split] = field(default_factory=dict)   # HF name inside the layer -> parts
    first_moe_layer: Callable[[dict], int] = _all_moe         # the layers before it are dense
    check: Optional[Callable[[dict, object], None]] = None   # cfg, Checkpoint: refuse a mismatch early


def _get(cfg: dict, *names, default=None):
    """The first of `names` that config.json sets, else `default`; an error when neither."""
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    if default is None:
        raise ConvertError(f"config.json lacks {names[0]}")
    return default


def rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = rp.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConvertError(f"rope scaling {kind!r} is not supported by this converter")
    return float(rp.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _common(cfg: dict, n_ff: int, n_expert: int) -> List[Hparam]:
    from gguf import Keys

    L, A = Keys.LLM, Keys.Attention
    return [
        Hparam(L.CONTEXT_LENGTH, int(_get(cfg, "max_position_embeddings")), "u32"),
        Hparam(L.EMBEDDING_LENGTH, int(cfg["hidden_size"]), "u32"),
        Hparam(L.BLOCK_COUNT, int(cfg["num_hidden_layers"]), "u32"),
        Hparam(L.FEED_FORWARD_LENGTH, int(n_ff), "u32"),
        Hparam(A.HEAD_COUNT, int(cfg["num_attention_heads"]), "u32"),
        Hparam(A.HEAD_COUNT_KV, int(_get(cfg, "num_key_value_heads", default=cfg["num_attention_heads"])), "u32"),
        Hparam(Keys.Rope.FREQ_BASE, rope_theta(cfg), "f32"),
        Hparam(A.LAYERNORM_RMS_EPS, float(_get(cfg, "rms_norm_eps")), "f32"),
        Hparam(L.EXPERT_COUNT, int(n_expert), "u32"),
        Hparam(L.EXPERT_USED_COUNT, int(cfg["num_experts_per_tok"]), "u32"),
    ]


def _qwen3moe(cfg: dict) -> List[Hparam]:
    from gguf import Keys

    if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1)) != 1:
        raise ConvertError("qwen3_moe with dense layers (mlp_only_layers, decoder_sparse_step) is not supported by llama.cpp")
    hd = head_dim(cfg)
    return _common(cfg, cfg["intermediate_size"], _get(cfg, "num_experts", "num_local_experts")) + [
        Hparam(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, int(cfg["moe_intermediate_size"]), "u32"),
        Hparam(Keys.Attention.KEY_LENGTH, hd, "u32"),
        Hparam(Keys.Attention.VALUE_LENGTH, hd, "u32"),
    ]


def _qwen2moe(cfg: dict) -> List[Hparam]:
    from gguf import Keys

    if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1)) != 1:
        raise ConvertError("qwen2_moe with dense layers (mlp_only_layers, decoder_sparse_step) is not supported by llama.cpp")
    return _common(cfg, cfg["intermediate_size"], _get(cfg, "num_experts", "num_local_experts")) + [
        Hparam(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, int(cfg["moe_intermediate_size"]), "u32"),
        Hparam(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, int(cfg["shared_expert_intermediate_size"]), "u32"),
    ]


def _olmoe(cfg: dict) -> List[Hparam]:
    if cfg.get("clip_qkv") is not None:
        raise ConvertError("olmoe with clip_qkv is not supported by llama.cpp's olmoe graph")
    n_head = int(cfg["num_attention_heads"])
    if int(cfg.get("num_key_value_heads") or n_head) != n_head:
        raise ConvertError("olmoe with grouped-query attention is not supported by llama.cpp's olmoe graph")
    # llama.cpp's olmoe reads the expert width from feed_forward_length
    return _common(cfg, cfg["intermediate_size"], _get(cfg, "num_experts", "num_local_experts"))


def _mixtral(cfg: dict) -> List[Hparam]:
    from gguf import Keys

    if cfg.get("sliding_window"):
        raise ConvertError("mixtral with a sliding window is not supported by this converter")
    return _common(cfg, cfg["intermediate_size"], _get(cfg, "num_local_experts", "num_experts")) + [
        Hparam(Keys.Rope.DIMENSION_COUNT, head_dim(cfg), "u32"),
    ]


def _deepseek2(name: str) -> Callable:
    """deepseek2.py's function `name`, imported when called (that module builds on this one)."""
    def call(*args):
        from edgemoe.convert import deepseek2

        return getattr(deepseek2, name)(*args)
    return call


ARCHS: Dict[str, ArchSpec] = {
    "qwen3_moe": ArchSpec("qwen3_moe", "qwen3moe", _ATTN, "mlp.gate", "mlp.experts",
                          ("gate_proj", "up_proj", "down_proj"), _qwen3moe, norm_topk_prob=True),
    "qwen2_moe": ArchSpec("qwen2_moe", "qwen2moe", {**_ATTN, **_SHARED_EXPERT}, "mlp.gate", "mlp.experts",
                          ("gate_proj", "up_proj", "down_proj"), _qwen2moe, norm_topk_prob=False),
    "olmoe": ArchSpec("olmoe", "olmoe", _ATTN, "mlp.gate", "mlp.experts",
                      ("gate_proj", "up_proj", "down_proj"), _olmoe, norm_topk_prob=False),
    "mixtral": ArchSpec("mixtral", "llama", _ATTN, "block_sparse_moe.gate", "block_sparse_moe.experts",
                        ("w1", "w3", "w2"), _mixtral, norm_topk_prob=None, permute_qk=True),
    # routing keys (norm_topk_prob included) are deepseek2.py's
    "deepseek_v2": ArchSpec("deepseek_v2", "deepseek2", _MLA, "mlp.gate", "mlp.experts",
                            ("gate_proj", "up_proj", "down_proj"), _deepseek2("hparams"), norm_topk_prob=None,
                            splits={"self_attn.kv_b_proj": Split((T.ATTN_K_B, T.ATTN_V_B), _deepseek2("kv_b_shapes"),
                                                                 _deepseek2("split_kv_b"))},
                            first_moe_layer=_deepseek2("first_moe_layer"), check=_deepseek2("check_checkpoint")),
}


def arch_for(cfg: dict) -> ArchSpec:
    mt = cfg.get("model_type")
    if mt not in ARCHS:
        raise ConvertError(f"unsupported architecture {mt!r}; supported: {', '.join(sorted(ARCHS))}")
    spec = ARCHS[mt]
    if spec.norm_topk_prob is not None and bool(cfg.get("norm_topk_prob", spec.norm_topk_prob)) != spec.norm_topk_prob:
        raise ConvertError(f"{mt} with norm_topk_prob={cfg.get('norm_topk_prob')} differs from llama.cpp's "
                           f"{spec.gguf_arch} graph (norm_topk_prob={spec.norm_topk_prob})")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConvertError(f"{mt} with hidden_act={act!r} is not supported (llama.cpp uses SiLU)")
    return spec
