"""Runs configurations in child processes, each inside its own memory cgroup when a limit is
asked for, and turns what they report into rows.

A child the kernel kills for memory leaves no result; with SIGKILL as its end and the group's
OOM-kill counter (or, on kernels without one, its limit-hit counter) up, its rows say OOM and
the sweep goes on. On Ctrl-C or SIGTERM (KeyboardInterrupt here, edgemoe.interrupt) the child
that runs is killed at once and its cgroup removed before the interrupt goes up.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

from edgemoe.bench.child import META_SUFFIX, ChildSpec
from edgemoe.bench.disk import drop_file_pages
from edgemoe.bench.params import Config
from edgemoe.bench.results import STATUS_ERROR, STATUS_OK, STATUS_OOM, Row, fill_measurements
from edgemoe.cgroup import MemoryCgroup, MemoryController
from edgemoe.interrupt import held, wait_child


@dataclass
class Options:
    """How every configuration of a run is measured.

    Args:
        repetitions: timed runs per test.
        warmup: an untimed run of each test first (off with cold: a cold start is the point).
        preload: before that, load every expert the pool can hold, as stock's load reads the file.
        cold: drop the model file's pages before every repetition, each in a fresh process.
        controller: the cgroup controller for memory limits; None runs without (flagged).
        read_ahead_kb: model path -> read-ahead in effect, for the rows.
        repack: ggml's repacking of quantized CPU weights, stock and pools alike (off: llama.cpp's
            --no-repack; stock's repacked experts live in anonymous memory, not the page cache).
        hybrid: cache rows compute the experts not ready in the pool on the CPU (Engine(hybrid=)).
    """

    repetitions: int = 5
    warmup: bool = True
    cold: bool = False
    seed: int = 1
    prompts: List[str] = field(default_factory=list)
    prompts_name: Optional[str] = None
    routes: Optional[str] = None
    record_routes: bool = False
    jetson: bool = False
    preload: bool = False
    repack: bool = True
    hybrid: bool = False
    controller: Optional[MemoryController] = None
    read_ahead_kb: Dict[str, Optional[int]] = field(default_factory=dict)


@dataclass
class ConfigResult:
    rows: List[Row]
    # with record_routes: per child process, int32 [rows, 2 + k] (layer, token, ids) of every
    # token it evaluated, warm-up included (cold: one process, one repetition each)
    routes: List[np.ndarray] = field(default_factory=list)


@dataclass
class _ChildOutcome:
    status: str
    result: dict
    error: Optional[str] = None
    cgroup_peak: Optional[int] = None


def _cpu_info() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def system_fields() -> dict:
    """The fields every row shares: versions, CPU, backend."""
    from edgemoe._native import llama  # first: it points llama_cpp at our libllama
    from edgemoe.version import version_fields

    v = version_fields()
    gpu = bool(llama.llama_supports_gpu_offload())
    return dict(edgemoe_version=v["edgemoe_version"], build_commit=v["llama_cpp_commit"][:9],
                patch_sha256=v["patch_sha256"] or "", cpu_info=_cpu_info(), backends="CUDA" if gpu else "CPU")


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _spawn(spec: ChildSpec, limit: Optional[int], controller: Optional[MemoryController],
           notice: Callable[[str], None]) -> _ChildOutcome:
    with tempfile.TemporaryDirectory(prefix="edgemoe-bench-") as tmp:
        spec_path, out_path, err_path = (os.path.join(tmp, n) for n in ("spec.json", "out.json", "stderr"))
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(asdict(spec), f)
        cgroup = None
        try:
            if limit is not None and controller is not None:
                with held():  # created means removed below, whenever Ctrl-C comes
                    cgroup = MemoryCgroup(controller, limit)
            with open(err_path, "w+", encoding="utf-8", errors="replace") as err:
                def enter() -> None:
                    # in the child, before exec: every page it touches counts against the limit
                    if cgroup is not None:
                        cgroup.add(os.getpid())

                proc = None
                try:
                    # Ctrl-C and SIGTERM held until Popen returns: raised inside it, after the
                    # fork, they would leave a child that this process has no pid to kill
                    with held():
                        proc = subprocess.Popen([sys.executable, "-m", "edgemoe.bench.child", spec_path, out_path],
                                                stdin=subprocess.DEVNULL, stdout=err, stderr=err, preexec_fn=enter)
                    rc = wait_child(proc)  # in steps: a blocking waitpid may never see Ctrl-C
                except BaseException:
                    if proc is not None:
                        with held():  # Ctrl-C, SIGTERM: the child goes at once, whatever it runs
                            proc.kill()
                            proc.wait()
                    raise
                err.seek(0)
                lines = [line.rstrip() for line in err.read().splitlines() if line.strip()]
            peak = cgroup.peak_bytes() if cgroup else None
            meta = {}
            if os.path.exists(out_path + META_SUFFIX):
                with open(out_path + META_SUFFIX, encoding="utf-8") as f:
                    meta = json.load(f)
            if os.path.exists(out_path):
                with open(out_path, encoding="utf-8") as f:
                    result = json.load(f)
                for line in lines:
                    if line.startswith("edgemoe:"):
                        notice(line[len("edgemoe:"):].strip())
                if result.get("status") == STATUS_OK:
                    return _ChildOutcome(STATUS_OK, result, cgroup_peak=peak)
                return _ChildOutcome(STATUS_ERROR, {**meta, **result}, error=result.get("error"), cgroup_peak=peak)
            if rc == -signal.SIGKILL and cgroup is not None and (cgroup.oom_kills() > 0 or cgroup.hit_limit()):
                return _ChildOutcome(STATUS_OOM, meta, error=f"killed for memory (limit {limit} bytes)",
                                     cgroup_peak=peak)
            if rc == -signal.SIGINT or rc == 130:
                raise KeyboardInterrupt
            why = f"killed by {_signal_name(rc)}" if rc < 0 else f"exited with status {rc}"
            return _ChildOutcome(STATUS_ERROR, meta, error=why + (f": {lines[-1]}" if lines else ""),
                                 cgroup_peak=peak)
        finally:
            if cgroup is not None:
                with held():  # a second Ctrl-C must not leave the group behind
                    cgroup.remove()


def run_config(cfg: Config, opts: Options, shared: dict, notice: Callable[[str], None]) -> ConfigResult:
    """Runs one configuration (cold: one process per repetition) and returns its rows, one per
    test; an OOM or a failure gives rows with that status and the run goes on."""
    tests = [asdict(t) for t in cfg.tests]
    base = ChildSpec(model=cfg.model, n_threads=cfg.n_threads, n_batch=cfg.n_batch, n_ubatch=cfg.n_ubatch,
                     n_gpu_layers=cfg.n_gpu_layers, expert_cache=cfg.expert_cache, policy=cfg.policy, io=cfg.io,
                     prefetch=cfg.prefetch, lookahead=cfg.lookahead, prefetch_top=cfg.prefetch_top, tests=tests, reps=list(range(opts.repetitions)), warmup=opts.warmup and not opts.cold,
                     seed=opts.seed, prompts=opts.prompts,
                     routes=opts.routes if cfg.expert_cache else None, record_routes=opts.record_routes,
                     jetson=opts.jetson, preload=opts.preload, n_parallel=cfg.n_parallel, schedule=cfg.schedule,
                     step_seqs=cfg.step_seqs, repack=opts.repack,
                     hybrid=opts.hybrid and bool(cfg.expert_cache))
    batches = [dict(reps=[r]) for r in range(opts.repetitions)] if opts.cold else [{}]
    outcomes: List[_ChildOutcome] = []
    for change in batches:
        if opts.cold:
            drop_file_pages(cfg.model)
        spec = ChildSpec(**{**asdict(base), **change})
        outcome = _spawn(spec, cfg.mem_limit, opts.controller, notice)
        outcomes.append(outcome)
        if outcome.status != STATUS_OK:
            break  # a configuration that died once would die again

    ok = [o.result for o in outcomes if o.status == STATUS_OK]
    failed = next((o for o in outcomes if o.status != STATUS_OK), None)
    first = ok[0] if ok else (failed.result if failed else {})
    peaks = [o.cgroup_peak for o in outcomes if o.cgroup_peak is not None]
    routes_name = os.path.basename(opts.routes) if opts.routes and cfg.expert_cache else None
    rows = []
    for i, test in enumerate(cfg.tests):
        reps = [rep for res in ok for rep in res["tests"][i]["reps"]]
        row = Row(**shared, model_filename=cfg.model, model_type=first.get("model_type", ""),
                  model_size=first.get("model_size"), model_n_params=first.get("model_n_params"),
                  n_batch=cfg.n_batch, n_ubatch=cfg.n_ubatch, n_threads=cfg.n_threads,
                  n_gpu_layers=cfg.n_gpu_layers, n_prompt=test.n_prompt, n_gen=test.n_gen, test=test.name,
                  test_time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  expert_cache=cfg.expert_cache or "off", expert_cache_bytes=first.get("expert_cache_bytes"),
                  expert_cache_slots=first.get("expert_cache_slots"),
                  expert_cache_auto=first.get("expert_cache_auto"), policy=cfg.policy, io=cfg.io,
                  prefetch=cfg.prefetch_label if cfg.expert_cache else None,
                  mem_limit=cfg.mem_limit,
                  mem_limit_cgroup=(opts.controller.name if opts.controller else "none") if cfg.mem_limit else None,
                  cold=opts.cold, hybrid=opts.hybrid and bool(cfg.expert_cache), read_ahead_kb=opts.read_ahead_kb.get(cfg.model),
                  routes=routes_name if first.get("replayed", True) else None,  # auto may turn the cache off
                  prompts=opts.prompts_name, cgroup_peak_bytes=max(peaks) if peaks else None,
                  n_parallel=cfg.n_parallel, schedule=cfg.schedule, step_seqs=cfg.step_seqs)
        if test.kind in ("prompt", "streams") and reps:
            row.n_prompt = round(sum(r["n_prompt_tokens"] for r in reps) / len(reps))
        if failed is not None:
            row.status, row.error = failed.status, failed.error
        else:
            fill_measurements(row, reps)
        rows.append(row)
    routes = [np.asarray(res["routes"], dtype=np.int32) for res in ok if "routes" in res]
    return ConfigResult(rows=rows, routes=routes)


def run_all(configs: List[Config], opts: Options, on_result: Callable[[Config, ConfigResult], None],
            notice: Callable[[str], None], progress: Optional[Callable[[int, int, Config], None]] = None) -> None:
    """Runs every configuration in order; `on_result` gets each as it completes."""
    shared = system_fields()
    for i, cfg in enumerate(configs):
        if progress is not None:
            progress(i, len(configs), cfg)
        on_result(cfg, run_config(cfg, opts, shared, notice))
