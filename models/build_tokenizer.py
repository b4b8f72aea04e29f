#!/usr/bin/env python3
"""Trains the default model's byte-level BPE tokenizer on the corpus's train split.

GPT-2's scheme, so that llama.cpp's "gpt-2" pre-tokenizer reproduces it exactly: no
normalizer, a ByteLevel pre-tokenizer with GPT-2's split regex and no prefix space, BPE
over the 256 byte symbols, a ByteLevel decoder, and one special token `<|endoftext|>`
(id 0) that separates documents; no BOS is added. Training is deterministic for a corpus.

Usage: python models/build_tokenizer.py [--corpus models/corpus] [--vocab-size 8192] [-o models/tokenizer]
Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json (Hugging Face format).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from build_corpus import BLOCK_SEP, read_split  # noqa: E402

EOT = "<|endoftext|>"
VOCAB_MIN, VOCAB_MAX = 256 + 1, 65536


def make_tokenizer(texts: Iterable[str], vocab_size: int):
    """A trained `tokenizers.Tokenizer` (see the module docstring for its parts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save(tok, out_dir: Path) -> None:
    """Saves in the Hugging Face layout (what `edgemoe convert` and transformers read)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=None,
                                   pad_token=EOT, add_bos_token=False, add_eos_token=False,
                                   clean_up_tokenization_spaces=False)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        fast.save_pretrained(str(tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=HERE / "corpus")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("-o", "--out", type=Path, default=HERE / "tokenizer")
    args = ap.parse_args(argv)
    if not VOCAB_MIN <= args.vocab_size <= VOCAB_MAX:
        print(f"build_tokenizer: error: --vocab-size must be in {VOCAB_MIN}..{VOCAB_MAX}", file=sys.stderr)
        return 1
    try:
        blocks = read_split(args.corpus, "train").split(BLOCK_SEP)
    except OSError as e:
        print(f"build_tokenizer: error: cannot read the corpus: {e}", file=sys.stderr)
        return 1
    tok = make_tokenizer(blocks, args.vocab_size)
    save(tok, args.out)
    print(f"vocab {tok.get_vocab_size()} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
