"""Experts on the GPU (issue 13): edgemoe's CUDA slot pool against llama.cpp's own placements.

A trained model (real routing; --source, the shipped 24-layer models/edgemoe-deep-q8_0.gguf
unless given) inflated to --size (8.5 GB: the deep model's 24 MoE layers of 64 Q8_0 experts make
5.6 MB each; the default model's 8, with --source models/edgemoe-tiny-q8_0.gguf, 16.9 MB), every
layer offloaded (-ngl 99), greedy decoding of -n tokens after each
of --prompts held-out paragraphs. Each configuration runs in its own process:

  gpu-all       cache off, every expert in VRAM (stock -ngl 99)
  cpu-experts   cache off, every expert on the CPU (stock --n-cpu-moe = all MoE layers)
  n-cpu-moe     cache off, the first layers' experts on the CPU so that --budget of the expert
                bytes stay in VRAM (stock --n-cpu-moe N at equal VRAM)
  edgemoe ...   a --budget cache: VRAM pool ("vram"), pinned host memory the GPU reads in place
                ("mapped", the Jetson's zero-copy pool; over PCIe here), or the host pool (expert
                matmuls on the CPU, the pre-issue-13 behaviour); warm reads from the page cache
                (--io buffered, the file read once before), cold ones with O_DIRECT. Rows
                that vary the warm VRAM row: each expert read whole by one I/O thread (the loads
                before pieces), 1 MiB pieces, twice the I/O threads, and copies from a mapping
                (--io mmap) instead of pread. "hybrid" rows compute the experts not ready in
                VRAM on the CPU from the mapped file while their loads go on behind
                (Engine(hybrid=True)); its "CPU share" is the share of expert uses the CPU computed.
                The pinned rows also vary the lookahead predictor's reach (two layers ahead;
                all 8 predicted experts instead of 4). "vram auto" is --expert-cache auto: the
                pool sized from the GPU's free memory, the cache off where every expert fits.
                "at n-cpu-moe's VRAM" grows the pinned pool by the VRAM stock's row used beyond
                the pinned row's (stock holds a larger compute buffer).

Decode tokens/s is the mean over the prompts of 1000 / TPOT (llama.cpp's t/s). VRAM is the
device's free memory before the load less after it (weights, pool, KV and compute buffers). Each
row counts the prompts whose text equals gpu-all's, and n-cpu-moe's (the stock column at equal
VRAM).

    python benchmarks/gpu_pool.py --out benchmarks/out/gpu-deep.jsonl      (on a CUDA build)
    python benchmarks/gpu_pool.py --report benchmarks/out/gpu-deep.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_routing import ensure_model, write_prompts  # noqa: E402

from edgemoe.bench.disk import drop_file_pages, warm_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# issue 13 asks for 24+ MoE layers: the shipped deep model (models/cards/edgemoe-deep-q8_0.md)
DEEP = REPO / "models" / "edgemoe-deep-q8_0.gguf"


WHOLE = {"EDGEMOE_READ_PIECE_KIB": str(1 << 20)}  # pieces of 1 GiB: every expert one read, on one thread
SMALL = {"EDGEMOE_READ_PIECE_KIB": "1024"}  # pieces of 1 MiB instead of 2


EQUAL_VRAM = "edgemoe vram at n-cpu-moe's VRAM, pinned"
EQUAL_VRAM_PENDING = "set by the run"  # no budget parses as this: the row cannot run unset


def pinned_label(budget: float) -> str:
    return f"edgemoe vram {round(budget * 100)}% warm, pinned"


def equal_vram_budget(rows: list, budget: float) -> int | None:
    """The pool's bytes that make edgemoe's VRAM stock n-cpu-moe's: the pinned row's pool plus
    what the n-cpu-moe row used beyond that row's VRAM (None unless both ran)."""
    ncpu = next((r for r in rows if r["label"].startswith("n-cpu-moe") and "vram_bytes" in r), None)
    pinned = next((r for r in rows if r["label"] == pinned_label(budget) and "pool_bytes" in r), None)
    if ncpu is None or pinned is None:
        return None
    return pinned["pool_bytes"] + max(0, ncpu["vram_bytes"] - pinned["vram_bytes"])


