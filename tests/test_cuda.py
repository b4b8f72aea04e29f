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
