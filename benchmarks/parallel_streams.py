"""Many streams at once (issue 12): expert-aware batching against FIFO, and stock llama-server.

For each model (the trained default model and the Read-ME model, both inflated to about 3.5 GB,
so routing is real) and each stream count N, under the same memory limit (the bench's `auto`
limit for a 25 % expert cache, non-expert weights + 25 % of the experts + its overhead, plus
the KV cache and compute buffers of N streams), with the disk's read-ahead at 128 KiB, every
stream prefilling its own held-out paragraph and generating -n greedy tokens, after one
untimed warm-up run of the same:

  edgemoe  `edgemoe bench --parallel N --schedule fifo,expert --step-seqs S` (S = N/2: more
           streams are ready than a step takes, so the schedule chooses), plus fifo with every
           stream in each step (`--step-seqs 0`, what llama-server does);
  stock    llama-server with --parallel N (the cache off: mmap and the page cache) under the
           same limit (benchmarks/llama_server.py), default model only: stock llama.cpp cannot
           take a readme model's external routes.

Prints a markdown report (BENCHMARKS.md takes it as is) and writes everything to --out. Root.

    python benchmarks/parallel_streams.py --out benchmarks/out/parallel-streams.json
    python benchmarks/parallel_streams.py --report benchmarks/out/parallel-streams.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_routing import DEFAULT_MODEL, ensure_model, write_prompts  # noqa: E402
from sweep import bench, machine  # noqa: E402

from edgemoe.cpus import default_threads  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
README_MODEL = REPO / "benchmarks" / "out" / "readme-inflated-3.5g.gguf"
README_SOURCE = REPO / "models" / "edgemoe-tiny-readme-q8_0.gguf"
BUDGET = "25%"
CTX_PER_SEQ = 1024  # llama-server's -c is this times N; edgemoe's streams need fewer (prompt + n_gen)


def limit_bytes(model: Path, n_streams: int, ctx_per_seq: int) -> int:
    """The bench's `auto` limit for the budget, plus what N streams add (KV cache and llama.cpp's
    compute buffers for full ubatches): the same bytes for edgemoe and llama-server."""
    from edgemoe.auto_budget import model_memory
    from edgemoe.bench.params import ModelFacts, auto_limit
    from edgemoe.cache import inspect_model

    info = inspect_model(model)
    facts = ModelFacts(str(model), info.expert_bytes, info.non_expert_bytes, info.min_budget_bytes, info.n_moe_layer)
    need = model_memory(model, n_ctx=n_streams * ctx_per_seq, n_ubatch=512)
    return auto_limit(BUDGET, facts) + need.kv_bytes + need.compute_bytes


def run(args, log) -> dict:
    models = {"default": ensure_model(DEFAULT_MODEL, "3.5GB"),
              "readme": ensure_model(README_MODEL, "3.5GB", README_SOURCE)}
    # repetition r's stream i takes prompt 1 + r*N + i (edgemoe.bench.child): room for two repetitions
    prompts = write_prompts(Path(args.out).with_suffix(".prompts.jsonl"), 2 * max(args.streams) + 1)
    results = dict(machine=machine(), n_gen=args.n_gen, repetitions=args.repetitions, budget=BUDGET,
                   threads=args.threads, edgemoe=[], stock=[], commands=[])
    for name, model in models.items():
        for n in args.streams:
            limit = limit_bytes(model, n, CTX_PER_SEQ)
            for step in (n // 2, 0):
                schedules = "fifo,expert" if step else "fifo"
                shown, rows = bench(["-m", model, "--prompts", prompts, "-n", args.n_gen, "-r", args.repetitions,
                                     "-t", args.threads, "--expert-cache", BUDGET,
                                     "--mem-limit", limit, "--read-ahead", 128, "--parallel", n,
                                     "--schedule", schedules, "--step-seqs", step], log)
                results["commands"].append(shown)
                for r in rows:
                    r.pop("samples_tpot_ms", None)
                    results["edgemoe"].append(dict(r, model_name=name))
            if name == "default":
                from edgemoe.bench.inputs import read_prompts
                from llama_server import build_server, run_server

                build_server()
                # the prompts of edgemoe's first repetition, so that the texts can be compared
                row = run_server(model, n, args.n_gen, read_prompts(str(prompts))[1:n + 1], threads=args.threads,
                                 ctx_per_seq=CTX_PER_SEQ, mem_limit=limit, warmup=True)
                results["stock"].append(dict(asdict(row), model_name=name))
                results["commands"].append(f"python benchmarks/llama_server.py --model {model} --parallel {n} "
                                           f"--n-gen {args.n_gen} --mem-limit {limit} --warmup")
    return results


def _f(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def same_text(res: dict) -> list:
    """Whether edgemoe's first repetition and llama-server generated the same text per stream."""
    if not res["stock"]:
        return []
    from edgemoe.engine import Engine

    lines = ["", "Same text as llama-server (edgemoe's first repetition, stream by stream):", ""]
    with Engine(str(REPO / "models" / "edgemoe-tiny-q8_0.gguf"), n_ctx=64, notice=lambda m: None) as vocab:
        for st in res["stock"]:
            n = st["n_parallel"]
            for r in res["edgemoe"]:
                if r["model_name"] != st["model_name"] or r["n_parallel"] != n or not r["samples_generated"]:
                    continue
                texts = [vocab.detokenize(g) for g in r["samples_generated"][:n]]
                same = sum(a == b for a, b in zip(texts, st["texts"]))
                lines.append(f"- {r['model_name']}, {n} streams, {r['schedule']} step {r['step_seqs'] or n}: "
                             f"{same} of {n} streams identical")
    return lines