def inflated_from(model: Path) -> str | None:
    """The source name `edgemoe inflate` recorded in a model it wrote."""
    from edgemoe.info import describe

    keys = describe(str(model)).inflate or {}
    return keys.get("source_name")


def configs(n_moe_layer: int, budget: float, io_threads: int, n_cpus: int) -> list:
    """(label, Engine keyword arguments, cold, environment) for every configuration, in table
    order."""
    pct = f"{round(budget * 100)}%"
    keep = round(budget * n_moe_layer)  # layers whose experts stay in VRAM at equal VRAM
    cache = dict(expert_cache=pct, prefetch="auto", n_io_threads=io_threads)
    vram = dict(cache, expert_pool="vram", io="buffered")
    # hybrid: the I/O threads' copies take cores from the compute threads, whose barriers then
    # wait for a descheduled thread; these rows leave half the cores to I/O
    half = max(1, n_cpus // 2)
    return [
        ("gpu-all", dict(), False, {}),
        (f"n-cpu-moe {n_moe_layer - keep}", dict(n_cpu_moe=n_moe_layer - keep), False, {}),
        ("cpu-experts", dict(n_cpu_moe=n_moe_layer), False, {}),
        (f"edgemoe vram {pct} warm", vram, False, {}),
        (f"edgemoe vram {pct} warm, prefetch off", dict(vram, prefetch="off"), False, {}),
        (f"edgemoe vram {pct} warm, whole-expert reads", vram, False, WHOLE),
        (f"edgemoe vram {pct} warm, 1 MiB pieces", vram, False, SMALL),
        (f"edgemoe vram {pct} warm, {2 * io_threads} I/O threads", dict(vram, n_io_threads=2 * io_threads), False, {}),
        (f"edgemoe vram {pct} warm, mmap", dict(vram, io="mmap"), False, {}),
        (f"edgemoe vram {pct} warm, hybrid", dict(vram, hybrid=True), False, {}),
        # pinned: the GPU DMAs misses out of the pinned file, so the I/O threads copy nothing
        (pinned_label(budget), dict(vram, io="pinned"), False, {}),
        (f"edgemoe vram {pct} warm, pinned, prefetch off", dict(vram, io="pinned", prefetch="off"), False, {}),
        # stock n-cpu-moe's VRAM also holds a larger compute buffer: the pool grown by the difference
        # (the run sets the bytes from the two rows' measured VRAM; EQUAL_VRAM marks it)
        (EQUAL_VRAM, dict(vram, io="pinned", expert_cache=EQUAL_VRAM_PENDING), False, {}),
        (f"edgemoe vram {pct} warm, pinned, {2 * io_threads} I/O threads",
         dict(vram, io="pinned", n_io_threads=2 * io_threads), False, {}),
        (f"edgemoe vram {pct} warm, pinned, whole-expert reads", dict(vram, io="pinned"), False, WHOLE),
        # the lookahead predictor's reach: two layers ahead (more time for a copy), all 8 predicted
        (f"edgemoe vram {pct} warm, pinned, 2 layers ahead", dict(vram, io="pinned", lookahead=2), False, {}),
        (f"edgemoe vram {pct} warm, pinned, top-8 predicted", dict(vram, io="pinned", prefetch_top=8), False, {}),
        (f"edgemoe vram {pct} warm, pinned, hybrid", dict(vram, io="pinned", hybrid=True), False, {}),
        (f"edgemoe vram {pct} warm, pinned, hybrid, prefetch off",
         dict(vram, io="pinned", hybrid=True, prefetch="off"), False, {}),
        (f"edgemoe vram {pct} warm, hybrid, prefetch off", dict(vram, hybrid=True, prefetch="off"), False, {}),
        (f"edgemoe vram {pct} warm, hybrid, {half} compute threads", dict(vram, hybrid=True, n_threads=half), False, {}),
        (f"edgemoe vram {pct} cold", dict(cache, expert_pool="vram", io="direct"), True, {}),
        (f"edgemoe vram {pct} cold, hybrid", dict(cache, expert_pool="vram", io="direct", hybrid=True), True, {}),
        (f"edgemoe vram {pct} cold, hybrid, {half} compute threads",
         dict(cache, expert_pool="vram", io="direct", hybrid=True, n_threads=half), True, {}),
        (f"edgemoe mapped {pct} warm", dict(cache, expert_pool="mapped", io="buffered"), False, {}),
        # --expert-cache auto sizes a VRAM pool from the GPU's free memory: off where every expert fits
        ("edgemoe vram auto, pinned", dict(vram, expert_cache="auto", io="pinned"), False, {}),
        (f"edgemoe host {pct} warm", dict(cache, expert_pool="host", io="buffered"), False, {}),
    ]


def child(spec: dict) -> dict:
    """One configuration in this process: load, decode every prompt greedily, report."""
    from edgemoe.cache import inspect_gpu
    from edgemoe.engine import Engine

    free0 = inspect_gpu().memory_free
    t0 = time.perf_counter()
    with Engine(spec["model"], n_gpu_layers=99, n_ctx=2048, **spec["kw"]) as e:
        load_s = time.perf_counter() - t0
        vram = free0 - inspect_gpu().memory_free
        "".join(e.generate(spec["prompts"][0], max_tokens=8, temperature=0))  # warm-up, untimed
        texts, tps, tpot, stats = [], [], [], None
        e.reset_stats()
        for p in spec["prompts"]:
            texts.append("".join(e.generate(p, max_tokens=spec["n_gen"], temperature=0)))
            s = e.stats()
            tpot.append(s.tpot_ms)
            tps.append(1000.0 / s.tpot_ms)
        stats = e.stats()
        decode = dataclasses.asdict(stats.per_token) if stats.per_token else None  # where a step's time went
        cs = e.cache.stats() if e.cache else None
        cpu_share = cs.cpu_uses / max(1, cs.hits + cs.misses) if cs else None
        return dict(tokens_per_s=sum(tps) / len(tps), tpot_ms=sum(tpot) / len(tpot), vram_bytes=vram,
                    cpu_share=cpu_share,
                    load_s=load_s, texts=texts, hit_rate=stats.hit_rate, expert_pool=stats.expert_pool,
                    bytes_read_per_token=(stats.bytes_read / max(1, len(texts) * spec["n_gen"])), decode=decode,
                    auto=e.auto_budget.describe() if e.auto_budget else None,
                    pool_bytes=stats.expert_cache_bytes)


def run(args) -> list:
    from edgemoe.cache import inspect_gpu, inspect_model

    model = ensure_model(Path(args.model), args.size, Path(args.source))
    source = inflated_from(model)
    if source != Path(args.source).name:
        sys.exit(f"gpu_pool: error: {model} was inflated from {source}, not from --source "
                 f"{Path(args.source).name}; remove it or give another --model")
    info = inspect_model(model)
    gpu = inspect_gpu()
    prompts_file = write_prompts(Path(args.model).with_suffix(".prompts.jsonl"), args.prompts)
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    rows = []
    out = open(args.out, "w") if args.out else None
    head = dict(model=str(model), source=source, file_bytes=model.stat().st_size,
                expert_bytes=info.expert_bytes,
                n_moe_layer=info.n_moe_layer, n_expert=info.n_expert, n_expert_used=info.n_expert_used,
                gpu=gpu.description, n_gen=args.n_gen, prompts=len(prompts), io_threads=args.io_threads)
    print(json.dumps(head), file=sys.stderr, flush=True)
    if out:
        out.write(json.dumps(dict(head=head)) + "\n")
    for label, kw, cold, env in configs(info.n_moe_layer, args.budget, args.io_threads, os.cpu_count() or 2):
        # the report compares with gpu-all and n-cpu-moe: they always run
        if args.rows and label != "gpu-all" and not label.startswith("n-cpu-moe") and label not in args.rows:
            continue
        if label == EQUAL_VRAM:
            pool = equal_vram_budget(rows, args.budget)
            if pool is None:
                why = f"needs the n-cpu-moe and '{pinned_label(args.budget)}' rows"
                row = dict(label=label, kw=kw, env=env, error=[why])
                rows.append(row)
                if out:
                    out.write(json.dumps(row) + "\n")
                continue
            kw = dict(kw, expert_cache=pool)
        if cold:
            drop_file_pages(model)
        else:
            warm_file(model)
        spec = dict(model=str(model), kw=kw, prompts=prompts, n_gen=args.n_gen)
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, env={**os.environ, **env})
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            why = [x for x in lines if "GGML_ASSERT" in x or "rror" in x or "CUDA" in x][:3] or lines[-1:]
            row = dict(label=label, kw=kw, env=env, error=why)
        else:
            row = dict(label=label, kw=kw, env=env, **json.loads(proc.stdout.strip().splitlines()[-1]))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "texts"}), file=sys.stderr, flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()
    return rows


