"""One result row per (configuration, test), with llama-bench's fields first, then ours.

A row's figures are over its repetitions: `avg_*`/`*_ms` the mean, `stddev_*`/`*_stddev` the
sample standard deviation (0 for one repetition); cache counters and telemetry are means per
repetition; `tpot_p50_ms`/`tpot_p90_ms` pool the tokens of every repetition; the `samples_*`
arrays keep each repetition (`samples_tpot_ms`: every token of each repetition).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

import numpy as np

from edgemoe.power_log import mean_known

STATUS_OK, STATUS_OOM, STATUS_ERROR = "ok", "oom", "error"


@dataclass
class Row:
    # -- llama-bench's fields ------------------------------------------------------------
    edgemoe_version: str = ""
    build_commit: str = ""          # the llama.cpp commit edgemoe patches (llama-bench's short form)
    patch_sha256: str = ""          # of edgemoe's patches as built (edgemoe.version)
    cpu_info: str = ""
    gpu_info: str = ""
    backends: str = "CPU"
    model_filename: str = ""
    model_type: str = ""
    model_size: Optional[int] = None
    model_n_params: Optional[int] = None
    n_batch: int = 0
    n_ubatch: int = 0
    n_threads: int = 0
    n_gpu_layers: int = 0
    use_mmap: bool = True
    n_prompt: int = 0
    n_gen: int = 0
    test: str = ""
    test_time: str = ""
    repetitions: int = 0
    avg_ns: Optional[int] = None
    stddev_ns: Optional[int] = None
    avg_ts: Optional[float] = None
    stddev_ts: Optional[float] = None
    # -- the configuration -----------------------------------------------------------------
    expert_cache: str = "off"
    expert_cache_bytes: Optional[int] = None
    expert_cache_slots: Optional[int] = None
    expert_cache_auto: Optional[str] = None  # with `auto`: what it chose and how (one line)
    policy: Optional[str] = None
    prefetch: Optional[str] = None           # off, lookahead[:layers[:top]]; none with the cache off
    io: Optional[str] = None
    mem_limit: Optional[int] = None
    mem_limit_cgroup: Optional[str] = None   # "v2", "v1", or "none": asked for but not enforced
    cold: bool = False
    hybrid: bool = False                     # --hybrid: misses computed on the CPU (cache rows)
    read_ahead_kb: Optional[int] = None
    routes: Optional[str] = None             # the replayed trace's file name
    prompts: Optional[str] = None            # the --prompts file's name
    n_parallel: int = 1                      # streams tests: sequences decoded together
    schedule: Optional[str] = None           # their step scheduler (fifo, expert)
    step_seqs: Optional[int] = None          # sequences a step decodes (None: every ready one)
    status: str = STATUS_OK
    error: Optional[str] = None
    # -- timings ---------------------------------------------------------------------------
    ttft_ms: Optional[float] = None
    ttft_ms_stddev: Optional[float] = None
    tpot_ms: Optional[float] = None
    tpot_ms_stddev: Optional[float] = None
    tpot_p50_ms: Optional[float] = None
    tpot_p90_ms: Optional[float] = None
    # -- streams tests (--parallel): avg_ts is every generated token over the wall time ------------
    tokens_per_s: Optional[float] = None     # aggregate over the decode steps (no prompt in them)
    latency_p50_ms: Optional[float] = None   # a stream's gap between consecutive tokens, waits included
    latency_p95_ms: Optional[float] = None
    unique_experts_per_step: Optional[float] = None  # distinct experts per MoE layer in a decode step
    # -- the cache -------------------------------------------------------------------------
    hit_rate: Optional[float] = None
    hits: Optional[float] = None
    misses: Optional[float] = None
    prefetch_hits: Optional[float] = None
    bytes_read: Optional[float] = None
    read_ms: Optional[float] = None
    stall_ms: Optional[float] = None
    cpu_uses: Optional[float] = None         # --hybrid: expert uses the CPU computed (part of misses)
    prefetch_issued: Optional[float] = None
    prefetch_wasted: Optional[float] = None
    pred_precision: Optional[float] = None   # the lookahead predictor against the actual routes
    pred_recall: Optional[float] = None
    # -- a decode step, per generated token (docs/cache.md, "Where the time goes") -----------
    compute_ms: Optional[float] = None       # tpot_ms less stall, cache, predictor and router time
    stall_ms_per_token: Optional[float] = None
    cache_ms_per_token: Optional[float] = None
    predict_ms_per_token: Optional[float] = None
    router_ms_per_token: Optional[float] = None  # a readme model's router
    bytes_read_per_token: Optional[float] = None
    cpu_s_per_token: Optional[float] = None  # all threads of the process
    # -- telemetry -------------------------------------------------------------------------
    peak_rss_bytes: Optional[int] = None
    cgroup_peak_bytes: Optional[int] = None  # page cache included
    disk_read_bytes: Optional[float] = None
    cpu_user_s: Optional[float] = None
    cpu_system_s: Optional[float] = None
    power_source: Optional[str] = None       # jtop or tegrastats (edgemoe.telemetry)
    power_w: Optional[float] = None          # board, mean over the repetition
    energy_j: Optional[float] = None         # board, per repetition
    energy_per_token_j: Optional[float] = None  # over every token a repetition evaluated
    rail_energy_per_token_j: Optional[str] = None  # the same per rail: "VDD_IN=0.41,VDD_SOC=0.12"
    temp_max_c: Optional[float] = None
    nvpmodel: Optional[str] = None
    cpu_mhz: Optional[float] = None          # clocks, means over the samples (CPU: online cores)
    gpu_mhz: Optional[float] = None
    emc_mhz: Optional[float] = None
    # -- per repetition --------------------------------------------------------------------
    samples_ns: List[int] = field(default_factory=list)
    samples_ts: List[float] = field(default_factory=list)
    samples_ttft_ms: List[float] = field(default_factory=list)
    samples_tpot_ms: List[List[float]] = field(default_factory=list)
    samples_generated: List[List[int]] = field(default_factory=list)  # prompt tests: the greedy tokens

    def to_dict(self) -> dict:
        return asdict(self)


FIELDS = [f.name for f in fields(Row)]
SAMPLE_FIELDS = [name for name in FIELDS if name.startswith("samples_")]
SCALAR_FIELDS = [name for name in FIELDS if name not in SAMPLE_FIELDS]


def _sd(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return float(statistics.stdev(values)) if len(values) > 1 else 0.0


def fill_measurements(row: Row, reps: List[dict]) -> None:
    """Sets a row's figures from its repetitions (the child's per-repetition dicts)."""
    row.repetitions = len(reps)
    if not reps:
        return
    ns = [int(r["ns"]) for r in reps]
    ts = [r["n_tokens"] / (n / 1e9) if n > 0 else None for r, n in zip(reps, ns)]
    row.samples_ns, row.samples_ts = ns, [t for t in ts if t is not None]
    row.avg_ns, row.stddev_ns = int(round(statistics.fmean(ns))), int(round(_sd(ns)))
    row.avg_ts, row.stddev_ts = mean_known(ts), _sd(ts)

    ttft = [r["ttft_ms"] for r in reps if r["ttft_ms"] is not None]
    if ttft:
        row.samples_ttft_ms = ttft
        row.ttft_ms, row.ttft_ms_stddev = mean_known(ttft), _sd(ttft)
    row.samples_generated = [r["generated"] for r in reps if r.get("generated")]
    tpot = [r["tpot_ms"] for r in reps if r["tpot_ms"]]
    if tpot:
        row.samples_tpot_ms = tpot
        per_rep = [statistics.fmean(t) for t in tpot]
        row.tpot_ms, row.tpot_ms_stddev = mean_known(per_rep), _sd(per_rep)
        pooled = np.concatenate([np.asarray(t, dtype=np.float64) for t in tpot])
        row.tpot_p50_ms = float(np.percentile(pooled, 50))
        row.tpot_p90_ms = float(np.percentile(pooled, 90))

    if row.expert_cache != "off":
        hits, misses = sum(r["hits"] for r in reps), sum(r["misses"] for r in reps)
        row.hit_rate = hits / (hits + misses) if hits + misses else None
        for name in ("hits", "misses", "prefetch_hits", "bytes_read", "read_ms", "stall_ms", "prefetch_issued",
                     "prefetch_wasted", "cpu_uses"):
            setattr(row, name, mean_known([r.get(name) for r in reps]))
        predicted = sum(r.get("pred_predicted", 0) for r in reps)
        actual = sum(r.get("pred_actual", 0) for r in reps)
        correct = sum(r.get("pred_correct", 0) for r in reps)
        row.pred_precision = correct / predicted if predicted else None
        row.pred_recall = correct / actual if actual else None
    n_decode = sum(len(r["tpot_ms"]) for r in reps)
    if n_decode:
        def per_token(name):
            return sum(r.get(name, 0.0) for r in reps) / n_decode

        row.stall_ms_per_token = per_token("decode_stall_ms")
        row.cache_ms_per_token = per_token("decode_book_ms")
        row.predict_ms_per_token = per_token("decode_predict_ms")
        row.router_ms_per_token = per_token("decode_router_ms")
        row.bytes_read_per_token = per_token("decode_bytes_read")
        row.cpu_s_per_token = per_token("decode_cpu_s")
        tpot_all = sum(sum(r["tpot_ms"]) for r in reps) / n_decode
        row.compute_ms = max(0.0, tpot_all - row.stall_ms_per_token - row.cache_ms_per_token
                             - row.predict_ms_per_token - row.router_ms_per_token)
    row.peak_rss_bytes = max(r["peak_rss_bytes"] for r in reps)
    if any("decode_steps" in r for r in reps):
        ms = sum(r["decode_ms"] for r in reps)
        row.tokens_per_s = sum(r["decode_tokens"] for r in reps) / (ms / 1e3) if ms > 0 else None
        if tpot:
            row.latency_p50_ms, row.latency_p95_ms = float(np.percentile(pooled, 50)), float(np.percentile(pooled, 95))
        row.unique_experts_per_step = mean_known([r["unique_experts_per_step"] for r in reps])
        row.samples_generated = [g for r in reps for g in r["streams_generated"]]

    tel = [r["telemetry"] for r in reps]
    row.disk_read_bytes = mean_known([t["disk_read_bytes"] for t in tel])
    row.cpu_user_s = mean_known([t["cpu_user_s"] for t in tel])
    row.cpu_system_s = mean_known([t["cpu_system_s"] for t in tel])
    row.power_source = next((t["power_source"] for t in tel if t.get("power_source")), None)
    if any(t.get("power_w") is not None for t in tel):
        row.power_w = mean_known([t["power_w"] for t in tel])
        row.energy_j = mean_known([t.get("energy_j") for t in tel])
        row.energy_per_token_j = mean_known([t["energy_j"] / r["n_tokens"] for t, r in zip(tel, reps)
                                        if t.get("energy_j") is not None and r["n_tokens"]])
        row.rail_energy_per_token_j = _rails_per_token(tel, reps)
    row.temp_max_c = max((t["temp_max_c"] for t in tel if t.get("temp_max_c") is not None), default=None)
    row.nvpmodel = next((t["nvpmodel"] for t in tel if t.get("nvpmodel")), None)
    row.cpu_mhz = mean_known([t.get("cpu_mhz") for t in tel])
    row.gpu_mhz = mean_known([t.get("gpu_mhz") for t in tel])
    row.emc_mhz = mean_known([t.get("emc_mhz") for t in tel])


def _rails_per_token(tel: List[dict], reps: List[dict]) -> Optional[str]:
    """Each rail's joules per token, the mean over repetitions, as one CSV-safe cell."""
    per_rail: dict = {}
    for t, r in zip(tel, reps):
        for name, joules in (t.get("rail_energy_j") or {}).items():
            if r["n_tokens"]:
                per_rail.setdefault(name, []).append(joules / r["n_tokens"])
    if not per_rail:
        return None
    return ",".join(f"{name}={statistics.fmean(v):.6g}" for name, v in sorted(per_rail.items()))
