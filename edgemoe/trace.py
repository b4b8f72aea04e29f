"""`edgemoe trace` records which experts a model routes each token of a text to;
`edgemoe trace-stats` summarizes such a trace (EOR, LRU hit rates, usage entropy).

The trace file (`trace.npz`, format_version 1; `edgemoe bench --routes` replays it):
  experts  int32 [n_tokens, n_moe_layers, k]  expert ids per token and MoE layer, top-k order
  layers   int32 [n_moe_layers]               llama.cpp layer index of each MoE layer
  tokens   int32 [n_tokens]
  n_expert int32 scalar                       routed experts per layer
  model    str                                the model file's basename
  format_version int32 scalar = 1

The text is evaluated in consecutive windows of --ctx tokens, each from an empty context
(as a perplexity evaluation does), with the patched runtime's eval callback recording
`ffn_moe_topk-<il>`; every token's logits are requested, so llama.cpp computes the last
layer's experts for every token, not only the last one of a window.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence, Union

import click
import numpy as np

from edgemoe.errors import EdgemoeError, EdgemoeIOError, InvalidArgumentError, ModelFormatError
from edgemoe.files import discard, probe_beside, publish, temp_beside
from edgemoe.errors import CliError

FORMAT_VERSION = 1
LRU_CAPACITIES = (0.10, 0.25, 0.50)


class TraceFormatError(ModelFormatError):
    """A trace file is missing arrays or has inconsistent shapes."""


@dataclass(frozen=True)
class Trace:
    experts: np.ndarray  # int32 [n_tokens, n_moe_layers, k]
    layers: np.ndarray  # int32 [n_moe_layers]
    tokens: np.ndarray  # int32 [n_tokens]
    n_expert: int
    model: str

    @property
    def n_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def k(self) -> int:
        return int(self.experts.shape[2])

    def validate(self) -> None:
        e = self.experts
        if e.ndim != 3 or e.shape[1] == 0 or e.shape[2] == 0:
            raise TraceFormatError(f"experts must be [n_tokens, n_moe_layers, k], got shape {e.shape}")
        if self.layers.shape != (e.shape[1],):
            raise TraceFormatError(f"layers has shape {self.layers.shape}, expected ({e.shape[1]},)")
        if self.tokens.shape != (e.shape[0],):
            raise TraceFormatError(f"tokens has shape {self.tokens.shape}, expected ({e.shape[0]},)")
        if self.n_expert <= 0:
            raise TraceFormatError(f"n_expert must be positive, got {self.n_expert}")
        if e.size and (e.min() < 0 or e.max() >= self.n_expert):
            raise TraceFormatError(f"expert ids outside 0..{self.n_expert - 1}")


def save_trace(trace: Trace, path: str) -> None:
    """Writes the trace atomically: a temp file beside `path`, renamed when complete."""
    trace.validate()
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, experts=trace.experts.astype(np.int32), layers=trace.layers.astype(np.int32),
                     tokens=trace.tokens.astype(np.int32), n_expert=np.int32(trace.n_expert),
                     model=np.str_(trace.model), format_version=np.int32(FORMAT_VERSION))
        publish(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def load_trace(path: str) -> Trace:
    """Reads and checks a trace file; raises EdgemoeIOError or TraceFormatError."""
    if not os.path.isfile(path):
        raise EdgemoeIOError(f"trace file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"experts", "layers", "tokens", "n_expert", "model", "format_version"} - set(z.files)
            if missing:
                raise TraceFormatError(f"{path}: not an edgemoe trace (missing {', '.join(sorted(missing))})")
            version = int(z["format_version"])
            if version != FORMAT_VERSION:
                raise TraceFormatError(f"{path}: trace format_version {version}, this edgemoe reads {FORMAT_VERSION}")
            trace = Trace(experts=z["experts"].astype(np.int32), layers=z["layers"].astype(np.int32),
                          tokens=z["tokens"].astype(np.int32), n_expert=int(z["n_expert"]), model=str(z["model"]))
    except TraceFormatError:
        raise
    except (ValueError, OSError, EOFError, KeyError) as e:  # not a zip, truncated, object arrays
        raise TraceFormatError(f"{path}: not a readable trace file ({e})") from None
    try:
        trace.validate()
    except TraceFormatError as e:
        raise TraceFormatError(f"{path}: {e}") from None
    return trace


# -- recording -------------------------------------------------------------------------


def routes_from_rows(rows: np.ndarray, n_tokens: int) -> tuple:
    """Recorder rows [layer, running token index, k ids] -> (experts [n_tokens, layers, k], layers).

    Each MoE layer must have exactly one row per token, with running indices 0..n_tokens-1.
    """
    if rows.ndim != 2 or rows.shape[1] < 3:
        raise EdgemoeError("the route recorder returned no expert ids")
    layers = np.unique(rows[:, 0]).astype(np.int32)
    k = rows.shape[1] - 2
    experts = np.empty((n_tokens, len(layers), k), dtype=np.int32)
    for j, il in enumerate(layers):
        mine = rows[rows[:, 0] == il]
        if len(mine) != n_tokens or not np.array_equal(mine[:, 1], np.arange(n_tokens)):
            raise EdgemoeError(f"layer {il}: {len(mine)} routed tokens recorded, expected {n_tokens}")
        experts[:, j] = mine[:, 2:]
    return experts, layers


def record_trace(model_path: str, tokens: Union[str, Sequence[int]], ctx: int = 512,
                 n_threads: Optional[int] = None, max_tokens: Optional[int] = None,
                 progress: Optional[Callable[[int, int], None]] = None) -> Trace:
    """Evaluates `tokens` in windows of `ctx` and returns every token's routes.

    Args:
        tokens: token ids, or text, tokenized by the model's own tokenizer without BOS (plain
            running text) with the same loaded model that records the routes.
        max_tokens: route only the first N tokens.
        progress: called with (tokens done, tokens in all) after each window.
    """
    from edgemoe.cache import inspect_model
    from edgemoe.engine import Engine
    from edgemoe.routes import RouteRecorder

    if ctx < 1:
        raise InvalidArgumentError("--ctx must be positive")
    recorder = RouteRecorder()
    try:
        # the engine first: its checks of the file give the clearest errors
        with Engine(model_path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=n_threads,
                    route_recorder=recorder) as engine:
            info = inspect_model(model_path)
            if info.n_moe_layer == 0:
                raise InvalidArgumentError(f"{os.path.basename(model_path)} has no routed experts (dense model)")
            if isinstance(tokens, str):
                tokens = engine.tokenize(tokens, add_special=False)
            tokens = list(tokens)[:max_tokens]
            if not tokens:
                raise InvalidArgumentError("the text has no tokens")
            for start in range(0, len(tokens), ctx):
                engine.reset()
                engine.eval(tokens[start:start + ctx])  # all logits: the last layer routes every token
                if progress is not None:
                    progress(min(start + ctx, len(tokens)), len(tokens))
        experts, layers = routes_from_rows(recorder.rows(), len(tokens))
    finally:
        recorder.close()
    return Trace(experts=experts, layers=layers, tokens=np.asarray(tokens, dtype=np.int32),
                 n_expert=info.n_expert, model=os.path.basename(model_path))


# -- statistics ------------------------------------------------------------------------


def eor_per_layer(experts: np.ndarray) -> np.ndarray:
    """Expert overlap ratio |E_t ∩ E_t-1| / K averaged over t >= 1, per layer (ReMoE's EOR)."""
    n, n_layers, k = experts.shape
    if n < 2:
        return np.full(n_layers, np.nan)
    cur, prev = experts[1:], experts[:-1]
    # ids within a token are distinct (top-k), so counting matches counts the intersection
    overlap = (cur[:, :, :, None] == prev[:, :, None, :]).any(axis=3).sum(axis=2)
    return overlap.mean(axis=0) / k


def lru_hit_rate(ids: np.ndarray, capacity: int) -> float:
    """Hit rate of an LRU of `capacity` experts over one layer's [n_tokens, k] accesses,
    taken one at a time in top-k order, from an empty cache."""
    if capacity < 1:
        raise InvalidArgumentError("LRU capacity must be at least 1")
    cache: "OrderedDict[int, None]" = OrderedDict()
    hits = 0
    for e in ids.reshape(-1).tolist():
        if e in cache:
            hits += 1
            cache.move_to_end(e)
        else:
            if len(cache) >= capacity:
                cache.popitem(last=False)
            cache[e] = None
    return hits / ids.size if ids.size else float("nan")


def lru_capacity(fraction: float, n_expert: int) -> int:
    return max(1, int(round(fraction * n_expert)))


def usage_entropy_bits(ids: np.ndarray, n_expert: int) -> float:
    """Shannon entropy (bits) of how often each expert is chosen in one layer."""
    counts = np.bincount(ids.reshape(-1), minlength=n_expert).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


@dataclass(frozen=True)
class LayerRouting:
    layer: int
    eor: float
    lru_hit_rate: dict  # "10%" -> hit rate
    entropy_bits: float
    entropy_norm: float  # entropy / log2(n_expert): 1.0 is perfectly even use


@dataclass(frozen=True)
class RoutingStats:
    model: str
    n_tokens: int
    n_moe_layers: int
    n_expert: int
    k: int
    lru_capacity: dict  # "10%" -> experts per layer
    eor: float
    lru_hit_rate: dict
    entropy_bits: float
    entropy_norm: float
    layers: List[LayerRouting]

    def to_json(self) -> dict:
        return asdict(self)


def _pct(f: float) -> str:
    return f"{round(f * 100)}%"


def routing_stats(trace: Trace, capacities: Sequence[float] = LRU_CAPACITIES) -> RoutingStats:
    """Per-layer and mean EOR, LRU hit rates at each per-layer capacity, usage entropy."""
    eor = eor_per_layer(trace.experts)
    caps = {_pct(f): lru_capacity(f, trace.n_expert) for f in capacities}
    max_bits = math.log2(trace.n_expert) if trace.n_expert > 1 else 1.0
    layers = []
    for j, il in enumerate(trace.layers.tolist()):
        ids = trace.experts[:, j]
        h = usage_entropy_bits(ids, trace.n_expert)
        layers.append(LayerRouting(layer=int(il), eor=float(eor[j]),
                                   lru_hit_rate={name: lru_hit_rate(ids, c) for name, c in caps.items()},
                                   entropy_bits=h, entropy_norm=h / max_bits))
    return RoutingStats(
        model=trace.model, n_tokens=trace.n_tokens, n_moe_layers=len(layers), n_expert=trace.n_expert,
        k=trace.k, lru_capacity=caps, eor=float(np.mean(eor)),
        lru_hit_rate={name: float(np.mean([l.lru_hit_rate[name] for l in layers])) for name in caps},
        entropy_bits=float(np.mean([l.entropy_bits for l in layers])),
        entropy_norm=float(np.mean([l.entropy_norm for l in layers])), layers=layers)


def format_table(stats: RoutingStats) -> str:
    """A markdown table, one row per MoE layer and a mean row."""
    caps = list(stats.lru_capacity)
    head = ["layer", "EOR"] + [f"LRU {c} ({stats.lru_capacity[c]})" for c in caps] + ["entropy (bits)", "entropy / max"]
    lines = [f"{stats.model}: {stats.n_tokens} tokens, {stats.n_moe_layers} MoE layers, "
             f"{stats.n_expert} experts, top-{stats.k}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name, eor, hits, h, hn):
        return "| " + " | ".join([name, f"{eor:.3f}"] + [f"{hits[c]:.3f}" for c in caps] + [f"{h:.2f}", f"{hn:.3f}"]) + " |"

    for l in stats.layers:
        lines.append(row(str(l.layer), l.eor, l.lru_hit_rate, l.entropy_bits, l.entropy_norm))
    lines.append(row("mean", stats.eor, stats.lru_hit_rate, stats.entropy_bits, stats.entropy_norm))
    return "\n".join(lines)


# -- commands ----------------------------------------------------------------------------


@click.command("trace")
@click.option("-m", "--model", "model_path", required=True, metavar="FILE", help="GGUF MoE model.")
@click.option("--text", "text_path", required=True, metavar="FILE", help="UTF-8 text to route.")
@click.option("-o", "--output", "out_path", required=True, metavar="FILE", help="trace.npz to write.")
@click.option("-c", "--ctx-size", "ctx", type=int, default=512, show_default=True,
              help="Window: the text is evaluated in windows of this many tokens.")
@click.option("--max-tokens", type=int, default=None, help="Route only the text's first N tokens.")
@click.option("-t", "--threads", type=int, default=None, help="Compute threads (default: all CPUs).")
def trace(model_path: str, text_path: str, out_path: str, ctx: int, max_tokens: Optional[int],
          threads: Optional[int]) -> None:
    """Record the experts MODEL routes each token of a text to, as trace.npz."""
    if ctx < 1:
        raise CliError("--ctx-size must be positive")
    if max_tokens is not None and max_tokens < 1:
        raise CliError("--max-tokens must be positive")
    if os.path.isdir(out_path):
        raise CliError(f"cannot write {out_path}: is a directory")
    try:
        with open(text_path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise CliError(f"cannot read --text {text_path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise CliError(f"--text {text_path} is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        probe_beside(out_path)  # before the (long) run, and with no partial file left
    except OSError as e:
        raise CliError(f"cannot write {out_path}: {e.strerror or e}") from None
    try:
        def progress(done: int, total: int) -> None:
            click.echo(f"\rrouting {done}/{total} tokens", err=True, nl=done == total)

        # a progress line only for a person watching
        watching = click.get_text_stream("stderr").isatty()
        result = record_trace(model_path, text, ctx=ctx, n_threads=threads, max_tokens=max_tokens,
                              progress=progress if watching else None)
        save_trace(result, out_path)
    except EdgemoeError as e:
        raise CliError(str(e)) from None
    except KeyboardInterrupt:
        raise click.exceptions.Abort() from None
    click.echo(f"{out_path}: {result.n_tokens} tokens x {len(result.layers)} MoE layers, top-{result.k} "
               f"of {result.n_expert}", err=True)


@click.command("trace-stats")
@click.argument("trace_path", metavar="TRACE.npz")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def trace_stats(trace_path: str, as_json: bool) -> None:
    """Routing statistics of a trace: EOR, LRU hit rate at 10/25/50 % per-layer capacity,
    expert-usage entropy per layer."""
    try:
        stats = routing_stats(load_trace(trace_path))
    except EdgemoeError as e:
        raise CliError(str(e)) from None
    click.echo(json.dumps(stats.to_json(), indent=2) if as_json else format_table(stats))
