"""Read-ME's router (`cluster_predictor.*` in a checkpoint) as a router of docs/router-format.md.

Read-ME's `LlamaForCausalLM.add_cluster_predictor` builds, for `nonautoregressive` false, a
causal transformer over the token ids: an embedding of `embedding_dim`; per block an RMSNorm
(`input_layernorm_i`), q/k/v/o projections with biases, RoPE of head_dim = inter_dim / n_head
at the backbone's `rope_theta`, scores q.k / `normalizer`, a residual add, then an RMSNorm
(`post_attention_layernorm_i`), `proj_2(act(proj_1(x)))` with biases and a residual add; a
last RMSNorm (`out_layernorm`) and `proj_out` to N_cluster logits. Every RMSNorm has eps 1e-6.
Each block adds its input to the o-projection, so the format's one width needs
embedding_dim == inter_dim, which Read-ME's training scripts always use.
"""

from __future__ import annotations

from typing import Dict, Set, Tuple

import numpy as np

from edgemoe.convert.hf_archs import rope_theta
from edgemoe.convert.safetensors import Checkpoint
from edgemoe.errors import ConvertError
from edgemoe.router_format import Router, RouterHParams, bias_shapes, weight_shapes

PREFIX = "cluster_predictor."
RMS_EPS = 1e-6  # LlamaRMSNorm(..., eps=1e-6) throughout Read-ME's router
# transformers' ACT2FN names -> the format's activations (gelu_new / gelu_pytorch_tanh: tanh approximation)
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}


def _need(cfg: dict, key: str):
    if cfg.get(key) is None:
        raise ConvertError(f"config.json has add_cluster_predictor but lacks {key}")
    return cfg[key]


def router_hparams(cfg: dict, n_vocab: int) -> RouterHParams:
    if cfg.get("nonautoregressive"):
        raise ConvertError("Read-ME's non-autoregressive router (an ablation without attention) is not supported")
    emb, inter = int(_need(cfg, "embedding_dim")), int(_need(cfg, "inter_dim"))
    n_head, n_cluster = int(_need(cfg, "n_head")), int(_need(cfg, "N_cluster"))
    if emb != inter:
        raise ConvertError(f"Read-ME router with embedding_dim {emb} != inter_dim {inter} is not supported "
                           "(its blocks add the embedding to the attention output)")
    if n_head <= 0 or inter % n_head or (inter // n_head) % 2:
        raise ConvertError(f"Read-ME router: inter_dim {inter} does not split into {n_head} heads of even size")
    act = str(cfg.get("hidden_act_predictor") or "silu")
    if act not in _ACTIVATIONS:
        raise ConvertError(f"Read-ME router activation {act!r} is not supported (supported: {', '.join(_ACTIVATIONS)}; "
                           "'gelu' is the exact erf GELU, which the router format does not have)")
    normalizer = float(_need(cfg, "normalizer"))
    if not normalizer > 0:
        raise ConvertError(f"Read-ME router normalizer {normalizer} is not a positive number")
    return RouterHParams(
        n_vocab=n_vocab, n_ctx=int(cfg.get("max_position_embeddings_predictor") or 4096), n_embd=inter,
        n_layer=int(_need(cfg, "n_layer")), n_head=n_head, n_head_kv=n_head, n_ff=inter,
        rope_freq_base=rope_theta(cfg), rms_eps=RMS_EPS, activation=_ACTIVATIONS[act], n_choice=n_cluster,
        top_k=1, attention_scale=1.0 / normalizer)


def tensor_names(hp: RouterHParams) -> Dict[str, str]:
    """Format tensor name (without edgemoe.router.) -> checkpoint name, weights and biases."""
    names = {"token_embd.weight": "embed.weight", "output_norm.weight": "out_layernorm.weight",
             "head.weight": "proj_out.weight", "head.bias": "proj_out.bias"}
    for i in range(hp.n_layer):
        b = f"blk.{i}."
        names[b + "attn_norm.weight"] = f"input_layernorm_{i}.weight"
        names[b + "ffn_norm.weight"] = f"post_attention_layernorm_{i}.weight"
        for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"),
                             ("attn_output", "o_proj"), ("ffn_up", "proj_1"), ("ffn_down", "proj_2")):
            for kind in ("weight", "bias"):
                names[f"{b}{ours}.{kind}"] = f"{theirs}_{i}.{kind}"
    return {k: PREFIX + v for k, v in names.items()}


def router_from_checkpoint(ckpt: Checkpoint, cfg: dict, n_vocab: int, n_layer_backbone: int, used: Set[str],
                           directory: str) -> Router:
    """The readme router: choice c is expert c of every MoE layer, beside the residual expert.
    Weights stay f32 whatever the output type: routing decisions are sensitive to them."""
    hp = router_hparams(cfg, n_vocab)
    shapes: Dict[str, Tuple[int, ...]] = {**weight_shapes(hp), **bias_shapes(hp)}
    weights: Dict[str, np.ndarray] = {}
    for ours, theirs in tensor_names(hp).items():
        if theirs not in ckpt:
            raise ConvertError(f"{directory}: tensor {theirs} is missing")
        got = tuple(ckpt.shape(theirs))
        if got != shapes[ours]:
            raise ConvertError(f"{directory}: tensor {theirs} has shape {list(got)}, expected {list(shapes[ours])} "
                               f"(N_cluster {hp.n_choice}, inter_dim {hp.n_embd}, vocabulary {n_vocab})")
        weights[ours] = np.array(ckpt.tensor(theirs), dtype=np.float32)
        used.add(theirs)
    n_choice = hp.n_choice
    choice_experts = np.broadcast_to(np.arange(n_choice, dtype=np.int32)[:, None, None],
                                     (n_choice, n_layer_backbone, 1))
    router = Router(kind="readme", hparams=hp, layers=np.arange(n_layer_backbone, dtype=np.int32),
                    choice_experts=np.ascontiguousarray(choice_experts), residual_expert=True, weights=weights)
    router.check()
    return router
