"""Where experts live without a GPU: --expert-pool resolution and errors, and the --n-cpu-moe
overrides (their effect on a GPU is tests/test_cuda.py's)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_one_line_error, needs_cache

pytestmark = needs_cache


def _cpu_build() -> bool:
    from edgemoe.cache import inspect_gpu

    return inspect_gpu().n_gpu == 0


cpu_only = pytest.mark.skipif("not _cpu_build()", reason="a GPU build resolves GPU pools")


def test_auto_pool_is_host_without_offload():
    from edgemoe.placement import resolve_pool

    assert resolve_pool("auto", 0) == "host"
    assert resolve_pool("vram", 0) == "vram"  # an explicit choice is kept


@cpu_only
def test_auto_pool_is_host_on_a_cpu_build():
    from edgemoe.cache import inspect_gpu
    from edgemoe.placement import resolve_pool

    assert inspect_gpu().n_gpu == 0
    assert resolve_pool("auto", 99) == "host"


def test_unknown_pool_is_refused(tiny_models):
    from edgemoe.engine import Engine
    from edgemoe.errors import InvalidArgumentError
    from edgemoe.placement import resolve_pool

    with pytest.raises(InvalidArgumentError, match="unknown expert pool"):
        resolve_pool("disk", 0)
    with pytest.raises(InvalidArgumentError, match="unknown expert pool"):
        Engine(str(tiny_models["qwen3moe"]), expert_cache="50%", expert_pool="disk")


@cpu_only
@pytest.mark.parametrize("pool", ["gpu", "vram", "mapped"])
def test_gpu_pool_without_a_gpu_is_a_clear_error(tiny_models, pool):
    from edgemoe.engine import Engine
    from edgemoe.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=f"a {pool} expert pool needs a GPU"):
        Engine(str(tiny_models["qwen3moe"]), expert_cache="50%", expert_pool=pool, n_gpu_layers=99)


@cpu_only
def test_run_with_a_gpu_pool_without_a_gpu_exits_with_one_line(tiny_models, edgemoe_env):
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "run", "-m", str(tiny_models["qwen3moe"]), "-n", "4",
                           "--expert-cache", "50%", "--expert-pool", "vram"], env=edgemoe_env,
                          capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, "vram expert pool needs a gpu")
    assert proc.stdout == ""


def test_host_pool_reports_its_device(tiny_models):
    from edgemoe.engine import Engine

    with Engine(str(tiny_models["qwen3moe"]), expert_cache="50%", n_ctx=128) as e:
        info = e.cache.info()
        stats = e.stats()
    assert (info.pool, info.pool_device) == ("host", "CPU")
    assert stats.expert_pool == "host"


@pytest.mark.parametrize("name, layer, hit", [
    ("blk.3.ffn_up_exps.weight", 3, True),
    ("blk.3.ffn_gate_exps.weight", 3, True),
    ("blk.3.ffn_down_exps.weight", 3, True),
    ("blk.3.ffn_gate_up_exps.weight", 3, True),
    ("blk.13.ffn_up_exps.weight", 3, False),   # another layer
    ("blk.3.ffn_up_shexp.weight", 3, False),   # the shared expert stays where -ngl puts it
    ("blk.3.ffn_gate_inp.weight", 3, False),   # the router too
])
def test_cpu_moe_pattern_names_only_the_routed_experts(name, layer, hit):
    from edgemoe.placement import cpu_moe_pattern

    # llama.cpp matches overrides with std::regex_search, as re.search does
    assert bool(re.search(cpu_moe_pattern(layer), name)) is hit


def test_cpu_moe_overrides_are_terminated():
    from edgemoe.errors import InvalidArgumentError
    from edgemoe.placement import cpu_moe_overrides

    arr = cpu_moe_overrides(3)
    assert len(arr) == 4
    assert [a.pattern.decode() for a in arr[:3]] == [rf"blk\.{i}\.ffn_(up|down|gate|gate_up)_(ch|)exps" for i in range(3)]
    assert all(a.buft for a in arr[:3])
    assert arr[3].pattern is None
    with pytest.raises(InvalidArgumentError):
        cpu_moe_overrides(0)


def test_n_cpu_moe_runs_and_keeps_the_logits_on_the_cpu(tiny_models):
    from edgemoe.engine import Engine

    path = str(tiny_models["qwen3moe"])
    tokens = list(range(300, 316))
    with Engine(path, n_ctx=128) as e:
        ref = e.eval(tokens)
    with Engine(path, n_ctx=128, n_cpu_moe=2) as e:
        got = e.eval(tokens)
    assert np.array_equal(ref, got)  # on the CPU both placements use the same kernels


def test_n_cpu_moe_with_a_cache_is_refused(tiny_models):
    from edgemoe.engine import Engine
    from edgemoe.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="n_cpu_moe places experts without a cache"):
        Engine(str(tiny_models["qwen3moe"]), expert_cache="50%", n_cpu_moe=1)
    with pytest.raises(InvalidArgumentError, match="n_cpu_moe must be 0 or more"):
        Engine(str(tiny_models["qwen3moe"]), n_cpu_moe=-1)
