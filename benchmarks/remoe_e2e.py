"""ReMoE end to end (issue 11): the default model tuned for expert reuse (`edgemoe tune-router`)
against the untuned one, both inflated to the same real size (`edgemoe inflate`), cold, under the
same memory limits at 10/25/50 %, generating from the same held-out prompts greedily, under stock
llama.cpp (ReMoE's own setting) and under edgemoe (its default prefetch and policy).

The two models may write different text from the same prompt; every configuration generates the
same number of tokens, so TPOT compares per token over equal token counts. One bench run per
model, the two runs back to back; ratios are of means over the same prompts.

    python benchmarks/remoe_e2e.py --out benchmarks/out/remoe-e2e.json
    python benchmarks/remoe_e2e.py --report benchmarks/out/remoe-e2e.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_routing import ensure_model, write_prompts  # noqa: E402
from sweep import bench, machine, rows_of, save  # noqa: E402

from edgemoe.cpus import default_threads  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODELS = {"untuned": REPO / "models" / "edgemoe-tiny-q8_0.gguf", "tuned": REPO / "models" / "edgemoe-tiny-remoe-q8_0.gguf"}
BUDGETS = ("10%", "25%", "50%")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="3.5GB")
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--read-ahead", type=int, default=128)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/remoe-e2e.json"))
    ap.add_argument("--report", type=Path, metavar="JSON")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    inflated = {name: ensure_model(args.out.parent / f"{name}-inflated-{args.size.lower()}.gguf", args.size, src)
                for name, src in MODELS.items()}
    prompts = write_prompts(args.out.parent / "heldout-prompts.jsonl", args.repetitions + 1)
    results = dict(models={k: str(v) for k, v in inflated.items()},
                   model_bytes={k: os.path.getsize(v) for k, v in inflated.items()},
                   machine=machine(),
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   args={k: str(v) for k, v in vars(args).items()}, commands={}, cold={})
    done = json.loads(args.out.read_text()) if args.resume and args.out.exists() else {}
    for name, model in inflated.items():
        if name in done.get("cold", {}):
            results["cold"][name] = done["cold"][name]
            results["commands"][name] = done["commands"][name]
            continue
        cmd = ["-m", str(model), "-t", args.threads, "--read-ahead", args.read_ahead, "--prompts", prompts,
               "-n", args.n_gen, "-r", args.repetitions, "--cold", "--mem-limit", "auto",
               "--expert-cache", ",".join(BUDGETS), "--baseline"]
        results["commands"][name], results["cold"][name] = bench(cmd, log)
        save(results, args.out)
    save(results, args.out)
    print(report(results))
    return 0


def _ok(rows):
    return rows[0] if rows and rows[0]["status"] == "ok" else None


def report(results: dict) -> str:
    n_gen = int(results["args"]["n_gen"])
    test = f"prompt+tg{n_gen}"
    cold = results["cold"]
    out = [f"Models: the default model and its `tune-router` output, each inflated to "
           f"{results['model_bytes']['untuned'] / 1e9:.2f} GB; {results['machine']}; {results['date']}. "
           f"Cold, TPOT of `{test}` in ms (mean ± sample stddev over {results['args']['repetitions']} cold starts, "
           f"each a fresh process prefilling the next held-out paragraph; every run generates {n_gen} tokens):", "",
           "| budget | limit MiB | untuned stock | tuned stock | untuned edgemoe | tuned edgemoe | tuned / untuned, edgemoe | "
           "tuned edgemoe / untuned stock | hit rate untuned / tuned | MB read/token untuned / tuned |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for budget in BUDGETS:
        mine = {k: _ok(rows_of(cold[k], test, expert_cache=budget)) for k in cold}
        if not all(mine.values()):
            continue
        stock = {k: _ok([r for r in rows_of(cold[k], test, expert_cache="off") if r["mem_limit"] == mine[k]["mem_limit"]])
                 for k in cold}

        def cell(r):
            return f"{r['tpot_ms']:.1f} ± {r['tpot_ms_stddev']:.1f}" if r else "-"

        u, t = mine["untuned"], mine["tuned"]
        out.append(" | ".join([
            f"| {budget}", f"{u['mem_limit'] / 2**20:.0f}", cell(stock["untuned"]), cell(stock["tuned"]), cell(u), cell(t),
            f"**{u['tpot_ms'] / t['tpot_ms']:.2f}x** faster",
            f"**{stock['untuned']['tpot_ms'] / t['tpot_ms']:.2f}x** faster" if stock["untuned"] else "-",
            f"{100 * u['hit_rate']:.1f} / {100 * t['hit_rate']:.1f} %",
            f"{u['bytes_read_per_token'] / 1e6:.0f} / {t['bytes_read_per_token'] / 1e6:.0f}"]) + " |")
    out += ["", "Commands: " + "; ".join(f"{k}: `{v}`" for k, v in results["commands"].items())]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
