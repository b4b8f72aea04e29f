"""edgemoe.serve.metrics: Prometheus text exposition of GeneratorMetrics."""

from __future__ import annotations

import math
import re

import pytest

from edgemoe.generator import GeneratorMetrics
from edgemoe.serve.metrics import CONTENT_TYPE, quantile, render

NAMES = ("edgemoe_requests_total", "edgemoe_prompt_tokens_total", "edgemoe_completion_tokens_total",
         "edgemoe_tpot_seconds", "edgemoe_queue_depth", "edgemoe_active_sequences",
         "edgemoe_expert_cache_hit_rate", "edgemoe_expert_cache_hits_total", "edgemoe_expert_cache_misses_total",
         "edgemoe_expert_bytes_read_total", "edgemoe_expert_stall_seconds_total",
         "edgemoe_unique_experts_per_step")
SAMPLE = re.compile(r'^([a-z_]+)(\{quantile="[0-9.]+"\})? (NaN|[-+]?Inf|[-+]?[0-9.]+(e[-+]?[0-9]+)?)$')


def parse(text: str) -> dict:
    """name (with labels) -> value, checking every line's syntax and HELP/TYPE before samples."""
    assert text.endswith("\n")
    values, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            assert len(parts) == 4 and parts[3], line
            if parts[1] == "TYPE":
                assert parts[3] in ("counter", "gauge", "summary"), line
                typed.add(parts[2])
            continue
        m = SAMPLE.match(line)
        assert m, line
        base = re.sub(r"_(sum|count)$", "", m.group(1))
        assert m.group(1) in typed or base in typed, line
        values[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return values


def test_content_type():
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_every_metric_with_help_and_type():
    m = GeneratorMetrics(requests_total=3, prompt_tokens_total=40, cached_tokens_total=8, completion_tokens_total=60,
                         decode_steps_total=10, token_latency_ms_sum=600.0, token_latency_count=59,
                         unique_experts_sum=25.0, queue_depth=2, active=4, hits=30, misses=10,
                         bytes_read=1 << 20, stall_ms=250.0, token_latency_ms=(10.0, 20.0, 30.0, 40.0))
    text = render(m, n_parallel=4)
    for name in NAMES:
        assert f"# HELP {name} " in text and f"# TYPE {name} " in text
    v = parse(text)
    assert v["edgemoe_requests_total"] == 3 and v["edgemoe_prompt_tokens_total"] == 40
    assert v["edgemoe_completion_tokens_total"] == 60 and v["edgemoe_cached_prompt_tokens_total"] == 8
    assert v['edgemoe_tpot_seconds{quantile="0.5"}'] == pytest.approx(0.025)
    assert v['edgemoe_tpot_seconds{quantile="0.95"}'] == pytest.approx(0.0385)
    assert v["edgemoe_tpot_seconds_sum"] == pytest.approx(0.6) and v["edgemoe_tpot_seconds_count"] == 59
    assert v["edgemoe_queue_depth"] == 2 and v["edgemoe_active_sequences"] == 4
    assert v["edgemoe_parallel_sequences"] == 4
    assert v["edgemoe_expert_cache_hit_rate"] == 0.75
    assert v["edgemoe_expert_cache_hits_total"] == 30 and v["edgemoe_expert_cache_misses_total"] == 10
    assert v["edgemoe_expert_bytes_read_total"] == 1 << 20
    assert v["edgemoe_expert_stall_seconds_total"] == pytest.approx(0.25)
    assert v["edgemoe_unique_experts_per_step"] == 2.5
    assert "TYPE edgemoe_tpot_seconds summary" in text and "TYPE edgemoe_requests_total counter" in text


def test_nothing_yet_is_nan_not_zero_division():
    v = parse(render(GeneratorMetrics()))
    assert math.isnan(v["edgemoe_expert_cache_hit_rate"]) and math.isnan(v["edgemoe_unique_experts_per_step"])
    assert math.isnan(v['edgemoe_tpot_seconds{quantile="0.5"}']) and v["edgemoe_tpot_seconds_count"] == 0
    assert "edgemoe_parallel_sequences" not in v


def test_quantile_interpolates_like_numpy():
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0, 2.0], 0.95) == pytest.approx(1.95)
    assert quantile([7.0], 0.95) == 7.0
    assert math.isnan(quantile([], 0.5))
