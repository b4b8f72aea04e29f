"""Tiny randomly initialised Hugging Face MoE checkpoints, written with transformers (CPU torch).

Each gets a byte-level BPE tokenizer trained on a few sentences with `tokenizers`, so the
converter's tokenizer path runs too. Weights are drawn with a larger std than transformers'
default 0.02 so that logits spread and routing differs between tokens.
"""

from __future__ import annotations

import pathlib
from typing import Optional

TEXT = ("Once upon a time there was a little model that routed every token to a few experts. "
        "The quick brown fox jumps over the lazy dog; numbers 12345 and 67890 appear too. ")

COMMON = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256,
              tie_word_embeddings=False)

ARCHS = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, moe_intermediate_size=32, intermediate_size=96,
                                         head_dim=16, norm_topk_prob=True)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=8, moe_intermediate_size=32, intermediate_size=96,
                                         shared_expert_intermediate_size=48)),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, intermediate_size=32, num_key_value_heads=4)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, intermediate_size=32)),
    # DeepSeek-V2-Lite's layout: MLA without query compression, a leading dense layer, shared experts
    "deepseek_v2": ("DeepseekV2Config", dict(num_hidden_layers=3, num_key_value_heads=4, first_k_dense_replace=1,
                                             n_routed_experts=8, n_shared_experts=2, moe_intermediate_size=32,
                                             intermediate_size=96, q_lora_rank=None, kv_lora_rank=32,
                                             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)),
}


def train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT * 4], trainer)
    return tok


def write_checkpoint(directory: pathlib.Path, arch: str, seed: int = 0, dtype: str = "float32",
                     fused: bool = False, overrides: Optional[dict] = None) -> pathlib.Path:
    """Writes config.json, safetensors and tokenizer.json for a tiny `arch` model into `directory`.

    fused: save the in-memory module layout (`experts.gate_up_proj`) instead of the
    per-expert tensors `save_pretrained` writes.
    overrides: config values that replace the arch's (a variant: rope scaling, query compression, ...).
    """
    import torch
    import transformers

    cls_name, extra = ARCHS[arch]
    kw = {**COMMON, **extra, **(overrides or {})}
    cfg = getattr(transformers, cls_name)(**kw, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    model = model.to(getattr(torch, dtype))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if fused:
        from safetensors.torch import save_file

        for f in directory.glob("*.safetensors"):
            f.unlink()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
    train_tokenizer(kw["vocab_size"] - 8).save(str(directory / "tokenizer.json"))
    return directory
