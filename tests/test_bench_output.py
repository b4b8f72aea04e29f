"""Printers, row aggregation and parameter expansion of `edgemoe bench`, without running models."""

from __future__ import annotations

import csv
import io
import json
import statistics

import pytest

from edgemoe.bench.output import Printer
from edgemoe.bench.params import AUTO, AUTO_OVERHEAD, ModelFacts, BenchTest, auto_limit, check_budget, check_limit, expand
from edgemoe.bench.results import FIELDS, SCALAR_FIELDS, Row, fill_measurements
from edgemoe.errors import InvalidArgumentError


def _rep(rep, ns, tpot=(), ttft=None, hits=10, misses=5):
    return dict(rep=rep, ns=ns, n_tokens=len(tpot) or 8, n_prompt_tokens=0 if tpot else 8, ttft_ms=ttft,
                tpot_ms=list(tpot), hits=hits, misses=misses, prefetch_hits=0, bytes_read=4096 * misses,
                read_ms=1.0, stall_ms=2.0, peak_rss_bytes=100 << 20,
                telemetry=dict(seconds=ns / 1e9, rss_bytes=1, disk_read_bytes=4096, cpu_user_s=0.1,
                               cpu_system_s=0.01))


def test_fill_measurements_means_and_sample_stddev():
    row = Row(expert_cache="25%", test="tg4")
    reps = [_rep(0, 4_000_000, tpot=[1.0, 1.0, 1.0, 1.0]), _rep(1, 8_000_000, tpot=[1.0, 2.0, 3.0, 2.0])]
    fill_measurements(row, reps)
    assert row.repetitions == 2 and row.samples_ns == [4_000_000, 8_000_000]
    assert row.samples_ts == pytest.approx([1000.0, 500.0])
    assert row.avg_ts == pytest.approx(750.0) and row.stddev_ts == pytest.approx(statistics.stdev([1000, 500]))
    assert row.avg_ns == 6_000_000 and row.stddev_ns == round(statistics.stdev([4e6, 8e6]))
    assert row.tpot_ms == pytest.approx(1.5) and row.tpot_ms_stddev == pytest.approx(statistics.stdev([1.0, 2.0]))
    assert row.tpot_p50_ms == pytest.approx(1.0) and row.tpot_p90_ms == pytest.approx(2.3)
    assert row.hit_rate == pytest.approx(20 / 30) and row.misses == 5
    assert row.ttft_ms is None and row.samples_tpot_ms[1] == [1.0, 2.0, 3.0, 2.0]
    off = Row(expert_cache="off", test="pp8")
    fill_measurements(off, [_rep(0, 1_000_000, ttft=1.0)])
    assert off.hit_rate is None and off.hits is None and off.ttft_ms == 1.0 and off.ttft_ms_stddev == 0.0


def _rows():
    a = Row(n_batch=512, n_ubatch=512, model_type="qwen3moe 1B Q8_0", model_size=3 << 30, model_n_params=3_580_000_000, n_threads=2,
            expert_cache="25%", policy="default", io="direct", test="tg32", status="ok", avg_ts=12.5,
            stddev_ts=0.25, tpot_ms=80.0, tpot_ms_stddev=1.5, hit_rate=0.95, mem_limit=2 << 30,
            mem_limit_cgroup="v1", samples_ns=[1, 2])
    b = Row(n_batch=512, n_ubatch=512, model_filename="/m/x.gguf", n_threads=2, expert_cache="100%", policy="lru", io="buffered",
            test='pp"512', status="oom", error='killed, "hard"', mem_limit=1 << 30, mem_limit_cgroup="none")
    return [a, b]


