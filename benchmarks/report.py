"""Markdown tables from the JSON that benchmarks/expert_cache.py writes.

    python benchmarks/report.py benchmarks/out/expert_cache-skew8.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def group(runs, kind):
    out = defaultdict(list)
    for r in runs:
        if r["kind"] == kind:
            out[(r["budget"], r["config"])].append(r)
    return out


def main(path: str) -> None:
    r = json.load(open(path))
    gb = 1e9
    print(f"Model: {r['model'].split('/')[-1]}, {(r['expert_bytes'] + r['non_expert_bytes']) / gb:.2f} GB, "
          f"experts {100 * r['expert_share']:.1f} % of bytes, {r['bytes_per_expert'] / 2**20:.2f} MiB per expert; "
          f"{r['cpus']} CPUs; {r['date']}.")
    rt = r["routing"]
    print(f"Routing (recorded, cache off): top quarter of experts take {100 * rt['top_quarter_share']:.0f} % of a "
          f"layer's uses; usage entropy {rt['entropy_bits']:.2f} of {rt['max_entropy_bits']:.0f} bits; "
          f"EOR {rt['eor']:.2f}. O_DIRECT bandwidth (cold, 4 threads, whole experts): {r['bandwidth_gbps']:.2f} GB/s.")
    print()

    warm = group(r["runs"], "warm")
    stock = [x["tpot_ms"] for x in warm.get((None, "stock"), []) if "tpot_ms" in x]
    print("**Warm** (no memory limit, file in the page cache; 100 %: every expert resident before timing)")
    print()
    print("| config | TPOT ms | vs stock | hit rate | misses/token | stall ms/token |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for (budget, cfg), rows in warm.items():
        ok = [x for x in rows if "tpot_ms" in x]
        t = [x["tpot_ms"] for x in ok]
        n = r["args"]["n_gen"]
        ratio = f"{np.mean(t) / np.mean(stock):.3f}" if stock and t else "-"
        hr = mean_sd([100 * x["hit_rate"] for x in ok if x["hit_rate"] is not None]) if budget else "-"
        print(f"| {cfg} | {mean_sd(t)} | {ratio} | {hr + ' %' if budget else '-'} | "
              f"{mean_sd([x['misses'] / n for x in ok]) if budget else '-'} | "
              f"{mean_sd([x['stall_ms'] / n for x in ok]) if budget else '-'} |")
    print()

    sims = r["simulations"]
    for kind in ("cold", "cold-default-readahead"):
        cold = group(r["runs"], kind)
        if not cold:
            continue
        ra = "read-ahead 128 KiB" if kind == "cold" else "this VM's default read-ahead (8 MiB): not a baseline"
        print(f"**Cold** (cgroup memory limit = non-expert bytes + budget + 300 MiB, pages dropped, {ra})")
        print()
        print("| budget | limit MiB | stock TPOT ms | edgemoe TPOT ms | speed-up | hit rate | Belady hit rate "
              "| floor no-overlap (Belady) ms | measured / floor | floor no-overlap (own misses) ms |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for pct in ("10%", "25%", "50%"):
            s = [x["tpot_ms"] if "tpot_ms" in x else None for x in cold.get((pct, "stock"), [])]
            e = [x for x in cold.get((pct, f"edgemoe {pct}"), []) if "tpot_ms" in x]
            if not e:
                continue
            et = [x["tpot_ms"] for x in e]
            limit = cold[(pct, f"edgemoe {pct}")][0]["mem_limit"] / 2**20
            bel = sims[f"cold {pct}/belady"]
            own = sims[f"cold {pct}/default"]
            s_ok = [v for v in s if v is not None]
            oom = len(s) - len(s_ok)
            speed = f"{np.mean(s_ok) / np.mean(et):.2f}x" if s_ok else "-"
            print(f"| {pct} | {limit:.0f} | {mean_sd(s_ok)}{' (' + str(oom) + ' OOM)' if oom else ''} | {mean_sd(et)} "
                  f"| {speed} | {mean_sd([100 * x['hit_rate'] for x in e])} % | {100 * bel['hit_rate']:.1f} % "
                  f"| {bel['floor_no_overlap_ms']:.1f} | {np.mean(et) / bel['floor_no_overlap_ms']:.2f} "
                  f"| {own['floor_no_overlap_ms']:.1f} |")
        print()

    print("**Policies** replayed over the recorded routes (decode tokens after warm-up; hit rate %)")
    print()
    print("| budget | lru | lfu | default | belady |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for pct in ("10%", "25%", "50%", "100%"):
        cells = [f"{100 * sims[f'{pct}/{p}']['hit_rate']:.1f}" for p in ("lru", "lfu", "default", "belady")]
        print(f"| {pct} | " + " | ".join(cells) + " |")
    print()
    print(f"Floors: misses × {r['bytes_per_expert'] / 2**20:.2f} MiB / {r['bandwidth_gbps']:.2f} GB/s, plus the "
          f"warm compute of {r['warm_compute_ms']:.1f} ms (edgemoe 100 %, all resident) without overlap, or the "
          f"larger of the two with overlap.")


if __name__ == "__main__":
    main(sys.argv[1])
