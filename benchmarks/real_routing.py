"""The headline benchmark (issue 9): real routing at a real size. The trained default model,
inflated to about 3.5 GB by `edgemoe inflate` (its routes and logits kept), generates the same
greedy text from held-out prompts under stock llama.cpp and under edgemoe, cold, at the same
memory limit, with the disk's read-ahead at Linux's 128 KiB.

  cold    `edgemoe bench --prompts P -n N --cold --mem-limit auto --read-ahead 128 --baseline`
          at budgets 10/25/50 %, prefetch off and each --prefetch variant; every repetition a
          fresh process whose prompt is the next held-out paragraph;
  warm    edgemoe at 100 % against stock, no limit, every expert loaded first (--preload), a
          warm-up, then the runs, twice in opposite orders (ABBA);
  floors  the routes of the same prompts and tokens, recorded in a cache-off run, replayed
          through benchmarks/cache_sim.py for Belady and the default policy at each run's slot
          count: misses x bytes per expert / measured O_DIRECT bandwidth, plus (no overlap) or
          against (overlap: the larger of the two) the warm compute.

It checks that every configuration generated the same tokens, prints a markdown report
(BENCHMARKS.md takes it as is) and writes everything measured to --out. Needs root.

    python benchmarks/real_routing.py --out benchmarks/out/real-routing.json
    python benchmarks/real_routing.py --report benchmarks/out/real-routing.json   # print a saved run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from floors import direct_bandwidth, expert_slices, io_floor, routing_stats  # noqa: E402
from sweep import bench, machine, rows_of, save, warm_compute_ms  # noqa: E402

from edgemoe.cpus import default_threads  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "models" / "edgemoe-tiny-q8_0.gguf"
HELDOUT = REPO / "models" / "corpus" / "heldout.txt"
DEFAULT_MODEL = REPO / "benchmarks" / "out" / "tiny-inflated-3.5g.gguf"
BUDGETS = ("10%", "25%", "50%")
SIM_POLICIES = ("default", "belady")


def ensure_model(path: Path, size: str, source: Path = SOURCE) -> Path:
    """`source` (the default model) inflated to `size` at `path`, by `edgemoe inflate` when absent."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "edgemoe", "inflate", str(source), "-o", str(path), "--size", size],
                       check=True)
    return path


def write_prompts(path: Path, n: int, min_chars: int = 300, max_chars: int = 700) -> Path:
    """n held-out paragraphs of a few hundred characters, in file order: the same prompts on
    every run."""
    prompts = []
    for line in HELDOUT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if min_chars <= len(line) <= max_chars:
            prompts.append(line)
            if len(prompts) == n:
                break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    return path