def test_markdown_columns_and_cells():
    out = io.StringIO()
    p = Printer("md", out, _rows())
    p.begin()
    for r in _rows():
        p.row(r)
    p.end()
    lines = out.getvalue().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:5] == ["model", "size", "params", "backend", "threads"]
    for col in ("expert_cache", "policy", "io", "mem_limit", "test", "t/s", "ttft_ms", "tpot_ms", "tpot_p50_ms",
                "tpot_p90_ms", "hit_rate", "bytes_read", "stall_ms", "peak_rss_bytes"):
        assert col in header
    for col in ("n_batch", "n_ubatch", "ngl", "routes"):  # defaults: not shown, as llama-bench
        assert col not in header
    assert set(lines[1].replace("|", "").split()) <= {"-" * n for n in range(1, 40)} | {"-" * n + ":" for n in range(1, 40)}
    cells = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|"))))
    assert cells["t/s"] == "12.50 ± 0.25" and cells["tpot_ms"] == "80.00 ± 1.50" and cells["hit_rate"] == "0.950"
    assert cells["params"] == "3.58 B" and cells["size"] == "3.00 GiB" and cells["mem_limit"] == "2.00 GiB"
    oom = dict(zip(header, (c.strip() for c in lines[3].strip("|").split("|"))))
    assert oom["t/s"] == "OOM" and oom["model"] == "x.gguf" and oom["mem_limit"].endswith("(not enforced)")


def test_markdown_shows_non_default_batch_columns():
    rows = [Row(n_batch=256, n_ubatch=512, n_gpu_layers=99)]
    out = io.StringIO()
    Printer("md", out, rows).begin()
    header = out.getvalue().splitlines()[0]
    assert "n_batch" in header and "ngl" in header and "n_ubatch" not in header


def test_csv_quotes_every_scalar_and_omits_samples():
    out = io.StringIO()
    p = Printer("csv", out)
    p.begin()
    for r in _rows():
        p.row(r)
    p.end()
    text = out.getvalue()
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert list(parsed[0].keys()) == SCALAR_FIELDS and not any(k.startswith("samples_") for k in parsed[0])
    assert parsed[1]["test"] == 'pp"512' and parsed[1]["error"] == 'killed, "hard"' and parsed[1]["status"] == "oom"
    assert parsed[0]["use_mmap"] == "1" and parsed[0]["ttft_ms"] == ""
    for line in text.splitlines()[1:]:  # the header is bare, as llama-bench's
        assert line.startswith('"') and line.endswith('"')


@pytest.mark.parametrize("n", [0, 1, 2])
def test_json_is_one_valid_array(n):
    out = io.StringIO()
    p = Printer("json", out)
    p.begin()
    for r in _rows()[:n]:
        p.row(r)
    p.end()
    data = json.loads(out.getvalue())
    assert isinstance(data, list) and len(data) == n
    for d in data:
        assert list(d) == FIELDS


def test_jsonl_one_object_per_line():
    out = io.StringIO()
    p = Printer("jsonl", out)
    p.begin()
    for r in _rows():
        p.row(r)
    p.end()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and [json.loads(l)["test"] for l in lines] == ["tg32", 'pp"512']


# -- expansion ---------------------------------------------------------------------------

FACTS = ModelFacts("/m/a.gguf", expert_bytes=1000 << 20, non_expert_bytes=100 << 20, min_budget_bytes=10 << 20,
                   n_moe_layer=4)
TESTS = (BenchTest("pp", 16, 0), BenchTest("tg", 0, 8))


def test_every_combination_in_order():
    configs = expand([FACTS], [1, 2], [512], [512], [0], ["25%", "50%"], ["lru", "lfu"], ["direct", "buffered"],
                     baseline=False, mem_limit=None, tests=TESTS)
    assert len(configs) == 2 * 2 * 2 * 2
    assert [(c.n_threads, c.expert_cache, c.policy, c.io) for c in configs[:4]] == [
        (1, "25%", "lru", "direct"), (1, "25%", "lru", "buffered"), (1, "25%", "lfu", "direct"),
        (1, "25%", "lfu", "buffered")]
    assert all(c.tests == TESTS and c.mem_limit is None for c in configs)


