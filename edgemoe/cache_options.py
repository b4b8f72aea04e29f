"""The expert-cache options `edgemoe run` and `edgemoe serve` share, one definition for both."""

from __future__ import annotations

import click

from edgemoe.bindings import IO_MODES

_OPTIONS = (
    click.option("--expert-cache", "expert_cache", metavar="SIZE|auto|off", default="auto", show_default=True,
                 help="Expert-cache budget: bytes (800MiB, 1.5GiB), a share of expert bytes (25%), auto (from "
                      "the memory this process may use; off where every expert fits; prints how) or off "
                      "(stock llama.cpp)."),
    click.option("--policy", type=click.Choice(["auto", "default", "lru", "lfu", "belady"]), default="auto",
                 show_default=True,
                 help="Eviction policy; auto: belady for a model with a readme router (its routes are "
                      "known ahead), else default."),
    click.option("--io", type=click.Choice(list(IO_MODES)), default="direct", show_default=True,
                 help="How the cache reads experts. pinned (a VRAM pool): the file mapped and pinned for "
                      "the GPU, which copies misses out of the page cache itself; the whole file is read "
                      "into RAM and held there."),
    click.option("--prefetch", type=click.Choice(["auto", "off", "lookahead", "routes"]), default="auto",
                 show_default=True,
                 help="routes: a readme router's routes load ahead in order of first use; lookahead: each MoE "
                      "layer applies the next layers' routers to its input and loads the experts they pick "
                      "while it computes; auto: routes for a readme model, else lookahead where the model "
                      "allows it; off: on demand (a readme model still obeys its router)."),
    click.option("--expert-pool", "expert_pool", type=click.Choice(["auto", "host", "gpu", "vram", "mapped"]),
                 default="auto", show_default=True,
                 help="Where the cache's slots live, and so where the expert matmuls run. auto: the GPU's with "
                      "-ngl above 0 on a GPU build, else host; gpu: VRAM on a discrete GPU, pinned host memory "
                      "the GPU reads in place on an integrated one (a Jetson); vram, mapped: either, forced."),
    click.option("--repack/--no-repack", default=True, show_default=True,
                 help="Repack quantized weights for ggml's faster CPU kernels where it can (Q4_0, Q4_K, IQ4_NL; "
                      "Q8_0 on Arm), as llama.cpp does; the cache's host pools then hold repacked slots. "
                      "--no-repack is llama.cpp's."),
    click.option("--hybrid", is_flag=True,
                 help="Decode steps compute the experts not ready in the cache's pool on the CPU, from the "
                      "model's mapped weights, while their reads go on behind, instead of waiting for them. "
                      "Pays where misses come from storage (cold) to a GPU pool; measured in BENCHMARKS.md. "
                      "Needs a cache."),
)


def cache_options(f):
    """Adds --expert-cache, --policy, --io, --prefetch, --expert-pool, --repack and --hybrid to a click command."""
    for option in reversed(_OPTIONS):
        f = option(f)
    return f
