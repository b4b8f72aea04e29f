"""A GGUF MoE model read back into Hugging Face terms: the transformers config its keys
describe, and each tensor dequantized under its HF name.

The name mapping is `edgemoe convert`'s (edgemoe.convert.hf_archs) run backwards, so a GGUF
that `convert` writes from a checkpoint reads back into the same model; llama.cpp's llama
arch (Mixtral) gets its q/k rows un-permuted, the inverse of convert's `_permute_rope`, and
deepseek2's attn_k_b / attn_v_b are joined back into kv_b_proj (the inverse of
edgemoe.convert.deepseek2.split_kv_b), its YaRN keys solved back into the rope parameters
that make transformers compute the graph's cos/sin and softmax scales.
Experts go to transformers' in-memory layout: `mlp.experts.gate_up_proj` [E, 2 ff, n_embd]
(gate rows first) and `mlp.experts.down_proj` [E, n_embd, ff]. This module needs no torch.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Tuple

import numpy as np

import gguf
from gguf import MODEL_TENSOR as T
from gguf import TENSOR_NAMES

from edgemoe.convert.hf_archs import ARCHS, ArchSpec
from edgemoe.tune.options import TuneError

GATE = re.compile(r"^blk\.(\d+)\.ffn_gate_inp\.weight$")
_BLK = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_EXPERT_ROLES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps")


def _role(t: T) -> str:
    """llama.cpp's per-layer tensor name without `blk.{bid}.`: MODEL_TENSOR.ATTN_Q -> attn_q."""
    return TENSOR_NAMES[t].split(".", 2)[2]


@dataclass(frozen=True)
class GGUFModel:
    """What a GGUF holds, in the terms tune-router trains in."""

    path: str
    arch: str                     # llama.cpp architecture
    spec: ArchSpec                # the HF architecture convert maps it from
    config: dict                  # transformers config fields (model_type included)
    n_expert: int
    top_k: int
    gates: Dict[int, str]         # MoE layer -> its ffn_gate_inp tensor
    permute_heads: Dict[str, int]  # role -> heads, for q/k rows to un-permute (llama arch)


def open_reader(path: str) -> "gguf.GGUFReader":
    from edgemoe.convert.gguf_source import open_gguf
    from edgemoe.errors import EdgemoeError

    try:
        return open_gguf(path)
    except EdgemoeError as e:
        raise TuneError(str(e)) from None


def _keys(reader) -> dict:
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def _spec_for(arch: str, path: str) -> ArchSpec:
    specs = [s for s in ARCHS.values() if s.gguf_arch == arch]
    if not specs:
        readable = sorted({s.gguf_arch for s in ARCHS.values() if s.gguf_arch in _CONFIGS})
        raise TuneError(f"{os.path.basename(path)}: unsupported architecture {arch!r} for tune-router; "
                        f"supported GGUF architectures: {', '.join(readable)}")
    if arch not in _CONFIGS:
        raise TuneError(f"{os.path.basename(path)}: tune-router cannot read {arch} GGUFs back into "
                        f"transformers yet; tune its Hugging Face checkpoint instead")
    return specs[0]


