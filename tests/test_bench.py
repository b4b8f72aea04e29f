"""`edgemoe bench` end to end: every output format, list expansion, memory limits in cgroups (OOM
reported, the sweep going on, groups removed also on Ctrl-C), cold runs and read-ahead,
--prompts, --routes replay, and bad input."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import (SIGNAL_BOUND_S, assert_interrupted, assert_one_line_error, interrupt, needs_cache,
                      on_tmpfs, start_edgemoe)
from edgemoe.bench.results import FIELDS, SCALAR_FIELDS
from edgemoe.cgroup import find_memory_controller, leftover_groups

pytestmark = needs_cache

CONTROLLER, WHY = find_memory_controller()
needs_cgroup = pytest.mark.skipif(CONTROLLER is None, reason=f"no usable cgroup memory controller: {WHY}")


def _bench(args, env, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "edgemoe", "bench", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def _json_rows(proc):
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


def _assert_one_line_error(proc, *needles):
    assert_one_line_error(proc, *needles)
    assert proc.stdout == ""  # nothing ran


@pytest.fixture(scope="module")
def model(tiny_models):
    """qwen3moe, 2 layers x 8 experts, top-2, 4 KiB aligned."""
    return tiny_models["qwen3moe"]


@pytest.fixture(scope="module")
def oom_model(tmp_path_factory, gpt2_vocab):
    """288 MiB of F16 experts (3 layers x 64, top-8) beside 26 MiB of other weights: a 100 %
    cache cannot fit a 200 MiB limit, a 10 % one can."""
    from edgemoe.synth import SynthConfig, write_model

    path = tmp_path_factory.mktemp("oom") / "oom-qwen3moe.gguf"
    write_model(path, SynthConfig(arch="qwen3moe", vocab=str(gpt2_vocab), n_layer=3, n_embd=256, n_ff=512,
                                  n_ff_exp=1024, n_expert=64, n_expert_used=8, n_head=4, n_head_kv=2,
                                  expert_type="F16", weight_type="F16", embd_type="F16", tie_output=True,
                                  alignment=4096, seed=3))
    return path


# -- formats -----------------------------------------------------------------------------

ARGS = ["-p", "16", "-n", "4", "-r", "2", "--expert-cache", "50%,100%", "--baseline", "-t", "2"]
EXPECT = [("50%", "pp16"), ("50%", "tg4"), ("100%", "pp16"), ("100%", "tg4"), ("off", "pp16"), ("off", "tg4")]


def test_json_carries_every_field_and_the_samples(model, edgemoe_env):
    rows = _json_rows(_bench(["-m", model, *ARGS, "-o", "json"], edgemoe_env))
    assert [(r["expert_cache"], r["test"]) for r in rows] == EXPECT
    for r in rows:
        assert list(r) == FIELDS
        assert r["status"] == "ok" and r["repetitions"] == 2 and r["n_threads"] == 2
        assert r["model_type"].startswith("qwen3moe") and r["model_size"] > 0 and r["model_n_params"] > 0
        assert len(r["samples_ns"]) == 2 and len(r["samples_ts"]) == 2
        assert r["avg_ts"] == pytest.approx(statistics.fmean(r["samples_ts"]))
        assert r["stddev_ts"] == pytest.approx(statistics.stdev(r["samples_ts"]))
        assert r["peak_rss_bytes"] > 0 and r["disk_read_bytes"] >= 0 and r["cpu_user_s"] >= 0
        assert r["mem_limit"] is None and r["mem_limit_cgroup"] is None
        if r["test"] == "tg4":
            assert [len(s) for s in r["samples_tpot_ms"]] == [4, 4]
            per_rep = [statistics.fmean(s) for s in r["samples_tpot_ms"]]
            assert r["tpot_ms"] == pytest.approx(statistics.fmean(per_rep))
            assert r["tpot_p50_ms"] <= r["tpot_p90_ms"] and r["ttft_ms"] is None
            assert r["n_gen"] == 4 and r["n_prompt"] == 0
        else:
            assert r["samples_ttft_ms"] and r["ttft_ms"] == pytest.approx(statistics.fmean(r["samples_ttft_ms"]))
            assert r["tpot_ms"] is None and r["n_prompt"] == 16
        if r["expert_cache"] == "off":
            assert r["hit_rate"] is None and r["policy"] is None and r["expert_cache_bytes"] is None
        else:
            assert 0 <= r["hit_rate"] <= 1 and r["expert_cache_bytes"] > 0 and r["policy"] == "default"
    # after the warm-up every expert is resident at 100 %
    full = [r for r in rows if r["expert_cache"] == "100%"]
    assert all(r["hit_rate"] == 1.0 and r["misses"] == 0 for r in full)


def test_jsonl_csv_and_md(model, edgemoe_env):
    args = ["-m", model, "-p", "16", "-n", "4", "-r", "1", "--expert-cache", "50%", "--baseline", "-t", "2"]
    lines = _bench([*args, "-o", "jsonl"], edgemoe_env).stdout.splitlines()
    assert [(json.loads(l)["expert_cache"], json.loads(l)["test"]) for l in lines] == \
        [("50%", "pp16"), ("50%", "tg4"), ("off", "pp16"), ("off", "tg4")]
    assert all(list(json.loads(l)) == FIELDS for l in lines)

    proc = _bench([*args, "-o", "csv"], edgemoe_env)
    assert proc.returncode == 0, proc.stderr
    parsed = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert len(parsed) == 4 and list(parsed[0]) == SCALAR_FIELDS
    assert all(float(r["avg_ts"]) > 0 for r in parsed)
    assert [r["test"] for r in parsed] == ["pp16", "tg4", "pp16", "tg4"]

    proc = _bench([*args, "-o", "md"], edgemoe_env)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[0] == "model" and "t/s" in header and "tpot_ms" in header and "hit_rate" in header
    assert set(table[1].replace("|", "").replace(" ", "")) <= {"-", ":"}
    assert len(table) == 2 + 4
    for line in table[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        assert " ± " in cells["t/s"]


def test_list_flags_expand_to_every_combination(model, edgemoe_env):
    rows = _json_rows(_bench(["-m", model, "-p", "0", "-n", "2", "-r", "1", "-t", "1,2", "--policy", "lru,lfu",
                              "--io", "direct", "--io", "buffered", "--expert-cache", "50%", "-o", "json"],
                             edgemoe_env))
    combos = [(r["n_threads"], r["policy"], r["io"]) for r in rows]
    assert combos == [(t, p, i) for t in (1, 2) for p in ("lru", "lfu") for i in ("direct", "buffered")]
    assert all(r["test"] == "tg2" for r in rows)


# -- memory limits -------------------------------------------------------------------------

@needs_cgroup
def test_oom_is_reported_and_the_sweep_goes_on(oom_model, edgemoe_env):
    before = set(leftover_groups(CONTROLLER))
    rows = _json_rows(_bench(["-m", oom_model, "-p", "128", "-n", "2", "-r", "1", "--expert-cache", "100%,10%",
                              "--mem-limit", "200MiB", "-o", "json"], edgemoe_env))
    assert [(r["expert_cache"], r["status"]) for r in rows] == [
        ("100%", "oom"), ("100%", "oom"), ("10%", "ok"), ("10%", "ok")]
    assert "memory" in rows[0]["error"] and rows[0]["avg_ts"] is None
    assert rows[0]["model_type"].startswith("qwen3moe")  # known from the child before it died
    assert all(r["mem_limit"] == 200 << 20 and r["mem_limit_cgroup"] == CONTROLLER.name for r in rows)
    assert rows[2]["avg_ts"] > 0 and rows[2]["cgroup_peak_bytes"] <= 200 << 20
    assert set(leftover_groups(CONTROLLER)) == before


@needs_cgroup
def test_auto_limit_runs_baseline_beside_each_budget(model, edgemoe_env):
    from edgemoe.bench.params import AUTO_OVERHEAD
    from edgemoe.cache import inspect_model

    info = inspect_model(model)
    rows = _json_rows(_bench(["-m", model, "-p", "0", "-n", "4", "-r", "1", "--expert-cache", "50%,100%",
                              "--baseline", "--mem-limit", "auto", "-o", "json"], edgemoe_env))
    assert [r["expert_cache"] for r in rows] == ["50%", "off", "100%", "off"]
    half = info.non_expert_bytes + -(-info.expert_bytes // 2) + AUTO_OVERHEAD
    full = info.non_expert_bytes + info.expert_bytes + AUTO_OVERHEAD
    assert [r["mem_limit"] for r in rows] == [half, half, full, full]
    assert all(r["status"] == "ok" and r["mem_limit_cgroup"] == CONTROLLER.name for r in rows)


def test_without_a_controller_a_notice_and_flagged_rows(model, monkeypatch):
    from click.testing import CliRunner

    import edgemoe.cgroup
    from edgemoe.cli import cli

    monkeypatch.setattr(edgemoe.cgroup, "find_memory_controller", lambda: (None, "no controller in this test"))
    result = CliRunner().invoke(cli, ["bench", "-m", str(model), "-p", "0", "-n", "2", "-r", "1",
                                      "--mem-limit", "1GiB", "-o", "jsonl"])
    assert result.exit_code == 0, result.output
    notices = [l for l in result.stderr.splitlines() if "no controller in this test" in l]
    assert len(notices) == 1 and notices[0].startswith("edgemoe: notice: ")
    row = json.loads(result.stdout.splitlines()[0])
    assert row["mem_limit"] == 1 << 30 and row["mem_limit_cgroup"] == "none" and row["status"] == "ok"


@needs_cgroup
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_or_sigterm_removes_cgroups_and_restores_read_ahead(signum, oom_model, edgemoe_env, cpu_hog):
    """On a busy machine: Ctrl-C (SIGINT to the whole process group) or SIGTERM (to `edgemoe
    bench` alone, whose child then has to be killed by it) ends the run within 5 s, the child's
    cgroup removed and the disk's read-ahead restored."""
    from edgemoe.bench.disk import read_ahead_kb

    original = read_ahead_kb(oom_model)
    if original is None:
        pytest.skip("no read-ahead knob for the test directory's disk")
    wanted = 256 if original != 256 else 128
    before = set(leftover_groups(CONTROLLER))
    proc = start_edgemoe(["bench", "-m", oom_model, "-p", "0", "-n", "100000", "-r", "1", "--expert-cache", "10%",
                          "--mem-limit", "300MiB", "--read-ahead", wanted], edgemoe_env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the child runs in its group
            groups = set(leftover_groups(CONTROLLER)) - before
            if groups and any((g / "cgroup.procs").read_text().split() for g in groups):
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("no cgroup appeared")
        assert read_ahead_kb(oom_model) == wanted
        time.sleep(0.5)  # the child starts up, loads, decodes: any of it
        err, seconds = interrupt(proc, signum, group=signum == signal.SIGINT)
        assert_interrupted(proc, err, signum)
        assert seconds < SIGNAL_BOUND_S
        assert set(leftover_groups(CONTROLLER)) == before
        assert read_ahead_kb(oom_model) == original
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _tidy(before, oom_model, original)


def _tidy(groups_before, model, read_ahead) -> None:
    """What a failed interrupt left, removed, so that it fails no test after it: its groups
    (and what runs in them), the read-ahead it set."""
    from edgemoe.bench.disk import read_ahead_kb, read_ahead_knob

    for group in set(leftover_groups(CONTROLLER)) - groups_before:
        for _ in range(100):
            try:
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                group.rmdir()
            except FileNotFoundError:
                break
            except OSError:  # busy until the killed tasks are gone
                time.sleep(0.05)
            else:
                break
    if read_ahead_kb(model) != read_ahead:
        read_ahead_knob(model).write_text(str(read_ahead))


# -- cold, read-ahead ---------------------------------------------------------------------

def test_cold_starts_each_repetition_empty(model, edgemoe_env):
    from edgemoe.bench.disk import read_ahead_kb

    args = ["-m", model, "-p", "64", "-n", "0", "-r", "2", "--expert-cache", "100%", "-o", "json"]
    warm = _json_rows(_bench(args, edgemoe_env))
    assert warm[0]["cold"] is False
    original = read_ahead_kb(model)
    extra = [] if original is None or os.geteuid() != 0 else ["--read-ahead", "512" if original != 512 else "256"]
    cold = _json_rows(_bench([*args, "--cold", *extra], edgemoe_env))
    assert cold[0]["cold"] is True and cold[0]["repetitions"] == 2
    # every repetition starts from an empty pool: at least k experts of each of the 2 layers
    # load, where the warm run's warm-up had already loaded nearly all
    assert cold[0]["misses"] >= 2 * 2 and cold[0]["misses"] > warm[0]["misses"] and cold[0]["bytes_read"] > 0
    if extra:
        assert cold[0]["read_ahead_kb"] == int(extra[1])
        assert read_ahead_kb(model) == original


def test_preload_makes_every_expert_resident(model, edgemoe_env):
    args = ["-m", model, "-p", "0", "-n", "8", "-r", "1", "--expert-cache", "100%", "--no-warmup", "-o", "json"]
    empty = _json_rows(_bench(args, edgemoe_env))[0]
    preloaded = _json_rows(_bench([*args, "--preload"], edgemoe_env))[0]
    assert empty["misses"] > 0  # no warm-up: the pool starts empty
    assert preloaded["misses"] == 0 and preloaded["hit_rate"] == 1.0 and preloaded["bytes_read"] == 0


# -- prompts and routes --------------------------------------------------------------------

def test_prompts_generate_from_real_text(model, edgemoe_env, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Once upon a time there was a"}\n\n{"text": "The capital of France is"}\n')
    rows = _json_rows(_bench(["-m", model, "-n", "4", "-r", "3", "--expert-cache", "50%", "--prompts", prompts,
                              "-o", "json"], edgemoe_env))
    [row] = rows
    assert row["test"] == "prompt+tg4" and row["prompts"] == "p.jsonl" and row["n_gen"] == 4
    assert row["n_prompt"] > 3 and len(row["samples_ttft_ms"]) == 3
    assert [len(s) for s in row["samples_tpot_ms"]] == [4, 4, 4]


def _trace(path, experts, n_expert):
    np.savez(path, experts=experts.astype(np.int32), layers=np.arange(experts.shape[1], dtype=np.int32),
             tokens=np.arange(experts.shape[0], dtype=np.int32), n_expert=np.int32(n_expert), model="t.gguf",
             format_version=np.int32(1))
    return path


def test_routes_replay_drives_the_cache(model, edgemoe_env, tmp_path):
    """A trace that always picks the same two experts: with slots for those of both layers (twice
    the minimum of k slots; the layers share one pool) every use after the warm-up hits; the
    model's own routing at that budget misses."""
    from edgemoe.cache import inspect_model

    budget = str(2 * inspect_model(model).min_budget_bytes)
    const = np.zeros((40, 1, 2), dtype=np.int32)
    const[:, :, 1] = 1
    trace = _trace(tmp_path / "const.npz", const, 8)
    args = ["-m", model, "-p", "0", "-n", "16", "-r", "2", "--expert-cache", budget, "-o", "json"]
    own = _json_rows(_bench(args, edgemoe_env))[0]
    proc = _bench([*args, "--routes", trace, "--baseline"], edgemoe_env)
    replayed, stock = _json_rows(proc)
    assert own["misses"] > 0 and own["routes"] is None
    assert replayed["routes"] == "const.npz" and replayed["misses"] == 0 and replayed["hit_rate"] == 1.0
    assert stock["expert_cache"] == "off" and stock["routes"] is None
    assert "own router" in proc.stderr  # the baseline cannot follow a trace: said once


def test_routes_replay_of_a_wider_trace(model, edgemoe_env, tmp_path):
    rng = np.random.default_rng(5)
    experts = np.stack([np.stack([rng.permutation(32)[:4] for _ in range(3)]) for _ in range(64)])
    trace = _trace(tmp_path / "wide.npz", experts, 32)
    rows = _json_rows(_bench(["-m", model, "-p", "8", "-n", "8", "-r", "1", "--expert-cache", "50%", "--routes",
                              trace, "-o", "json"], edgemoe_env))
    assert all(r["status"] == "ok" and r["routes"] == "wide.npz" for r in rows)
    assert rows[1]["hits"] + rows[1]["misses"] == 8 * 2 * 2  # tokens x MoE layers x k


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing", "not_gguf", "budget_junk", "budget_below_min", "limit_too_small",
                                  "limit_junk", "policy", "io", "nothing_to_run", "prompts_json",
                                  "prompts_empty", "prompts_missing", "routes_bad", "routes_dense"])
