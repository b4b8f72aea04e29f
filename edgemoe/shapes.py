"""Real MoE shapes for synthetic models, and how `--scale` shrinks them.

Each Shape holds a released model's hyperparameters as its Hugging Face config.json gives
them (sources in models/shapes.md), the llama.cpp architecture that runs it and the vocab
GGUF of llama.cpp's tree with its tokenizer. `synth_config` turns a shape and a scale into a
SynthConfig:

- layers: round(F * n_layer), at least the leading dense layers plus one MoE layer;
- heads: round(F * n_head), at least 1, as a multiple of the GQA group (n_head / n_head_kv)
  when there are at least that many, so the group survives; n_head_kv = n_head / group;
- head sizes (head_dim, DeepSeek's RoPE and value heads) never change;
- widths: the effective factor f = n_head' / n_head scales n_embd exactly (n_embd / n_head is
  kept), and the FFN widths and DeepSeek's kv_lora_rank to the nearest multiple of 32 (whole
  quant blocks), at least 32;
- expert count, experts per token, shared experts, vocabulary and tokenizer never change.

At F = 1 every number is the real one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Dict, Optional

from edgemoe.synth import SynthConfig


@dataclass(frozen=True)
class Shape:
    name: str
    model: str             # Hugging Face repository of the real model
    arch: str              # llama.cpp architecture
    vocab: str             # vocab GGUF (llama.cpp's models/ directory)
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int              # dense FFN width; qwen2moe: the shared expert's width
    n_ff_exp: int
    n_expert: int
    n_expert_used: int
    n_ctx_train: int
    rope_theta: float
    rms_eps: float
    moe: Optional[bool] = None
    n_expert_shared: int = 0   # deepseek2's count (qwen2moe's one gated shared expert is implied)
    n_dense_lead: int = 0
    rope_dim: int = 0
    v_head_dim: int = 0
    kv_lora_rank: int = 0
    attn_bias: bool = False
    # defaults of `edgemoe synth`: Q4_0 experts have the 4.5 bits per weight of a Q4_K_M GGUF's
    expert_type: str = "Q4_0"
    weight_type: str = "Q8_0"
    embd_type: str = "Q8_0"
    router_type: str = "F32"   # llama.cpp's quantizer keeps routers in F32 too


SHAPES: Dict[str, Shape] = {s.name: s for s in (
    # MLA: q_lora_rank null (Lite), kv_lora_rank 512, qk_nope 128 + qk_rope 64, v_head 128;
    # first_k_dense_replace 1; YaRN rope scaling (factor 40) is left out: it changes no size
    Shape("deepseek-v2-lite", "deepseek-ai/DeepSeek-V2-Lite", "deepseek2", "ggml-vocab-deepseek-llm.gguf",
          n_layer=27, n_embd=2048, n_head=16, n_head_kv=16, head_dim=192, n_ff=10944, n_ff_exp=1408,
          n_expert=64, n_expert_used=6, n_ctx_train=163840, rope_theta=10000.0, rms_eps=1e-6,
          n_expert_shared=2, n_dense_lead=1, rope_dim=64, v_head_dim=128, kv_lora_rank=512),
    Shape("qwen1.5-moe-a2.7b", "Qwen/Qwen1.5-MoE-A2.7B", "qwen2moe", "ggml-vocab-qwen2.gguf",
          n_layer=24, n_embd=2048, n_head=16, n_head_kv=16, head_dim=128, n_ff=5632, n_ff_exp=1408,
          n_expert=60, n_expert_used=4, n_ctx_train=8192, rope_theta=1_000_000.0, rms_eps=1e-6,
          attn_bias=True),
    # intermediate_size 6144 belongs to dense layers, which this model has none of
    Shape("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", "qwen3moe", "ggml-vocab-qwen2.gguf",
          n_layer=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128, n_ff=6144, n_ff_exp=768,
          n_expert=128, n_expert_used=8, n_ctx_train=40960, rope_theta=1_000_000.0, rms_eps=1e-6),
    # tokenizer: GPT-NeoX's (50432 entries in llama.cpp's vocab file; OLMoE pads to 50304)
    Shape("olmoe-1b-7b", "allenai/OLMoE-1B-7B-0924", "olmoe", "ggml-vocab-gpt-neox.gguf",
          n_layer=16, n_embd=2048, n_head=16, n_head_kv=16, head_dim=128, n_ff=1024, n_ff_exp=1024,
          n_expert=64, n_expert_used=8, n_ctx_train=4096, rope_theta=10000.0, rms_eps=1e-5),
    # llama.cpp runs Mixtral as `llama` with experts
    Shape("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", "llama", "ggml-vocab-llama-spm.gguf",
          n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, head_dim=128, n_ff=14336, n_ff_exp=14336,
          n_expert=8, n_expert_used=2, n_ctx_train=32768, rope_theta=1_000_000.0, rms_eps=1e-5,
          moe=True),
)}


def get_shape(name: str) -> Shape:
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown shape {name!r}; expected one of {', '.join(SHAPES)}") from None


def _round_half_up(x: float) -> int:
    # not round(): banker's rounding would make 2.5 and 3.5 scale differently
    return int(math.floor(x + 0.5))


def _width(w: int, f: float) -> int:
    return max(32, 32 * _round_half_up(w * f / 32))


def _heads(shape: Shape, scale: float) -> int:
    group = shape.n_head // shape.n_head_kv
    n_head = max(1, _round_half_up(scale * shape.n_head))
    if n_head >= group:
        n_head = group * _round_half_up(n_head / group)
    return n_head


def synth_config(shape: Shape, scale: float = 1.0, vocab_dir: Optional[os.PathLike] = None,
                 **overrides) -> SynthConfig:
    """The SynthConfig of `shape` shrunk by `scale` (0 < scale <= 1; see the module doc).

    Args:
        vocab_dir: where the shape's vocab GGUF is (default: edgemoe's vocab directory).
        overrides: SynthConfig fields to set (expert_type, seed, alignment, vocab, ...).
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    n_head = _heads(shape, scale)
    group = shape.n_head // shape.n_head_kv
    n_head_kv = n_head // group if n_head >= group else 1
    f = n_head / shape.n_head
    n_embd = shape.n_embd * n_head // shape.n_head
    n_layer = max(shape.n_dense_lead + 1, _round_half_up(scale * shape.n_layer))
    if vocab_dir is None:
        from edgemoe._native import vocab_dir as default_dir
        vocab_dir = default_dir()
    suffix = "" if scale == 1 else f"-x{scale:g}"
    cfg = SynthConfig(
        arch=shape.arch, moe=shape.moe, vocab=str(os.path.join(vocab_dir, shape.vocab)),
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        head_dim=shape.head_dim,
        rope_dim=shape.rope_dim, v_head_dim=shape.v_head_dim,
        kv_lora_rank=_width(shape.kv_lora_rank, f) if shape.kv_lora_rank else 0,
        n_ff=_width(shape.n_ff, f), n_ff_exp=_width(shape.n_ff_exp, f),
        n_expert=shape.n_expert, n_expert_used=shape.n_expert_used,
        n_expert_shared=shape.n_expert_shared, n_dense_lead=shape.n_dense_lead,
        attn_bias=shape.attn_bias, n_ctx_train=shape.n_ctx_train, rope_theta=shape.rope_theta,
        rms_eps=shape.rms_eps, expert_type=shape.expert_type, weight_type=shape.weight_type,
        embd_type=shape.embd_type, router_type=shape.router_type, alignment=4096,
        name=f"edgemoe-synthetic-{shape.name}{suffix}",
    )
    return replace(cfg, **overrides)
