"""The default model's tokenizer: GPT-2's byte-level BPE scheme, reproducible from the corpus,
and llama.cpp (through the shipped GGUF) tokenizes exactly as the `tokenizers` reference."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import N_THREADS, REPO, needs_llama

MODELS = REPO / "models"
TOKENIZER = MODELS / "tokenizer" / "tokenizer.json"
GGUF = MODELS / "edgemoe-tiny-q8_0.gguf"
tokenizers = pytest.importorskip("tokenizers")

# Strings where GPT-2's split regex, byte fallback and merges are easy to get wrong.
TRICKY = [
    "It's a truth universally acknowledged; isn't it? They'd've said \"no\" -- I'll see.",
    "  two leading spaces, trailing spaces   \n\n\nthree newlines\ttab\r\nCRLF",
    "numbers 1234567 3.14159 1,000,000 and 2nd/3rd",
    "accents: café naïve Æsop £5 — em dash … ellipsis",
    "other scripts: Привет мир 你好世界 こんにちは مرحبا",
    "emoji 😀🎉 and symbols ©®™ ∑∫√",
    "MIXEDcase camelCaseWords snake_case_words ALLCAPS",
    "<|endoftext|> separates documents",
    " ",
    "a",
]


@pytest.fixture(scope="module")
def reference():
    return tokenizers.Tokenizer.from_file(str(TOKENIZER))


def test_gpt2_byte_level_scheme():
    spec = json.loads(TOKENIZER.read_text(encoding="utf-8"))
    assert spec["normalizer"] is None
    pre = spec["pre_tokenizer"]
    assert pre["type"] == "ByteLevel" and pre["add_prefix_space"] is False and pre["use_regex"] is True
    assert spec["decoder"]["type"] == "ByteLevel"
    assert spec["model"]["type"] == "BPE" and spec["model"]["byte_fallback"] is False
    vocab = spec["model"]["vocab"]
    assert 8000 <= len(vocab) <= 16384
    assert [(t["id"], t["content"], t["special"]) for t in spec["added_tokens"]] == [(0, "<|endoftext|>", True)]
    # every byte has a token, so any text encodes without an unknown token
    from tokenizers.pre_tokenizers import ByteLevel

    assert set(ByteLevel.alphabet()) <= set(vocab)


def test_rebuilt_from_the_corpus_byte_for_byte(tmp_path):
    proc = subprocess.run([sys.executable, str(MODELS / "build_tokenizer.py"), "-o", str(tmp_path / "tok")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == TOKENIZER.read_bytes()


def test_reference_round_trips(reference):
    for text in TRICKY:
        assert reference.decode(reference.encode(text).ids, skip_special_tokens=False) == text
    assert reference.encode("<|endoftext|>").ids == [0]


@needs_llama
def test_llama_cpp_tokenizes_like_the_reference(reference):
    from edgemoe.engine import Engine

    heldout = (MODELS / "corpus" / "heldout.txt").read_text(encoding="utf-8")
    with Engine(GGUF, n_ctx=64, n_threads=N_THREADS) as engine:
        got = engine.tokenize(heldout, add_special=False)
        want = reference.encode(heldout).ids
        assert len(want) > 100_000
        assert got == want
        # generation joins token pieces (llama_detokenize would also apply the "gpt-2" pre-type's
        # GPT-2 space clean-up, e.g. "He 's" -> "He's", which the reference does not do)
        assert b"".join(engine.token_to_bytes(t) for t in got) == heldout.encode("utf-8")
        for text in TRICKY:
            # `tokenizers` always matches special tokens in text; llama.cpp does when asked
            ids = reference.encode(text).ids
            assert engine.tokenize(text, add_special=False, parse_special=True) == ids, text
            pieces = b"".join(engine.token_to_bytes(t) for t in ids if t != 0)
            assert pieces == text.replace("<|endoftext|>", "").encode("utf-8"), text
        # no BOS: the model was trained on running text
        assert engine.tokenize("Once upon a time", add_special=True) == reference.encode("Once upon a time").ids
