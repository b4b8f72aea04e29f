"""A Read-ME checkpoint (docs/readme-checkpoint.md) as a GGUF plan: a bailingmoe backbone whose
routes come from the embedded router.

bailingmoe is llama attention plus routed experts and an always-on shared expert, the shape of
a Read-ME layer (the chosen expert plus the residual). The backbone has no gate of its own:
`ffn_gate_inp` is written as zeros, so the softmax is uniform and, with top-1 and weight
normalisation, the chosen expert's weight is exactly 1 whichever expert the routes name.
`edgemoe.router_decoupled` tells the runtime that those routes must come from the router.
"""

from __future__ import annotations

import os
from typing import List, Optional, Set, Tuple

import numpy as np

from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType as VT
from gguf import Keys
from gguf import MODEL_TENSOR as T

from edgemoe.convert.hf import (_FILE_TYPE, _IGNORED, _KEEP_F32, FLOAT_TYPES, HFPlan, _gguf_name, _permute_rope,
                                _source_float)
from edgemoe.convert.hf_archs import head_dim, rope_theta
from edgemoe.convert.readme_experts import LayerExperts, plan_layer, shared_count
from edgemoe.convert.readme_router import PREFIX as ROUTER_PREFIX
from edgemoe.convert.readme_router import router_from_checkpoint
from edgemoe.convert.safetensors import Checkpoint
from edgemoe.convert.hf_archs import _ATTN as HF_ATTN
from edgemoe.convert.tokenizer import load_vocab
from edgemoe.convert.writer import KV, TensorPlan, encode
from edgemoe.errors import ConvertError
from edgemoe.model_router import DECOUPLED_KEY

GGUF_ARCH = "bailingmoe"

# Llama's attention names, as convert maps them for the other architectures; a Llama has no
# q/k norms
_ATTN = {k: v for k, v in HF_ATTN.items() if v not in (T.ATTN_Q_NORM, T.ATTN_K_NORM)}


def is_readme_config(cfg: dict) -> bool:
    return bool(cfg.get("add_cluster_predictor"))


def _check_backbone(cfg: dict) -> None:
    if cfg.get("model_type") != "llama":
        raise ConvertError(f"a Read-ME checkpoint is a llama model; this one is {cfg.get('model_type')!r}")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConvertError("Read-ME llama with attention_bias or mlp_bias is not supported by llama.cpp's bailingmoe graph")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConvertError(f"llama with hidden_act={act!r} is not supported (llama.cpp uses SiLU)")


def _hparams(cfg: dict, n_expert: int, n_ff_exp: int, n_shared: int) -> List[KV]:
    L, A = Keys.LLM, Keys.Attention
    n_head = int(cfg["num_attention_heads"])
    hd = head_dim(cfg)
    items = [
        (L.CONTEXT_LENGTH, int(cfg.get("max_position_embeddings") or 4096), VT.UINT32),
        (L.EMBEDDING_LENGTH, int(cfg["hidden_size"]), VT.UINT32),
        (L.BLOCK_COUNT, int(cfg["num_hidden_layers"]), VT.UINT32),
        (L.FEED_FORWARD_LENGTH, int(cfg["intermediate_size"]), VT.UINT32),
        (A.HEAD_COUNT, n_head, VT.UINT32),
        (A.HEAD_COUNT_KV, int(cfg.get("num_key_value_heads") or n_head), VT.UINT32),
        (A.KEY_LENGTH, hd, VT.UINT32),
        (A.VALUE_LENGTH, hd, VT.UINT32),
        (Keys.Rope.DIMENSION_COUNT, hd, VT.UINT32),
        (Keys.Rope.FREQ_BASE, rope_theta(cfg), VT.FLOAT32),
        (A.LAYERNORM_RMS_EPS, float(cfg.get("rms_norm_eps") or 1e-6), VT.FLOAT32),
        (L.EXPERT_COUNT, n_expert, VT.UINT32),
        (L.EXPERT_USED_COUNT, 1, VT.UINT32),
        (L.EXPERT_FEED_FORWARD_LENGTH, n_ff_exp, VT.UINT32),
        (L.EXPERT_SHARED_COUNT, n_shared, VT.UINT32),
        (L.EXPERT_WEIGHTS_SCALE, 1.0, VT.FLOAT32),
        (L.EXPERT_WEIGHTS_NORM, True, VT.BOOL),
    ]
    return [(k.format(arch=GGUF_ARCH), v, t, None) for k, v, t in items]


