"""The standard sweep of issue 4: `edgemoe bench` on the synthetic benchmark model, edgemoe's
expert cache against stock llama.cpp under the same memory limit, with the floors computed
from the run's own routes.

  cold   `edgemoe bench --cold --mem-limit auto --read-ahead 128 --baseline` at budgets
         10/25/50 % for each policy: every repetition a fresh process, the model's pages
         dropped, a cgroup memory limit of non-expert bytes + budget + 300 MiB shared by the
         stock run of that budget;
  warm   edgemoe at 100 % against stock, no limit, every expert loaded first (--preload, as
         stock's load reads the whole file), a warm-up, then the runs; twice in opposite
         orders (ABBA) because this machine is shared and drifts;
  floors the routes of the cold runs, recorded again in a cache-off run with the same tokens,
         replayed through benchmarks/cache_sim.py for each policy and Belady at each run's
         slot count: misses x bytes per expert / measured O_DIRECT bandwidth, plus the warm
         compute (edgemoe 100 %) without overlap, or the larger of the two with overlap.

It prints a markdown report (BENCHMARKS.md takes it as is), writes everything measured to
--out, and the plots with benchmarks/plot.py. Needs root (cgroups, read-ahead, dropping pages).

    python benchmarks/sweep.py --router-skew 8 --out benchmarks/out/sweep-skew8.json --plots benchmarks
    python benchmarks/sweep.py --model small.gguf --repetitions 1 --n-gen 8 --out benchmarks/out/try.json   # a try-out
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import default_path, ensure_model  # noqa: E402
from floors import direct_bandwidth, expert_slices, io_floor, routing_stats  # noqa: E402

from edgemoe.cpus import default_threads  # noqa: E402
from edgemoe.files import discard, publish, temp_beside  # noqa: E402

BUDGETS = ("10%", "25%", "50%")
SIM_POLICIES = ("default", "lru", "lfu", "belady")


def bench(args: list, log) -> tuple:
    """Runs `edgemoe bench ... -o json`; returns (the command as a string, rows)."""
    cmd = [sys.executable, "-m", "edgemoe", "bench", *map(str, args), "-o", "json"]
    shown = "edgemoe bench " + " ".join(shlex.quote(_relative(a)) for a in args)
    log(f"$ {shown}")
    p = subprocess.run(cmd, capture_output=True, text=True)
    for line in p.stderr.splitlines():
        log(line)
    if p.returncode != 0:
        raise SystemExit(f"sweep: edgemoe bench failed ({p.returncode})")
    return shown, json.loads(p.stdout)


def _relative(arg) -> str:
    """Paths below the working directory as relative ones, for commands others can rerun."""
    text = str(arg)
    cwd = os.getcwd() + os.sep
    return text[len(cwd):] if text.startswith(cwd) else text


def reference_routes(model: str, args, routes_file) -> list:
    """Routes of every cold repetition (pp then tg, no warm-up, the same seeded tokens), recorded
    in a cache-off run; with --routes, a 100 % run that replays them."""
    from edgemoe.bench.params import BenchTest, Config
    from edgemoe.bench.runner import Options, run_config, system_fields

    tests = tuple(t for t in (BenchTest("pp", args.n_prompt, 0), BenchTest("tg", 0, args.n_gen))
                  if t.n_prompt or t.n_gen)
    cache = "100%" if routes_file else None
    cfg = Config(model, args.threads, 512, 512, 0, cache, "default" if cache else None,
                 "direct" if cache else None, None, tests)
    opts = Options(repetitions=args.repetitions, warmup=False, cold=True, seed=args.seed, record_routes=True,
                   routes=os.path.abspath(routes_file) if routes_file else None)
    res = run_config(cfg, opts, system_fields(), lambda m: None)
    if any(r.status != "ok" for r in res.rows):
        raise SystemExit(f"sweep: the route recording run failed: {res.rows[0].error}")
    return res.routes


def machine() -> str:
    """The line every benchmark report gives for the machine it ran on."""
    return f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"


def rows_of(rows, test, **match):
    return [r for r in rows if r["test"] == test and all(r.get(k) == v for k, v in match.items())]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="default: the benchmark model of --router-skew (written if absent)")
    ap.add_argument("--router-skew", type=float, default=8.0)
    ap.add_argument("--routes", type=Path, help="also replay this trace (edgemoe trace) in the cold runs")
    ap.add_argument("--repetitions", type=int, default=3, help="cold repetitions (each a fresh process)")
    ap.add_argument("--warm-repetitions", type=int, default=5)
    ap.add_argument("--n-prompt", type=int, default=16, help="the cold runs' prompt before the timed tokens")
    ap.add_argument("--warm-n-prompt", type=int, default=256, help="the warm runs' prompt (pp rows)")
    ap.add_argument("--n-gen", type=int, default=32)
    ap.add_argument("--policies", default="default,lru,lfu")
    ap.add_argument("--read-ahead", type=int, default=128)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/sweep.json"))
    ap.add_argument("--plots", type=Path, help="write the PNG plots into this directory")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="measure nothing: print the report (and --plots) of a saved sweep")
    args = ap.parse_args()
    if args.report:
        results = json.loads(args.report.read_text())
        refresh_floors(results)
        if args.plots:
            from plot import plot_all

            for path in plot_all(results, args.plots, stem=args.report.stem):
                print(f"wrote {path}", file=sys.stderr)
        print(report(results))
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    from edgemoe.cache import inspect_model

    model = str(ensure_model(args.model or default_path(args.router_skew), args.router_skew))
    info = inspect_model(model)
    slices, per_expert = expert_slices(model)
    common = ["-m", model, "-t", args.threads, "--read-ahead", args.read_ahead, "--seed", args.seed]
    results = dict(model=model, model_bytes=os.path.getsize(model), expert_bytes=info.expert_bytes,
                   non_expert_bytes=info.non_expert_bytes, n_moe_layer=info.n_moe_layer, n_expert=info.n_expert,
                   n_expert_used=info.n_expert_used, bytes_per_expert=per_expert,
                   machine=machine(),
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), args={k: str(v) for k, v in vars(args).items()},
                   commands={})

    # cold: the headline
    cold_args = [*common, "-p", args.n_prompt, "-n", args.n_gen, "-r", args.repetitions, "--cold",
                 "--mem-limit", "auto", "--expert-cache", ",".join(BUDGETS), "--policy", args.policies, "--baseline"]
    results["commands"]["cold"], results["cold"] = bench(cold_args, log)
    if args.routes:
        results["commands"]["cold_routes"], results["cold_routes"] = bench(
            [*cold_args[:-1], "--routes", args.routes.resolve()], log)

    # warm: 100 % against stock, ABBA
    warm_args = [*common, "-p", args.warm_n_prompt, "-n", args.n_gen, "-r", args.warm_repetitions, "--preload"]
    results["commands"]["warm_ab"], ab = bench([*warm_args, "--expert-cache", "100%", "--baseline"], log)
    results["commands"]["warm_ba"], ba = bench([*warm_args, "--expert-cache", "off,100%"], log)
    results["warm"] = ab + ba

    log("measuring O_DIRECT bandwidth ...")
    results["bandwidth_gbps"] = direct_bandwidth(model, slices, 2 << 30)
    log(f"O_DIRECT bandwidth: {results['bandwidth_gbps']:.2f} GB/s")

    log("recording the cold runs' routes ...")
    routes = reference_routes(model, args, None)
    results["routes"] = [r.tolist() for r in routes]  # per cold repetition, for re-analysis
    results["floors"] = floors(results, routes, args, "cold")
    if args.routes:
        routes = reference_routes(model, args, args.routes)
        results["routes_replayed"] = [r.tolist() for r in routes]
        results["floors_routes"] = floors(results, routes, args, "cold_routes")

    save(results, args.out)
    log(f"wrote {args.out}")
    if args.plots:
        from plot import plot_all

        for path in plot_all(results, args.plots, stem=args.out.stem):
            log(f"wrote {path}")
    print(report(results))
    return 0


def floors(results: dict, routes: list, args, kind: str) -> dict:
    """Per budget and policy: simulated misses per timed token (mean over repetitions) and the
    floors; and the routing statistics of the recorded routes."""
    P, N = args.n_prompt, args.n_gen
    tg = f"tg{N}"
    compute_ms = warm_compute_ms(results)
    out = {"compute_ms": compute_ms, "n_timed_tokens": N, "budgets": {},
           "routing": routing_stats(routes, results["n_expert"], P)}
    for budget in BUDGETS:
        measured = [r for r in rows_of(results[kind], tg, expert_cache=budget) if r["expert_cache_slots"]]
        if not measured:
            continue
        slots = measured[0]["expert_cache_slots"]
        sims = {}
        for policy in SIM_POLICIES:
            per_rep = [io_floor(r, slots, policy, prompt_tokens=P, n_tokens=N,
                                bytes_per_expert=results["bytes_per_expert"], bandwidth_gbps=results["bandwidth_gbps"],
                                compute_ms=compute_ms, count_from_token=P, stop_token=P + N) for r in routes]
            sims[policy] = {key: float(np.mean([s[key] for s in per_rep]))
                            for key in ("misses_per_token", "hit_rate", "io_ms", "floor_no_overlap_ms",
                                        "floor_overlap_ms")}
        out["budgets"][budget] = {"slots": slots, "sim": sims}
    return out


def warm_compute_ms(results: dict, test: str = "") -> float:
    """The compute time of a decode step with every expert resident: the median token of
    edgemoe's warm 100 % runs of `test` (default tg<n_gen>; a median, because other work on this
    machine stalls some tokens by seconds)."""
    test = test or f"tg{results['args']['n_gen']}"
    full = rows_of(results.get("warm", []), test, expert_cache="100%", status="ok")
    tokens = [t for r in full for rep in r["samples_tpot_ms"] for t in rep]
    return float(np.median(tokens)) if tokens else float("nan")


def refresh_floors(results: dict) -> None:
    """Recomputes the floors' compute part (warm_compute_ms) from the saved I/O parts."""
    compute = warm_compute_ms(results)
    for key in ("floors", "floors_routes"):
        if key not in results:
            continue
        results[key]["compute_ms"] = compute
        for b in results[key]["budgets"].values():
            for sim in b["sim"].values():
                sim["floor_no_overlap_ms"] = compute + sim["io_ms"]
                sim["floor_overlap_ms"] = max(compute, sim["io_ms"])


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        publish(tmp, path)
    except BaseException:
        discard(tmp)
        raise


