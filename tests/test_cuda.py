"""The CUDA build. Runs only where EDGEMOE_TEST_CUDA=1 (a CUDA build on a GPU machine, see
jetson/README.md); CI has no GPU.

- A host pool (`expert_pool="host"`) with -ngl 99 gives the logits of the cache-off graph over
  host experts (the cache's engine with the provider detached): the expert matmuls run on the
  CPU in both.
- A GPU pool (VRAM, or pinned host memory the GPU reads in place) puts the expert matmuls on the
  GPU. Its reference is stock llama.cpp with -ngl 99 and no cache, the experts in VRAM: the same
  kernels on the same bytes, at another address.
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


def _run(path, budget, n_prompt, detach=False, n_gpu_layers=99, pool="host", **kw):
    from edgemoe.engine import Engine

    tokens = list(range(300, 300 + n_prompt))
    with Engine(path, expert_cache=budget, n_gpu_layers=n_gpu_layers, n_threads=N_THREADS, n_ctx=512,
                expert_pool=pool, **kw) as e:
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


def _run_sequences(path, budget, detach=False, pool="host"):
    """Four sequences of mixed lengths in one context with -ngl 99: a prefill batch of all of
    them, then decode steps of varying subsets (issue 12); every output row's logits."""
    from edgemoe.engine import Engine

    prompts = [list(range(300 + 7 * s, 300 + 7 * s + n)) for s, n in enumerate((3, 17, 9, 30))]
    with Engine(path, expert_cache=budget, n_gpu_layers=99, n_threads=N_THREADS, n_ctx=4 * 128,
                n_parallel=4, expert_pool=pool) as e:
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


# -- GPU pools ---------------------------------------------------------------------------


def gpu_min(path):
    """A GPU pool's minimum: one layer's experts (these test models have one pool)."""
    from edgemoe.cache import inspect_model

    info = inspect_model(path)
    assert info.n_pools == 1
    return info.n_expert * info.slot_bytes_max


def _budgets(path):
    return ("100%", "75%", gpu_min(path))


def test_gpu_pool_resolves_to_vram_on_a_discrete_gpu(tiny_models):
    from edgemoe.cache import inspect_gpu
    from edgemoe.engine import Engine

    gpu = inspect_gpu()
    assert gpu.n_gpu >= 1
    with Engine(str(tiny_models["qwen3moe"]), expert_cache="50%", n_gpu_layers=99, n_ctx=256) as e:
        info = e.cache.info()
    assert info.pool == ("mapped" if gpu.integrated else "vram")
    assert info.pool_device == gpu.name
    with Engine(str(tiny_models["qwen3moe"]), expert_cache="50%", n_gpu_layers=0, n_ctx=256) as e:
        assert e.cache.info().pool == "host"  # nothing offloaded: auto keeps the CPU's pool


@pytest.mark.parametrize("pool", ["vram", "mapped"])
@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "olmoe", "qwen3moe-q8_0"])
def test_gpu_pool_decode_matches_experts_in_vram(tiny_models, arch, pool):
    """One-token ubatches (a one-token prompt, then decode steps): bit-identical to stock -ngl 99
    at every budget, misses included. Each expert's matmul sees the same rows as stock's."""
    path = str(tiny_models[arch])
    ref, _ = _run(path, None, 1)
    for budget in _budgets(path):
        got, stats = _run(path, budget, 1, pool=pool)
        assert np.array_equal(ref, got), f"{arch} {pool} budget {budget}: max |diff| {np.abs(ref - got).max()}"
        if budget != "100%":
            assert stats.misses > 0
            assert stats.bytes_read > 0


@pytest.mark.parametrize("arch", ["qwen3moe", "olmoe", "qwen3moe-q8_0"])
@pytest.mark.parametrize("n_prompt", [8, 24, 96])
def test_gpu_pool_prompt_batches(tiny_models, arch, n_prompt):
    """Prompt batches, then decode steps. At 100 % the logits are bit-identical: a quantized
    pool gives each layer's matmuls a view of exactly its experts, the stock tensor's shape.
    Below 100 % they see the whole pool, and CUDA's MMQ splits its work by the number of expert
    matrices (stream-k), so prompt ubatches of a large model agree only to rounding; these tiny
    ones measured exact, the bound is PROMPT_BOUND. The mapped pool equals the VRAM pool bit for
    bit (the same kernels on the same bytes)."""
    path = str(tiny_models[arch])
    ref, _ = _run(path, None, n_prompt)
    scale = float(np.abs(ref).max())
    for budget in _budgets(path):
        vram, _ = _run(path, budget, n_prompt, pool="vram")
        mapped, _ = _run(path, budget, n_prompt, pool="mapped")
        diff = float(np.abs(ref - vram).max())
        print(f"{arch} pp{n_prompt} budget {budget}: vram vs stock max |diff| {diff:.3g} of {scale:.3g}"
              f"{' (exact)' if diff == 0 else ''}")
        assert np.array_equal(vram, mapped)
        if budget == "100%":
            assert diff == 0
        assert diff <= PROMPT_BOUND * scale, diff


# relative to the largest logit; see test_gpu_pool_prompt_batches and docs/cache.md
PROMPT_BOUND = 5e-2


