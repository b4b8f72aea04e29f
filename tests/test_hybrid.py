"""The hybrid (hybrid=True): a ubatch that fits in one wave computes the experts not ready in the
pool on the CPU, over the model's mapped tensors, and loads them behind for later tokens. On a
host pool of a type the CPU does not repack, the CPU computes a missed expert with the same
kernel as a slot, so the logits equal the cache-off run's bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import N_THREADS, REPO, needs_cache

pytestmark = needs_cache

DEFAULT_MODEL = REPO / "models" / "edgemoe-tiny-q8_0.gguf"


def _run(path, budget, hybrid, repack=False, n_gen=12):
    from edgemoe.engine import Engine

    prompt = list(range(300, 316))
    with Engine(str(path), expert_cache=budget, n_ctx=256, n_threads=N_THREADS, repack=repack,
                hybrid=hybrid, notice=lambda _: None) as e:
        out = [e.eval(prompt)]
        if e.cache:
            e.cache.reset_stats()  # the prompt may need more slots than the pool: waves that wait
        tok = int(out[0][-1].argmax())
        for _ in range(n_gen):
            out.append(e.eval([tok]))
            tok = int(out[-1][-1].argmax())
        stats = e.cache.stats() if e.cache else None
    return np.concatenate(out), stats


@pytest.mark.parametrize("name", ["qwen3moe", "olmoe", "qwen3moe-q8_0"])
def test_hybrid_equals_cache_off(tiny_models, name):
    from edgemoe.cache import inspect_model

    path = tiny_models[name]
    ref, _ = _run(path, None, False)
    for budget in ("50%", inspect_model(path).min_budget_bytes):
        got, stats = _run(path, budget, True)
        assert np.array_equal(ref, got), f"{name} {budget}: {np.abs(ref - got).max()}"
        assert stats.cpu_uses > 0                    # misses were computed on the CPU
        assert stats.hits > 0                        # and the loads behind them served later tokens
        assert stats.stall_ms == 0                   # no decode step waited for a read
        assert stats.hits + stats.misses == 12*2*2   # every (token, k) pair of 2 layers, once


def test_hybrid_on_the_default_model_serves_later_tokens_from_the_pool():
    """A trained router (64 experts, top-8, 8 layers) at 25 %: exact, and some uses still come from
    the pool once the loads behind the CPU's misses have landed."""
    ref, _ = _run(DEFAULT_MODEL, None, False, n_gen=24)
    got, stats = _run(DEFAULT_MODEL, "25%", True, n_gen=24)
    assert np.array_equal(ref, got), np.abs(ref - got).max()
    assert 0 < stats.cpu_uses == stats.misses < stats.hits + stats.misses
    assert stats.stall_ms == 0


def test_without_hybrid_no_use_is_computed_on_the_cpu(tiny_models):
    _, stats = _run(tiny_models["qwen3moe"], "50%", False)
    assert stats.cpu_uses == 0 and stats.misses > 0


def test_hybrid_needs_a_cache(tiny_models):
    from edgemoe.engine import Engine
    from edgemoe.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="needs a cache"):
        Engine(str(tiny_models["qwen3moe"]), expert_cache=None, hybrid=True)
