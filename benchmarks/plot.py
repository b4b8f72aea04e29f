"""Plots of a sweep (benchmarks/sweep.py's JSON): TPOT against budget per policy with the stock
baseline at the same limits and Belady's no-overlap floor; hit rate against budget per policy
with Belady's. matplotlib is an optional extra: `pip install edgemoe[plot]`.

    python benchmarks/plot.py benchmarks/out/sweep-skew8.json --out-dir benchmarks
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List

BUDGETS = ("10%", "25%", "50%")


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plot.py needs matplotlib: pip install 'edgemoe[plot]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _plain_ticks():
    """Tick labels as plain numbers (20, 30, 200), not 2x10^1, on a log axis."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}")


def _series(results: dict, kind: str, policy, key: str):
    """(budget %, value, stddev) of the timed tg rows of one policy (None: the stock rows,
    matched to each budget by its memory limit)."""
    tg = f"tg{results['args']['n_gen']}"
    rows = [r for r in results[kind] if r["test"] == tg]
    out = []
    for budget in BUDGETS:
        mine = [r for r in rows if r["expert_cache"] == budget and r["policy"] == (policy or "default")]
        if not mine:
            continue
        if policy is None:
            mine = [r for r in rows if r["expert_cache"] == "off" and r["mem_limit"] == mine[0]["mem_limit"]]
        ok = [r for r in mine if r["status"] == "ok" and r.get(key) is not None]
        if ok:
            out.append((float(budget.rstrip("%")), ok[0][key], ok[0].get(f"{key}_stddev") or 0.0))
    return out


def plot_all(results: dict, out_dir, stem: str = "sweep") -> List[Path]:
    """Writes <stem>-tpot.png and <stem>-hit-rate.png into out_dir (and the routes-replay pair
    when the sweep has one); returns the paths."""
    plt = _matplotlib()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    policies = results["args"]["policies"].split(",")
    written = []
    for kind, floors_key, suffix in (("cold", "floors", ""), ("cold_routes", "floors_routes", "-routes")):
        if kind not in results:
            continue
        floors = results[floors_key]["budgets"]
        title = f"{Path(results['model']).name}, cold, memory limit = non-expert + budget + 300 MiB"
        if kind == "cold_routes":
            title += f"\nroutes replayed from {Path(results['args']['routes']).name}"

        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
        for policy in policies:
            pts = _series(results, kind, policy, "tpot_ms")
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=f"edgemoe, {policy}")
        pts = _series(results, kind, None, "tpot_ms")
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="s", color="black", capsize=3, label="stock llama.cpp, same limit")
        fx = [float(b.rstrip("%")) for b in BUDGETS if b in floors]
        ax.plot(fx, [floors[b]["sim"]["belady"]["floor_no_overlap_ms"] for b in BUDGETS if b in floors],
                linestyle="--", color="gray", label="floor: Belady misses, no overlap")
        ax.set_xlabel("expert-cache budget (% of expert bytes)")
        ax.set_ylabel(f"TPOT, ms (tg{results['args']['n_gen']})")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_plain_ticks())
        ax.yaxis.set_minor_formatter(_plain_ticks())
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xticks(fx)
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{stem}{suffix}-tpot.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
        for policy in policies:
            pts = _series(results, kind, policy, "hit_rate")
            if pts:
                x, y, _ = zip(*pts)
                ax.plot(x, [100 * v for v in y], marker="o", label=f"edgemoe, {policy}")
        ax.plot(fx, [100 * floors[b]["sim"]["belady"]["hit_rate"] for b in BUDGETS if b in floors],
                linestyle="--", color="gray", marker="x", label="Belady (replayed routes)")
        ax.set_xlabel("expert-cache budget (% of expert bytes)")
        ax.set_ylabel("hit rate, %")
        ax.set_ylim(0, 100)
        ax.set_xticks(fx)
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{stem}{suffix}-hit-rate.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path)
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks"))
    a = ap.parse_args()
    for path in plot_all(json.loads(a.results.read_text()), a.out_dir, stem=a.results.stem):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