def plan_readme(directory: str, ckpt: Checkpoint, cfg: dict, outtype: Optional[str]) -> HFPlan:
    """The GGUF plan of a Read-ME checkpoint, its router included (HFPlan.router)."""
    _check_backbone(cfg)
    wtype = FLOAT_TYPES[outtype] if outtype else _source_float(ckpt)
    n_layer = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    n_cluster = int(cfg.get("N_cluster") or 0)
    if n_cluster <= 0:
        raise ConvertError("config.json has add_cluster_predictor but no N_cluster")
    used: Set[str] = set()
    plans: List[TensorPlan] = []

    def add(t: T, bid: Optional[int], shape: Tuple[int, ...], make) -> None:
        qtype = QType.F32 if len(shape) == 1 or t in _KEEP_F32 else wtype
        plans.append(TensorPlan(_gguf_name(t, bid, "weight"), tuple(int(s) for s in shape), qtype,
                                lambda: encode(make(), qtype)))

    def add_plain(name: str, t: T, bid: Optional[int], fix=None) -> None:
        if name not in ckpt:
            raise ConvertError(f"{directory}: tensor {name} is missing")
        used.add(name)
        add(t, bid, tuple(ckpt.shape(name)),
            lambda: (fix or (lambda d: d))(ckpt.tensor(name).astype(np.float32, copy=False)))

    add_plain("model.embed_tokens.weight", T.TOKEN_EMBD, None)
    n_vocab, n_embd = (int(x) for x in ckpt.shape("model.embed_tokens.weight"))
    layers: List[LayerExperts] = []
    for i in range(n_layer):
        prefix = f"model.layers.{i}."
        for hf, t in _ATTN.items():
            fix = None
            if t in (T.ATTN_Q, T.ATTN_K):  # bailingmoe ropes adjacent pairs, HF the two halves
                fix = (lambda d, h=n_head if t == T.ATTN_Q else n_head_kv: _permute_rope(d, h))
            add_plain(f"{prefix}{hf}.weight", t, i, fix)
        layers.append(plan_layer(ckpt, i, n_cluster, n_embd, used, directory))
        # a layer saved with remove_dense=False keeps its masked dense MLP, which its MoE replaces
        used.update(n for n in ckpt.names() if n.startswith(prefix + "mlp."))
    add_plain("model.norm.weight", T.OUTPUT_NORM, None)
    add_plain("lm_head.weight" if "lm_head.weight" in ckpt else "model.embed_tokens.weight", T.OUTPUT, None)

    # one expert width and one shared count for all layers, as bailingmoe's keys have them
    n_ff_exp = max(layer.expert_width(ckpt) for layer in layers)
    n_shared = max(shared_count(layer.residual_width(ckpt), n_ff_exp) for layer in layers)
    for i, layer in enumerate(layers):
        _plan_moe(add, ckpt, i, layer, n_cluster, n_embd, n_ff_exp, n_shared)

    router = router_from_checkpoint(ckpt, cfg, n_vocab, n_layer, used, directory)
    leftover = sorted(n for n in ckpt.names() if n not in used and not _IGNORED.search(n))
    if leftover:
        what = "the Read-ME router" if leftover[0].startswith(ROUTER_PREFIX) else "a Read-ME llama"
        raise ConvertError(f"{directory}: tensor {leftover[0]} has no GGUF counterpart in {what}")

    vocab = load_vocab(directory, cfg)
    vocab.pad_to(n_vocab)
    kv: List[KV] = [
        (Keys.General.NAME, os.path.basename(os.path.abspath(directory)), VT.STRING, None),
        (Keys.General.FILE_TYPE, int(_FILE_TYPE[wtype]), VT.UINT32, None),
        *_hparams(cfg, n_cluster, n_ff_exp, n_shared),
        (Keys.LLM.VOCAB_SIZE.format(arch=GGUF_ARCH), n_vocab, VT.UINT32, None),
        (DECOUPLED_KEY, True, VT.BOOL, None),
        *vocab.kv_items(),
    ]
    return HFPlan(arch=GGUF_ARCH, kv=kv, tensors=plans, n_vocab=n_vocab, n_expert=n_cluster, n_expert_used=1,
                  moe_layers=tuple(range(n_layer)), router=router)


def _plan_moe(add, ckpt: Checkpoint, i: int, layer: LayerExperts, n_expert: int, n_embd: int, n_ff_exp: int,
              n_shared: int) -> None:
    add(T.FFN_GATE_INP, i, (n_expert, n_embd), lambda: np.zeros((n_expert, n_embd), np.float32))
    for proj, t in (("gate", T.FFN_GATE_EXP), ("up", T.FFN_UP_EXP), ("down", T.FFN_DOWN_EXP)):
        shape = (n_expert, n_embd, n_ff_exp) if proj == "down" else (n_expert, n_ff_exp, n_embd)
        add(t, i, shape, lambda proj=proj: np.stack([e.rows(ckpt, proj, n_ff_exp) for e in layer.experts]))
    width = n_ff_exp * n_shared
    for proj, t in (("gate", T.FFN_GATE_SHEXP), ("up", T.FFN_UP_SHEXP), ("down", T.FFN_DOWN_SHEXP)):
        shape = (n_embd, width) if proj == "down" else (width, n_embd)
        if layer.residual is None:
            add(t, i, shape, lambda shape=shape: np.zeros(shape, np.float32))
        else:
            add(t, i, shape, lambda proj=proj: layer.residual.rows(ckpt, proj, width))