def describe(path: str, reader=None) -> GGUFModel:
    """Checks that `path` is an MoE GGUF tune-router can train, and reads its shape."""
    reader = reader or open_reader(path)
    keys = _keys(reader)
    arch = str(keys.get(gguf.Keys.General.ARCHITECTURE, ""))
    name = os.path.basename(path)
    gates = {int(m.group(1)): t.name for t in reader.tensors if (m := GATE.match(t.name))}
    n_expert = int(keys.get(f"{arch}.expert_count", 0) or 0)
    if not gates or n_expert == 0:
        raise TuneError(f"{name} is a dense model (no routed experts): tune-router tunes MoE routers")
    if keys.get("edgemoe.router_decoupled") or any(k.startswith("edgemoe.router.") for k in keys):
        raise TuneError(f"{name} is routed by its embedded router (router-decoupled): "
                        f"its ffn_gate_inp tensors choose no experts, so there is nothing to tune")
    spec = _spec_for(arch, path)
    top_k = int(keys.get(f"{arch}.expert_used_count", 0) or 0)
    if not 0 < top_k < n_expert:
        raise TuneError(f"{name}: top-{top_k} of {n_expert} experts leaves no choice to tune")
    by_name = {t.name: t for t in reader.tensors}
    n_vocab = int(by_name["token_embd.weight"].shape[-1]) if "token_embd.weight" in by_name else 0
    if n_vocab == 0:
        raise TuneError(f"{name} has no token_embd.weight")
    cfg = _CONFIGS[arch](_Keys(keys, arch, name), by_name)
    cfg.update(model_type=spec.model_type, vocab_size=n_vocab, num_experts_per_tok=top_k,
               tie_word_embeddings="output.weight" not in by_name, use_cache=False,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)
    permute = {}
    if spec.permute_qk:
        permute = {_role(T.ATTN_Q): cfg["num_attention_heads"], _role(T.ATTN_K): cfg["num_key_value_heads"]}
    return GGUFModel(path=path, arch=arch, spec=spec, config=cfg, n_expert=n_expert, top_k=top_k,
                     gates=gates, permute_heads=permute)


class _Keys:
    """The GGUF's keys of one architecture, with one-line errors for missing ones."""

    def __init__(self, keys: dict, arch: str, name: str):
        self.keys, self.arch, self.name = keys, arch, name

    def __call__(self, key: str, default=None):
        full = f"{self.arch}.{key}"
        if full in self.keys:
            return self.keys[full]
        if default is None:
            raise TuneError(f"{self.name} lacks the key {full}")
        return default


def _common(k: _Keys) -> dict:
    n_head = int(k("attention.head_count"))
    return dict(hidden_size=int(k("embedding_length")), num_hidden_layers=int(k("block_count")),
                num_attention_heads=n_head, num_key_value_heads=int(k("attention.head_count_kv", n_head)),
                max_position_embeddings=int(k("context_length")), rms_norm_eps=float(k("attention.layer_norm_rms_epsilon")),
                rope_parameters={"rope_type": "default", "rope_theta": float(k("rope.freq_base", 10000.0))})


