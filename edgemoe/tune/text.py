"""The training text: read (.txt, or .txt.xz as models/corpus ships it), fingerprinted, and
tokenized by the source's own tokenizer: llama.cpp's for a GGUF (as `edgemoe run` and
`edgemoe trace` tokenize), the checkpoint's tokenizer.json for a Hugging Face checkpoint.
Plain running text: no BOS is added and special-token text is not parsed."""

from __future__ import annotations

import ctypes
import lzma
import os

import numpy as np

from edgemoe.tune.options import TuneError


def read_bytes(path: str) -> bytes:
    """The file's bytes, decompressed when it is .xz."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TuneError(f"cannot read --text {path}: {e.strerror or e}") from None
    if path.endswith(".xz"):
        try:
            data = lzma.decompress(data)
        except lzma.LZMAError as e:
            raise TuneError(f"--text {path} is not a readable .xz file ({e})") from None
    return data


def read_text(path: str) -> str:
    data = read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TuneError(f"--text {path} is not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise TuneError(f"--text {path} is empty")
    return text


def sha256_of(path: str) -> str:
    from edgemoe.files import sha256_file

    try:
        return sha256_file(path)
    except OSError as e:
        raise TuneError(f"cannot read {path}: {e.strerror or e}") from None


def tokenize_gguf(model_path: str, text: str) -> np.ndarray:
    """Token ids from the GGUF's vocabulary, loaded alone (no weights, no context)."""
    from edgemoe import log
    from edgemoe._native import llama

    log.install(False)
    llama.llama_backend_init()
    params = llama.llama_model_default_params()
    params.vocab_only = True
    log.take_error()
    model = llama.llama_model_load_from_file(os.fsencode(model_path), params)
    if not model:
        reason = log.take_error()
        raise TuneError(f"cannot read the vocabulary of {model_path}" + (f": {reason}" if reason else ""))
    try:
        vocab = llama.llama_model_get_vocab(model)
        data = text.encode("utf-8")
        cap = len(data) + 8  # byte-level vocabularies never make more tokens than bytes
        buf = (llama.llama_token * cap)()
        n = llama.llama_tokenize(vocab, data, len(data), buf, cap, False, False)
        if n < 0:
            raise TuneError(f"llama.cpp could not tokenize the text with {os.path.basename(model_path)}'s vocabulary")
        return np.ctypeslib.as_array(ctypes.cast(buf, ctypes.POINTER(ctypes.c_int32)), shape=(n,)).astype(np.int64)
    finally:
        llama.llama_model_free(model)


def tokenize_checkpoint(directory: str, text: str) -> np.ndarray:
    """Token ids from the checkpoint's tokenizer.json (the `tokenizers` library), or from
    transformers' AutoTokenizer where a checkpoint ships only a SentencePiece model."""
    path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(path):
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(path).encode(text, add_special_tokens=False).ids
    else:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError) as e:
            raise TuneError(f"{directory} has no usable tokenizer ({' '.join(str(e).split())[:200]})") from None
        ids = tok(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)
