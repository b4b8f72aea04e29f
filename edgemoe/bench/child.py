"""One benchmark configuration, in its own process: `python -m edgemoe.bench.child SPEC OUT`.

SPEC is a JSON file (ChildSpec); OUT receives the JSON result, written whole or not at all,
so a child the kernel kills for memory leaves no result and the parent reports OOM.
Tokenization, sampling and route setting happen outside the timed calls, as in llama-bench.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np

from edgemoe.files import discard, publish, temp_beside

META_SUFFIX = ".meta"  # beside OUT: the model's description, written as soon as it is loaded
WARMUP_REP = -1  # the warm-up run's repetition index: its own tokens, routes and prompt


@dataclass
class ChildSpec:
    model: str
    n_threads: int
    n_batch: int
    n_ubatch: int
    n_gpu_layers: int
    expert_cache: Optional[str]
    policy: Optional[str]
    io: Optional[str]
    prefetch: Optional[str]
    lookahead: int
    prefetch_top: int
    tests: List[dict]                 # BenchTest fields: kind, n_prompt, n_gen
    reps: List[int]                   # repetition indices to run
    warmup: bool
    seed: int = 1
    prompts: List[str] = field(default_factory=list)
    routes: Optional[str] = None      # trace.npz to replay (cache on only)
    record_routes: bool = False       # return the routes every MoE layer took
    jetson: bool = False
    preload: bool = False             # load every expert that fits before the warm-up
    n_parallel: int = 1               # streams tests: sequences decoded together
    schedule: Optional[str] = None    # and their scheduler
    step_seqs: Optional[int] = None   # sequences a step decodes (None: every ready one)
    repack: bool = True               # ggml's CPU repacking (llama.cpp's --no-repack: False)
    hybrid: bool = False              # misses computed on the CPU (cache on only)


def _notice(msg: str) -> None:
    """The engine's notices, less the `auto` budget's derivation: that goes into the rows."""
    if not msg.startswith("expert cache auto:"):
        print(f"edgemoe: {msg}", file=sys.stderr, flush=True)


def _tokens_per_rep(tests: List[dict], prompt_lens: List[int], rep: int) -> List[int]:
    """Tokens each test of one repetition evaluates (route replay positions follow them)."""
    out = []
    for t in tests:
        if t["kind"] == "pp":
            out.append(t["n_prompt"])
        elif t["kind"] == "tg":
            out.append(t["n_gen"])
        else:
            out.append(prompt_lens[(rep + 1) % len(prompt_lens)] + t["n_gen"])
    return out


class _Runner:
    def __init__(self, spec: ChildSpec):
        from edgemoe.engine import Engine
        from edgemoe.routes import RouteRecorder
        from edgemoe.telemetry import Telemetry

        self.spec = spec
        self.recorder = RouteRecorder() if spec.record_routes else None
        n_gen = max((t["n_gen"] for t in spec.tests), default=0)
        n_pp = max((t["n_prompt"] for t in spec.tests), default=0)
        # a prompt has at most one token per byte, plus BOS
        longest = max((len(p.encode("utf-8")) + 2 for p in spec.prompts), default=0)
        n_ctx = (max(n_pp, longest + n_gen, n_gen + 1) + 8) * spec.n_parallel
        self.engine = Engine(spec.model, n_parallel=spec.n_parallel, expert_cache=spec.expert_cache, policy=spec.policy or "default",
                             # replayed routes are not the model's own: nothing to predict them from
                             prefetch="off" if spec.routes else spec.prefetch or "off", lookahead=spec.lookahead,
                             prefetch_top=spec.prefetch_top,
                             io=spec.io or "direct", n_threads=spec.n_threads, n_ctx=n_ctx,
                             n_batch=spec.n_batch, n_ubatch=spec.n_ubatch, n_gpu_layers=spec.n_gpu_layers,
                             route_recorder=self.recorder, notice=_notice, repack=spec.repack,
                             hybrid=spec.hybrid)
        self.telemetry = Telemetry(jetson=spec.jetson)
        self.prompts = [self.engine.tokenize(p) for p in spec.prompts]
        self.replay = None
        if spec.routes and self.engine.cache is not None:
            from edgemoe.bench.layout import expert_layout
            from edgemoe.bench.replay import RouteReplay
            from edgemoe.cache import inspect_model
            from edgemoe.trace import load_trace

            info = inspect_model(spec.model)
            layout = expert_layout(spec.model)
            self.replay = RouteReplay(load_trace(spec.routes), layout.moe_layers, info.n_expert,
                                      info.n_expert_used)

    def preload(self, timeout_s: float = 600.0) -> None:
        """Loads every expert the pool can hold and waits for the reads: the cache's state
        after stock llama.cpp's load, which maps (and reads) the whole file."""
        from edgemoe.bench.layout import expert_layout
        from edgemoe.errors import EdgemoeError

        cache = self.engine.cache
        if cache is None:
            return
        layout = expert_layout(self.spec.model)
        for il in layout.moe_layers:
            cache.prefetch(il, list(range(layout.n_expert)))
        deadline = time.monotonic() + timeout_s
        while True:
            stats = {il: cache.stats(il) for il in layout.moe_layers}
            if all(s.bytes_read >= s.prefetch_issued * layout.expert_bytes(il) for il, s in stats.items()):
                return
            if time.monotonic() > deadline:
                raise EdgemoeError(f"--preload: the expert reads did not finish within {timeout_s:.0f} s")
            time.sleep(0.01)

    @functools.cached_property
    def meta(self) -> dict:
        """What the rows say about the model and the cache, known once the model is loaded."""
        d = self.engine.describe()
        out = dict(model_type=d.desc, model_size=d.size, model_n_params=d.n_params)
        if self.engine.cache is not None:
            info = self.engine.cache.info()
            out.update(expert_cache_bytes=info.budget_bytes, expert_cache_slots=info.n_slots)
        if self.engine.auto_budget is not None:
            out.update(expert_cache_auto=self.engine.auto_budget.describe())
        return out

    def close(self) -> None:
        self.telemetry.close()
        self.engine.close()
        if self.recorder is not None:
            self.recorder.close()

    # -- one call, timed -------------------------------------------------------------

    def _eval(self, tokens: List[int], pos: int) -> tuple:
        """Sets the replayed routes of these tokens (untimed), then times the decode; only the
        last token's logits are computed, as in a prefill or a decode step."""
        if self.replay is not None:
            for layer, ids in self.replay.routes(pos, len(tokens)).items():
                self.engine.cache.set_routes(layer, ids)
        t = time.perf_counter_ns()
        logits = self.engine.eval(tokens, last_only=True)
        return time.perf_counter_ns() - t, logits

    def _random_tokens(self, test_index: int, rep: int, n: int) -> List[int]:
        # the same tokens in every configuration and every process: seeded by (seed, test, rep)
        rng = np.random.default_rng([self.spec.seed, test_index, rep - WARMUP_REP])
        return rng.integers(0, self.engine.n_vocab, size=n).tolist()

    def run_test(self, index: int, test: dict, rep: int, pos: int) -> dict:
        """One repetition of one test from an empty context; returns its measurements."""
        e = self.engine
        e.reset()
        e.reset_stats()
        kind, n_gen = test["kind"], test["n_gen"]
        ttft_ns, tpot_ns = None, []
        decode_cpu_s = 0.0
        generated: List[int] = []
        window = self.telemetry.start()
        if kind == "pp":
            tokens = self._random_tokens(index, rep, test["n_prompt"])
            ttft_ns, _ = self._eval(tokens, pos)
            n_tokens = len(tokens)
            at_decode = self._cache_counters()
        elif kind == "tg":
            tokens = self._random_tokens(index, rep, n_gen)
            at_decode = self._cache_counters()
            for i, tok in enumerate(tokens):
                cpu = time.process_time()
                ns, _ = self._eval([tok], pos + i)
                decode_cpu_s += time.process_time() - cpu
                tpot_ns.append(ns)
            n_tokens = n_gen
        elif kind == "streams":
            return self._run_streams(index, test, rep, window)
        else:
            prompt = self.prompts[(rep + 1) % len(self.prompts)]
            ttft_ns, logits = self._eval(prompt, pos)
            at_decode = self._cache_counters()
            for i in range(n_gen):
                tok = int(np.argmax(logits[-1]))  # greedy: real text from a trained model
                generated.append(tok)
                cpu = time.process_time()
                ns, logits = self._eval([tok], pos + len(prompt) + i)
                decode_cpu_s += time.process_time() - cpu
                tpot_ns.append(ns)
            n_tokens = len(prompt) + n_gen
        total_ns = (ttft_ns or 0) + sum(tpot_ns)
        tel = self.telemetry.stop(window)
        s = e.stats()
        end = self._cache_counters()
        # the decode steps' share of the counters: where a step's time goes
        decode = {f"decode_{k}": end[k] - at_decode[k] for k in end}
        return dict(rep=rep, ns=total_ns, n_tokens=n_tokens, n_prompt_tokens=n_tokens - len(tpot_ns),
                    ttft_ms=ttft_ns / 1e6 if ttft_ns is not None else None,
                    tpot_ms=[x / 1e6 for x in tpot_ns], hits=s.hits, misses=s.misses,
                    prefetch_hits=s.prefetch_hits, prefetch_wasted=s.prefetch_wasted,
                    prefetch_issued=s.prefetch_issued, pred_predicted=end["pred_predicted"],
                    pred_correct=end["pred_correct"], pred_actual=end["pred_actual"],
                    bytes_read=s.bytes_read, read_ms=s.read_ms, stall_ms=s.stall_ms, cpu_uses=s.cpu_uses,
                    decode_cpu_s=decode_cpu_s, generated=generated, **decode,
                    peak_rss_bytes=s.peak_rss_bytes, telemetry=asdict(tel))

    def _run_streams(self, index: int, test: dict, rep: int, window) -> dict:
        """n_parallel requests at once, decoded together with the spec's schedule: aggregate
        tokens/s over the decode steps, and each stream's per-token latency (waits included)."""
        from edgemoe.generator import BatchGenerator, SamplingOptions

        e, n, n_gen = self.engine, self.spec.n_parallel, test["n_gen"]
        steps = []
        gen = BatchGenerator(e, schedule=self.spec.schedule or "fifo", max_queue=n, on_step=steps.append,
                             step_seqs=self.spec.step_seqs)
        if self.prompts:  # stream i of repetition r: the next prompts in file order
            prompts = [self.prompts[(rep + 1 + i + rep * (n - 1)) % len(self.prompts)] for i in range(n)]
        else:
            prompts = [self._random_tokens(index, rep * n + i, test["n_prompt"] or 1) for i in range(n)]
        opts = SamplingOptions(max_tokens=n_gen, temperature=0.0, ignore_eos=True)
        start = self._cache_counters()
        t0 = time.perf_counter()
        jobs = [gen.submit(p, opts, lambda ev: None) for p in prompts]
        cpu = time.process_time()
        gen.run_until_idle()
        wall_ns = int((time.perf_counter() - t0) * 1e9)
        cpu_s = time.process_time() - cpu
        tel = self.telemetry.stop(window)
        s = e.stats()
        end = self._cache_counters()
        decode = [st for st in steps if not st.prefill and st.n_generated]
        gaps = [(b - a) * 1e3 for j in jobs for a, b in zip(j.token_times, j.token_times[1:])]
        unique = [st.unique_experts for st in decode if st.unique_experts is not None]
        n_tokens = sum(len(j.generated) for j in jobs)
        decode_tokens = sum(st.n_generated for st in decode)
        return dict(rep=rep, ns=wall_ns, n_tokens=n_tokens, n_prompt_tokens=sum(len(p) for p in prompts),
                    ttft_ms=float(np.mean([(j.token_times[0] - t0) * 1e3 for j in jobs if j.token_times])),
                    tpot_ms=gaps, hits=s.hits, misses=s.misses, prefetch_hits=s.prefetch_hits,
                    prefetch_wasted=s.prefetch_wasted, prefetch_issued=s.prefetch_issued,
                    pred_predicted=end["pred_predicted"], pred_correct=end["pred_correct"],
                    pred_actual=end["pred_actual"], bytes_read=s.bytes_read, read_ms=s.read_ms,
                    stall_ms=s.stall_ms, cpu_uses=s.cpu_uses, decode_cpu_s=cpu_s,
                    generated=[t for j in jobs for t in j.generated],
                    streams_generated=[j.generated for j in jobs],
                    decode_steps=len(decode), decode_tokens=decode_tokens,
                    decode_ms=sum(st.ms for st in decode),
                    unique_experts_per_step=float(np.mean(unique)) if unique else None,
                    # the whole run's counters, prompts included (the steps interleave them)
                    **{f"decode_{k}": end[k] - start[k] for k in end},
                    peak_rss_bytes=s.peak_rss_bytes, telemetry=asdict(tel))

    def _cache_counters(self) -> dict:
        """The cache's running totals (zeros with the cache off)."""
        from edgemoe.cache import CacheStats

        s = self.engine.cache.stats() if self.engine.cache is not None else CacheStats()
        return dict(stall_ms=s.stall_ms, book_ms=s.book_ms, predict_ms=s.predict_ms, bytes_read=s.bytes_read,
                    router_ms=self.engine.router_ms,
                    pred_predicted=s.pred_predicted, pred_correct=s.pred_correct, pred_actual=s.pred_actual)

    def run(self) -> dict:
        spec = self.spec
        lens = [len(p) for p in self.prompts] or [0]
        results: Dict[int, List[dict]] = {i: [] for i in range(len(spec.tests))}
        if spec.preload:
            self.preload()
        reps = ([WARMUP_REP] if spec.warmup else []) + list(spec.reps)
        for rep in reps:
            # replay positions: the warm-up takes the trace's first stretch, repetition r the (r+2)-th
            per_test = _tokens_per_rep(spec.tests, lens, rep)
            pos = (rep - WARMUP_REP) * sum(per_test)
            for i, test in enumerate(spec.tests):
                measured = self.run_test(i, test, rep, pos)
                pos += per_test[i]
                if rep != WARMUP_REP:
                    results[i].append(measured)
        out = dict(status="ok", **self.meta,
                   tests=[dict(test, reps=results[i]) for i, test in enumerate(spec.tests)],
                   replayed=self.replay is not None)
        if self.recorder is not None:
            out["routes"] = self.recorder.rows().tolist()
        return out


def _write(path: str, obj: dict) -> None:
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f)
        publish(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def main(argv: List[str]) -> int:
    spec_path, out_path = argv
    with open(spec_path, encoding="utf-8") as f:
        spec = ChildSpec(**json.load(f))
    from edgemoe.errors import EdgemoeError
    from edgemoe.interrupt import exit_status, signum_of

    runner = None
    try:
        runner = _Runner(spec)
        # for the parent's rows should the kernel kill us for memory from here on
        _write(out_path + META_SUFFIX, runner.meta)
        result = runner.run()
    except EdgemoeError as e:
        _write(out_path, dict(status="error", error=" ".join(str(e).split())))
        return 1
    except KeyboardInterrupt as e:  # the parent kills us on its own Ctrl-C; this is for ours alone
        return exit_status(signum_of(e))
    finally:
        if runner is not None:
            runner.close()
    _write(out_path, result)
    return 0


if __name__ == "__main__":
    from edgemoe.interrupt import interruptible

    with interruptible():  # also a Ctrl-C that comes inside llama.cpp's log callback; SIGTERM: 143
        status = main(sys.argv[1:])
    sys.exit(status)