def _qwen3moe(k: _Keys, tensors) -> dict:
    common = _common(k)
    head_dim = int(k("attention.key_length", common["hidden_size"] // common["num_attention_heads"]))
    return {**common, "num_experts": int(k("expert_count")), "moe_intermediate_size": int(k("expert_feed_forward_length")),
            "intermediate_size": int(k("feed_forward_length")), "head_dim": head_dim,
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}


def _qwen2moe(k: _Keys, tensors) -> dict:
    return {**_common(k), "num_experts": int(k("expert_count")), "moe_intermediate_size": int(k("expert_feed_forward_length")),
            "intermediate_size": int(k("feed_forward_length", 1)),
            "shared_expert_intermediate_size": int(k("expert_shared_feed_forward_length")),
            "qkv_bias": "blk.0.attn_q.bias" in tensors, "norm_topk_prob": False, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "use_sliding_window": False}


def _olmoe(k: _Keys, tensors) -> dict:
    return {**_common(k), "num_experts": int(k("expert_count")), "intermediate_size": int(k("feed_forward_length")),
            "norm_topk_prob": False, "clip_qkv": None, "attention_bias": "blk.0.attn_q.bias" in tensors}


def _llama(k: _Keys, tensors) -> dict:
    common = _common(k)
    head_dim = int(k("rope.dimension_count", common["hidden_size"] // common["num_attention_heads"]))
    return {**common, "num_local_experts": int(k("expert_count")), "intermediate_size": int(k("feed_forward_length")),
            "head_dim": head_dim, "sliding_window": None}


def _deepseek2(k: _Keys, tensors) -> dict:
    if int(k("expert_gating_func", int(gguf.ExpertGatingFuncType.SOFTMAX))) != int(gguf.ExpertGatingFuncType.SOFTMAX):
        raise TuneError(f"{k.name}: deepseek2 with sigmoid gating (DeepSeek-V3) is not supported; DeepSeek-V2 routes by softmax")
    if int(k("expert_group_count", 1)) > 1 and int(k("expert_group_used_count", 1)) < int(k("expert_group_count", 1)):
        raise TuneError(f"{k.name}: deepseek2 with expert groups left out is not supported")
    common = _common(k)
    rope = int(k("rope.dimension_count"))
    n_head = common["num_attention_heads"]
    norm = bool(k("expert_weights_norm", False))
    cfg = {**common, "num_key_value_heads": n_head,  # the GGUF's 1 is MLA run as MQA; HF counts heads
           "n_routed_experts": int(k("expert_count")), "n_shared_experts": int(k("expert_shared_count")),
           "first_k_dense_replace": int(k("leading_dense_block_count", 0)),
           "moe_intermediate_size": int(k("expert_feed_forward_length")),
           "intermediate_size": int(k("feed_forward_length")),
           "kv_lora_rank": int(k("attention.kv_lora_rank")), "q_lora_rank": int(k("attention.q_lora_rank", 0)) or None,
           "qk_rope_head_dim": rope, "qk_nope_head_dim": int(k("attention.key_length_mla")) - rope,
           "v_head_dim": int(k("attention.value_length_mla")), "norm_topk_prob": norm,
           "routed_scaling_factor": 1.0 if norm else float(k("expert_weights_scale", 1.0)),
           "topk_method": "greedy", "n_group": 1, "topk_group": 1, "attention_bias": False, "mlp_bias": False}
    if str(k("rope.scaling.type", "none")) == "yarn":
        cfg["rope_parameters"] = _deepseek2_yarn(k, cfg["rope_parameters"]["rope_theta"])
    return cfg


def _deepseek2_yarn(k: _Keys, theta: float) -> dict:
    """transformers' yarn parameters that give the deepseek2 graph's scales: cos/sin by
    `attention_factor`, the softmax by mscale(mscale_all_dim)^2. The graph scales cos/sin by
    a (attn_factor) and the softmax by (a (1 + L ln factor))^2 with L the stored
    yarn_log_multiplier, or, without that key, both by a * mscale(1) (plain YaRN)."""
    factor = float(k("rope.scaling.factor"))
    ln = math.log(factor)
    a = float(k("rope.scaling.attn_factor", 1.0))
    log_mul = k.keys.get(f"{k.arch}.rope.scaling.yarn_log_multiplier")
    if log_mul is not None:
        cos_sin, sqrt_softmax = a, a * (1.0 + float(log_mul) * ln)
    else:
        cos_sin = sqrt_softmax = a * (1.0 + 0.1 * ln)
    out = {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
           "original_max_position_embeddings": int(k("rope.scaling.original_context_length")),
           "beta_fast": float(k("rope.scaling.yarn_beta_fast", 32.0)), "beta_slow": float(k("rope.scaling.yarn_beta_slow", 1.0)),
           "attention_factor": cos_sin}
    m_all = (sqrt_softmax - 1.0) / (0.1 * ln)
    if abs(m_all) > 1e-6:  # float32 keys leave a residue where the graph has no softmax mscale
        out["mscale_all_dim"] = m_all
    return out


# llama.cpp architecture -> transformers config fields from its keys
_CONFIGS: Dict[str, Callable[[_Keys, dict], dict]] = {
    "qwen3moe": _qwen3moe, "qwen2moe": _qwen2moe, "olmoe": _olmoe, "llama": _llama, "deepseek2": _deepseek2,
}


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of convert's `_permute_rope`: llama.cpp's adjacent pairs back to HF's halves."""
    out, n_in = w.shape[0], w.shape[-1]
    hd = out // n_head
    return w.reshape(n_head, hd // 2, 2, n_in).swapaxes(1, 2).reshape(out, n_in)


def _join_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """attn_k_b [n_head, rank, nope] (transposed per head) and attn_v_b [n_head, v, rank] back
    into kv_b_proj [n_head * (nope + v), rank]."""
    per_head = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)
    return per_head.reshape(-1, per_head.shape[-1])


# llama.cpp roles that are parts of one HF tensor: (roles in order) -> (HF name, join)
_JOINS = {("attn_k_b", "attn_v_b"): ("self_attn.kv_b_proj", _join_kv_b)}


def dequantize(t) -> np.ndarray:
    """A GGUF tensor as float32 in numpy order (GGUF's ne reversed)."""
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    try:
        data = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType(t.tensor_type))
    except NotImplementedError:
        raise TuneError(f"tensor {t.name}: gguf cannot dequantize {gguf.GGMLQuantizationType(t.tensor_type).name}") from None
    # writable: torch refuses read-only numpy memory (an F32 tensor is a view of the mapped file)
    return np.require(data, np.float32, ["C", "W"]).reshape(shape)


def _layer_names(spec: ArchSpec) -> Dict[str, str]:
    """llama.cpp role -> HF name inside `model.layers.{i}.`, routers and experts excluded."""
    return {_role(t): hf for hf, t in spec.layer_map.items()}


def hf_tensors(model: GGUFModel, reader) -> Iterator[Tuple[str, np.ndarray]]:
    """(HF parameter name, float32 array) for every tensor of the model, one layer's experts
    at a time; a tensor with no HF counterpart is refused rather than dropped."""
    roles = _layer_names(model.spec)
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    pending: Dict[Tuple[int, str], object] = {}
    for t in reader.tensors:
        if t.name.startswith("edgemoe."):
            continue
        if t.name in top:
            yield top[t.name], dequantize(t)
            continue
        m = _BLK.match(t.name)
        if m is None:
            raise TuneError(f"{os.path.basename(model.path)}: tensor {t.name} has no transformers counterpart")
        i, role, suffix = int(m.group(1)), m.group(2), m.group(3)
        prefix = f"model.layers.{i}."
        if role == "ffn_gate_inp":
            yield prefix + "mlp.gate.weight", dequantize(t)
        elif role in _EXPERT_ROLES and suffix == "weight":
            pending[(i, role)] = t
            yield from _experts(prefix, i, pending)
        elif any(role in parts for parts in _JOINS) and suffix == "weight":
            pending[(i, role)] = t
            for parts, (hf, join) in _JOINS.items():
                if all((i, r) in pending for r in parts):
                    yield f"{prefix}{hf}.weight", join(*(dequantize(pending.pop((i, r))) for r in parts))
        elif role in roles:
            data = dequantize(t)
            if role in model.permute_heads and suffix == "weight":
                data = _unpermute_rope(data, model.permute_heads[role])
            yield f"{prefix}{roles[role]}.{suffix}", data
        else:
            raise TuneError(f"{os.path.basename(model.path)}: tensor {t.name} has no transformers counterpart "
                            f"in {model.spec.model_type}")
    if pending:
        (i, role), _ = next(iter(pending.items()))
        raise TuneError(f"{os.path.basename(model.path)}: layer {i} has {role} without its other expert tensors")


def _experts(prefix: str, i: int, pending: Dict[Tuple[int, str], object]) -> Iterator[Tuple[str, np.ndarray]]:
    """Yields a layer's fused tensors once their parts are all read."""
    if (i, "ffn_down_exps") in pending:
        yield prefix + "mlp.experts.down_proj", dequantize(pending.pop((i, "ffn_down_exps")))
    if (i, "ffn_gate_up_exps") in pending:
        yield prefix + "mlp.experts.gate_up_proj", dequantize(pending.pop((i, "ffn_gate_up_exps")))
    elif (i, "ffn_gate_exps") in pending and (i, "ffn_up_exps") in pending:
        gate = dequantize(pending.pop((i, "ffn_gate_exps")))
        up = dequantize(pending.pop((i, "ffn_up_exps")))
        yield prefix + "mlp.experts.gate_up_proj", np.concatenate([gate, up], axis=1)
