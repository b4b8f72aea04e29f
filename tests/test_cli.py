"""`edgemoe run` end to end, in subprocesses (native stderr output is part of what we check)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import assert_one_line_error as _assert_one_line_error, needs_cache, needs_llama

pytestmark = needs_llama


def _run(args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "edgemoe", "run", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_run_streams_text_and_writes_stats(tiny_models, edgemoe_env, tmp_path):
    out = tmp_path / "stats.json"
    proc = _run(["-m", str(tiny_models["qwen3moe"]), "-p", "Hello", "-n", "12", "--seed", "1",
                 "--stats", "--stats-json", str(out)], edgemoe_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    stats = json.loads(out.read_text())
    for name in ("ttft_ms", "tpot_ms", "tokens_per_s", "hit_rate", "hits", "misses", "bytes_read",
                 "stall_ms", "peak_rss_bytes"):
        assert name in stats
        assert f"{name}: " in proc.stderr
    assert stats["n_generated"] == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]  # no temp file left


def test_run_is_reproducible_with_seed(tiny_models, edgemoe_env):
    args = ["-m", str(tiny_models["qwen2moe"]), "-p", "Hi", "-n", "10", "--seed", "42"]
    assert _run(args, edgemoe_env).stdout == _run(args, edgemoe_env).stdout


@pytest.mark.parametrize("case", ["missing", "not_gguf", "truncated", "empty"])
def test_bad_model_file(case, tiny_models, edgemoe_env, tmp_path):
    path = tmp_path / "model.gguf"
    if case == "not_gguf":
        path.write_text("this is not a model\n" * 50)
    elif case == "truncated":
        data = tiny_models["qwen3moe"].read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif case == "empty":
        path.write_bytes(b"")
    stats = tmp_path / "stats.json"
    proc = _run(["-m", str(path), "-n", "4", "--stats-json", str(stats)], edgemoe_env)
    _assert_one_line_error(proc)
    assert not stats.exists() and proc.stdout == ""
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@needs_cache
def test_truncated_model_with_cache(tiny_models, edgemoe_env, tmp_path):
    path = tmp_path / "cut.gguf"
    data = tiny_models["qwen3moe"].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_one_line_error(_run(["-m", str(path), "-n", "4", "--expert-cache", "50%"], edgemoe_env))


@pytest.mark.parametrize("budget", ["lots", "-1", "0%", "150%", "12XB"])
def test_bad_budget_string(budget, tiny_models, edgemoe_env, tmp_path):
    stats = tmp_path / "s.json"
    proc = _run(["-m", str(tiny_models["qwen3moe"]), "--expert-cache", budget, "--stats-json", str(stats)],
                edgemoe_env)
    _assert_one_line_error(proc, "budget")
    assert not stats.exists()


@needs_cache
def test_budget_below_minimum(tiny_models, edgemoe_env, tmp_path):
    from edgemoe.cache import inspect_model

    path = tiny_models["qwen3moe"]
    minimum = inspect_model(path).min_budget_bytes
    stats = tmp_path / "s.json"
    proc = _run(["-m", str(path), "--expert-cache", str(minimum - 1), "--stats-json", str(stats)], edgemoe_env)
    _assert_one_line_error(proc, "minimum")
    assert not stats.exists() and proc.stdout == ""


@pytest.mark.parametrize("where", ["no_dir", "under_file", "is_dir"])
def test_unwritable_stats_json(where, tiny_models, edgemoe_env, tmp_path):
    if where == "no_dir":
        target = tmp_path / "missing" / "s.json"
    elif where == "under_file":
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "s.json"
    else:
        target = tmp_path
    proc = _run(["-m", str(tiny_models["qwen3moe"]), "-n", "4", "--stats-json", str(target)], edgemoe_env)
    _assert_one_line_error(proc, "stats-json")
    assert proc.stdout == ""  # failed before generating


@needs_cache
def test_dense_model_with_cache_gives_notice_and_runs(dense_model, edgemoe_env):
    proc = _run(["-m", str(dense_model), "-n", "8", "--expert-cache", "25%", "--stats"], edgemoe_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    notices = [l for l in proc.stderr.splitlines() if "dense" in l.lower() or "no routed experts" in l.lower()]
    assert len(notices) == 1
    assert "Traceback" not in proc.stderr


@needs_cache
def test_run_with_cache_reports_hits(tiny_models, edgemoe_env, tmp_path):
    out = tmp_path / "s.json"
    proc = _run(["-m", str(tiny_models["olmoe"]), "-n", "16", "--expert-cache", "50%", "--policy", "lru",
                 "--io", "buffered", "--stats-json", str(out)], edgemoe_env)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(out.read_text())
    assert stats["hits"] + stats["misses"] > 0 and 0 <= stats["hit_rate"] <= 1
    assert stats["expert_cache_bytes"] > 0 and stats["bytes_read"] > 0


def test_usage_error_is_one_line(edgemoe_env):
    proc = _run(["--policy", "fifo"], edgemoe_env)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("edgemoe: error: ")


def test_cli_runner_in_process(tiny_models):
    """The command also works through click's runner (no subprocess)."""
    from edgemoe.cli import cli

    result = CliRunner().invoke(cli, ["run", "-m", str(tiny_models["qwen3moe"]), "-n", "5", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    bad = CliRunner().invoke(cli, ["run", "-m", "/nonexistent/model.gguf"])
    assert bad.exit_code == 1 and bad.stderr.startswith("edgemoe: error: ")


def test_default_model_writes_english(edgemoe_env):
    """Without -m: the shipped trained model, greedy, words of its corpus, deterministic."""
    import re

    from conftest import REPO

    args = ["-p", "Once upon a time", "-n", "48", "--temp", "0", "--expert-cache", "25%"]
    first = _run(args, edgemoe_env)
    assert first.returncode == 0, first.stderr
    words = re.findall(r"[A-Za-z]+", first.stdout)
    assert len(words) >= 20, first.stdout
    known = set(re.findall(r"[a-z]+", (REPO / "models" / "corpus" / "heldout.txt").read_text().lower()))
    assert sum(w.lower() in known for w in words) / len(words) > 0.9, first.stdout
    assert _run(args, edgemoe_env).stdout == first.stdout


def test_missing_default_model_is_one_line(edgemoe_env, tmp_path):
    env = dict(edgemoe_env, EDGEMOE_DEFAULT_MODEL=str(tmp_path / "absent.gguf"))
    _assert_one_line_error(_run(["-n", "2"], env), "default model")


def test_help_and_version(edgemoe_env):
    for args in (["--help"], ["run", "--help"], ["--version"]):
        proc = subprocess.run([sys.executable, "-m", "edgemoe", *args], env=edgemoe_env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    run_help = subprocess.run([sys.executable, "-m", "edgemoe", "run", "--help"], env=edgemoe_env,
                              capture_output=True, text=True, timeout=60).stdout
    for flag in ("-m", "-p", "-n", "-t", "-c", "--temp", "--seed", "--expert-cache", "--policy", "--io",
                 "--stats", "--stats-json"):
        assert flag in run_help


@needs_cache
def test_run_hybrid_generates_the_cache_off_text(tiny_models, edgemoe_env):
    """--hybrid reaches the engine: greedy text equals the cache-off run's (exact on a host pool,
    tests/test_hybrid.py), and a cache-off hybrid is refused in one line."""
    path = str(tiny_models["qwen3moe"])
    args = ["-m", path, "-p", "Hello", "-n", "12", "--temp", "0"]
    off = _run([*args, "--expert-cache", "off"], edgemoe_env)
    hybrid = _run([*args, "--expert-cache", "50%", "--hybrid"], edgemoe_env)
    assert off.returncode == 0 and hybrid.returncode == 0, hybrid.stderr
    assert hybrid.stdout == off.stdout
    refused = _run([*args, "--expert-cache", "off", "--hybrid"], edgemoe_env)
    _assert_one_line_error(refused)
    assert "needs a cache" in refused.stderr


def test_run_io_pinned_on_a_host_pool_is_refused_in_one_line(tiny_models, edgemoe_env):
    """--io pinned is the GPU's DMA out of the pinned file into VRAM slots: a host pool says so."""
    path = str(tiny_models["qwen3moe"])
    refused = _run(["-m", path, "-p", "Hello", "-n", "4", "--expert-cache", "50%", "--expert-pool", "host",
                    "--io", "pinned"], edgemoe_env)
    _assert_one_line_error(refused)
    assert "io pinned is for a VRAM expert pool" in refused.stderr
