"""Floors of a decode step and the statistics beside them, shared by the benchmark scripts.

- `direct_bandwidth`: cold O_DIRECT reads of whole random experts, the way the cache reads them.
- `io_floor`: misses of a policy replayed over recorded routes (benchmarks/cache_sim.py) x bytes
  per expert / that bandwidth; with the warm compute time, the floor without overlap (the sum)
  and with overlap (the larger).
- `routing_stats`: skew and expert overlap ratio (EOR) of recorded routes.

Routes are int32 rows (layer, token index, k expert ids), as edgemoe's route recorder writes them.
"""

from __future__ import annotations

import mmap
import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

import numpy as np

from cache_sim import simulate
from edgemoe.bench.disk import drop_file_pages
from edgemoe.bench.layout import expert_layout


def expert_slices(path) -> Tuple[List[List[Tuple[int, int]]], float]:
    """Per (layer, expert): the (offset, bytes) of each role's slice; and the mean bytes of one expert."""
    layout = expert_layout(path)
    return list(layout.slices.values()), layout.mean_expert_bytes


def direct_bandwidth(path, experts: List[List[Tuple[int, int]]], total: int, threads: int = 4) -> float:
    """GB/s of cold O_DIRECT reads of random whole experts (one pread per role slice), read the
    way the cache reads them: `threads` threads, each with its own descriptor and aligned buffer."""
    drop_file_pages(path)
    rng = random.Random(1)
    picks, n = [], 0
    while n < total:
        e = rng.choice(experts)
        picks.append(e)
        n += sum(size for _, size in e)
    span_max = max(size for e in experts for _, size in e) + 2 * 4096

    def worker(jobs):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, span_max)
        done = 0
        try:
            for slices in jobs:
                for off, size in slices:
                    start = off - off % 4096
                    span = ((off + size + 4095) // 4096) * 4096 - start
                    done += os.preadv(fd, [memoryview(buf)[:span]], start)
        finally:
            os.close(fd)
            buf.close()
        return done

    import time

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        done = sum(pool.map(worker, [picks[i::threads] for i in range(threads)]))
    return done / (time.perf_counter() - t0) / 1e9


def io_floor(routes: np.ndarray, slots: int, policy: str, prompt_tokens: int, n_tokens: int,
             bytes_per_expert: float, bandwidth_gbps: float, compute_ms: float, count_from_token: int,
             stop_token: Optional[int] = None) -> dict:
    """A policy's misses over the window [count_from_token, stop_token) of the routes, per token,
    and the floors they imply."""
    sim = simulate(routes, slots, policy, prompt_tokens=prompt_tokens, count_from_token=count_from_token,
                   stop_token=stop_token)
    io_ms = sim["misses"] / n_tokens * bytes_per_expert / (bandwidth_gbps * 1e6)
    return {**sim, "misses_per_token": sim["misses"] / n_tokens, "io_ms": io_ms,
            "floor_no_overlap_ms": compute_ms + io_ms, "floor_overlap_ms": max(compute_ms, io_ms)}


def routing_stats(runs: list, n_expert: int, n_prompt: int) -> dict:
    """Skew of the recorded routing, over the routes of each repetition (rows: layer, token,
    expert ids): share of uses taken by the top quarter of experts per layer, usage entropy
    (bits) and the expert overlap ratio between consecutive decode tokens of one repetition.

    A layer may hold fewer prompt rows than n_prompt (see cache_sim.steps_of): its decode
    rows are its last ones."""
    from edgemoe.trace import eor_per_layer, usage_entropy_bits

    every = np.concatenate(runs)
    layers = np.unique(every[:, 0])
    top_quarter, entropy = [], []
    for il in layers:
        ids = every[every[:, 0] == il][:, 2:]
        p = np.bincount(ids.ravel(), minlength=n_expert) / ids.size
        top_quarter.append(np.sort(p)[::-1][: n_expert // 4].sum())
        entropy.append(usage_entropy_bits(ids, n_expert))
    eor, n_pairs = 0.0, 0
    for run in runs:
        by_layer = [run[run[:, 0] == il][:, 2:] for il in layers]
        n_decode = max(len(r) for r in by_layer) - n_prompt
        if n_decode < 2:
            continue
        decode = np.stack([r[-n_decode:] for r in by_layer], axis=1)  # [tokens, layers, k]
        eor += float(eor_per_layer(decode).mean()) * (n_decode - 1)
        n_pairs += n_decode - 1
    return {"top_quarter_share": float(np.mean(top_quarter)), "entropy_bits": float(np.mean(entropy)),
            "max_entropy_bits": float(np.log2(n_expert)), "eor": eor / n_pairs if n_pairs else None}
