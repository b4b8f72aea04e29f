"""The model `edgemoe run` uses without -m.

Until a trained default model exists, this is a small synthetic qwen3moe (8 layers, 32
experts, top-4, the qwen2 vocab, about 27 MB), written deterministically on first use to
`$EDGEMOE_CACHE_DIR` or `~/.cache/edgemoe/`.
"""

from __future__ import annotations

import os
import pathlib

from edgemoe._native import vocab_dir
from edgemoe.errors import EdgemoeIOError
from edgemoe.synth import SynthConfig, write_model

VOCAB_FILE = "ggml-vocab-qwen2.gguf"
# Bump the file name when the config changes, so an old file is never reused.
FILE_NAME = "synthetic-qwen3moe-8x32-v2.gguf"


def config(vocab: pathlib.Path) -> SynthConfig:
    return SynthConfig(arch="qwen3moe", vocab=str(vocab), n_layer=8, n_embd=64, n_ff=128,
                       n_ff_exp=64, n_expert=32, n_expert_used=4, n_head=4, n_head_kv=2,
                       # untied output: tied random embeddings make every token predict itself
                       expert_type="F16", weight_type="F16", embd_type="Q8_0", tie_output=False,
                       seed=20261124, name="edgemoe-default-synthetic")


def cache_dir() -> pathlib.Path:
    override = os.environ.get("EDGEMOE_CACHE_DIR")
    return pathlib.Path(override) if override else pathlib.Path.home() / ".cache" / "edgemoe"


def default_model_path() -> pathlib.Path:
    """The default model's path, writing it first if absent."""
    path = cache_dir() / FILE_NAME
    if path.exists():
        return path
    vocab = vocab_dir() / VOCAB_FILE
    if not vocab.exists():
        raise EdgemoeIOError(f"vocab file not found: {vocab} (set EDGEMOE_VOCAB_DIR or reinstall edgemoe)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_model(path, config(vocab))
    except OSError as e:
        raise EdgemoeIOError(f"cannot write the default model to {path}: {e.strerror or e}") from None
    return path
