"""Expert-cache benchmark: edgemoe against stock llama.cpp (cache off), warm and cold.

Writes a synthetic qwen3moe model (16 layers x 64 experts, top-8, Q8_0, experts > 90 % of the
bytes) unless --model is given, then runs, each configuration in its own process:

  warm   cache off and budgets 100/50/25 %, no memory limit, the model file in the page cache;
  cold   budgets 10/25/50 % and stock at the same limits: a cgroup memory limit of
         non-expert bytes + budget + 300 MiB, the model's pages dropped before each run, the
         disk read-ahead at 128 KiB (restored afterwards); with --also-default-readahead the
         cold pairs run again at the disk's own read-ahead, reported separately.

For the floor it measures O_DIRECT bandwidth on the model's expert slices and replays the
routes recorded in a cache-off run through simulations of LRU, LFU, the default policy and
Belady at each budget. Needs root (cgroups, read-ahead, dropping pages). The cgroup, read-ahead,
page-cache and floor code is shared with `edgemoe bench` and benchmarks/sweep.py
(edgemoe.cgroup, edgemoe.bench.disk, benchmarks/floors.py).

    python benchmarks/expert_cache.py --out benchmarks/out/expert_cache.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import ensure_model  # noqa: E402
from cache_sim import simulate  # noqa: E402
from floors import direct_bandwidth, expert_slices, routing_stats  # noqa: E402

from edgemoe.bench.disk import drop_file_pages, read_ahead, warm_file  # noqa: E402
from edgemoe.cgroup import MemoryCgroup, find_memory_controller  # noqa: E402

OVERHEAD = 300 << 20


@contextlib.contextmanager
def memory_cgroup(limit: int | None):
    """A memory cgroup of `limit` bytes (v2 or v1, edgemoe.cgroup), removed afterwards."""
    if limit is None:
        yield None
        return
    controller, why = find_memory_controller()
    if controller is None:
        raise SystemExit(f"expert_cache.py: the cold runs need a cgroup memory controller: {why}")
    with MemoryCgroup(controller, limit) as cg:
        yield cg


# -- one configuration, in a child process ---------------------------------------------

def child(cfg: dict) -> dict:
    from edgemoe.engine import Engine
    from edgemoe.routes import RouteRecorder

    rec = RouteRecorder() if cfg.get("record") else None
    rng = np.random.default_rng(cfg["seed"])
    t0 = time.perf_counter()
    with Engine(cfg["model"], expert_cache=cfg["budget"], policy=cfg.get("policy", "default"),
                io=cfg.get("io", "direct"), n_threads=cfg["threads"], n_ctx=1024, route_recorder=rec) as e:
        load_s = time.perf_counter() - t0
        if cfg.get("prefetch_all") and e.cache is not None:
            # a warm cache at a full budget: every expert resident before timing
            for il in range(e.n_layer):
                e.cache.prefetch(il, list(range(cfg["n_expert"])))
        prompt = rng.integers(1000, e.n_vocab - 1000, size=cfg["n_prompt"]).tolist()
        t1 = time.perf_counter()
        logits = e.eval(prompt)
        pp_ms = (time.perf_counter() - t1) * 1e3
        tok = int(logits[-1].argmax())
        for _ in range(cfg["n_warmup"]):
            tok = int(e.eval([tok])[-1].argmax())
        e.reset_stats()
        times = []
        for _ in range(cfg["n_gen"]):
            t = time.perf_counter()
            tok = int(e.eval([tok])[-1].argmax())
            times.append((time.perf_counter() - t) * 1e3)
        s = e.stats()
        out = {
            "load_s": load_s, "pp_ms": pp_ms, "tpot_ms": float(np.mean(times)),
            "tpot_p50_ms": float(np.percentile(times, 50)), "tpot_p90_ms": float(np.percentile(times, 90)),
            "samples_ms": times, "hits": s.hits, "misses": s.misses, "hit_rate": s.hit_rate,
            "bytes_read": s.bytes_read, "stall_ms": s.stall_ms, "read_ms": s.read_ms,
            "expert_cache_bytes": s.expert_cache_bytes, "peak_rss_bytes": s.peak_rss_bytes,
        }
    if rec is not None:
        out["routes"] = rec.rows().tolist()
    return out


def run_child(cfg: dict, cgroup: MemoryCgroup | None) -> dict:
    def enter():
        if cgroup is not None:
            cgroup.add(os.getpid())

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                       preexec_fn=enter, env=env)
    if p.returncode != 0:
        oom = p.returncode in (-9, 137)
        return {"error": "OOM (killed)" if oom else f"exit {p.returncode}: {p.stderr.strip()[-400:]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- the sweep -------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="default: a synthetic 3.6 GB qwen3moe written to benchmarks/out/")
    ap.add_argument("--router-skew", type=float, default=0.0,
                    help="router skew of the synthetic model (0: near-uniform routing; 8: 16 of 64 experts "
                         "take about 95 %% of a layer's uses)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "expert_cache.json")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--n-prompt", type=int, default=16)
    ap.add_argument("--n-warmup", type=int, default=16)
    ap.add_argument("--n-gen", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--also-default-readahead", action="store_true")
    ap.add_argument("--ab-full", type=int, default=0, metavar="N",
                    help="only compare stock and edgemoe 100 %% warm, alternating N times (this machine is noisy)")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    from edgemoe.cache import inspect_model

    model = args.model or ROOT / "benchmarks" / "out" / f"bench-qwen3moe-q8-skew{args.router_skew:g}.gguf"
    model = ensure_model(model, args.router_skew)
    info = inspect_model(str(model))
    expert_bytes, non_expert = info.expert_bytes, info.non_expert_bytes
    slices, per_expert = expert_slices(model)
    base = dict(model=str(model), threads=args.threads, n_prompt=args.n_prompt, n_gen=args.n_gen, seed=1,
                n_expert=info.n_expert)
    results = {"model": str(model), "expert_bytes": expert_bytes, "non_expert_bytes": non_expert,
               "expert_share": expert_bytes / (expert_bytes + non_expert), "bytes_per_expert": per_expert,
               "machine": platform.node(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"),
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
               "runs": []}

    def record(kind, label, budget, limit, res):
        row = {"kind": kind, "config": label, "budget": budget, "mem_limit": limit, **res}
        results["runs"].append(row)
        shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()
                 if k not in ("samples_ms", "routes")}
        print(json.dumps(shown), file=sys.stderr, flush=True)

    if args.ab_full:
        return ab_full(args, base, model, results)

    # routes of the timed window, from a warm cache-off run (greedy decoding: identical in every run)
    warm_file(model)
    ref = run_child({**base, "budget": None, "n_warmup": args.n_warmup, "record": True}, None)
    routes = np.array(ref.pop("routes"), dtype=np.int32)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out.with_suffix(".routes.npy"), routes)  # (layer, token, k ids) rows, for replays
    results["bandwidth_gbps"] = direct_bandwidth(model, slices, 2 << 30)
    print(f"O_DIRECT bandwidth: {results['bandwidth_gbps']:.2f} GB/s", file=sys.stderr, flush=True)

    # warm: no limit, the file in the page cache; at 100 % every expert resident before timing
    for rep in range(args.repeats):
        for budget in (None, "100%", "50%", "25%"):
            warm_file(model)
            res = run_child({**base, "budget": budget, "n_warmup": args.n_warmup, "prefetch_all": budget == "100%"},
                            None)
            record("warm", "stock" if budget is None else f"edgemoe {budget}", budget, None, res)

    # cold: same limit for both, read-ahead 128 KiB
    def cold_pairs(kind, ra_kb):
        with read_ahead(model, ra_kb) as old:
            results.setdefault("read_ahead_restored", {})[kind] = old
            for rep in range(args.repeats):
                for pct in (10, 25, 50):
                    limit = non_expert + int(expert_bytes * pct / 100) + OVERHEAD
                    for budget in (f"{pct}%", None):
                        drop_file_pages(model)
                        with memory_cgroup(limit) as cg:
                            res = run_child({**base, "budget": budget, "n_warmup": 0}, cg)
                        record(kind, "stock" if budget is None else f"edgemoe {budget}", f"{pct}%", limit, res)

    cold_pairs("cold", 128)
    if args.also_default_readahead:
        cold_pairs("cold-default-readahead", None)

    # floors from the recorded routes: misses x bytes per expert / bandwidth (+ warm compute: the
    # cache at 100 % with every expert resident)
    warm_100 = [r for r in results["runs"] if r["kind"] == "warm" and r["budget"] == "100%" and "tpot_ms" in r]
    compute_ms = float(np.mean([r["tpot_ms"] for r in warm_100])) if warm_100 else float("nan")
    n_slots_all = info.n_moe_layer * info.n_expert
    n_skip = args.n_prompt + args.n_warmup
    bytes_per_ms = results["bandwidth_gbps"] * 1e6

    def floors(pct, policy, **window):
        slots = max(info.n_expert_used, int(n_slots_all * pct / 100))
        sim = simulate(routes, slots, policy, prompt_tokens=args.n_prompt, **window)
        io_ms = sim["misses"] / args.n_gen * per_expert / bytes_per_ms
        return {**sim, "misses_per_token": sim["misses"] / args.n_gen, "io_ms": io_ms,
                "floor_no_overlap_ms": compute_ms + io_ms, "floor_overlap_ms": max(compute_ms, io_ms)}

    sims = {}
    for pct in (10, 25, 50, 100):
        for policy in ("lru", "lfu", "default", "belady"):
            sims[f"{pct}%/{policy}"] = floors(pct, policy, count_from_token=n_skip)
    # a cold run times the first n_gen decode tokens, from an empty pool
    for pct in (10, 25, 50):
        for policy in ("default", "belady"):
            sims[f"cold {pct}%/{policy}"] = floors(pct, policy, count_from_token=args.n_prompt,
                                                   stop_token=args.n_prompt + args.n_gen)
    results["warm_compute_ms"] = compute_ms
    results["simulations"] = sims
    results["routing"] = routing_stats([routes], info.n_expert, args.n_prompt)

    save(results, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


def ab_full(args, base: dict, model: Path, results: dict) -> int:
    """Stock against edgemoe at 100 % (all resident), warm, alternating, each in a fresh process."""
    warm_file(model)
    pairs = []
    for i in range(args.ab_full):
        row = {}
        for budget in ((None, "100%") if i % 2 == 0 else ("100%", None)):
            res = run_child({**base, "budget": budget, "n_warmup": args.n_warmup, "prefetch_all": budget == "100%"},
                            None)
            row["stock" if budget is None else "edgemoe"] = res["tpot_ms"]
        pairs.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    ratios = [p["edgemoe"] / p["stock"] for p in pairs]
    results["ab_full"] = {"pairs": pairs, "ratio_median": float(np.median(ratios)),
                          "ratio_mean": float(np.mean(ratios)), "ratio_sd": float(np.std(ratios, ddof=1))}
    print(json.dumps(results["ab_full"]), file=sys.stderr)
    save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