def test_auto_limit_and_baseline_beside_each_budget():
    configs = expand([FACTS], [2], [512], [512], [0], ["10%", "25%"], ["default"], ["direct"], baseline=True,
                     mem_limit=AUTO, tests=TESTS)
    assert [(c.expert_cache, c.mem_limit) for c in configs] == [
        ("10%", (100 << 20) + (100 << 20) + AUTO_OVERHEAD), (None, (100 << 20) + (100 << 20) + AUTO_OVERHEAD),
        ("25%", (100 << 20) + (250 << 20) + AUTO_OVERHEAD), (None, (100 << 20) + (250 << 20) + AUTO_OVERHEAD)]
    assert auto_limit("off", FACTS) == (1100 << 20) + AUTO_OVERHEAD
    assert auto_limit("64MiB", FACTS) == (164 << 20) + AUTO_OVERHEAD


def test_fixed_limit_one_baseline_and_duplicates_dropped():
    configs = expand([FACTS], [2], [512], [512], [0], ["25%", "off"], ["default"], ["direct"], baseline=True,
                     mem_limit=str(1 << 30), tests=TESTS)
    assert [(c.expert_cache, c.mem_limit) for c in configs] == [("25%", 1 << 30), (None, 1 << 30)]


def test_budget_and_limit_checks_name_the_minimum():
    check_budget("1%", FACTS)
    with pytest.raises(InvalidArgumentError, match="minimum"):
        check_budget("0.5%", FACTS)
    with pytest.raises(InvalidArgumentError, match="minimum"):
        check_budget("5MiB", FACTS)
    check_limit((110 << 20), FACTS)
    with pytest.raises(InvalidArgumentError, match="too small"):
        check_limit((110 << 20) - 1, FACTS)


def test_auto_budget_gets_stocks_limit_and_passes_the_minimum_check():
    check_budget("auto", FACTS)  # sized in the child, never below the minimum
    assert auto_limit("auto", FACTS) == auto_limit("off", FACTS) == (1100 << 20) + AUTO_OVERHEAD
    configs = expand([FACTS], [2], [512], [512], [0], ["auto", "25%", "off"], ["default"], ["direct"],
                     baseline=True, mem_limit=AUTO, tests=TESTS)
    stock = (1100 << 20) + AUTO_OVERHEAD
    # auto's baseline and the plain `off` share stock's limit: one stock row there, not two
    assert [(c.expert_cache, c.policy, c.mem_limit) for c in configs] == [
        ("auto", "default", stock), (None, None, stock), ("25%", "default", (350 << 20) + AUTO_OVERHEAD),
        (None, None, (350 << 20) + AUTO_OVERHEAD)]
    fixed = expand([FACTS], [2], [512], [512], [0], ["auto"], ["lru", "lfu"], ["direct"], baseline=False,
                   mem_limit=str(1 << 30), tests=TESTS)
    assert [(c.expert_cache, c.policy, c.mem_limit) for c in fixed] == [("auto", "lru", 1 << 30),
                                                                         ("auto", "lfu", 1 << 30)]


def test_markdown_shows_what_auto_chose():
    rows = [Row(expert_cache="auto", expert_cache_auto="expert cache auto: off, every expert fits (...)"),
            Row(expert_cache="auto", expert_cache_bytes=3 << 29, expert_cache_auto="expert cache auto: 1.5 GiB"),
            Row(expert_cache="auto", status="error", error="boom"),  # the child never got that far
            Row(expert_cache="25%", expert_cache_bytes=1 << 20)]
    out = io.StringIO()
    p = Printer("md", out, rows)
    p.begin()
    for r in rows:
        p.row(r)
    lines = out.getvalue().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))["expert_cache"] for line in lines[2:]]
    assert cells == ["auto: off", "auto: 1.5 GiB", "auto", "25%"]
    assert len({len(line) for line in lines}) == 1  # the column is wide enough for every cell