def report(lines: list) -> str:
    head = lines[0]["head"]
    rows = lines[1:]
    ref = next(r for r in rows if r["label"] == "gpu-all")
    ncpu = next(r for r in rows if r["label"].startswith("n-cpu-moe"))
    source = f" (inflated from {head['source']})" if head.get("source") else ""
    out = [f"{head['gpu']}; {Path(head['model']).name}{source}: {head['file_bytes'] / 1e9:.2f} GB, "
           f"{head['n_moe_layer']} MoE layers x {head['n_expert']} experts, top-{head['n_expert_used']}; "
           f"{head['prompts']} prompts x {head['n_gen']} greedy tokens; {head['io_threads']} I/O threads", "",
           "| configuration | decode t/s | vs n-cpu-moe | VRAM GB | hit rate | CPU share | read MB/token "
           "| stall ms/token | same text as gpu-all | as n-cpu-moe |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['label']} | error: {' '.join(r['error'])} | | | | | | | | |")
            continue
        same = sum(a == b for a, b in zip(r["texts"], ref["texts"]))
        same_ncpu = sum(a == b for a, b in zip(r["texts"], ncpu["texts"]))
        hit = f"{r['hit_rate']:.2f}" if r.get("hit_rate") is not None else "-"
        read = f"{r['bytes_read_per_token'] / 1e6:.0f}" if r.get("expert_pool") else "-"
        cpu = f"{r['cpu_share']:.2f}" if r.get("cpu_share") else "-"
        # the decode step's wait for its misses (the cache's rows): what the copies cost
        decode = r.get("decode") or {}
        stall = f"{decode['stall_ms']:.2f}" if r.get("expert_pool") and "stall_ms" in decode else "-"
        out.append(f"| {r['label']} | {r['tokens_per_s']:.2f} | {r['tokens_per_s'] / ncpu['tokens_per_s']:.2f}x | "
                   f"{r['vram_bytes'] / 1e9:.2f} | {hit} | {cpu} | {read} | {stall} | {same}/{len(r['texts'])} | "
                   f"{same_ncpu}/{len(r['texts'])} |")
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "benchmarks" / "out" / "deep-inflated-8.5g.gguf"))
    ap.add_argument("--size", default="8.5GB")
    ap.add_argument("--source", default=str(DEEP),
                    help="the trained model --model is inflated from when absent (default: the deep model)")
    ap.add_argument("--budget", type=float, default=0.25, help="share of expert bytes in VRAM")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("--io-threads", type=int, default=8)
    ap.add_argument("--rows", type=lambda s: s.split(";"), metavar="LABEL;LABEL",
                    help="run only these configurations (besides gpu-all and n-cpu-moe), by label")
    ap.add_argument("--out", help="JSON lines: a head line, then a row per configuration")
    ap.add_argument("--report", metavar="JSONL", help="print the markdown table of an earlier --out")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.report:
        print(report([json.loads(x) for x in Path(args.report).read_text().splitlines()]))
        return
    rows = run(args)
    if args.out:
        print(report([json.loads(x) for x in Path(args.out).read_text().splitlines()]))
    else:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
