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
import re
import struct
import zipfile
import zlib
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


_ARRAYS = ("experts", "layers", "tokens", "n_expert", "model", "format_version")
_INT32 = (-(1 << 31), (1 << 31) - 1)
_CHUNK = 1 << 20
# the .npy header of an array edgemoe reads: a dict literal of a plain dtype string, the
# storage order and the shape. Parsed here rather than by numpy, whose ast.literal_eval of a
# hostile header raises MemoryError, RecursionError or tokenize.TokenError.
_NPY_MAGIC = b"\x93NUMPY"
_NPY_MAX_HEADER = 10000  # numpy's own limit on the header's length
_NPY_FIELD = re.compile(r"""\s*(['"])(descr|fortran_order|shape)\1\s*:\s*"""
                        r"""(?:(['"])([<>|=]?[A-Za-z][0-9]{0,9})\3|(True|False)|\(([0-9,\s]{0,400})\))\s*""")


def _read_upto(f, n: int) -> bytes:
    """Up to n bytes of a zip member, in chunks: memory follows the bytes the member really
    holds, never a size its zip headers claim."""
    chunks, left = [], n
    while left > 0:
        chunk = f.read(min(left, _CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _npy_header(head: bytes, name: str):
    """(shape, fortran_order, dtype, header length) of the .npy whose first bytes are `head`."""
    if head[:6] != _NPY_MAGIC or len(head) < 10:
        raise TraceFormatError(f"array {name} is not a .npy array")
    version = (head[6], head[7])
    if version == (1, 0):
        start, (n,) = 10, struct.unpack_from("<H", head, 8)
    elif version in ((2, 0), (3, 0)) and len(head) >= 12:
        start, (n,) = 12, struct.unpack_from("<I", head, 8)
    else:
        raise TraceFormatError(f"array {name} has an unsupported .npy version {version[0]}.{version[1]}")
    if n > _NPY_MAX_HEADER or start + n > len(head):
        raise TraceFormatError(f"array {name} has a truncated or oversized .npy header")
    text = head[start:start + n].decode("latin-1").strip()
    if not (text.startswith("{") and text.endswith("}")):
        raise TraceFormatError(f"array {name} has a malformed .npy header")
    fields, pos, body = {}, 1, text[:-1]
    while pos < len(body) and body[pos:].strip():
        m = _NPY_FIELD.match(body, pos)
        # each key with its kind of value: descr a string, fortran_order a bool, shape a tuple
        group = {"descr": 4, "fortran_order": 5, "shape": 6}[m.group(2)] if m else 0
        if not m or m.group(2) in fields or m.group(group) is None:
            raise TraceFormatError(f"array {name} has a malformed .npy header")
        fields[m.group(2)] = m.group(group)
        pos = m.end()
        if pos < len(body) and body[pos] == ",":
            pos += 1
        elif body[pos:].strip():
            raise TraceFormatError(f"array {name} has a malformed .npy header")
    if set(fields) != {"descr", "fortran_order", "shape"}:
        raise TraceFormatError(f"array {name} has a malformed .npy header")
    dims = [d.strip() for d in fields["shape"].split(",")]
    if dims and not dims[-1]:
        dims.pop()  # (3,): the comma of a one-element tuple
    if len(dims) > 32 or not all(d.isdigit() and len(d) <= 19 for d in dims):
        raise TraceFormatError(f"array {name} has a malformed shape ({fields['shape']})")
    try:
        dtype = np.dtype(fields["descr"])
    except (TypeError, ValueError, OverflowError):
        raise TraceFormatError(f"array {name} has an unknown dtype {fields['descr']!r}") from None
    return tuple(int(d) for d in dims), fields["fortran_order"] == "True", dtype, start + n


def _read_npy(z: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> np.ndarray:
    """One .npy member, checked before anything is allocated for it."""
    if info.flag_bits & 0x1:
        raise TraceFormatError(f"array {name} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise TraceFormatError(f"array {name} uses zip compression method {info.compress_type} "
                               "(expected stored or deflated)")
    with z.open(info) as f:
        head = _read_upto(f, 12 + _NPY_MAX_HEADER)
        shape, fortran, dtype, start = _npy_header(head, name)
        if dtype.hasobject or dtype.itemsize == 0 or dtype.kind not in "iuUS":
            raise TraceFormatError(f"array {name} holds {dtype}, expected integers or text")
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        data = head[start:start + nbytes]
        data += _read_upto(f, nbytes - len(data))
        if len(data) < nbytes:
            raise TraceFormatError(f"array {name} is truncated ({len(data)} of {nbytes} bytes)")
        if len(head) > start + nbytes or f.read(1):  # the read at the end also checks the member's CRC
            raise TraceFormatError(f"array {name} has data past its {nbytes} bytes")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")


def _int32_array(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype.kind not in "iu":
        raise TraceFormatError(f"{name} holds {arr.dtype}, expected integers")
    if arr.size and (int(arr.min()) < _INT32[0] or int(arr.max()) > _INT32[1]):
        raise TraceFormatError(f"{name} holds values outside the int32 range")
    return arr.astype(np.int32)


def _int32_scalar(arr: np.ndarray, name: str) -> int:
    if arr.size != 1:
        raise TraceFormatError(f"{name} must be one number, got shape {arr.shape}")
    return int(_int32_array(arr, name).reshape(-1)[0])


def _text_scalar(arr: np.ndarray, name: str) -> str:
    if arr.dtype.kind not in "US" or arr.size != 1:
        raise TraceFormatError(f"{name} must be one string, got {arr.dtype} of shape {arr.shape}")
    if arr.dtype.kind == "S":
        return arr.reshape(-1)[0].decode("utf-8", errors="replace")
    # UTF-32 code units from the file: numpy fails on values past U+10FFFF with a SystemError,
    # and a lone surrogate cannot be printed
    codes = np.frombuffer(arr.tobytes(), dtype=arr.dtype.str[0] + "u4")
    if ((codes > 0x10FFFF) | ((codes >= 0xD800) & (codes <= 0xDFFF))).any():
        raise TraceFormatError(f"{name} is not valid Unicode text")
    return str(arr.reshape(-1)[0])


def load_trace(path: str) -> Trace:
    """Reads and checks a trace file; raises EdgemoeIOError or TraceFormatError.

    The .npz is read member by member with each .npy header checked first, so that a
    damaged or hostile file costs memory in proportion to what it holds, not to the sizes
    its headers claim (np.load allocates an array as large as its header says)."""
    if not os.path.isfile(path):
        raise EdgemoeIOError(f"trace file not found: {path}")
    try:
        with zipfile.ZipFile(path) as z:
            # np.savez's member names: the array's name with .npy added
            members = {i.filename[:-4] if i.filename.endswith(".npy") else i.filename: i for i in z.infolist()}
            missing = set(_ARRAYS) - set(members)
            if missing:
                raise TraceFormatError(f"{path}: not an edgemoe trace (missing {', '.join(sorted(missing))})")
            version = _int32_scalar(_read_npy(z, members["format_version"], "format_version"), "format_version")
            if version != FORMAT_VERSION:
                raise TraceFormatError(f"{path}: trace format_version {version}, this edgemoe reads {FORMAT_VERSION}")
            arrays = {name: _read_npy(z, members[name], name) for name in _ARRAYS if name != "format_version"}
            trace = Trace(experts=_int32_array(arrays["experts"], "experts"),
                          layers=_int32_array(arrays["layers"], "layers"),
                          tokens=_int32_array(arrays["tokens"], "tokens"),
                          n_expert=_int32_scalar(arrays["n_expert"], "n_expert"),
                          model=_text_scalar(arrays["model"], "model"))
            trace.validate()
    except TraceFormatError as e:
        msg = str(e)
        raise TraceFormatError(msg if msg.startswith(f"{path}: ") else f"{path}: {msg}") from None
    # not a zip, a truncated one, a bad CRC or deflate stream, a data type numpy refuses
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise TraceFormatError(f"{path}: not a readable trace file ({_brief(e)})") from None
    return trace


def _brief(e: Exception, limit: int = 200) -> str:
    """An exception's text on one line, cut to `limit` characters (zipfile's and numpy's
    messages can run over lines and quote what they read)."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


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


_EOR_CUBE_K = 16        # up to this k, eor_per_layer compares all k x k pairs
_EOR_BLOCK = 1 << 24    # pair comparisons per block of tokens


def eor_per_layer(experts: np.ndarray) -> np.ndarray:
    """Expert overlap ratio |E_t ∩ E_t-1| / K averaged over t >= 1, per layer (ReMoE's EOR)."""
    n, n_layers, k = experts.shape
    if n < 2:
        return np.full(n_layers, np.nan)
    cur, prev = experts[1:], experts[:-1]
    # ids within a token are distinct (top-k), so counting the ids of E_t found in E_t-1
    # counts the intersection
    if k <= _EOR_CUBE_K:
        # compare every pair, [tokens, layers, k, k] at a time, in blocks of tokens
        overlap = np.empty((n - 1, n_layers), dtype=np.int64)
        step = max(1, _EOR_BLOCK // (n_layers * k * k))
        for s in range(0, n - 1, step):
            c, p = cur[s:s + step], prev[s:s + step]
            overlap[s:s + step] = (c[:, :, :, None] == p[:, :, None, :]).any(axis=3).sum(axis=2)
    else:
        # k from a file can be anything: search each id in its sorted previous row instead,
        # O(n k log k) time and O(n k) memory rather than k^2 per token
        lo = int(experts.min())
        span = int(experts.max()) - lo + 1
        rows = np.arange((n - 1) * n_layers, dtype=np.int64).reshape(n - 1, n_layers, 1) * span
        prev_keys = (rows + (np.sort(prev, axis=2).astype(np.int64) - lo)).ravel()  # ascending
        cur_keys = (rows + (cur.astype(np.int64) - lo)).ravel()
        at = np.minimum(np.searchsorted(prev_keys, cur_keys), prev_keys.size - 1)
        overlap = (prev_keys[at] == cur_keys).reshape(n - 1, n_layers, k).sum(axis=2)
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
    # the experts in use only: n_expert comes from the file, and a bincount of that length
    # would allocate for every expert id it allows
    counts = np.unique(ids.reshape(-1), return_counts=True)[1].astype(np.float64)
    p = counts / counts.sum()
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