def test_bad_input_is_one_line(case, model, dense_model, edgemoe_env, tmp_path):
    from edgemoe.cache import inspect_model

    info = inspect_model(model)
    args = ["-m", model, "-p", "4", "-n", "2", "-r", "1"]
    needle = []
    if case == "missing":
        args[1], needle = tmp_path / "none.gguf", ["not found"]
    elif case == "not_gguf":
        (tmp_path / "x.gguf").write_text("hello" * 100)
        args[1], needle = tmp_path / "x.gguf", ["gguf"]
    elif case == "budget_junk":
        args += ["--expert-cache", "25%,lots"]
        needle = ["budget"]
    elif case == "budget_below_min":
        args += ["--expert-cache", str(info.min_budget_bytes - 1)]
        needle = ["minimum"]
    elif case == "limit_too_small":
        args += ["--mem-limit", str(info.non_expert_bytes + info.min_budget_bytes - 4096)]
        needle = ["too small", "minimum"]
    elif case == "limit_junk":
        args += ["--mem-limit", "50%"]
        needle = ["--mem-limit"]
    elif case == "policy":
        args += ["--policy", "lru,fifo"]
        needle = ["fifo"]
    elif case == "io":
        args += ["--io", "tape"]
        needle = ["tape"]
    elif case == "nothing_to_run":
        args[3], args[5] = "0", "0"
        needle = ["nothing"]
    elif case == "prompts_json":
        (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
        args += ["--prompts", tmp_path / "p.jsonl"]
        needle = [":2"]
    elif case == "prompts_empty":
        (tmp_path / "p.jsonl").write_text('\n{"other": 1}\n')
        args += ["--prompts", tmp_path / "p.jsonl"]
        needle = ["prompt"]
    elif case == "prompts_missing":
        args += ["--prompts", tmp_path / "none.jsonl"]
        needle = ["--prompts"]
    elif case == "routes_bad":
        (tmp_path / "t.npz").write_text("no")
        args += ["--routes", tmp_path / "t.npz"]
        needle = ["trace"]
    else:
        args[1] = dense_model
        args += ["--routes", _trace(tmp_path / "t.npz", np.zeros((4, 1, 2)) + [0, 1], 8)]
        needle = ["dense"]
    _assert_one_line_error(_bench(args, edgemoe_env), *needle)


def test_help_lists_the_flags(edgemoe_env):
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "bench", "--help"], env=edgemoe_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("-m", "-p", "-n", "-r", "-t", "--expert-cache", "--policy", "--io", "--baseline", "--mem-limit",
                 "--cold", "--prompts", "--routes", "--read-ahead", "-o"):
        assert flag in proc.stdout


