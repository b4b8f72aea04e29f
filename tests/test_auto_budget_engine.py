"""`--expert-cache auto` through the engine, `edgemoe run` (its default), `edgemoe bench`, and a
real cgroup v1/v2 group where only part of the default model's experts fit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import needs_cache
from edgemoe.auto_budget import MARGIN_FIXED, MARGIN_FRACTION, kv_cache_bytes
from edgemoe.budget import AUTO
from edgemoe.cgroup import MemoryCgroup, find_memory_controller

MiB, GiB = 1 << 20, 1 << 30


@needs_cache
def test_engine_resolves_auto_and_says_how():
    from edgemoe.default_model import default_model_path
    from edgemoe.engine import Engine
    from edgemoe.gguf_header import read_header

    notices = []
    with Engine(default_model_path(), expert_cache="auto", n_ctx=512, notice=notices.append) as e:
        assert e.auto_budget is not None
        assert e.auto_budget.need.kv_bytes == kv_cache_bytes(read_header(default_model_path()), 512)
        assert notices == [e.auto_budget.describe()]
        # this machine holds the whole 30 MB model many times over: stock llama.cpp
        assert e.auto_budget.budget is None and e.cache is None
        assert "".join(e.generate("Once", max_tokens=3, temperature=0))


@needs_cache
def test_dense_model_auto_is_off_in_one_line(dense_model):
    from edgemoe.engine import Engine

    notices = []
    with Engine(dense_model, expert_cache="auto", n_ctx=256, notice=notices.append) as e:
        assert e.cache is None and e.auto_budget.budget is None
    assert notices == [f"expert cache auto: off, {dense_model.name} has no routed experts"]


@needs_cache
def test_expert_cache_refuses_an_unresolved_auto(tiny_models):
    from edgemoe.cache import ExpertCache
    from edgemoe.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="auto"):
        ExpertCache(tiny_models["qwen3moe"], AUTO)


@needs_cache
def test_run_without_expert_cache_is_auto(edgemoe_env):
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "run", "-n", "4", "--temp", "0"], env=edgemoe_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    lines = [l for l in proc.stderr.splitlines() if "expert cache auto" in l]
    assert len(lines) == 1 and lines[0].startswith("edgemoe: expert cache auto: off, every expert fits ("), \
        proc.stderr
    assert "Traceback" not in proc.stderr


# -- a real cgroup -------------------------------------------------------------------------

CONTROLLER, WHY = find_memory_controller()
_PROBE = """
import json, sys
from edgemoe.run import run  # what `edgemoe run` has imported when its engine sizes the cache
from edgemoe.engine import Engine
from edgemoe.auto_budget import derive_auto_budget
from edgemoe.default_model import default_model_path
a = derive_auto_budget(default_model_path(), n_ctx=4096)
print(json.dumps(dict(source=a.room.source, limit=a.room.limit_bytes, in_use=a.room.in_use_bytes,
                      rest=a.need.non_expert_bytes + a.need.kv_bytes + a.need.compute_bytes,
                      experts=a.need.expert_bytes, minimum=a.need.min_budget_bytes)))
"""


def _in_group(cg: MemoryCgroup, args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=180,
                          preexec_fn=lambda: cg.add(os.getpid()))


@needs_cache
@pytest.mark.skipif(CONTROLLER is None, reason=f"no usable cgroup memory controller: {WHY}")
def test_real_cgroup_with_room_for_part_of_the_experts(edgemoe_env, tmp_path):
    with MemoryCgroup(CONTROLLER, 1 * GiB) as cg:
        probe = _in_group(cg, ["-c", _PROBE], edgemoe_env)
    assert probe.returncode == 0, probe.stderr
    p = json.loads(probe.stdout)
    assert p["source"] == f"cgroup {CONTROLLER.name} limit" and p["limit"] == 1 * GiB, p
    # a limit where the room is half the experts; the run's own usage moves it by a few MiB
    limit = math.ceil((p["in_use"] + p["rest"] + MARGIN_FIXED + p["experts"] // 2) / (1 - MARGIN_FRACTION))
    stats = tmp_path / "stats.json"
    with MemoryCgroup(CONTROLLER, limit) as cg:
        run = _in_group(cg, ["-m", "edgemoe", "run", "-n", "8", "--temp", "0", "--stats-json", str(stats)],
                        edgemoe_env)
        assert cg.oom_kills() == 0
    assert run.returncode == 0, run.stderr
    line = next(l for l in run.stderr.splitlines() if "expert cache auto" in l)
    assert f"cgroup {CONTROLLER.name} limit" in line and "off" not in line and "short" not in line, line
    budget = json.loads(stats.read_text())["expert_cache_bytes"]
    assert p["minimum"] < budget < p["experts"], (budget, p, line)


# -- edgemoe bench ---------------------------------------------------------------------------

def _bench_rows(args, env):
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "bench", "-p", "0", "-n", "2", "-r", "1", "-o", "jsonl",
                           *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "expert cache auto" not in proc.stderr  # the derivation goes into the rows
    return [json.loads(line) for line in proc.stdout.splitlines()]


@needs_cache
def test_bench_auto_rows_say_what_it_chose(edgemoe_env):
    from edgemoe.default_model import default_model_path

    rows = _bench_rows(["-m", default_model_path(), "--expert-cache", "auto,off"], edgemoe_env)
    assert [r["expert_cache"] for r in rows] == ["auto", "off"]
    auto, off = rows
    assert auto["expert_cache_auto"].startswith("expert cache auto: off, every expert fits (MemAvailable ")
    assert auto["expert_cache_bytes"] is None and auto["hit_rate"] is None and auto["status"] == "ok"
    assert off["expert_cache_auto"] is None


@needs_cache
@pytest.mark.skipif(CONTROLLER is None, reason=f"no usable cgroup memory controller: {WHY}")
def test_bench_auto_sizes_from_the_childs_cgroup(edgemoe_env):
    from edgemoe.cache import inspect_model
    from edgemoe.default_model import default_model_path

    path = default_model_path()
    info = inspect_model(path)
    # 185 MiB: after the margin (137 MiB), the child's own ~30 MiB and the other weights, a few MiB of room
    rows = _bench_rows(["-m", path, "--expert-cache", "auto", "--mem-limit", "185MiB"], edgemoe_env)
    (row,) = rows
    assert row["status"] == "ok" and row["mem_limit"] == 185 * MiB
    assert row["expert_cache_auto"].startswith("expert cache auto: ")
    assert f"cgroup {CONTROLLER.name} limit 185.0 MiB" in row["expert_cache_auto"], row["expert_cache_auto"]
    assert info.min_budget_bytes <= row["expert_cache_bytes"] < info.expert_bytes
    assert row["hits"] + row["misses"] > 0