def test_gpu_pool_below_one_layer_of_experts_is_refused(tiny_models):
    from edgemoe.engine import Engine
    from edgemoe.errors import BudgetTooSmallError

    path = str(tiny_models["qwen3moe"])
    with pytest.raises(BudgetTooSmallError, match="a GPU pool holds one layer's 8 experts"):
        Engine(path, expert_cache=gpu_min(path) - 1, n_gpu_layers=99, expert_pool="vram")


@pytest.mark.parametrize("prefetch", ["lookahead"])
def test_gpu_pool_prefetch_is_exact(tiny_models, prefetch):
    """Loads that run ahead on the upload streams change nothing but timing."""
    path = str(tiny_models["qwen3moe"])
    ref, _ = _run(path, None, 1)
    got, stats = _run(path, gpu_min(path), 1, pool="vram", prefetch=prefetch)
    assert np.array_equal(ref, got)
    assert stats.prefetch_issued > 0


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen3moe-q8_0"])
def test_gpu_pool_pinned_io_matches_experts_in_vram(tiny_models, arch):
    """io pinned: the GPU copies misses out of the pinned file with no staging copy; the slots
    hold the same bytes, so decode stays bit-identical to stock -ngl 99. The cache reports
    pinned only where the pin took (a failed one falls back to mmap with a notice)."""
    from edgemoe.engine import Engine

    path = str(tiny_models[arch])
    ref, _ = _run(path, None, 1)
    for budget in _budgets(path):
        got, stats = _run(path, budget, 1, pool="vram", io="pinned")
        assert np.array_equal(ref, got), f"{arch} pinned budget {budget}: max |diff| {np.abs(ref - got).max()}"
        if budget != "100%":
            assert stats.misses > 0 and stats.bytes_read > 0
    with Engine(path, expert_cache="50%", n_gpu_layers=99, n_ctx=256, expert_pool="vram", io="pinned") as e:
        assert e.cache.info().io == "pinned"


# hybrid: the CPU's kernels on the experts it computes, relative to the largest logit
HYBRID_BOUND = 1e-3


@pytest.mark.parametrize("arch", ["qwen3moe", "olmoe", "qwen3moe-q8_0"])
def test_gpu_pool_hybrid_decode_is_close_to_experts_in_vram(tiny_models, arch):
    """Hybrid decode computes the experts not ready in VRAM on the CPU: CPU kernels for those,
    so the logits equal stock -ngl 99 only to rounding (measured: 2.5e-4 of the largest logit
    for F32 experts, exact for Q8_0), within HYBRID_BOUND, with the same greedy tokens. At
    100 % every expert is ready after its first load, and the CPU computed some uses."""
    path = str(tiny_models[arch])
    ref, _ = _run(path, None, 1)
    scale = float(np.abs(ref).max())
    for budget in ("100%", "50%", gpu_min(path)):
        got, _ = _run(path, budget, 1, pool="vram", hybrid=True)
        diff = float(np.abs(ref - got).max())
        print(f"{arch} hybrid budget {budget}: vram+cpu vs stock max |diff| {diff:.3g} of {scale:.3g}")
        assert diff <= HYBRID_BOUND * scale, diff
        assert np.array_equal(ref.argmax(-1), got.argmax(-1))


def test_gpu_pool_hybrid_counts_cpu_uses(tiny_models):
    from edgemoe.engine import Engine

    path = str(tiny_models["qwen3moe"])
    with Engine(path, expert_cache=gpu_min(path), n_gpu_layers=99, n_threads=N_THREADS, n_ctx=256,
                expert_pool="vram", hybrid=True) as e:
        e.eval([300])
        for t in range(301, 317):
            e.eval([t])
        cs = e.cache.stats()
    assert 0 < cs.cpu_uses <= cs.misses
    assert cs.stall_ms == 0


@pytest.mark.parametrize("arch", ["qwen3moe", "olmoe"])
def test_gpu_pool_many_sequences(tiny_models, arch):
    """Several sequences a step through the VRAM pool, against stock -ngl 99: exact at 100 %,
    PROMPT_BOUND below (their ubatches hold several tokens)."""
    path = str(tiny_models[arch])
    ref = _run_sequences(path, None)
    scale = float(np.abs(ref).max())
    for budget in ("100%", gpu_min(path)):
        got = _run_sequences(path, budget, pool="vram")
        diff = float(np.abs(ref - got).max())
        print(f"{arch} 4 sequences, budget {budget}: vram vs stock max |diff| {diff:.3g} of {scale:.3g}")
        if budget == "100%":
            assert diff == 0
        assert diff <= PROMPT_BOUND * scale, diff


def test_n_cpu_moe_keeps_experts_on_the_host(tiny_models):
    """llama.cpp's --n-cpu-moe placement: no more VRAM (the tiny experts may not cross an
    allocation granule; the benchmark measures the real saving), logits as all on the GPU to
    rounding (the CPU's kernels)."""
    from edgemoe.cache import inspect_gpu
    from edgemoe.engine import Engine

    path = str(tiny_models["qwen3moe"])
    used = {}
    outs = {}
    for n in (0, 2):
        before = inspect_gpu().memory_free
        with Engine(path, n_gpu_layers=99, n_ctx=256, n_cpu_moe=n) as e:
            used[n] = before - inspect_gpu().memory_free
            outs[n] = e.eval(list(range(300, 316)))
    assert used[2] <= used[0]
    assert np.abs(outs[0] - outs[2]).max() < 1e-2 * np.abs(outs[0]).max()