# -- the report ----------------------------------------------------------------------------

def _tpot_cell(rows) -> str:
    """mean ± stddev (median token) of a configuration's TPOT, or its failure."""
    if not rows:
        return "-"
    r = rows[0]
    if r["status"] != "ok":
        return r["status"].upper()
    return f"{r['tpot_ms']:.1f} ± {r['tpot_ms_stddev']:.1f} ({r['tpot_p50_ms']:.1f})"


def _cold_table(results, kind, fl) -> list:
    N = int(results["args"]["n_gen"])
    tg = f"tg{N}"
    policies = results["args"]["policies"].split(",")
    has_stock = any(r["expert_cache"] == "off" for r in results[kind])
    head = ["budget", "limit MiB"] + (["stock"] if has_stock else []) + [f"edgemoe {p}" for p in policies] \
        + (["speed-up, mean (median)"] if has_stock else []) \
        + ["hit rate", "Belady hit rate", "misses/token measured (replayed)", "floor Belady, no overlap / overlap",
           "measured / floor (no overlap)", "floor own misses, no overlap"]
    lines = ["| " + " | ".join(head) + " |", "| --- | " + " | ".join("---:" for _ in head[1:]) + " |"]
    for budget in BUDGETS:
        mine = {p: rows_of(results[kind], tg, expert_cache=budget, policy=p) for p in policies}
        d = mine.get("default") or next(iter(mine.values()))
        if not d or budget not in fl["budgets"]:
            continue
        stock = [r for r in rows_of(results[kind], tg, expert_cache="off") if r["mem_limit"] == d[0]["mem_limit"]]
        sim = fl["budgets"][budget]["sim"]
        cells = [budget, f"{d[0]['mem_limit'] / 2**20:.0f}"] + ([_tpot_cell(stock)] if has_stock else []) \
            + [_tpot_cell(mine[p]) for p in policies]
        if d[0]["status"] == "ok":
            e = d[0]
            s_ok = stock[0] if stock and stock[0]["status"] == "ok" else None
            bel = sim["belady"]
            if has_stock:
                cells.append(f"{s_ok['tpot_ms'] / e['tpot_ms']:.2f}x ({s_ok['tpot_p50_ms'] / e['tpot_p50_ms']:.2f}x)"
                             if s_ok else "-")
            cells += [f"{100 * e['hit_rate']:.1f} %", f"{100 * bel['hit_rate']:.1f} %",
                      f"{e['misses'] / N:.1f} ({sim[e['policy']]['misses_per_token']:.1f})",
                      f"{bel['floor_no_overlap_ms']:.1f} / {bel['floor_overlap_ms']:.1f} ms",
                      f"{e['tpot_ms'] / bel['floor_no_overlap_ms']:.2f} ({e['tpot_p50_ms'] / bel['floor_no_overlap_ms']:.2f})",
                      f"{sim[e['policy']]['floor_no_overlap_ms']:.1f} ms"]
        else:
            cells += ["-"] * (len(head) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ttft_table(results: dict) -> list:
    """TTFT of the cold prompt, and prompt processing warm: the pp rows beside the tg ones."""
    pp = f"pp{results['args']['n_prompt']}"
    cold = results["cold"]
    lines = [f"TTFT of the cold `{pp}` (ms, mean ± stddev), the first test of each cold start, so it includes "
             f"loading the prompt's experts:", "",
             "| budget | stock | " + " | ".join(f"edgemoe {p}" for p in results["args"]["policies"].split(","))
             + " |", "| --- | ---: | " + " | ".join("---:" for _ in results["args"]["policies"].split(",")) + " |"]
    for budget in BUDGETS:
        mine = [rows_of(cold, pp, expert_cache=budget, policy=p) for p in results["args"]["policies"].split(",")]
        if not mine[0]:
            continue
        stock = [r for r in rows_of(cold, pp, expert_cache="off") if r["mem_limit"] == mine[0][0]["mem_limit"]]

        def cell(rows):
            if not rows:
                return "-"
            r = rows[0]
            return r["status"].upper() if r["status"] != "ok" else f"{r['ttft_ms']:.0f} ± {r['ttft_ms_stddev']:.0f}"

        lines.append(f"| {budget} | {cell(stock)} | " + " | ".join(cell(m) for m in mine) + " |")
    wpp = f"pp{results['args']['warm_n_prompt']}"
    warm = results["warm"]
    e = rows_of(warm, wpp, expert_cache="100%", status="ok")
    s = rows_of(warm, wpp, expert_cache="off", status="ok")
    if e and s:
        lines += ["", f"Warm `{wpp}` (t/s): stock " + ", ".join(f"{r['avg_ts']:.1f} ± {r['stddev_ts']:.1f}" for r in s)
                  + "; edgemoe 100 % " + ", ".join(f"{r['avg_ts']:.1f} ± {r['stddev_ts']:.1f}" for r in e)
                  + " (the AB run, then the BA run)."]
    return lines + [""]


def report(results: dict) -> str:
    N = int(results["args"]["n_gen"])
    tg = f"tg{N}"
    fl = results["floors"]
    rt = fl["routing"]
    out = [f"Model: {Path(results['model']).name}, {results['model_bytes'] / 1e9:.2f} GB, experts "
           f"{100 * results['expert_bytes'] / (results['expert_bytes'] + results['non_expert_bytes']):.1f} % of "
           f"bytes, {results['bytes_per_expert'] / 2**20:.2f} MiB per expert; {results['machine']}; "
           f"{results['date']}.",
           f"Routing (recorded, the cold runs' tokens): top quarter of experts take "
           f"{100 * rt['top_quarter_share']:.0f} % of a layer's uses; usage entropy {rt['entropy_bits']:.2f} of "
           f"{rt['max_entropy_bits']:.0f} bits; EOR {rt['eor']:.2f}. O_DIRECT bandwidth (cold, 4 threads, whole "
           f"experts): {results['bandwidth_gbps']:.2f} GB/s.", "",
           f"**Cold**, TPOT of `tg{N}` in ms: mean ± sample stddev over {results['args']['repetitions']} cold "
           f"starts (median token); each starts after a {results['args']['n_prompt']}-token prompt in the same "
           f"process:", ""]
    out += _cold_table(results, "cold", fl)
    out += ["", f"Command: `{results['commands']['cold']}`", ""]
    out += _ttft_table(results)
    if "cold_routes" in results:
        rr = results["floors_routes"]["routing"]
        out += [f"**Cold, routes replayed** from `{Path(results['args']['routes']).name}`; stock llama.cpp cannot "
                f"take routes, so it has no column here. Routing as replayed: top quarter of experts take "
                f"{100 * rr['top_quarter_share']:.0f} % of a layer's uses; usage entropy {rr['entropy_bits']:.2f} of "
                f"{rr['max_entropy_bits']:.0f} bits; EOR {rr['eor']:.2f}.", ""]
        out += _cold_table(results, "cold_routes", results["floors_routes"])
        out += ["", f"Command: `{results['commands']['cold_routes']}`", ""]

    warm = results["warm"]
    e = rows_of(warm, tg, expert_cache="100%", status="ok")
    s = rows_of(warm, tg, expert_cache="off", status="ok")
    out += [f"**Warm**, TPOT of `tg{N}` in ms, no limit, every expert loaded (`--preload`) and a warm-up "
            f"first; the two runs in opposite orders (edgemoe first, then stock first):", "",
            "| run | stock | edgemoe 100 % | ratio, mean (median) | edgemoe hit rate |",
            "| --- | ---: | ---: | ---: | ---: |"]
    ratios, medians = [], []
    for i, (er, sr) in enumerate(zip(e, s)):
        ratios.append(er["tpot_ms"] / sr["tpot_ms"])
        medians.append(er["tpot_p50_ms"] / sr["tpot_p50_ms"])
        out.append(f"| {'AB' if i == 0 else 'BA'} | {_tpot_cell([sr])} | {_tpot_cell([er])} | "
                   f"{ratios[-1]:.3f} ({medians[-1]:.3f}) | {100 * er['hit_rate']:.2f} % |")
    if ratios:
        out += ["", f"Ratio edgemoe / stock over both runs: mean **{np.mean(ratios):.3f}**, median token "
                f"**{np.mean(medians):.3f}**.", ""]
    out += [f"Commands: `{results['commands']['warm_ab']}`, then `{results['commands']['warm_ba']}`.", ""]
    out += [f"Floors: misses × {results['bytes_per_expert'] / 2**20:.2f} MiB / {results['bandwidth_gbps']:.2f} GB/s, "
            f"plus the warm compute of {fl['compute_ms']:.1f} ms (the median token of edgemoe 100 % warm) without "
            f"overlap, or the larger of "
            f"the two with overlap; misses of each policy and Belady replayed over the recorded routes at the "
            f"run's slot count."]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