def report(res: dict) -> str:
    out = [f"Machine: {res['machine']}; {res['threads']} threads; every stream generates {res['n_gen']} greedy "
           f"tokens after its own held-out paragraph; expert cache {res['budget']}, the same memory limit "
           f"for every row of a model and stream count (the bench's auto limit for the cache plus the "
           f"streams' KV and compute buffers), read-ahead 128 KiB; a warm-up run, then "
           f"{res['repetitions']} repetitions per row.", "",
           "| model | streams | engine | schedule | step | decode t/s | wall t/s | latency p50 ms | latency p95 ms "
           "| experts/step | hit rate |",
           "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["edgemoe"]:
        out.append(f"| {r['model_name']} | {r['n_parallel']} | edgemoe | {r['schedule']} | "
                   f"{r['step_seqs'] or r['n_parallel']} | {_f(r['tokens_per_s'])} | {_f(r['avg_ts'])} | "
                   f"{_f(r['latency_p50_ms'], 0)} | {_f(r['latency_p95_ms'], 0)} | "
                   f"{_f(r['unique_experts_per_step'])} | {_f(r['hit_rate'], 3)} |")
    for r in res["stock"]:
        out.append(f"| {r['model_name']} | {r['n_parallel']} | llama-server | fifo | {r['n_parallel']} | "
                   f"{_f(r['decode_tokens_per_s'])} | {_f(r['tokens_per_s'])} | {_f(r['latency_p50_ms'], 0)} | "
                   f"{_f(r['latency_p95_ms'], 0)} | - | - |")
    out += ["", "Ratios, expert over fifo at the same step size:", ""]
    by = {}
    for r in res["edgemoe"]:
        by[(r["model_name"], r["n_parallel"], r["schedule"], r["step_seqs"])] = r
    for (name, n, sched, step), e in by.items():
        f = by.get((name, n, "fifo", step))
        if sched != "expert" or f is None or not f.get("tokens_per_s") or not e.get("tokens_per_s"):
            continue
        out.append(f"- {name}, {n} streams, step {step}: distinct experts per step "
                   f"{e['unique_experts_per_step'] / f['unique_experts_per_step'] - 1:+.0%}, decode throughput "
                   f"x{e['tokens_per_s'] / f['tokens_per_s']:.2f}, p95 latency "
                   f"x{e['latency_p95_ms'] / f['latency_p95_ms']:.2f}")
    out += same_text(res)
    out += ["", "Commands:", ""] + [f"    {c}" for c in res["commands"]]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "parallel-streams.json"))
    ap.add_argument("--report", metavar="FILE", help="print a saved run's report and exit")
    ap.add_argument("--streams", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--n-gen", type=int, default=32)
    ap.add_argument("--repetitions", type=int, default=2)
    ap.add_argument("--threads", type=int, default=default_threads())
    args = ap.parse_args()
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return 0

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    res = run(args, log)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
