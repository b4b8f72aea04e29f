"""`edgemoe bench`: TTFT/TPOT of every combination of the given settings, side by side with
stock llama.cpp (the cache off) under the same memory limit, in llama-bench's formats."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import List, Sequence

import click

from edgemoe.bench.output import FORMATS
from edgemoe.bench.params import AUTO, AUTO_OVERHEAD
from edgemoe.bindings import IO_MODES
from edgemoe.cpus import default_threads
from edgemoe.errors import EdgemoeError
from edgemoe.errors import CliError
from edgemoe.interrupt import interruptible_command

POLICY_CHOICES = ("default", "lru", "lfu", "belady", "auto")
IO_CHOICES = tuple(IO_MODES)
PREFETCH_CHOICES = ("auto", "off", "lookahead", "routes")
SCHEDULES = ("fifo", "expert")  # edgemoe.scheduler.SCHEDULES, without importing numpy at startup


class _Notices:
    """One-line notices on stderr, each text once per run."""

    def __init__(self, progress_line):
        self._seen = set()
        self._progress = progress_line

    def __call__(self, msg: str) -> None:
        msg = " ".join(msg.split())
        if msg.startswith("notice: "):
            msg = msg[len("notice: "):]
        if msg in self._seen:
            return
        self._seen.add(msg)
        self._progress.clear()
        click.echo(f"edgemoe: notice: {msg}", err=True)


class _ProgressLine:
    """`[3/8] model 25% ...` on stderr, overwritten in place; only when both streams are a
    terminal (rows go to stdout, and a redirected run wants no carriage returns)."""

    def __init__(self):
        self.on = sys.stdout.isatty() and sys.stderr.isatty()
        self._shown = False

    def show(self, i: int, n: int, cfg) -> None:
        if self.on:
            sys.stderr.write(f"\r\x1b[K[{i + 1}/{n}] {cfg.label}")
            sys.stderr.flush()
            self._shown = True

    def clear(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._shown = False


def _choices(values: Sequence[str], allowed: Sequence[str], flag: str) -> List[str]:
    from edgemoe.bench.params import split_list, unique

    out = unique(split_list(values))
    for v in out:
        if v not in allowed:
            raise CliError(f"{flag}: unknown value {v!r}; expected one of {', '.join(allowed)}")
    return out


@click.command("bench")
@click.option("-m", "--model", "models", multiple=True, required=True, metavar="FILE",
              help="GGUF model; repeat or comma-list for several.")
@click.option("-p", "--n-prompt", multiple=True, default=("512",), show_default=True, metavar="N[,N]",
              help="Prompt-processing tests: N random tokens in one call (0: none).")
@click.option("-n", "--n-gen", multiple=True, default=("128",), show_default=True, metavar="N[,N]",
              help="Generation tests: N single-token decodes (0: none).")
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("-t", "--threads", multiple=True, metavar="N[,N]", help="Compute threads (default: all CPUs).")
@click.option("-b", "--batch-size", multiple=True, default=("512",), show_default=True, metavar="N[,N]")
@click.option("-ub", "--ubatch-size", multiple=True, default=("512",), show_default=True, metavar="N[,N]")
@click.option("-ngl", "--n-gpu-layers", multiple=True, default=("0",), show_default=True, metavar="N[,N]")
@click.option("--expert-cache", "caches", multiple=True, default=("25%",), show_default=True,
              metavar="SIZE|auto|off[,...]",
              help="Budgets: bytes (800MiB), a share of expert bytes (25%), auto (sized in each child from its "
                   "memory limit, or MemAvailable), or off.")
@click.option("--policy", "policies", multiple=True, default=("default",), show_default=True,
              metavar="P[,P]", help=f"Cache policies: {', '.join(POLICY_CHOICES)} (auto: belady for a model "
                                    "with a readme router, else default).")
@click.option("--io", "ios", multiple=True, default=("direct",), show_default=True, metavar="IO[,IO]",
              help=f"How the cache reads experts: {', '.join(IO_CHOICES)}.")
@click.option("--prefetch", "prefetches", multiple=True, default=("auto",), show_default=True, metavar="P[,P]",
              help="Prefetch modes of the cache-on runs: auto (routes for a model with a readme router, else "
                   "lookahead where the model allows it), off, lookahead, routes (docs/cache.md).")
@click.option("--lookahead", "lookaheads", multiple=True, default=("1",), show_default=True, metavar="N[,N]",
              help="Layers ahead whose predicted experts load (0: predictions only steer eviction).")
@click.option("--prefetch-top", "prefetch_tops", multiple=True, default=("0",), show_default=True,
              metavar="M[,M]", help="Predicted experts per token to load, most likely first (0: half of top-k).")
@click.option("--baseline", is_flag=True,
              help="Add stock llama.cpp (cache off: mmap and the page cache) under the same limits.")
@click.option("--mem-limit", metavar="SIZE|auto", default=None,
              help=f"Run each configuration in a memory cgroup of this size; auto = non-expert bytes + "
                   f"budget + {AUTO_OVERHEAD >> 20} MiB (cache off: every expert).")
@click.option("--cold", is_flag=True,
              help="Drop the model's pages from the page cache before every repetition; each repetition "
                   "runs in a fresh process, without a warm-up.")
@click.option("--no-warmup", is_flag=True, help="Skip the untimed warm-up run of each test.")
@click.option("--preload", is_flag=True,
              help="Load every expert the cache can hold before the warm-up, as stock llama.cpp's load reads "
                   "the whole file (a warm 100 % cache).")
@click.option("--repack/--no-repack", default=True, show_default=True,
              help="ggml's repacking of quantized weights for its faster CPU kernels, stock and cache alike. "
                   "Stock keeps repacked experts in anonymous memory, not the page cache: compare under a "
                   "memory limit with --no-repack (docs/bench.md).")
@click.option("--hybrid", is_flag=True,
              help="Cache rows compute the experts not ready in the pool on the CPU while they load behind "
                   "(run's --hybrid); the rows count those uses in cpu_uses.")
@click.option("--read-ahead", "read_ahead", type=click.IntRange(min=0), default=None, metavar="KB",
              help="Set the model disk's read-ahead for the run (restored after; needs root). "
                   "Linux's default is 128.")
@click.option("--prompts", "prompts_file", metavar="FILE.jsonl", default=None,
              help='Real prompts ({"prompt": "..."} per line): each repetition prefills the next one and '
                   "generates -n tokens greedily, instead of the pp/tg tests on random tokens.")
@click.option("--routes", "routes_file", metavar="TRACE.npz", default=None,
              help="Replay expert routes recorded by `edgemoe trace` (cache-on configurations).")
@click.option("--parallel", "parallels", multiple=True, metavar="N[,N]",
              help="Streams tests: N requests at once (each a --prompts prompt or -p random tokens, then -n "
                   "greedy tokens), decoded together in one context as `edgemoe serve --parallel N` does; "
                   "rows add aggregate decode t/s, per-token latency p50/p95 and distinct experts per step.")
@click.option("--schedule", "schedules", multiple=True, default=("fifo",), show_default=True, metavar="S[,S]",
              help="Step schedulers of the streams tests: fifo (every ready stream, as llama-server), expert "
                   "(streams whose experts overlap or are resident go together; edgemoe.scheduler).")
@click.option("--step-seqs", "step_seqs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Streams tests: sequences one step decodes (0: every ready one). Below --parallel, more "
                   "are ready than a step takes and --schedule picks which.")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the random tokens.")
@click.option("-o", "--output", "fmt", type=click.Choice(FORMATS), default="md", show_default=True)
@interruptible_command  # Ctrl-C, SIGTERM: children killed, cgroups removed, read-ahead restored
def bench(models, n_prompt, n_gen, repetitions, threads, batch_size, ubatch_size, n_gpu_layers, caches,
          policies, ios, prefetches, lookaheads, prefetch_tops, baseline, mem_limit, cold, no_warmup, preload, repack, hybrid, read_ahead, prompts_file, routes_file,
          parallels, schedules, step_seqs, seed, fmt) -> None:
    """Benchmark MODEL like llama-bench: every combination of the list-valued settings, each in
    its own process, with expert-cache columns and stock llama.cpp beside it."""
    from edgemoe.bench import params as P
    from edgemoe.bench.inputs import check_model_path, parse_mem_limit, read_prompts

    progress = _ProgressLine()
    notice = _Notices(progress)
    try:
        model_paths = [check_model_path(m) for m in P.unique(P.split_list(models))]
        parallel_list = P.int_list(parallels, "--parallel", 1) if parallels else []
        schedule_list = _choices(schedules, SCHEDULES, "--schedule")
        tests = _tests(P.int_list(n_prompt, "-p"), P.int_list(n_gen, "-n"), prompts_file is not None,
                       bool(parallel_list))
        if parallel_list and routes_file:
            raise CliError("--routes replays one sequence's trace; it cannot drive --parallel streams")
        thread_list = P.int_list(threads, "-t", 1) if threads else [default_threads()]
        batches = P.int_list(batch_size, "-b", 1)
        ubatches = P.int_list(ubatch_size, "-ub", 1)
        ngls = P.int_list(n_gpu_layers, "-ngl", 0)
        cache_list = P.unique(P.split_list(caches))
        if not cache_list:
            raise CliError("--expert-cache needs at least one value")
        policy_list = _choices(policies, POLICY_CHOICES, "--policy")
        io_list = _choices(ios, IO_CHOICES, "--io")
        prefetch_list = _choices(prefetches, PREFETCH_CHOICES, "--prefetch")
        lookahead_list = P.int_list(lookaheads, "--lookahead", 0)
        if any(d > 8 for d in lookahead_list):
            raise CliError("--lookahead: at most 8 layers")
        top_list = P.int_list(prefetch_tops, "--prefetch-top", 0)
        prompts = read_prompts(prompts_file) if prompts_file else []
        if prompts and click.get_current_context().get_parameter_source("n_prompt").name == "COMMANDLINE":
            notice("-p is ignored with --prompts: the prompts are the prefill")
        limit_arg = None
        if mem_limit is not None:
            limit_arg = AUTO if mem_limit.strip().lower() == AUTO else str(parse_mem_limit(mem_limit))

        from edgemoe.bench.disk import read_ahead as read_ahead_ctx
        from edgemoe.bench.disk import read_ahead_kb, read_ahead_knob
        from edgemoe.bench.output import Printer
        from edgemoe.bench.runner import Options, run_all
        from edgemoe.cache import inspect_model
        from edgemoe.cgroup import find_memory_controller
        from edgemoe.telemetry import jetson_status

        facts = []
        for path in model_paths:
            info = inspect_model(path)
            facts.append(P.ModelFacts(path, info.expert_bytes, info.non_expert_bytes, info.min_budget_bytes,
                                      info.n_moe_layer))
            for cache in cache_list:
                P.check_budget(cache, facts[-1])
            if limit_arg not in (None, AUTO):
                P.check_limit(int(limit_arg), facts[-1])
        if routes_file:
            from edgemoe.trace import load_trace

            load_trace(routes_file)
            for f in facts:
                if f.n_moe_layer == 0:
                    raise CliError(f"--routes needs a model with routed experts; {f.path} is dense")
        configs = P.expand(facts, thread_list, batches, ubatches, ngls, cache_list, policy_list, io_list,
                           baseline, limit_arg, tests, prefetch_list, lookahead_list, top_list,
                           parallel_list, schedule_list, step_seqs or None)

        controller = None
        if limit_arg is not None:
            controller, why = find_memory_controller()
            if controller is None:
                notice(f"no usable cgroup memory controller ({why}); running without a memory limit, "
                       f"rows flagged mem_limit_cgroup=none")
        jetson, why = jetson_status()
        if not jetson:
            notice(f"telemetry from psutil only: no power, energy or temperatures ({why})")
        if routes_file and any(c.expert_cache is None for c in configs):
            notice("cache-off runs route with the model's own router: stock llama.cpp cannot take "
                   "external routes")

        with contextlib.ExitStack() as stack:
            if read_ahead is not None:
                knobs = set()
                for path in model_paths:  # once per disk, however many models it holds
                    knob = read_ahead_knob(path)
                    if knob is None or knob not in knobs:
                        knobs.add(knob)
                        stack.enter_context(read_ahead_ctx(path, read_ahead))
            opts = Options(repetitions=repetitions, warmup=not no_warmup, preload=preload, cold=cold, seed=seed,
                           prompts=prompts,
                           prompts_name=os.path.basename(prompts_file) if prompts_file else None,
                           routes=os.path.abspath(routes_file) if routes_file else None, jetson=jetson,
                           controller=controller, read_ahead_kb={p: read_ahead_kb(p) for p in model_paths},
                           repack=repack, hybrid=hybrid)
            printer = Printer(fmt, sys.stdout, _prototype_rows(configs, opts))
            printer.begin()

            def on_result(cfg, result) -> None:
                progress.clear()
                for row in result.rows:
                    printer.row(row)

            run_all(configs, opts, on_result, notice, progress.show)
            progress.clear()
            printer.end()
    except EdgemoeError as e:
        progress.clear()
        raise CliError(str(e)) from None
    except KeyboardInterrupt:
        progress.clear()
        raise


def _tests(pp: List[int], tg: List[int], with_prompts: bool, streams: bool = False):
    from edgemoe.bench.params import BenchTest

    if streams:
        if not any(n > 0 for n in tg):
            raise CliError("--parallel needs -n above 0: streams generate")
        prompt_lens = [0] if with_prompts else [p for p in pp if p > 0] or [1]
        return [BenchTest("streams", p, n) for p in prompt_lens for n in tg if n > 0]
    if with_prompts:
        return [BenchTest("prompt", 0, n) for n in tg] or [BenchTest("prompt", 0, 0)]
    tests = [BenchTest("pp", p, 0) for p in pp if p > 0] + [BenchTest("tg", 0, n) for n in tg if n > 0]
    if not tests:
        raise CliError("nothing to run: -p and -n are both 0")
    return tests


def _prototype_rows(configs, opts):
    """Rows carrying only what decides the markdown columns."""
    from edgemoe.bench.results import Row

    return [Row(n_batch=c.n_batch, n_ubatch=c.n_ubatch, n_gpu_layers=c.n_gpu_layers, mem_limit=c.mem_limit,
                expert_cache=c.expert_cache or "off", routes="x" if opts.routes and c.expert_cache else None,
                prefetch=c.prefetch_label if c.expert_cache else None, n_parallel=c.n_parallel,
                schedule=c.schedule, step_seqs=c.step_seqs)
            for c in configs]
