"""The synthetic benchmark model: qwen3moe, 16 layers x 64 experts, top-8, width 1024, expert
width 1024, Q8_0 everywhere, gpt-2 vocabulary, 4 KiB aligned; 3.58 GB, experts 95.7 % of the
bytes. Written once by edgemoe.synth (deterministic for a router skew), then reused.

    python benchmarks/bench_model.py --router-skew 8     # prints the path
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"


def default_path(router_skew: float) -> Path:
    return OUT / f"bench-qwen3moe-q8-skew{router_skew:g}.gguf"


def ensure_model(path: Path, router_skew: float) -> Path:
    """Writes the model to `path` unless it exists."""
    if path.exists():
        return path
    from edgemoe._native import vocab_dir
    from edgemoe.synth import SynthConfig, write_model

    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = SynthConfig(arch="qwen3moe", vocab=str(vocab_dir() / "ggml-vocab-gpt-2.gguf"), n_layer=16, n_embd=1024,
                      n_ff=2048, n_ff_exp=1024, n_expert=64, n_expert_used=8, n_head=16, n_head_kv=4,
                      expert_type="Q8_0", weight_type="Q8_0", embd_type="Q8_0", alignment=4096, seed=7,
                      router_skew=router_skew, name="edgemoe-bench-qwen3moe")
    print(f"writing {path} ...", file=sys.stderr, flush=True)
    write_model(path, cfg)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--router-skew", type=float, default=8.0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    print(ensure_model(a.out or default_path(a.router_skew), a.router_skew))
