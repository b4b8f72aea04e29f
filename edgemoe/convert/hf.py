"""A Hugging Face MoE checkpoint directory as a GGUF plan: keys and tensors, in llama.cpp's names.

Experts are stacked into one `[n_expert, rows, cols]` tensor per projection and layer, as
llama.cpp's `*_exps` tensors are; both checkpoint layouts are read: one tensor per expert
(what `save_pretrained` writes) and the fused `experts.gate_up_proj` / `experts.down_proj`
layout of transformers' in-memory modules.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Set, Tuple

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType as VT
from gguf import MODEL_TENSOR as T
from gguf import TENSOR_NAMES

from edgemoe.convert.hf_archs import ArchSpec, arch_for
from edgemoe.convert.safetensors import Checkpoint
from edgemoe.convert.tokenizer import load_vocab
from edgemoe.convert.writer import KV, TensorPlan, encode
from edgemoe.errors import ConvertError
from edgemoe.router_format import Router

FLOAT_TYPES = {"f32": QType.F32, "f16": QType.F16, "bf16": QType.BF16}
_FILE_TYPE = {QType.F32: gguf.LlamaFileType.ALL_F32, QType.F16: gguf.LlamaFileType.MOSTLY_F16,
              QType.BF16: gguf.LlamaFileType.MOSTLY_BF16}
# tensors that stay f32 whatever the output type: routing decisions are sensitive to them
_KEEP_F32 = {T.FFN_GATE_INP, T.FFN_GATE_INP_SHEXP}
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def is_checkpoint_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def load_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{path} is not a JSON object")
    return cfg


def _gguf_name(t: T, bid: Optional[int], suffix: str) -> str:
    base = TENSOR_NAMES[t]
    return (base.format(bid=bid) if bid is not None else base) + "." + suffix


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotates the two halves of each head; llama.cpp's llama graph rotates adjacent pairs."""
    out, n_in = w.shape[0], w.shape[-1]
    hd = out // n_head
    return w.reshape(n_head, 2, hd // 2, n_in).swapaxes(1, 2).reshape(out, n_in)


def _source_float(ckpt: Checkpoint) -> QType:
    dtypes = {ckpt.dtype(n) for n in ckpt.names()}
    if "BF16" in dtypes:
        return QType.BF16
    if dtypes <= {"F16"}:
        return QType.F16
    return QType.F32


@dataclass
class HFPlan:
    arch: str
    kv: List[KV]
    tensors: List[TensorPlan]
    n_vocab: int
    n_expert: int
    n_expert_used: int
    moe_layers: Tuple[int, ...]
    router: Optional[Router] = None  # a router the checkpoint carries (Read-ME)


def plan_checkpoint(directory: str, ckpt: Checkpoint, outtype: Optional[str]) -> HFPlan:
    """Everything needed to write `directory`'s model as GGUF with float type `outtype`
    (None: the checkpoint's own float type)."""
    cfg = load_config(directory)
    from edgemoe.convert.readme_ckpt import is_readme_config, plan_readme  # it builds on this module

    if is_readme_config(cfg):
        return plan_readme(directory, ckpt, cfg, outtype)
    spec = arch_for(cfg)
    if spec.check is not None:
        spec.check(cfg, ckpt)
    wtype = FLOAT_TYPES[outtype] if outtype else _source_float(ckpt)
    n_layer = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    used: Set[str] = set()  # checkpoint tensors some plan reads; the rest must be ignorable
    plans: List[TensorPlan] = []
    take = ckpt.tensor

    def add(t: T, bid: Optional[int], suffix: str, shape: Tuple[int, ...], make: Callable[[], np.ndarray]) -> None:
        qtype = QType.F32 if len(shape) == 1 or t in _KEEP_F32 else wtype
        plans.append(TensorPlan(_gguf_name(t, bid, suffix), tuple(int(s) for s in shape), qtype,
                                lambda: encode(make(), qtype)))

    def add_plain(hf_name: str, t: T, bid: Optional[int], suffix: str, fix=None) -> None:
        shape = tuple(ckpt.shape(hf_name))
        if t == T.FFN_GATE_INP_SHEXP:
            shape = (int(np.prod(shape)),)  # [1, n_embd] in HF, a vector in llama.cpp
        used.add(hf_name)

        def make(hf_name=hf_name, shape=shape, fix=fix):
            data = take(hf_name).astype(np.float32, copy=False)
            if fix is not None:
                data = fix(data)
            return data.reshape(shape)

        add(t, bid, suffix, shape, make)

    # embeddings and output
    if "model.embed_tokens.weight" not in ckpt:
        raise ConvertError(f"{directory}: tensor model.embed_tokens.weight is missing")
    n_vocab = int(ckpt.shape("model.embed_tokens.weight")[0])
    add_plain("model.embed_tokens.weight", T.TOKEN_EMBD, None, "weight")
    first_moe = spec.first_moe_layer(cfg)
    n_expert = 0
    for i in range(n_layer):
        prefix = f"model.layers.{i}."
        for hf, t in spec.layer_map.items():
            for suffix in ("weight", "bias"):
                name = f"{prefix}{hf}.{suffix}"
                if name not in ckpt:
                    continue
                fix = None
                if spec.permute_qk and t in (T.ATTN_Q, T.ATTN_K):
                    heads = n_head if t == T.ATTN_Q else n_head_kv
                    fix = (lambda d, h=heads: _permute_rope(d.reshape(d.shape[0], -1), h).reshape(d.shape))
                add_plain(name, t, i, suffix, fix)
        for hf, split in spec.splits.items():
            name = f"{prefix}{hf}.weight"
            if name not in ckpt:
                continue
            used.add(name)
            for k, (t, shape) in enumerate(zip(split.parts, split.shapes(cfg, tuple(ckpt.shape(name))))):
                add(t, i, "weight", shape, lambda name=name, split=split, k=k:
                    split.apply(cfg, take(name).astype(np.float32, copy=False))[k])
        if i < first_moe:
            continue  # a dense FFN layer: its tensors are in the layer map
        router = next((f"{prefix}{r}.weight" for r in (spec.router, "mlp.gate") if f"{prefix}{r}.weight" in ckpt), None)
        if router is None:
            raise ConvertError(f"{directory}: layer {i} has no router tensor ({prefix}{spec.router}.weight)")
        add_plain(router, T.FFN_GATE_INP, i, "weight")
        n_expert = int(ckpt.shape(router)[0])
        _plan_experts(ckpt, spec, prefix, i, n_expert, used, add, directory)
    add_plain("model.norm.weight", T.OUTPUT_NORM, None, "weight")
    if "lm_head.weight" in ckpt:
        add_plain("lm_head.weight", T.OUTPUT, None, "weight")
    else:  # tied embeddings: llama.cpp's graphs for these archs want an output matrix
        add_plain("model.embed_tokens.weight", T.OUTPUT, None, "weight")

    leftover = sorted(n for n in ckpt.names() if n not in used and not _IGNORED.search(n))
    if leftover:
        raise ConvertError(f"{directory}: tensor {leftover[0]} has no GGUF counterpart for {spec.model_type}")

    vocab = load_vocab(directory, cfg)
    vocab.pad_to(n_vocab)
    kv: List[KV] = [
        (gguf.Keys.General.NAME, os.path.basename(os.path.abspath(directory)), VT.STRING, None),
        (gguf.Keys.General.FILE_TYPE, int(_FILE_TYPE[wtype]), VT.UINT32, None),
    ]
    for hp in spec.hparams(cfg):
        vtype = {"u32": VT.UINT32, "f32": VT.FLOAT32, "bool": VT.BOOL, "str": VT.STRING}[hp.kind]
        kv.append((hp.key.format(arch=spec.gguf_arch), hp.value, vtype, None))
    kv.append((gguf.Keys.LLM.VOCAB_SIZE.format(arch=spec.gguf_arch), n_vocab, VT.UINT32, None))
    kv.extend(vocab.kv_items())
    return HFPlan(arch=spec.gguf_arch, kv=kv, tensors=plans, n_vocab=n_vocab, n_expert=n_expert,
                  n_expert_used=int(cfg["num_experts_per_tok"]), moe_layers=tuple(range(first_moe, n_layer)))


def _plan_experts(ckpt: Checkpoint, spec: ArchSpec, prefix: str, i: int, n_expert: int, used: Set[str],
                  add, directory: str) -> None:
    take = ckpt.tensor
    gate, up, down = spec.expert_proj
    per_expert = f"{prefix}{spec.expert_prefix}.0.{gate}.weight"
    fused = next((f"{prefix}{p}.gate_up_proj" for p in (spec.expert_prefix, "mlp.experts")
                  if f"{prefix}{p}.gate_up_proj" in ckpt), None)
    if per_expert in ckpt:
        def names(proj):
            out = [f"{prefix}{spec.expert_prefix}.{e}.{proj}.weight" for e in range(n_expert)]
            for n in out:
                if n not in ckpt:
                    raise ConvertError(f"{directory}: tensor {n} is missing")
                used.add(n)
            return out

        for proj, t in ((gate, T.FFN_GATE_EXP), (up, T.FFN_UP_EXP), (down, T.FFN_DOWN_EXP)):
            ns = names(proj)
            rows, cols = ckpt.shape(ns[0])
            add(t, i, "weight", (n_expert, rows, cols),
                lambda ns=ns: np.stack([take(n).astype(np.float32, copy=False) for n in ns]))
    elif fused is not None:
        down_name = fused.replace("gate_up_proj", "down_proj")
        if down_name not in ckpt:
            raise ConvertError(f"{directory}: tensor {down_name} is missing")
        used.update((fused, down_name))
        e, two_ff, n_embd = ckpt.shape(fused)
        ff = two_ff // 2
        # transformers fuses [gate; up] along the rows of each expert
        add(T.FFN_GATE_EXP, i, "weight", (e, ff, n_embd), lambda: take(fused)[:, :ff, :].astype(np.float32))
        add(T.FFN_UP_EXP, i, "weight", (e, ff, n_embd), lambda: take(fused)[:, ff:, :].astype(np.float32))
        add(T.FFN_DOWN_EXP, i, "weight", tuple(ckpt.shape(down_name)), lambda: take(down_name).astype(np.float32))
    else:
        raise ConvertError(f"{directory}: layer {i} has no expert tensors ({per_expert})")