# -- what the child uses of the engine ----------------------------------------------------------

def test_engine_last_only_logits_and_description(model):
    from conftest import N_THREADS
    from edgemoe.engine import Engine

    tokens = [11, 400, 1234, 99, 7, 3000]
    with Engine(model, expert_cache="50%", n_threads=N_THREADS, n_ctx=64) as e:
        full = e.eval(tokens)
        e.reset()
        last = e.eval(tokens, last_only=True)
        assert last.shape == (1, e.n_vocab) and np.array_equal(last[0], full[-1])
        assert e.n_past == len(tokens)
        d = e.describe()
        assert d.desc.startswith("qwen3moe") and d.n_params > 0
        assert 0 < d.size <= os.path.getsize(model)


# -- telemetry ------------------------------------------------------------------------------

def test_telemetry_counts_storage_reads(tmp_path):
    from edgemoe.bench.disk import drop_file_pages
    from edgemoe.telemetry import Telemetry, jetson_status

    path = tmp_path / "blob"
    path.write_bytes(os.urandom(8 << 20))
    drop_file_pages(path)
    tel = Telemetry(jetson=False)
    started = tel.start()
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
    w = tel.stop(started)
    tel.close()
    assert w.seconds > 0 and w.rss_bytes > 0 and w.cpu_user_s + w.cpu_system_s >= 0
    if os.path.exists(f"/proc/{os.getpid()}/io") and not on_tmpfs(path):
        assert w.disk_read_bytes >= 4 << 20
    assert w.power_w is None and w.energy_j is None
    ok, why = jetson_status()
    assert ok or (why and "\n" not in why)