def record_routes(model: str, prompts_file: Path, args) -> list:
    """The routes of each cold repetition (its prompt, then the greedy tokens), recorded in a
    cache-off run: the logits are bit-identical with the cache on, so the routes are too."""
    from edgemoe.bench.inputs import read_prompts
    from edgemoe.bench.params import BenchTest, Config
    from edgemoe.bench.runner import Options, run_config, system_fields

    cfg = Config(model, args.threads, 512, 512, 0, None, None, None, None, (BenchTest("prompt", 0, args.n_gen),))
    opts = Options(repetitions=args.repetitions, warmup=False, cold=True, seed=1, record_routes=True,
                   prompts=read_prompts(str(prompts_file)), prompts_name=prompts_file.name)
    res = run_config(cfg, opts, system_fields(), lambda m: None)
    if any(r.status != "ok" for r in res.rows):
        raise SystemExit(f"real_routing: the route recording run failed: {res.rows[0].error}")
    return res.routes, res.rows[0].to_dict()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--size", default="3.5GB", help="of the inflated model, when it has to be written")
    ap.add_argument("--repetitions", type=int, default=3, help="cold repetitions (each a fresh process)")
    ap.add_argument("--warm-repetitions", type=int, default=3)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--prefetch", default="lookahead", help="prefetch variants beside off (bench's --prefetch)")
    ap.add_argument("--prefetch-top", default="0", help="bench's --prefetch-top list")
    ap.add_argument("--read-ahead", type=int, default=128)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/real-routing.json"))
    ap.add_argument("--report", type=Path, metavar="JSON", help="measure nothing: print a saved run's report")
    ap.add_argument("--skip-warm", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="keep the stages (cold, warm) that --out already holds, measure the rest")
    ap.add_argument("--bandwidth-runs", type=int, default=3,
                    help="O_DIRECT bandwidth measurements (the floors take their median); with --report: "
                         "measure again and recompute the floors of the saved run")
    args = ap.parse_args()
    if args.report:
        results = json.loads(args.report.read_text())
        if "--bandwidth-runs" in sys.argv:
            results["bandwidth_gbps"], results["bandwidth_samples_gbps"] = bandwidth(results["model"],
                                                                                     args.bandwidth_runs)
            results["floors"] = floors(results, [np.asarray(r) for r in results["routes"]])
            save(results, args.report)
        print(report(results))
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    from edgemoe.cache import inspect_model

    model = str(ensure_model(args.model, args.size))
    info = inspect_model(model)
    slices, per_expert = expert_slices(model)
    # prompt i serves repetition i - 1 (bench takes prompt (rep + 1) mod n); the warm-up takes prompt 0
    prompts = write_prompts(args.out.parent / "heldout-prompts.jsonl", max(args.repetitions, args.warm_repetitions) + 1)
    common = ["-m", model, "-t", args.threads, "--read-ahead", args.read_ahead, "--prompts", prompts,
              "-n", args.n_gen]
    results = dict(model=model, model_bytes=os.path.getsize(model), expert_bytes=info.expert_bytes,
                   non_expert_bytes=info.non_expert_bytes, n_moe_layer=info.n_moe_layer, n_expert=info.n_expert,
                   n_expert_used=info.n_expert_used, bytes_per_expert=per_expert,
                   machine=machine(),
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   args={k: str(v) for k, v in vars(args).items()}, commands={})

    done = json.loads(args.out.read_text()) if args.resume and args.out.exists() else {}
    for key in ("cold", "warm"):
        if key in done:
            results[key], results["commands"] = done[key], {**done["commands"], **results["commands"]}
            log(f"kept the {key} runs of {args.out}")
    cold_args = [*common, "-r", args.repetitions, "--cold", "--mem-limit", "auto", "--expert-cache", ",".join(BUDGETS),
                 "--prefetch", "off," + args.prefetch, "--prefetch-top", args.prefetch_top, "--baseline"]
    if "cold" not in results:
        results["commands"]["cold"], results["cold"] = bench(cold_args, log)
        save(results, args.out)

    if not args.skip_warm and "warm" not in results:
        warm_args = [*common, "-r", args.warm_repetitions, "--preload"]
        results["commands"]["warm_ab"], ab = bench([*warm_args, "--expert-cache", "100%", "--baseline"], log)
        results["commands"]["warm_ba"], ba = bench([*warm_args, "--expert-cache", "off,100%"], log)
        results["warm"] = ab + ba
        save(results, args.out)

    log("measuring O_DIRECT bandwidth ...")
    results["bandwidth_gbps"], results["bandwidth_samples_gbps"] = bandwidth(model, args.bandwidth_runs, slices)
    log("recording the routes of the cold runs' text ...")
    routes, reference = record_routes(model, prompts, args)
    results["routes"] = [r.tolist() for r in routes]
    results["reference_generated"] = reference["samples_generated"]
    results["reference_n_prompt"] = reference["n_prompt"]
    results["floors"] = floors(results, routes)
    save(results, args.out)
    log(f"wrote {args.out}")
    print(report(results))
    return 0


def bandwidth(model: str, runs: int, slices=None) -> tuple:
    """The median of `runs` O_DIRECT measurements (2 GiB of whole experts, 4 threads each): this
    disk is shared, and one measurement can be off by 2x."""
    slices = slices if slices is not None else expert_slices(model)[0]
    samples = [direct_bandwidth(model, slices, 2 << 30) for _ in range(max(1, runs))]
    return float(np.median(samples)), samples


def prompt_lengths(results: dict) -> list:
    """Prompt tokens of each cold repetition: a layer's rows before its decode rows."""
    n_gen = int(results["args"]["n_gen"])
    out = []
    for run in results["routes"]:
        run = np.asarray(run)
        first_layer = run[run[:, 0] == run[0, 0]]
        out.append(len(first_layer) - n_gen)
    return out


def floors(results: dict, routes: list) -> dict:
    """Per budget: Belady's and the default policy's misses per generated token over the
    recorded routes, and the floors they imply."""
    n_gen = int(results["args"]["n_gen"])
    test = f"prompt+tg{n_gen}"
    compute_ms = warm_compute_ms(results, test)
    lens = prompt_lengths(results)
    per_run = [routing_stats([np.asarray(r)], results["n_expert"], p) for r, p in zip(routes, lens)]
    routing = {key: float(np.mean([s[key] for s in per_run if s[key] is not None])) for key in per_run[0]}
    out = {"compute_ms": compute_ms, "budgets": {}, "routing": routing}
    for budget in BUDGETS:
        measured = [r for r in rows_of(results["cold"], test, expert_cache=budget) if r["expert_cache_slots"]]
        if not measured:
            continue
        slots = measured[0]["expert_cache_slots"]
        sims = {}
        for policy in SIM_POLICIES:
            per_rep = [io_floor(np.asarray(r), slots, policy, prompt_tokens=p, n_tokens=n_gen,
                                bytes_per_expert=results["bytes_per_expert"], bandwidth_gbps=results["bandwidth_gbps"],
                                compute_ms=compute_ms, count_from_token=p, stop_token=p + n_gen)
                       for r, p in zip(routes, lens)]
            sims[policy] = {key: float(np.mean([s[key] for s in per_rep]))
                            for key in ("misses_per_token", "hit_rate", "io_ms", "floor_no_overlap_ms",
                                        "floor_overlap_ms")}
        out["budgets"][budget] = {"slots": slots, "sim": sims}
    return out


# -- the report ----------------------------------------------------------------------------

def _cell(rows) -> str:
    if not rows:
        return "-"
    r = rows[0]
    if r["status"] != "ok":
        return r["status"].upper()
    return f"{r['tpot_ms']:.1f} ± {r['tpot_ms_stddev']:.1f}"


def same_text(results: dict) -> str:
    """Whether every configuration generated the reference run's tokens."""
    ref = results.get("reference_generated")
    cold_rows = [r for r in results["cold"] if r["status"] == "ok"]
    if not ref or not cold_rows:
        return "not checked"
    differ = [r for r in cold_rows if r["samples_generated"] != ref]
    if differ:
        return f"**no**: {len(differ)} of {len(cold_rows)} cold configurations generated other tokens"
    return (f"yes: stock and edgemoe, all {len(cold_rows)} cold configurations, generated the same "
            f"{sum(len(g) for g in ref)} tokens as a cache-off reference run")


def report(results: dict) -> str:
    n_gen = int(results["args"]["n_gen"])
    test = f"prompt+tg{n_gen}"
    fl = results.get("floors", {"budgets": {}, "compute_ms": float("nan")})
    cold = results["cold"]
    variants = []
    for r in cold:
        if r["expert_cache"] != "off" and r["prefetch"] not in variants:
            variants.append(r["prefetch"])
    rt = fl.get("routing")
    out = [f"Model: {Path(results['model']).name}, {results['model_bytes'] / 1e9:.2f} GB "
           f"(`edgemoe inflate` of the trained default model: its routes and logits), experts "
           f"{100 * results['expert_bytes'] / (results['expert_bytes'] + results['non_expert_bytes']):.1f} % of bytes, "
           f"{results['bytes_per_expert'] / 2**20:.2f} MiB per expert; {results['machine']}; {results['date']}."]
    if rt:
        out.append(f"Routing of the generated text: top quarter of experts take {100 * rt['top_quarter_share']:.0f} % "
                   f"of a layer's uses; usage entropy {rt['entropy_bits']:.2f} of {rt['max_entropy_bits']:.0f} bits; "
                   f"EOR {rt['eor']:.2f}. O_DIRECT bandwidth (4 threads, whole experts): "
                   f"{results['bandwidth_gbps']:.2f} GB/s.")
    out += [f"Same text: {same_text(results)}.", "",
            f"**Cold**, TPOT of `{test}` in ms, mean ± sample stddev over {results['args']['repetitions']} cold "
            f"starts, each a fresh process prefilling the next held-out paragraph:", ""]
    head = ["budget", "limit MiB", "stock"] + [f"edgemoe, prefetch {v}" for v in variants] + \
        ["best / stock", "hit rate, prompt and decode: " + " / ".join(variants),
         "MB read/token " + " / ".join(variants),
         "decode hit rate: default policy (replayed) / Belady", "floor Belady, overlap / no overlap",
         "best / overlap floor"]
    out += ["| " + " | ".join(head) + " |", "| --- | " + " | ".join("---:" for _ in head[1:]) + " |"]
    for budget in BUDGETS:
        mine = {v: rows_of(cold, test, expert_cache=budget, prefetch=v) for v in variants}
        first = next((m[0] for m in mine.values() if m), None)
        if first is None:
            continue
        stock = [r for r in rows_of(cold, test, expert_cache="off") if r["mem_limit"] == first["mem_limit"]]
        ok = [m[0] for m in mine.values() if m and m[0]["status"] == "ok"]
        best = min(ok, key=lambda r: r["tpot_ms"]) if ok else None
        s_ok = stock[0] if stock and stock[0]["status"] == "ok" else None
        cells = [budget, f"{first['mem_limit'] / 2**20:.0f}", _cell(stock)] + [_cell(mine[v]) for v in variants]
        cells.append(f"{s_ok['tpot_ms'] / best['tpot_ms']:.2f}x faster" if best and s_ok else "-")
        cells.append(" / ".join(f"{100 * m[0]['hit_rate']:.1f} %" if m and m[0]["hit_rate"] is not None else "-"
                                for m in mine.values()))
        cells.append(" / ".join(f"{m[0]['bytes_read_per_token'] / 1e6:.0f}" if m and m[0]["bytes_read_per_token"]
                                is not None else "-" for m in mine.values()))
        sim = fl["budgets"].get(budget, {}).get("sim")
        if sim and best:
            bel = sim["belady"]
            cells += [f"{100 * sim['default']['hit_rate']:.1f} % / {100 * bel['hit_rate']:.1f} %",
                      f"{bel['floor_overlap_ms']:.1f} / {bel['floor_no_overlap_ms']:.1f} ms",
                      f"{best['tpot_ms'] / bel['floor_overlap_ms']:.2f}"]
        else:
            cells += ["-", "-", "-"]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", f"Command: `{results['commands']['cold']}`", "",
            "Where a cold decode step's time goes (ms per generated token, from the same runs: "
            "`compute` is TPOT less the other three), the CPU time of all threads, and the lookahead "
            "predictor against the actual routes:", "",
            "| budget | prefetch | TPOT | compute | stall | cache | predictor | CPU ms/token | prefetch hits / waste per token | predictor precision / recall |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for budget in BUDGETS:
        for v in variants:
            rows = rows_of(cold, test, expert_cache=budget, prefetch=v, status="ok")
            if not rows:
                continue
            r = rows[0]
            pf = "-" if v == "off" else f"{r['prefetch_hits'] / n_gen:.1f} / {r['prefetch_wasted'] / n_gen:.1f}"
            pr = "-" if r["pred_precision"] is None else f"{r['pred_precision']:.2f} / {r['pred_recall']:.2f}"
            out.append(f"| {budget} | {v} | {r['tpot_ms']:.1f} | {r['compute_ms']:.1f} | {r['stall_ms_per_token']:.1f} "
                       f"| {r['cache_ms_per_token']:.2f} | {r['predict_ms_per_token']:.2f} | "
                       f"{1e3 * r['cpu_s_per_token']:.0f} | {pf} | {pr} |")
        stock = [r for r in rows_of(cold, test, expert_cache="off", status="ok")
                 if rows_of(cold, test, expert_cache=budget) and r["mem_limit"] == rows_of(cold, test, expert_cache=budget)[0]["mem_limit"]]
        if stock:
            r = stock[0]
            out.append(f"| {budget} | stock | {r['tpot_ms']:.1f} | - | - | - | - | {1e3 * r['cpu_s_per_token']:.0f} | - | - |")
    warm = results.get("warm")
    if warm:
        e = rows_of(warm, test, expert_cache="100%", status="ok")
        s = rows_of(warm, test, expert_cache="off", status="ok")
        out += ["", f"**Warm**, TPOT of `{test}` in ms, no limit, every expert loaded first (`--preload`), a warm-up, "
                f"then {results['args']['warm_repetitions']} runs; the pair twice in opposite orders:", "",
                "| run | stock | edgemoe 100 % | edgemoe / stock, mean (median token) |", "| --- | ---: | ---: | ---: |"]
        ratios, medians = [], []
        for i, (er, sr) in enumerate(zip(e, s)):
            ratios.append(er["tpot_ms"] / sr["tpot_ms"])
            medians.append(er["tpot_p50_ms"] / sr["tpot_p50_ms"])
            out.append(f"| {'AB' if i == 0 else 'BA'} | {_cell([sr])} | {_cell([er])} | {ratios[-1]:.3f} ({medians[-1]:.3f}) |")
        if ratios:
            out += ["", f"edgemoe / stock over both runs: mean **{np.mean(ratios):.3f}**, median token "
                    f"**{np.mean(medians):.3f}**. Commands: `{results['commands']['warm_ab']}`, then "
                    f"`{results['commands']['warm_ba']}`."]
    samples = results.get("bandwidth_samples_gbps")
    shown = ", ".join(f"{b:.2f}" for b in samples) if samples else f"{results['bandwidth_gbps']:.2f}"
    out += ["", f"Floors: Belady's misses over the recorded routes at the run's slot count × "
            f"{results['bytes_per_expert'] / 2**20:.2f} MiB / the measured bandwidth ({shown} GB/s; the median), "
            f"against the warm compute of "
            f"{fl['compute_ms']:.1f} ms (median token of edgemoe 100 % warm): the larger of the two with overlap, "
            f"their sum without."]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
