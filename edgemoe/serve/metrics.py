"""GET /metrics: the generator's counters and gauges in Prometheus' text exposition format 0.0.4."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

from edgemoe.generator import GeneratorMetrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
QUANTILES = (0.5, 0.95)


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (numpy's default); NaN if empty."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _value(v) -> str:
    if v is None:
        return "NaN"
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class _Text:
    def __init__(self):
        self.lines: List[str] = []

    def metric(self, name: str, kind: str, help: str, value) -> None:
        self.lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {_value(value)}"]

    def summary(self, name: str, help: str, quantiles, total: float, count: int) -> None:
        self.lines += [f"# HELP {name} {help}", f"# TYPE {name} summary"]
        self.lines += [f'{name}{{quantile="{q}"}} {_value(v)}' for q, v in quantiles]
        self.lines += [f"{name}_sum {_value(total)}", f"{name}_count {count}"]


def render(m: GeneratorMetrics, n_parallel: Optional[int] = None) -> str:
    """The exposition text for one snapshot of the generator's metrics."""
    t = _Text()
    t.metric("edgemoe_requests_total", "counter", "Completion requests the generator accepted.",
             m.requests_total)
    t.metric("edgemoe_prompt_tokens_total", "counter",
             "Prompt tokens evaluated (without prefixes kept from a sequence's last request).",
             m.prompt_tokens_total)
    t.metric("edgemoe_cached_prompt_tokens_total", "counter",
             "Prompt tokens whose KV was kept from a sequence's last request.", m.cached_tokens_total)
    t.metric("edgemoe_completion_tokens_total", "counter", "Tokens generated.", m.completion_tokens_total)
    latencies = [ms / 1e3 for ms in m.token_latency_ms]
    t.summary("edgemoe_tpot_seconds",
              "Time between a sequence's consecutive tokens; quantiles over the last 1024.",
              [(q, quantile(latencies, q)) for q in QUANTILES], m.token_latency_ms_sum / 1e3,
              m.token_latency_count)
    t.metric("edgemoe_queue_depth", "gauge", "Requests waiting for a sequence.", m.queue_depth)
    t.metric("edgemoe_active_sequences", "gauge", "Requests holding a sequence.", m.active)
    if n_parallel is not None:
        t.metric("edgemoe_parallel_sequences", "gauge", "Sequences the context holds (--parallel).", n_parallel)
    t.metric("edgemoe_expert_cache_hit_rate", "gauge",
             "Expert uses served from the cache since start (NaN before the first use or without a cache).",
             m.hit_rate)
    t.metric("edgemoe_expert_cache_hits_total", "counter", "Expert uses served from the cache.", m.hits)
    t.metric("edgemoe_expert_cache_misses_total", "counter", "Expert uses that had to be read.", m.misses)
    t.metric("edgemoe_expert_bytes_read_total", "counter", "Bytes of experts read from the model file.",
             m.bytes_read)
    t.metric("edgemoe_expert_stall_seconds_total", "counter", "Time compute waited for expert reads.",
             m.stall_ms / 1e3)
    t.metric("edgemoe_unique_experts_per_step", "gauge",
             "Distinct experts per MoE layer in a decode step, mean over layers and steps.",
             m.unique_experts_sum / m.decode_steps_total if m.decode_steps_total else math.nan)
    return "\n".join(t.lines) + "\n"
