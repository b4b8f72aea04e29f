#!/usr/bin/env python3
"""Held-out perplexity of the default model, in torch (a checkpoint folder) or in llama.cpp
(a GGUF, through edgemoe.Engine), over the same token windows, so the two can be compared.
A Read-ME checkpoint of models/train_readme.py (config.json with add_cluster_predictor) is
evaluated with that script's torch model, routed by its own router.

The text is tokenized whole with the checkpoint's or the GGUF's tokenizer (identical by
tests/test_tokenizer.py), cut into non-overlapping windows of --ctx tokens (the tail
shorter than a window is dropped), and each window is evaluated from an empty context;
perplexity = exp(mean negative log-likelihood of every token after the first of a window).

Usage:
    python models/eval_ppl.py --torch CKPT_DIR [--text models/corpus/heldout.txt] [--device cpu]
    python models/eval_ppl.py --gguf MODEL.gguf [--text ...] [-t THREADS]
Prints one JSON object: backend, model, tokens, windows, ctx, nll, ppl, wall_s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, List

import numpy as np

HERE = Path(__file__).resolve().parent


def windows(tokens: List[int], ctx: int) -> List[List[int]]:
    n = len(tokens) // ctx
    if n == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {ctx}")
    return [tokens[i * ctx:(i + 1) * ctx] for i in range(n)]


def window_nll(logits: np.ndarray, window: List[int]) -> float:
    """Summed NLL of window[1:] given logits [len(window), vocab] (float64 log-softmax)."""
    z = logits[:-1].astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(window) - 1), np.asarray(window[1:])].sum())


def perplexity(wins: List[List[int]], logits_of: Callable[[List[int]], np.ndarray]) -> dict:
    total, count = 0.0, 0
    for w in wins:
        total += window_nll(logits_of(w), w)
        count += len(w) - 1
    nll = total / count
    return {"nll": nll, "ppl": math.exp(nll), "predicted_tokens": count}


def torch_ppl(ckpt: Path, text: str, ctx: int, device: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tokens = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(text).ids
    wins = windows(tokens, ctx)
    if json.loads((ckpt / "config.json").read_text()).get("add_cluster_predictor"):
        logits_of = _readme_logits(ckpt, device)
    else:
        # float32 compute from the stored weights: what a GGUF of the same checkpoint holds
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).to(device).eval()

        def logits_of(w):
            with torch.no_grad():
                return model(input_ids=torch.tensor([w], device=device)).logits[0].float().cpu().numpy()

    return {"backend": "torch", "tokens": len(tokens), **perplexity(wins, logits_of), "windows": len(wins)}


def _readme_logits(ckpt: Path, device: str) -> Callable[[List[int]], np.ndarray]:
    """A Read-ME checkpoint written by models/train_readme.py (transformers has no Read-ME
    model): its router picks each token's expert, every layer runs residual + that expert."""
    import torch

    sys.path.insert(0, str(HERE))
    from train_readme import load_checkpoint

    _, moe, router = load_checkpoint(ckpt)
    moe, router = moe.to(device), router.to(device)

    def logits_of(w):
        with torch.no_grad():
            ids = torch.tensor([w], device=device)
            return moe(ids, router(ids).argmax(-1))[0].float().cpu().numpy()

    return logits_of


def gguf_ppl(path: Path, text: str, ctx: int, threads: int) -> dict:
    from edgemoe.engine import Engine

    with Engine(path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=threads) as engine:
        tokens = engine.tokenize(text, add_special=False)
        wins = windows(tokens, ctx)

        def logits_of(w):
            engine.reset()
            return engine.eval(w)

        return {"backend": "llama.cpp", "tokens": len(tokens), **perplexity(wins, logits_of),
                "windows": len(wins)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--torch", type=Path, metavar="CKPT_DIR")
    src.add_argument("--gguf", type=Path, metavar="FILE")
    ap.add_argument("--text", type=Path, default=HERE / "corpus" / "heldout.txt")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--device", default="cpu", help="torch device")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1, help="CPU threads")
    args = ap.parse_args(argv)
    if args.ctx < 2:
        print("eval_ppl: error: --ctx must be at least 2", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    try:
        text = args.text.read_text(encoding="utf-8")
        if args.torch is not None:
            result = torch_ppl(args.torch, text, args.ctx, args.device, args.threads)
        else:
            result = gguf_ppl(args.gguf, text, args.ctx, args.threads)
    except (OSError, ValueError) as e:
        print(f"eval_ppl: error: {e}", file=sys.stderr)
        return 1
    model = args.torch if args.torch is not None else args.gguf
    print(json.dumps({**result, "model": str(model), "ctx": args.ctx,
                      "wall_s": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