def test_prefetch_variants_and_the_time_split(edgemoe_env, tmp_path):
    """--prefetch off,lookahead x --prefetch-top: one row each, prefetch counters only where it
    prefetches, the decode step split per token, and every variant generating the same text."""
    trained = os.path.join(os.path.dirname(__file__), "..", "models", "edgemoe-tiny-q8_0.gguf")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "It is a truth universally acknowledged, that"}\n'
                       '{"prompt": "Once upon a time there lived"}\n')
    rows = _json_rows(_bench(["-m", trained, "--prompts", prompts, "-n", 12, "-r", 1, "--expert-cache", "25%",
                              "--prefetch", "off,lookahead", "--prefetch-top", "8,2", "-o", "json"], edgemoe_env))
    assert [r["prefetch"] for r in rows] == ["off", "lookahead:1:8", "lookahead:1:2"]
    off, full, top4 = rows
    assert off["prefetch_issued"] == 0 and off["pred_precision"] is None
    for r in (full, top4):
        assert r["prefetch_issued"] > 0
        assert 0 < r["pred_precision"] <= 1
    assert top4["prefetch_issued"] < full["prefetch_issued"]
    for r in rows:
        assert r["compute_ms"] >= 0 and r["stall_ms_per_token"] >= 0 and r["cpu_s_per_token"] > 0
        # the split adds up to the TPOT of the decode steps
        parts = r["compute_ms"] + r["stall_ms_per_token"] + r["cache_ms_per_token"] + r["predict_ms_per_token"]
        assert parts == pytest.approx(r["tpot_ms"], rel=1e-6)
        assert r["samples_generated"] == off["samples_generated"]
        assert len(r["samples_generated"][0]) == 12


