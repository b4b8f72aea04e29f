"""Repacked host pools: where ggml's CPU backend repacks a quantized weight type for its faster
kernels (Q4_0, Q4_K, IQ4_NL with AVX2 or NEON; Q8_0 on Arm), llama.cpp's loader repacks stock's
experts, and the cache's pools hold repacked slots too. Cache on equals cache off, with
repacking on and off (llama.cpp's --no-repack)."""

from __future__ import annotations

import platform

import numpy as np
import pytest

from conftest import N_THREADS, needs_cache

pytestmark = needs_cache


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def repacks(expert_type: str) -> bool:
    """Whether ggml's CPU backend repacks this type here (ggml-cpu/repack.cpp's choice)."""
    flags = _cpu_flags()
    if platform.machine() in ("x86_64", "AMD64"):
        return "avx2" in flags and expert_type in ("Q4_0", "Q4_K")
    if platform.machine() in ("aarch64", "arm64"):
        return "asimddp" in flags and expert_type in ("Q4_0", "Q4_K", "Q8_0")
    return False


@pytest.fixture(scope="module")
def quant_models(model_dir, gpt2_vocab):
    """Tiny models whose expert rows are a multiple of the repack interleave (8 rows, 256-wide)."""
    from edgemoe.synth import SynthConfig, write_model

    out = {}
    for t in ("Q4_0", "Q4_K", "Q8_0"):
        path = model_dir / f"repack-{t}.gguf"
        write_model(path, SynthConfig(arch="qwen3moe", vocab=str(gpt2_vocab), n_layer=2, n_embd=256, n_ff=256,
                                      n_ff_exp=256, n_expert=8, n_expert_used=2, n_head=4, n_head_kv=2,
                                      expert_type=t, alignment=4096, seed=7))
        out[t] = path
    return out


def _run(path, budget, repack):
    from edgemoe.engine import Engine

    tokens = list(range(300, 340))
    with Engine(str(path), expert_cache=budget, n_ctx=256, n_threads=N_THREADS, repack=repack) as e:
        out = [e.eval(tokens)]
        tok = int(out[0][-1].argmax())
        for _ in range(8):
            out.append(e.eval([tok]))
            tok = int(out[-1][-1].argmax())
        info = e.cache.info() if e.cache else None
        stats = e.cache.stats() if e.cache else None
    return np.concatenate(out), info, stats


@pytest.mark.parametrize("repack", [True, False])
@pytest.mark.parametrize("expert_type", ["Q4_0", "Q4_K", "Q8_0"])
def test_cache_equals_stock_with_and_without_repacking(quant_models, expert_type, repack):
    from edgemoe.cache import inspect_model

    path = quant_models[expert_type]
    ref, _, _ = _run(path, None, repack)
    for budget in ("100%", "50%", inspect_model(path).min_budget_bytes):  # the minimum runs in waves
        got, info, stats = _run(path, budget, repack)
        assert np.array_equal(ref, got), f"{expert_type} repack={repack} {budget}: {np.abs(ref - got).max()}"
        assert info.n_repacked == (3 if repack and repacks(expert_type) else 0)  # gate, up, down
        if info.n_repacked:
            assert stats.convert_ms > 0  # the repack of each load is timed apart
        else:
            assert stats.convert_ms == 0


def test_repacked_roles_loaded_side_by_side_stay_exact(quant_models, monkeypatch):
    """With 4 KiB pieces every role of a load is its own job (a repacked role stays whole), so
    several I/O threads repack the roles of one slot at once: still bit-identical."""
    from edgemoe.cache import inspect_model

    if not repacks("Q4_0"):
        pytest.skip("this CPU does not repack Q4_0")
    path = quant_models["Q4_0"]
    ref, _, _ = _run(path, None, True)
    monkeypatch.setenv("EDGEMOE_READ_PIECE_KIB", "4")  # read when the cache is created
    for budget in ("50%", inspect_model(path).min_budget_bytes):
        got, info, stats = _run(path, budget, True)
        assert info.n_repacked == 3 and stats.convert_ms > 0
        assert np.array_equal(ref, got), f"{budget}: {np.abs(ref - got).max()}"


def test_repacking_changes_the_kernels(quant_models):
    """A negative control: where the CPU repacks Q4_0, repacked and plain runs are different
    computations, so the equalities above compare like with like."""
    if not repacks("Q4_0"):
        pytest.skip("this CPU does not repack Q4_0")
    on, _, _ = _run(quant_models["Q4_0"], None, True)
    off, _, _ = _run(quant_models["Q4_0"], None, False)
    assert not np.array_equal(on, off)
