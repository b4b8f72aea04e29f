"""DeepSeek-V2 checkpoints (`deepseek_v2`, DeepSeek-V2-Lite's layout) in llama.cpp's `deepseek2` terms.

MLA attention: the query comes from `q_proj`, or from `q_a_proj` -> `q_a_layernorm` -> `q_b_proj`
when `q_lora_rank` is set; `kv_a_proj_with_mqa` yields the compressed KV and the shared RoPE key
in one matrix (llama.cpp splits it with views, so it is written whole); `kv_b_proj` is split per
head into `attn_k_b` (transposed, for the absorbed query) and `attn_v_b`, the only form this
llama.cpp loads for MLA. MLA then runs as multi-query attention over the compressed KV: one KV
head of `kv_lora_rank + qk_rope_head_dim`. Both DeepSeek's code and transformers rotate
adjacent pairs (complex numbers), as llama.cpp's deepseek2 graph does, so nothing is permuted.

The refusals and the YaRN arithmetic below are where DeepSeek's published modeling code,
transformers and llama.cpp's graph read one config.json differently; the GGUF reproduces
DeepSeek's code wherever the graph can express it.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np

import gguf
from gguf import Keys

from edgemoe.convert.hf_archs import Hparam, _get
from edgemoe.convert.safetensors import Checkpoint
from edgemoe.errors import ConvertError

# llama.cpp's deepseek2 graph reads no yarn_beta_* keys: it always uses its defaults
_BETA_FAST, _BETA_SLOW = 32.0, 1.0


def _int(cfg: dict, name: str) -> int:
    return int(_get(cfg, name))


def first_moe_layer(cfg: dict) -> int:
    """Layers before this one have a dense FFN (`first_k_dense_replace`, llama.cpp's n_layer_dense_lead)."""
    return int(cfg.get("first_k_dense_replace") or 0)


def kv_b_shapes(cfg: dict, hf_shape: Tuple[int, ...]) -> Tuple[Tuple[int, ...], ...]:
    """numpy shapes of attn_k_b [n_head, kv_lora_rank, nope] and attn_v_b [n_head, v_head_dim, kv_lora_rank]."""
    n_head, rank = _int(cfg, "num_attention_heads"), _int(cfg, "kv_lora_rank")
    nope, v = _int(cfg, "qk_nope_head_dim"), _int(cfg, "v_head_dim")
    if tuple(hf_shape) != (n_head * (nope + v), rank):
        raise ConvertError(f"kv_b_proj has shape {list(hf_shape)}; config.json implies "
                           f"[{n_head * (nope + v)}, {rank}] (heads x (qk_nope_head_dim + v_head_dim), kv_lora_rank)")
    return (n_head, rank, nope), (n_head, v, rank)


def split_kv_b(cfg: dict, w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """kv_b_proj [n_head * (nope + v), rank] -> k_b (transposed per head) and v_b."""
    n_head, nope = _int(cfg, "num_attention_heads"), _int(cfg, "qk_nope_head_dim")
    per_head = w.reshape(n_head, -1, w.shape[-1])
    return per_head[:, :nope, :].transpose(0, 2, 1), per_head[:, nope:, :]


def check_checkpoint(cfg: dict, ckpt: Checkpoint) -> None:
    """The query path the tensors take agrees with q_lora_rank (llama.cpp picks it by the key)."""
    lora = cfg.get("q_lora_rank") is not None
    want, other = ("q_a_proj", "q_proj") if lora else ("q_proj", "q_a_proj")
    name = f"model.layers.0.self_attn.{want}.weight"
    if name not in ckpt:
        why = f"q_lora_rank={cfg['q_lora_rank']}" if lora else "q_lora_rank is null"
        found = f"; it has self_attn.{other}" if f"model.layers.0.self_attn.{other}.weight" in ckpt else ""
        raise ConvertError(f"{why} but the checkpoint lacks {name}{found}")


def _routing(cfg: dict) -> List[Hparam]:
    L = Keys.LLM
    n_layer = _int(cfg, "num_hidden_layers")
    n_expert, top_k = _int(cfg, "n_routed_experts"), _int(cfg, "num_experts_per_tok")
    if first_moe_layer(cfg) >= n_layer:
        raise ConvertError(f"deepseek_v2 with first_k_dense_replace={cfg['first_k_dense_replace']} of "
                           f"{n_layer} layers has no MoE layer")
    if int(cfg.get("moe_layer_freq") or 1) != 1:
        raise ConvertError(f"deepseek_v2 with moe_layer_freq={cfg['moe_layer_freq']} is not supported by "
                           "llama.cpp's deepseek2 graph (every layer after the dense ones is MoE)")
    n_shared = int(cfg.get("n_shared_experts") or 0)
    if n_shared < 1:
        raise ConvertError("deepseek_v2 without shared experts is not supported by llama.cpp's deepseek2 graph")
    scoring = cfg.get("scoring_func") or "softmax"
    if scoring != "softmax":
        raise ConvertError(f"deepseek_v2 with scoring_func={scoring!r} is not supported (DeepSeek-V2 routes by softmax)")
    method = cfg.get("topk_method") or "greedy"
    n_group, topk_group = int(cfg.get("n_group") or 1), int(cfg.get("topk_group") or 1)
    if method == "group_limited_greedy":
        # DeepSeek-V2 keeps the topk_group groups with the best single expert; llama.cpp's only
        # group rule is DeepSeek-V3's (the best two summed), so only a no-op grouping converts
        if n_group > 1 and topk_group < n_group:
            raise ConvertError(f"deepseek_v2 with topk_method 'group_limited_greedy' (n_group={n_group}, "
                               f"topk_group={topk_group}) is not supported: llama.cpp ranks expert groups by the sum "
                               "of their best two experts (DeepSeek-V3's rule), DeepSeek-V2 by their best one")
    elif method not in ("greedy", "gready"):  # DeepSeek's own code spells it "gready"
        raise ConvertError(f"deepseek_v2 with topk_method {method!r} is not supported; "
                           "greedy or group_limited_greedy are")
    # DeepSeek's gate either normalises the top-k weights or scales them by routed_scaling_factor,
    # never both (llama.cpp's converter writes both; transformers 5 ignores norm_topk_prob)
    norm = bool(cfg.get("norm_topk_prob")) and top_k > 1
    scale = 1.0 if norm else float(cfg.get("routed_scaling_factor") or 1.0)
    return [
        Hparam(L.EXPERT_COUNT, n_expert, "u32"),
        Hparam(L.EXPERT_USED_COUNT, top_k, "u32"),
        Hparam(L.LEADING_DENSE_BLOCK_COUNT, first_moe_layer(cfg), "u32"),
        Hparam(L.EXPERT_FEED_FORWARD_LENGTH, _int(cfg, "moe_intermediate_size"), "u32"),
        Hparam(L.EXPERT_SHARED_COUNT, n_shared, "u32"),
        Hparam(L.EXPERT_WEIGHTS_SCALE, scale, "f32"),
        Hparam(L.EXPERT_WEIGHTS_NORM, norm, "bool"),
        Hparam(L.EXPERT_GATING_FUNC, int(gguf.ExpertGatingFuncType.SOFTMAX), "u32"),
    ]


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 + 0.1 * mscale * math.log(factor)


def _yarn(cfg: dict, rp: dict) -> List[Hparam]:
    """YaRN keys that make llama.cpp's deepseek2 graph compute DeepSeek's attention scales.

    DeepSeek scales cos/sin by `r` = mscale(mscale) / mscale(mscale_all_dim) and the softmax by
    `s` = mscale(mscale_all_dim)^2 (1 without mscale_all_dim). The graph scales cos/sin by
    `attn_factor` (call it a) and the softmax by a^2 * (1 + 0.1 * log_mul * ln factor)^2: it
    assumes mscale == mscale_all_dim, as every published DeepSeek config has, and then a = 1,
    log_mul = mscale_all_dim, the keys llama.cpp's converter writes. Solving for any config:
    a = r and 1 + 0.1 * log_mul * ln factor = sqrt(s) / r. Without log_mul the graph takes the
    plain-YaRN path, cos/sin by a * mscale(1) and the softmax by (a * mscale(1))^2, which gives
    the same scales exactly when log_mul would be 0 (r = sqrt(s)), with a = r / mscale(1).
    """
    R = Keys.Rope
    n_ctx = _int(cfg, "max_position_embeddings")
    orig = int(cfg.get("original_max_position_embeddings") or rp.get("original_max_position_embeddings") or n_ctx)
    factor = float(rp.get("factor") or n_ctx / orig)
    if factor <= 1.0:
        raise ConvertError(f"yarn rope scaling with factor {factor:g} does not extend the context (factor must exceed 1)")
    beta = (float(rp.get("beta_fast") or _BETA_FAST), float(rp.get("beta_slow") or _BETA_SLOW))
    if beta != (_BETA_FAST, _BETA_SLOW):
        raise ConvertError(f"yarn rope scaling with beta_fast={beta[0]:g}, beta_slow={beta[1]:g} is not supported: "
                           f"llama.cpp's deepseek2 graph always uses {_BETA_FAST:g} and {_BETA_SLOW:g}")
    if rp.get("truncate") is False:
        raise ConvertError("yarn rope scaling with truncate=false is not supported (llama.cpp rounds the ramp ends)")
    m, m_all, attn = rp.get("mscale"), rp.get("mscale_all_dim"), rp.get("attention_factor")
    if attn is not None:
        r = float(attn)
    elif m and m_all:
        r = _yarn_mscale(factor, float(m)) / _yarn_mscale(factor, float(m_all))
    elif not m and not m_all:
        r = _yarn_mscale(factor, 1.0)
    else:
        # DeepSeek's code divides mscale(mscale) by mscale(mscale_all_dim) with a missing one as
        # 1 and 0; transformers then uses mscale(1) instead: the two disagree, so neither is guessed
        raise ConvertError("yarn rope scaling with only one of mscale and mscale_all_dim is ambiguous "
                           "(DeepSeek's code and transformers read it differently); set both")
    sqrt_s = _yarn_mscale(factor, float(m_all)) if m_all else 1.0
    log_mul = (sqrt_s / r - 1.0) / (0.1 * math.log(factor))
    out = [
        Hparam(R.SCALING_TYPE, "yarn", "str"),
        Hparam(R.SCALING_FACTOR, factor, "f32"),
        Hparam(R.SCALING_ORIG_CTX_LEN, orig, "u32"),
        Hparam(R.SCALING_YARN_BETA_FAST, _BETA_FAST, "f32"),
        Hparam(R.SCALING_YARN_BETA_SLOW, _BETA_SLOW, "f32"),
    ]
    if np.float32(0.1 * log_mul) != 0:
        # llama.cpp's converter stores 0.1 * mscale_all_dim here and the loader divides it back
        out.append(Hparam(R.SCALING_YARN_LOG_MUL, 0.1 * log_mul, "f32"))
        a = r
    else:
        a = r / _yarn_mscale(factor, 1.0)
    if a != 1.0:
        out.append(Hparam(R.SCALING_ATTN_FACTOR, a, "f32"))
    return out


def _rope(cfg: dict) -> List[Hparam]:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(rp.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    out = [Hparam(Keys.Rope.FREQ_BASE, theta, "f32"),
           Hparam(Keys.Rope.DIMENSION_COUNT, _int(cfg, "qk_rope_head_dim"), "u32")]
    kind = rp.get("rope_type") or rp.get("type") or "default"
    if kind == "yarn":
        return out + _yarn(cfg, rp)
    if kind != "default":
        # the graph's attention scale assumes YaRN whenever the rope is scaled
        raise ConvertError(f"deepseek_v2 with rope scaling {kind!r} is not supported (yarn or none)")
    return out


def hparams(cfg: dict) -> List[Hparam]:
    L, A = Keys.LLM, Keys.Attention
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConvertError("deepseek_v2 with attention_bias or mlp_bias is not supported by llama.cpp's deepseek2 graph")
    rank, rope = _int(cfg, "kv_lora_rank"), _int(cfg, "qk_rope_head_dim")
    nope, v = _int(cfg, "qk_nope_head_dim"), _int(cfg, "v_head_dim")
    return [
        Hparam(L.CONTEXT_LENGTH, _int(cfg, "max_position_embeddings"), "u32"),
        Hparam(L.EMBEDDING_LENGTH, _int(cfg, "hidden_size"), "u32"),
        Hparam(L.BLOCK_COUNT, _int(cfg, "num_hidden_layers"), "u32"),
        Hparam(L.FEED_FORWARD_LENGTH, _int(cfg, "intermediate_size"), "u32"),  # the dense layers'
        Hparam(A.HEAD_COUNT, _int(cfg, "num_attention_heads"), "u32"),
        Hparam(A.HEAD_COUNT_KV, 1, "u32"),
        Hparam(A.LAYERNORM_RMS_EPS, float(cfg.get("rms_norm_eps") or 1e-6), "f32"),
        # 0 for no query compression: llama.cpp requires the key unless the layer count is a Lite one's
        Hparam(A.Q_LORA_RANK, int(cfg.get("q_lora_rank") or 0), "u32"),
        Hparam(A.KV_LORA_RANK, rank, "u32"),
        Hparam(A.KEY_LENGTH, rank + rope, "u32"),
        Hparam(A.VALUE_LENGTH, rank, "u32"),
        Hparam(A.KEY_LENGTH_MLA, nope + rope, "u32"),
        Hparam(A.VALUE_LENGTH_MLA, v, "u32"),
    ] + _rope(cfg) + _routing(cfg)