def test_prefetch_flags_refuse_bad_values(model, edgemoe_env):
    _assert_one_line_error(_bench(["-m", model, "--prefetch", "sometimes"], edgemoe_env), "--prefetch")
    _assert_one_line_error(_bench(["-m", model, "--lookahead", "9"], edgemoe_env), "--lookahead")


# -- streams (--parallel) -----------------------------------------------------------------

def test_parallel_streams_rows(model, edgemoe_env, tmp_path):
    """--parallel N --schedule fifo,expert --step-seqs S: one row per (N, schedule) with the
    streams' fields; stock (cache off) runs fifo only; every stream generates -n tokens."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Prompt number {i} says"}) + "\n" for i in range(4)))
    rows = _json_rows(_bench(["-m", model, "-n", "6", "-r", "2", "--no-warmup", "--expert-cache", "50%",
                              "--baseline", "--prompts", prompts, "--parallel", "2,4", "--step-seqs", "2",
                              "--schedule", "fifo,expert", "-t", "2", "-o", "json"], edgemoe_env))
    got = [(r["expert_cache"], r["n_parallel"], r["schedule"], r["step_seqs"]) for r in rows]
    assert got == [("50%", 2, "fifo", None), ("50%", 2, "expert", None), ("50%", 4, "fifo", 2),
                   ("50%", 4, "expert", 2), ("off", 2, "fifo", None), ("off", 4, "fifo", 2)]
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert r["test"] == "streams tg6" and r["n_gen"] == 6
        # every stream of both repetitions, 6 tokens each
        assert [len(g) for g in r["samples_generated"]] == [6] * (2 * r["n_parallel"])
        assert r["tokens_per_s"] > 0 and r["avg_ts"] > 0
        assert 0 < r["latency_p50_ms"] <= r["latency_p95_ms"]
        if r["expert_cache"] == "off":
            assert r["unique_experts_per_step"] is None  # measured through the cache
        else:
            # distinct experts per layer in a step: at least top-k, at most the model's experts
            assert 2 <= r["unique_experts_per_step"] <= 8
    # greedy streams decode the same tokens whatever the cache and the schedule
    by = {(r["expert_cache"], r["n_parallel"], r["schedule"]): r["samples_generated"] for r in rows}
    assert by[("50%", 2, "fifo")] == by[("off", 2, "fifo")]


def test_parallel_flags_refuse_bad_values(model, edgemoe_env):
    _assert_one_line_error(_bench(["-m", model, "--parallel", "2", "--schedule", "lottery"], edgemoe_env),
                           "--schedule", "lottery")
    _assert_one_line_error(_bench(["-m", model, "--parallel", "0"], edgemoe_env), "--parallel")
    _assert_one_line_error(_bench(["-m", model, "--parallel", "2", "-n", "0"], edgemoe_env), "-n above 0")


def test_hybrid_rows_count_cpu_uses(model, edgemoe_env):
    """--hybrid reaches the cache rows (misses computed on the CPU, counted in cpu_uses); the
    stock row runs without it (a hybrid needs a cache)."""
    args = ["-m", model, "-p", "0", "-n", "16", "-r", "1", "--expert-cache", "off,25%", "--hybrid", "-o", "json"]
    rows = _json_rows(_bench(args, edgemoe_env))
    by_cache = {r["expert_cache"]: r for r in rows}
    assert by_cache["off"]["hybrid"] is False and by_cache["off"]["cpu_uses"] is None
    cached = by_cache["25%"]
    assert cached["hybrid"] is True
    assert 0 < cached["cpu_uses"] <= cached["misses"]
    assert cached["stall_ms"] == 0
