"""`edgemoe run`: stream a completion, optionally with the expert cache, and report stats."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from typing import Optional

import click

from edgemoe.budget import parse_budget
from edgemoe.errors import CliError, EdgemoeError
from edgemoe.files import discard, publish, temp_beside

# What --stats prints, in this order; --stats-json writes every scalar of EngineStats and the
# per-layer list. The *_per_token lines split a decode step (docs/cache.md, "Where the time goes").
STATS_FIELDS = ("ttft_ms", "tpot_ms", "tokens_per_s", "hit_rate", "hits", "misses",
                "bytes_read", "stall_ms", "peak_rss_bytes", "compute_ms_per_token", "stall_ms_per_token",
                "cache_ms_per_token", "predict_ms_per_token", "bytes_read_per_token", "cpu_s_per_token")
PREFETCH_FIELDS = ("prefetch_hits_per_token", "prefetch_wasted_per_token", "pred_precision", "pred_recall")
# a model with a readme router: its time, and what loading its routes ahead did
ROUTER_FIELDS = ("router_ms_per_token", "prefetch_hits_per_token", "prefetch_wasted_per_token")


class _JsonOut:
    """Writes a JSON file atomically: a temp file beside the target, renamed when complete.

    The temp file is created up front, so an unwritable path fails before any work.
    """

    def __init__(self, path: str):
        self.path = path
        if os.path.isdir(path):
            raise CliError(f"cannot write --stats-json {path}: is a directory")
        try:
            fd, self._tmp = temp_beside(path)
        except OSError as e:
            raise CliError(f"cannot write --stats-json {path}: {e.strerror or e}") from None
        self._file = os.fdopen(fd, "w", encoding="utf-8")

    def commit(self, obj: dict) -> None:
        json.dump(obj, self._file, indent=2)
        self._file.write("\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        publish(self._tmp, self.path)
        self._tmp = None

    def discard(self) -> None:
        if self._tmp is not None:
            self._file.close()
            discard(self._tmp)
            self._tmp = None


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:.2f}"
    return str(value)


@click.command("run")
@click.option("-m", "--model", "model_path", metavar="FILE", help="GGUF model (default: the built-in model).")
@click.option("-p", "--prompt", default="Once upon a time", show_default=True)
@click.option("-n", "--n-predict", type=int, default=128, show_default=True, help="Tokens to generate.")
@click.option("-t", "--threads", type=int, default=None, help="Compute threads (default: all CPUs).")
@click.option("-c", "--ctx-size", type=int, default=4096, show_default=True)
@click.option("-b", "--batch-size", type=int, default=512, show_default=True)
@click.option("-ub", "--ubatch-size", type=int, default=512, show_default=True)
@click.option("-ngl", "--n-gpu-layers", type=int, default=0, show_default=True)
@click.option("--temp", type=float, default=0.8, show_default=True, help="Temperature; 0 is greedy.")
@click.option("--seed", type=int, default=None, help="Sampling seed (default: random).")
@click.option("--expert-cache", "expert_cache", metavar="SIZE|auto|off", default="auto", show_default=True,
              help="Expert-cache budget: bytes (800MiB, 1.5GiB), a share of expert bytes (25%), auto (from "
                   "the memory this process may use; off where every expert fits; prints how) or off "
                   "(stock llama.cpp).")
@click.option("--policy", type=click.Choice(["auto", "default", "lru", "lfu", "belady"]), default="auto",
              show_default=True,
              help="Eviction policy; auto: belady for a model with a readme router (its routes are "
                   "known ahead), else default.")
@click.option("--io", type=click.Choice(["direct", "buffered", "mmap"]), default="direct", show_default=True,
              help="How the cache reads experts.")
@click.option("--prefetch", type=click.Choice(["auto", "off", "lookahead", "routes"]), default="auto",
              show_default=True,
              help="routes: a readme router's routes load ahead in order of first use; lookahead: each MoE "
                   "layer applies the next layers' routers to its input and loads the experts they pick "
                   "while it computes; auto: routes for a readme model, else lookahead where the model "
                   "allows it; off: on demand (a readme model still obeys its router).")
@click.option("--lookahead", type=click.IntRange(0, 8), default=1, show_default=True,
              help="Layers ahead whose predicted experts --prefetch lookahead loads (0: the predictions "
                   "only steer eviction).")
@click.option("--prefetch-top", type=click.IntRange(0), default=0, show_default=True,
              help="Predicted experts per token to load, most likely first (0: half of the model's top-k).")
@click.option("--stats", "show_stats", is_flag=True, help="Print timing and cache stats to stderr at the end.")
@click.option("--stats-json", metavar="FILE", default=None, help="Write the stats as one JSON object.")
@click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log.")
def run(model_path: Optional[str], prompt: str, n_predict: int, threads: Optional[int], ctx_size: int,
        batch_size: int, ubatch_size: int, n_gpu_layers: int, temp: float, seed: Optional[int],
        expert_cache: str, policy: str, io: str, prefetch: str, lookahead: int, prefetch_top: int,
        show_stats: bool, stats_json: Optional[str], verbose: bool) -> None:
    """Generate text from PROMPT, streaming it to stdout."""
    try:
        budget = parse_budget(expert_cache)
    except EdgemoeError as e:
        raise CliError(str(e)) from None
    json_out = _JsonOut(stats_json) if stats_json else None
    engine = None
    try:
        from edgemoe.default_model import default_model_path
        from edgemoe.engine import Engine

        if model_path is None:
            model_path = str(default_model_path())
        engine = Engine(model_path, expert_cache=budget, policy=policy, io=io, n_threads=threads,
                        n_ctx=ctx_size, n_batch=batch_size, n_ubatch=ubatch_size,
                        n_gpu_layers=n_gpu_layers, seed=seed, verbose=verbose, prefetch=prefetch,
                        lookahead=lookahead, prefetch_top=prefetch_top)
        out = sys.stdout
        for piece in engine.generate(prompt, max_tokens=n_predict, temperature=temp, seed=seed):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        full = engine.stats()
        stats = full.summary()
        if show_stats:
            if engine.router is not None:
                names = STATS_FIELDS + ROUTER_FIELDS
            else:
                names = STATS_FIELDS + (PREFETCH_FIELDS if prefetch != "off" and engine.cache is not None else ())
            for name in dict.fromkeys(names):
                if name in stats:
                    click.echo(f"{name}: {_format(stats[name])}", err=True)
        if json_out is not None:
            json_out.commit(dict(stats, layers=[asdict(layer) for layer in full.layers]))
    except EdgemoeError as e:
        raise CliError(str(e)) from None
    except KeyboardInterrupt:
        raise click.exceptions.Abort() from None
    finally:
        if json_out is not None:
            json_out.discard()
        if engine is not None:
            engine.close()
