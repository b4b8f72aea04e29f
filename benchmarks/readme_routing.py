"""Read-ME end to end (issue 10): the router-decoupled model, its router run ahead of the backbone.

The shipped Read-ME model (models/edgemoe-tiny-readme-q8_0.gguf), inflated to about 3.5 GB by
`edgemoe inflate` (its router, routes and logits kept), generates the same greedy text from
held-out prompts, cold, under the same memory limit, with the disk's read-ahead at 128 KiB:

  hit rates  the router's routes over held-out text (`edgemoe trace` of the shipped model),
             replayed through benchmarks/cache_sim.py for Belady, LRU and the default policy at
             equal capacity: 4 experts per layer (Read-ME's setting) and 10/25/50 % of them;
  cold       `edgemoe bench --cold --mem-limit auto` at 10/25/50 %: routes computed ahead
             (--prefetch routes, --policy belady) against the same model loading on demand
             (--prefetch off, --policy default: routes handed over at the layer), and the two
             mixed cases, all in one bench run;
  warm       every expert loaded first (--preload), 100 %: the compute of a decode step and the
             router's share of it;
  floors     Belady's misses over the recorded routes of the cold runs' text at each run's slot
             count x bytes per expert / measured O_DIRECT bandwidth, against the warm compute:
             the goal is TPOT <= 1.1 x max(compute, that I/O).

Prints a markdown report (BENCHMARKS.md takes it as is) and writes everything to --out. Needs root.

    python benchmarks/readme_routing.py --out benchmarks/out/readme-routing.json
    python benchmarks/readme_routing.py --report benchmarks/out/readme-routing.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cache_sim import simulate  # noqa: E402
from floors import expert_slices  # noqa: E402
from real_routing import bandwidth, ensure_model, floors, record_routes, write_prompts  # noqa: E402
from sweep import bench, machine, rows_of, save  # noqa: E402

from edgemoe.cpus import default_threads  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "models" / "edgemoe-tiny-readme-q8_0.gguf"
HELDOUT = REPO / "models" / "corpus" / "heldout.txt"
DEFAULT_MODEL = REPO / "benchmarks" / "out" / "readme-inflated-3.5g.gguf"
BUDGETS = ("10%", "25%", "50%")
AHEAD = ("routes", "belady")      # (prefetch, policy)
DEMAND = ("off", "default")
SIM_POLICIES = ("belady", "lru", "default")


def heldout_hit_rates(model: Path, n_tokens: int, threads: int) -> dict:
    """Belady, LRU and the default policy on the router's routes over held-out text, per
    capacity, every token one step (decode-like), one pool shared by all layers."""
    from edgemoe.trace import record_trace

    trace = record_trace(str(model), HELDOUT.read_text(encoding="utf-8"), ctx=512, n_threads=threads,
                         max_tokens=n_tokens)
    n, n_layers, k = trace.experts.shape
    rows = np.concatenate([np.concatenate([np.full((n, 1), il), np.arange(n)[:, None], trace.experts[:, j]], axis=1)
                           for j, il in enumerate(trace.layers)]).astype(np.int32)
    capacities = {"4 per layer": 4 * n_layers}
    for b in BUDGETS:
        per_layer = max(k, round(float(b.rstrip("%")) / 100 * trace.n_expert))
        capacities[f"{b} ({per_layer} per layer)"] = per_layer * n_layers
    out = {"n_tokens": int(n), "n_layers": int(n_layers), "n_expert": int(trace.n_expert), "k": int(k), "rates": {}}
    for name, slots in capacities.items():
        out["rates"][name] = {"slots": slots, **{p: simulate(rows, slots, p, prompt_tokens=1, n_expert=trace.n_expert)
                                                 ["hit_rate"] for p in SIM_POLICIES}}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--source", type=Path, default=SOURCE, help="the shipped model the inflated one comes from")
    ap.add_argument("--size", default="3.5GB", help="of the inflated model, when it has to be written")
    ap.add_argument("--repetitions", type=int, default=3, help="cold repetitions (each a fresh process)")
    ap.add_argument("--warm-repetitions", type=int, default=2)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--heldout-tokens", type=int, default=8192, help="held-out tokens the hit rates replay")
    ap.add_argument("--read-ahead", type=int, default=128)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--bandwidth-runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/readme-routing.json"))
    ap.add_argument("--report", type=Path, metavar="JSON", help="measure nothing: print a saved run's report")
    ap.add_argument("--resume", action="store_true", help="keep the parts --out already holds")
    args = ap.parse_args()
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    from edgemoe.cache import inspect_model

    model = str(ensure_model(args.model, args.size, args.source))
    info = inspect_model(model)
    slices, per_expert = expert_slices(model)
    prompts = write_prompts(args.out.parent / "heldout-prompts.jsonl", max(args.repetitions, args.warm_repetitions) + 1)
    common = ["-m", model, "-t", args.threads, "--read-ahead", args.read_ahead, "--prompts", prompts, "-n", args.n_gen]
    results = dict(model=model, source=str(args.source), model_bytes=os.path.getsize(model), expert_bytes=info.expert_bytes,
                   non_expert_bytes=info.non_expert_bytes, n_moe_layer=info.n_moe_layer, n_expert=info.n_expert,
                   n_expert_used=info.n_expert_used, bytes_per_expert=per_expert,
                   machine=machine(),
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   args={k: str(v) for k, v in vars(args).items()}, commands={})
    done = json.loads(args.out.read_text()) if args.resume and args.out.exists() else {}
    for key in ("heldout", "cold", "warm"):
        if key in done:
            results[key], results["commands"] = done[key], {**done["commands"], **results["commands"]}
            log(f"kept the {key} part of {args.out}")

    if "heldout" not in results:
        log("replaying the router's routes over held-out text ...")
        results["heldout"] = heldout_hit_rates(args.source, args.heldout_tokens, args.threads)
        save(results, args.out)
    if "cold" not in results:
        cold = [*common, "-r", args.repetitions, "--cold", "--mem-limit", "auto", "--expert-cache", ",".join(BUDGETS),
                "--prefetch", f"{AHEAD[0]},{DEMAND[0]}", "--policy", f"{AHEAD[1]},{DEMAND[1]}"]
        results["commands"]["cold"], results["cold"] = bench(cold, log)
        save(results, args.out)
    if "warm" not in results:
        warm = [*common, "-r", args.warm_repetitions, "--preload", "--expert-cache", "100%",
                "--prefetch", AHEAD[0], "--policy", AHEAD[1]]
        results["commands"]["warm"], results["warm"] = bench(warm, log)
        save(results, args.out)

    log("measuring O_DIRECT bandwidth ...")
    results["bandwidth_gbps"], results["bandwidth_samples_gbps"] = bandwidth(model, args.bandwidth_runs, slices)
    log("recording the routes of the cold runs' text ...")
    routes, reference = record_routes(model, prompts, args)
    results["routes"] = [r.tolist() for r in routes]
    results["reference_generated"] = reference["samples_generated"]
    results["floors"] = floors(results, routes)
    save(results, args.out)
    log(f"wrote {args.out}")
    print(report(results))
    return 0


# -- the report ----------------------------------------------------------------------------

def _row(cold, test, budget, mode):
    rows = rows_of(cold, test, expert_cache=budget, prefetch=mode[0], policy=mode[1])
    return rows[0] if rows else None


def _tpot(r) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok":
        return r["status"].upper()
    return f"{r['tpot_ms']:.1f} ± {r['tpot_ms_stddev']:.1f}"


def report(results: dict) -> str:
    n_gen = int(results["args"]["n_gen"])
    test = f"prompt+tg{n_gen}"
    cold = results["cold"]
    fl = results.get("floors", {"budgets": {}, "compute_ms": float("nan")})
    ok = [r for r in cold if r["status"] == "ok"]
    ref = results.get("reference_generated")
    same = ("not checked" if not ref else
            f"yes, all {len(ok)} cold configurations generated the same {sum(len(g) for g in ref)} tokens as a "
            f"reference run" if all(r["samples_generated"] == ref for r in ok) else
            f"**no**: {sum(r['samples_generated'] != ref for r in ok)} configurations generated other tokens")
    out = [f"Model: {Path(results['model']).name}, {results['model_bytes'] / 1e9:.2f} GB (`edgemoe inflate` of "
           f"`{Path(results['source']).name}`: its router, routes and logits), {results['n_moe_layer']} MoE layers of "
           f"{results['n_expert']} experts, top-{results['n_expert_used']} plus the always-on residual expert, "
           f"{results['bytes_per_expert'] / 2**20:.2f} MiB per expert; {results['machine']}; {results['date']}. "
           f"Same text: {same}."]
    ho = results.get("heldout")
    if ho:
        out += ["", f"**Hit rate at equal capacity** on the router's routes over {ho['n_tokens']:,} held-out tokens "
                f"(every token one step, one pool for all {ho['n_layers']} layers; `benchmarks/cache_sim.py`):", "",
                "| capacity | slots | Belady | LRU | default policy |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, r in ho["rates"].items():
            out.append(f"| {name} | {r['slots']} | {100 * r['belady']:.1f} % | {100 * r['lru']:.1f} % | "
                       f"{100 * r['default']:.1f} % |")
    out += ["", f"**Cold**, TPOT of `{test}` in ms, mean ± sample stddev over {results['args']['repetitions']} cold "
            f"starts (each a fresh process prefilling the next held-out paragraph), at the same memory limit:", "",
            "| budget | limit MiB | ahead (routes, Belady) | on demand (off, default) | ahead / on demand | "
            "on demand + Belady | ahead + default | hit rate ahead / on demand | MB read/token ahead / on demand | "
            "Belady I/O floor, compute | TPOT ahead / max(both) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for budget in BUDGETS:
        a, d = _row(cold, test, budget, AHEAD), _row(cold, test, budget, DEMAND)
        if a is None:
            continue
        mixed = (_row(cold, test, budget, (DEMAND[0], AHEAD[1])), _row(cold, test, budget, (AHEAD[0], DEMAND[1])))
        both_ok = a["status"] == "ok" and d is not None and d["status"] == "ok"
        f = fl["budgets"].get(budget, {}).get("sim", {}).get("belady")
        bound = max(fl["compute_ms"], f["io_ms"]) if f else None
        out.append(" | ".join([
            f"| {budget}", f"{a['mem_limit'] / 2**20:.0f}", _tpot(a), _tpot(d),
            f"**{d['tpot_ms'] / a['tpot_ms']:.2f}x** faster" if both_ok else "-", _tpot(mixed[0]), _tpot(mixed[1]),
            f"{100 * a['hit_rate']:.1f} / {100 * d['hit_rate']:.1f} %" if both_ok else "-",
            f"{a['bytes_read_per_token'] / 1e6:.0f} / {d['bytes_read_per_token'] / 1e6:.0f}" if both_ok else "-",
            f"{f['io_ms']:.1f}, {fl['compute_ms']:.1f} ms" if f else "-",
            f"{a['tpot_ms'] / bound:.2f}" if f and a["status"] == "ok" else "-"]) + " |")
    out += ["", f"Command: `{results['commands']['cold']}`", "",
            "Where a cold decode step's time goes (ms per generated token; `compute` is TPOT less the rest):", "",
            "| budget | prefetch, policy | TPOT | compute | stall | cache | router | prefetch hits / waste per token |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for budget in BUDGETS:
        for mode in (AHEAD, DEMAND, (DEMAND[0], AHEAD[1]), (AHEAD[0], DEMAND[1])):
            r = _row(cold, test, budget, mode)
            if r is None or r["status"] != "ok":
                continue
            out.append(f"| {budget} | {mode[0]}, {mode[1]} | {r['tpot_ms']:.1f} | {r['compute_ms']:.1f} | "
                       f"{r['stall_ms_per_token']:.1f} | {r['cache_ms_per_token']:.2f} | {r['router_ms_per_token']:.2f} | "
                       f"{r['prefetch_hits'] / n_gen:.1f} / {r['prefetch_wasted'] / n_gen:.1f} |")
    warm = rows_of(results.get("warm", []), test, expert_cache="100%", status="ok")
    if warm:
        router = float(np.mean([r["router_ms_per_token"] for r in warm]))
        tpot = float(np.mean([r["tpot_ms"] for r in warm]))
        out += ["", f"**Router overhead**: {router:.2f} ms per token of a warm {tpot:.1f} ms TPOT at 100 % "
                f"({100 * router / tpot:.1f} %; the goal moves it native above 3 %). Command: "
                f"`{results['commands']['warm']}`."]
    rt = fl.get("routing")
    samples = results.get("bandwidth_samples_gbps") or [results.get("bandwidth_gbps", float("nan"))]
    if rt:
        out += ["", f"Routing of the generated text: usage entropy {rt['entropy_bits']:.2f} of "
                f"{rt['max_entropy_bits']:.0f} bits, EOR between consecutive tokens {rt['eor']:.2f}. Floors: Belady's "
                f"misses over the recorded routes at the run's slot count × {results['bytes_per_expert'] / 2**20:.2f} MiB "
                f"/ the median O_DIRECT bandwidth ({', '.join(f'{b:.2f}' for b in samples)} GB/s), against the "
                f"warm compute ({fl['compute_ms']:.1f} ms, median token)."]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
