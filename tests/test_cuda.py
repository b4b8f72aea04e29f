"""The CUDA build: with layers offloaded (-ngl 99) the cache still gives the logits of the same
build with the experts on the host and no cache. Runs only where EDGEMOE_TEST_CUDA=1 (a CUDA
build on a GPU machine, see jetson/README.md); CI has no GPU.

The reference is the cache-off graph over host experts (the cache's engine with the provider
detached): with -ngl 99 and no cache, stock llama.cpp would put the experts in VRAM and use other
kernels, so only that placement is bit-comparable.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import N_THREADS, needs_cache

pytestmark = [
    needs_cache,
    pytest.mark.skipif(os.environ.get("EDGEMOE_TEST_CUDA") != "1", reason="set EDGEMOE_TEST_CUDA=1 on a CUDA build"),
]


def _run(path, budget, n_prompt, detach=False, n_gpu_layers=99):
    from edgemoe.engine import Engine

    tokens = list(range(300, 300 + n_prompt))
    with Engine(path, expert_cache=budget, n_gpu_layers=n_gpu_layers, n_threads=N_THREADS, n_ctx=512) as e:
        if detach:
            e.cache.detach()
        out = [e.eval(tokens)]
        tok = int(out[0][-1].argmax())
        for _ in range(16):
            out.append(e.eval([tok]))
            tok = int(out[-1][-1].argmax())
        stats = e.stats()
    return np.concatenate(out), stats


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "olmoe"])
@pytest.mark.parametrize("n_prompt", [24, 96])  # 96: batches large enough for CUDA's op offload
def test_cuda_logits_match_host_experts(tiny_models, arch, n_prompt):
    from edgemoe.cache import inspect_model

    path = str(tiny_models[arch])
    ref, _ = _run(path, "100%", n_prompt, detach=True)
    stock, _ = _run(path, None, n_prompt)
    print(f"{arch} pp{n_prompt}: host experts vs experts in VRAM, max |diff| {np.abs(ref - stock).max():.3g}")
    minimum = inspect_model(path).min_budget_bytes
    for budget in ("100%", "50%", minimum):
        got, stats = _run(path, budget, n_prompt)
        assert np.array_equal(ref, got), f"{arch} budget {budget}: max |diff| {np.abs(ref - got).max()}"
        assert stats.misses > 0


def _run_sequences(path, budget, detach=False):
    """Four sequences of mixed lengths in one context with -ngl 99: a prefill batch of all of
    them, then decode steps of varying subsets (issue 12); every output row's logits."""
    from edgemoe.engine import Engine

    prompts = [list(range(300 + 7 * s, 300 + 7 * s + n)) for s, n in enumerate((3, 17, 9, 30))]
    with Engine(path, expert_cache=budget, n_gpu_layers=99, n_threads=N_THREADS, n_ctx=4 * 128,
                n_parallel=4) as e:
        if detach:
            e.cache.detach()
        outs = e.decode_batch(list(enumerate(prompts)))
        rows = [e.logits_at(i) for i in outs]
        last = dict(enumerate(rows))
        for step in range(8):
            seqs = [s for s in range(4) if (step + s) % 3]
            outs = e.decode_batch([(s, [int(last[s].argmax())]) for s in seqs])
            for s, i in zip(seqs, outs):
                last[s] = e.logits_at(i)
                rows.append(last[s])
    return np.stack(rows)


@pytest.mark.parametrize("arch", ["qwen3moe", "olmoe"])
def test_cuda_many_sequences_match_host_experts(tiny_models, arch):
    from edgemoe.cache import inspect_model

    path = str(tiny_models[arch])
    ref = _run_sequences(path, "100%", detach=True)
    for budget in ("100%", inspect_model(path).min_budget_bytes):
        got = _run_sequences(path, budget)
        assert np.array_equal(ref, got), f"{arch} budget {budget}: max |diff| {np.abs(ref - got).max()}"
