"""`edgemoe inflate SRC -o OUT`: a trained MoE GGUF widened to a real model's size, with the
source's routing and logits.

Every routed expert's FFN grows from n_ff to N. The added rows of `ffn_gate_exps` and
`ffn_up_exps` (both halves of a fused `ffn_gate_up_exps`) hold random values in the tensor's
own type; the added columns of `ffn_down_exps` are zero blocks, which decode to exactly 0 in
every ggml type. Each added product therefore contributes exactly 0 to the expert's output,
while the matmuls and the cache's reads cost what an n_ff = N model's do. Every other key and
tensor is re-emitted byte for byte (edgemoe.convert.gguf_source); the expert width key
becomes N and `edgemoe.inflate.*` keys record what was done (`edgemoe info` shows them).
The output is streamed one tensor at a time and appears only when complete, as `convert`'s.
docs/inflate.md has the rules and the measurements.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import click
import numpy as np

import gguf
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType as VT

from edgemoe.convert import DEFAULT_ALIGN
from edgemoe.convert.writer import tensor_nbytes
from edgemoe.cpus import default_threads
from edgemoe.errors import CliError, ConvertError, EdgemoeError
from edgemoe.info import INFLATE_PREFIX as PREFIX
from edgemoe.version import stamp_gguf

PathLike = Union[str, os.PathLike]
PAGE = 4096          # O_DIRECT's unit: --size picks N whose expert slices are whole pages
FILL_STD_FALLBACK = 0.02
MAX_THREADS = 8  # each holds a tensor in the making: a bound on memory, not tuned

_EXPS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.(weight|bias)$")
_SHEXP = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_shexp\.weight$")
_FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)

__all__ = ["InflateResult", "inflate", "inflate_command", "PREFIX"]


@dataclass
class InflateResult:
    path: str
    arch: str
    source_expert_ff: int
    expert_ff: int
    seed: int
    fill: str            # "random", "copies" (types gguf cannot quantize) or "mixed"
    n_widened: int       # tensors widened
    size_bytes: int
    seconds: float


@dataclass(frozen=True)
class _Expert:
    """One routed-expert tensor that has an n_ff dimension."""

    index: int           # position in the source's tensor list
    role: str            # gate, up, down, gate_up
    kind: str            # weight, bias


@dataclass(frozen=True)
class _Shared:
    """A shared-expert tensor whose width llama.cpp derives from the routed experts' width
    (expert_feed_forward_length x expert_shared_count: bailingmoe, deepseek, deepseek2, dots1,
    glm4moe): it must grow with them, by zeros, which add exactly 0 to the layer's output."""

    index: int
    role: str            # gate, up: (width, n_embd); down: (n_embd, width)
    width: int           # the source's: n_ff x expert_shared_count

    def count_for(self, n_ff: int) -> int:
        """expert_shared_count at expert width n_ff: the fewest N-wide experts that hold the
        source's channels (the zeros would otherwise multiply the always-on compute by count)."""
        return -(-self.width // n_ff)


# -- shapes -------------------------------------------------------------------------------


def _n_ff_of(role: str, kind: str, np_shape: Tuple[int, ...]) -> int:
    """The expert FFN width a tensor was made for (numpy order: experts first)."""
    if kind == "bias":           # (n_expert, rows)
        rows = np_shape[-1]
    elif role == "down":         # (n_expert, n_embd, n_ff)
        return np_shape[-1]
    else:                        # (n_expert, rows, n_embd)
        rows = np_shape[-2]
    return rows // 2 if role == "gate_up" else rows


def _widened_shape(role: str, kind: str, np_shape: Tuple[int, ...], n_ff: int) -> Tuple[int, ...]:
    rows = 2 * n_ff if role == "gate_up" else n_ff
    if kind == "bias":
        return np_shape[:-1] + (rows,)
    if role == "down":
        return np_shape[:-1] + (n_ff,)
    return np_shape[:-2] + (rows, np_shape[-1])


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


# -- the plan -------------------------------------------------------------------------------


@dataclass
class _Plan:
    src: str
    arch: str
    kv: list                       # the source's keys, writer keys excluded
    tensors: list                  # the source's TensorPlans
    experts: List[_Expert]
    n_ff: int
    width_keys: List[str]          # keys that hold the expert width
    shared: List[_Shared]          # shared-expert tensors tied to the expert width
    block: int                     # N must be a multiple of this (down's block size)
    page_step: int                 # multiples of this also make every expert slice whole pages

    def slice_bytes(self, e: _Expert, n_ff: int) -> int:
        t = self.tensors[e.index]
        shape = _widened_shape(e.role, e.kind, t.np_shape, n_ff)
        return tensor_nbytes(shape, t.qtype) // shape[0]


def _plan(src: str) -> _Plan:
    from edgemoe.convert.gguf_source import plan_gguf

    plan = plan_gguf(src)
    experts: List[_Expert] = []
    widths = set()
    for i, t in enumerate(plan.tensors):
        m = _EXPS.match(t.name)
        if m is None:
            if "_exps." in t.name and t.name.startswith("blk."):
                raise ConvertError(f"{src}: expert tensor {t.name} is of a kind edgemoe inflate cannot widen")
            continue
        role, kind = m.group(2), m.group(3)
        if kind == "bias" and role == "down":
            continue                  # (n_expert, n_embd): unchanged
        if len(t.np_shape) != (2 if kind == "bias" else 3):
            raise ConvertError(f"{src}: expert tensor {t.name} has {len(t.np_shape)} dimensions")
        if kind == "bias" and t.qtype not in _FLOAT_TYPES:
            raise ConvertError(f"{src}: expert bias {t.name} is {t.qtype.name}; only float biases can be widened")
        experts.append(_Expert(i, role, kind))
        widths.add(_n_ff_of(role, kind, t.np_shape))
    if not any(e.kind == "weight" for e in experts):
        raise ConvertError(f"{os.path.basename(src)} has no routed experts (a dense model): nothing to inflate")
    if len(widths) != 1:
        raise ConvertError(f"{src}: expert tensors disagree on the FFN width ({sorted(widths)})")
    n_ff = widths.pop()

    keys = {k: v for k, v, _, _ in plan.kv}
    expert_key = f"{plan.arch}.expert_feed_forward_length"
    dense_key = f"{plan.arch}.feed_forward_length"
    has_dense_ffn = any(re.match(r"^blk\.\d+\.ffn_(gate|up|down)\.weight$", t.name) for t in plan.tensors)
    if expert_key in keys:
        width_keys = [expert_key]
    elif isinstance(keys.get(dense_key), int) and keys[dense_key] == n_ff and not has_dense_ffn:
        width_keys = [dense_key]     # olmoe, mixtral-style llama: the expert width lives here
    else:
        raise ConvertError(f"{src}: no {expert_key} (nor an all-MoE {dense_key} of {n_ff}): "
                           f"cannot record the new expert width")
    for k in width_keys:
        if keys[k] != n_ff:
            raise ConvertError(f"{src}: {k} is {keys[k]} but the expert tensors are {n_ff} wide")
    shared = _tied_shared(src, plan, keys, n_ff)

    block = 1
    for e in experts:
        if e.role == "down":
            block = math.lcm(block, gguf.GGML_QUANT_SIZES[plan.tensors[e.index].qtype][0])
    for sh in shared:
        if sh.role == "down":
            block = math.lcm(block, gguf.GGML_QUANT_SIZES[plan.tensors[sh.index].qtype][0])
    p = _Plan(src=src, arch=plan.arch, kv=plan.kv, tensors=plan.tensors, experts=experts, n_ff=n_ff,
              width_keys=width_keys, shared=shared, block=block, page_step=block)
    # slice bytes are linear in N: the smallest multiple of the block that makes every one a
    # whole number of pages exists within PAGE blocks
    for j in range(1, PAGE + 1):
        if all(p.slice_bytes(e, block * j) % PAGE == 0 for e in experts if e.kind == "weight"):
            p.page_step = block * j
            break
    return p


def _tied_shared(src: str, plan, keys: dict, n_ff: int) -> List[_Shared]:
    """Shared-expert tensors whose width is n_ff x expert_shared_count (no width key of their own)."""
    count = keys.get(f"{plan.arch}.expert_shared_count")
    if not isinstance(count, int) or count <= 0 or f"{plan.arch}.expert_shared_feed_forward_length" in keys:
        return []
    out = []
    for i, t in enumerate(plan.tensors):
        m = _SHEXP.match(t.name)
        if m is None:
            continue
        role = m.group(2)
        width = t.np_shape[-1] if role == "down" else t.np_shape[0]
        if len(t.np_shape) != 2 or width != n_ff * count:
            raise ConvertError(f"{src}: shared expert {t.name} is {width} wide, expected {n_ff} x {count}")
        out.append(_Shared(i, role, width))
    return out


def _shared_shape(sh: _Shared, np_shape: Tuple[int, ...], n_ff: int) -> Tuple[int, ...]:
    w = n_ff * sh.count_for(n_ff)
    return (np_shape[0], w) if sh.role == "down" else (w, np_shape[1])


def _shared_producer(p: _Plan, sh: _Shared, n_ff: int) -> Callable[[], np.ndarray]:
    t = p.tensors[sh.index]

    def produce() -> np.ndarray:
        data = t.produce()
        if sh.role == "down":    # (n_embd, width): whole zero blocks after each row
            n_embd = t.np_shape[0]
            src = data.reshape(n_embd, -1).view(np.uint8)
            out = np.zeros((n_embd, tensor_nbytes((n_ff * sh.count_for(n_ff),), t.qtype)), dtype=np.uint8)
            out[:, :src.shape[1]] = src
            return out
        width = t.np_shape[0]    # (width, n_embd): zero rows after the source's
        src = data.reshape(width, -1).view(np.uint8)
        out = np.zeros((n_ff * sh.count_for(n_ff), src.shape[1]), dtype=np.uint8)
        out[:width] = src
        return out

    return produce


def _check_width(p: _Plan, n_ff: int) -> None:
    if n_ff <= p.n_ff:
        raise ConvertError(f"--expert-ff {n_ff} must be above the source's expert width {p.n_ff}")
    if n_ff % p.block:
        types = sorted({p.tensors[e.index].qtype.name for e in p.experts if e.role == "down"})
        raise ConvertError(f"--expert-ff {n_ff} is not a multiple of {p.block}: ffn_down_exps ({', '.join(types)}) "
                           f"grows by whole blocks of {p.block} zeros")


def _source_id(src: str) -> Tuple[str, int, str]:
    from edgemoe.files import sha256_file

    try:
        sha = sha256_file(src)
    except OSError as e:
        raise ConvertError(f"cannot read {src}: {e.strerror or e}") from None
    return os.path.basename(src), os.path.getsize(src), sha


def _kv(p: _Plan, n_ff: int, seed: int, fill: str, source: Tuple[str, int, str]) -> list:
    """The source's keys with the new width, and the inflation recorded (older records replaced)."""
    kv = []
    for key, value, vtype, sub in p.kv:
        if key.startswith(PREFIX):
            continue
        if key in p.width_keys:
            value = n_ff
        elif p.shared and key == f"{p.arch}.expert_shared_count":
            value = p.shared[0].count_for(n_ff)
        kv.append((key, value, vtype, sub))
    name, size, sha = source
    kv += [(PREFIX + "source_expert_ff", p.n_ff, VT.UINT32, None),
           (PREFIX + "expert_ff", n_ff, VT.UINT32, None),
           (PREFIX + "seed", seed, VT.UINT64, None),
           (PREFIX + "fill", fill, VT.STRING, None),
           (PREFIX + "source_name", name, VT.STRING, None),
           (PREFIX + "source_bytes", size, VT.UINT64, None),
           (PREFIX + "source_sha256", sha, VT.STRING, None)]
    return kv


def _can_quantize(qtype: QType) -> bool:
    try:
        gguf.quants.quantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][0]), dtype=np.float32), qtype)
        return True
    except Exception:  # NotImplementedError, or a type gguf does not know how to pack
        return False


def _fill_kind(p: _Plan) -> str:
    kinds = {"random" if _can_quantize(p.tensors[e.index].qtype) else "copies"
             for e in p.experts if e.kind == "weight" and e.role != "down"}
    return kinds.pop() if len(kinds) == 1 else "mixed"


# -- the bytes ------------------------------------------------------------------------------


def _as_rows(data: np.ndarray, n_expert: int, n_rows: int) -> np.ndarray:
    """Tensor bytes as (experts, rows, row bytes)."""
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return raw.reshape(n_expert, n_rows, -1)


def _fill_std(rows: np.ndarray, qtype: QType) -> float:
    """The spread of one expert's existing rows: random rows of that scale keep activations
    like the real ones (finite: an inf times a zero column would be NaN)."""
    try:
        values = gguf.quants.dequantize(rows[0], qtype).astype(np.float64)
    except Exception:
        return FILL_STD_FALLBACK
    std = float(values.std()) if values.size else 0.0
    return std if math.isfinite(std) and std > 0 else FILL_STD_FALLBACK


def _new_rows(src_rows: np.ndarray, extra: int, n_embd: int, qtype: QType,
              rng: np.random.Generator) -> np.ndarray:
    """(experts, extra, row bytes): random rows in `qtype`, or copies of random existing rows
    where gguf cannot quantize the type."""
    n_expert, n_rows, row_bytes = src_rows.shape
    if not _can_quantize(qtype):
        flat = src_rows.reshape(n_expert * n_rows, row_bytes)
        return flat[rng.integers(0, len(flat), size=(n_expert, extra))]
    # uniform on [-a, a] with the rows' standard deviation (a = std * sqrt 3): several times
    # faster to draw than normal values, and the matmuls do not care
    span = np.float32(2.0 * math.sqrt(3.0) * _fill_std(src_rows, qtype))
    out = np.empty((n_expert, extra, row_bytes), dtype=np.uint8)
    for e in range(n_expert):
        x = rng.random((extra, n_embd), dtype=np.float32)
        x -= np.float32(0.5)
        x *= span
        out[e] = np.ascontiguousarray(_quantize(x, qtype)).view(np.uint8).reshape(extra, row_bytes)
    return out


def _quantize(x: np.ndarray, qtype: QType) -> np.ndarray:
    """gguf's quantization; Q8_0 (whose blocks are independent) over the whole array at once:
    the same bytes, 1.65x faster here, and in large numpy calls that let other threads run (gguf
    works through groups of 16 rows, in small calls that hold the interpreter's lock)."""
    if qtype == QType.Q8_0:
        return gguf.quants.Q8_0.quantize_blocks(x.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][0])).reshape(x.shape[0], -1)
    return gguf.quants.quantize(x, qtype)


def _producer(p: _Plan, e: _Expert, n_ff: int, seed: int) -> Callable[[], np.ndarray]:
    t = p.tensors[e.index]

    def produce() -> np.ndarray:
        data = t.produce()
        n_expert = t.np_shape[0]
        extra = n_ff - p.n_ff
        if e.kind == "bias":     # (n_expert, rows) floats: zeros in the added rows
            halves = 2 if e.role == "gate_up" else 1
            src = _as_rows(data, n_expert * halves, p.n_ff)
            out = np.zeros((n_expert * halves, n_ff, src.shape[2]), dtype=np.uint8)
            out[:, :p.n_ff] = src
            return out.reshape(n_expert, -1)
        if e.role == "down":     # (n_expert, n_embd, n_ff): whole zero blocks after each row
            n_embd = t.np_shape[1]
            src = _as_rows(data, n_expert, n_embd)
            row_bytes = tensor_nbytes((n_ff,), t.qtype)
            out = np.zeros((n_expert, n_embd, row_bytes), dtype=np.uint8)
            out[:, :, :src.shape[2]] = src
            return out
        # gate, up, gate_up: (n_expert, rows, n_embd); the added rows follow each half's own
        rng = np.random.default_rng([seed, e.index])
        n_embd = t.np_shape[2]
        halves = 2 if e.role == "gate_up" else 1
        src = _as_rows(data, n_expert, halves * p.n_ff)
        out = np.empty((n_expert, halves * n_ff, src.shape[2]), dtype=np.uint8)
        for h in range(halves):
            mine = src[:, h * p.n_ff:(h + 1) * p.n_ff]
            out[:, h * n_ff:h * n_ff + p.n_ff] = mine
            out[:, h * n_ff + p.n_ff:(h + 1) * n_ff] = _new_rows(mine, extra, n_embd, t.qtype, rng)
        return out

    return produce


def _tensors(p: _Plan, n_ff: int, seed: int) -> list:
    from edgemoe.convert.writer import TensorPlan

    tensors = list(p.tensors)
    for e in p.experts:
        t = p.tensors[e.index]
        tensors[e.index] = TensorPlan(t.name, _widened_shape(e.role, e.kind, t.np_shape, n_ff), t.qtype,
                                      _producer(p, e, n_ff, seed))
    for sh in p.shared:
        t = p.tensors[sh.index]
        tensors[sh.index] = TensorPlan(t.name, _shared_shape(sh, t.np_shape, n_ff), t.qtype,
                                       _shared_producer(p, sh, n_ff))
    return tensors


# -- sizes ----------------------------------------------------------------------------------


def _header_bytes(p: _Plan, kv: list, align: int, out: str) -> int:
    """Key-values and tensor table of the output, padded to the alignment; they do not depend
    on N (fixed-width integers), so one dry run of the header writer measures them."""
    from edgemoe.files import discard, temp_beside

    try:
        fd, path = temp_beside(out)
    except OSError as e:  # the first file made beside OUT: an unwritable directory shows here
        raise ConvertError(f"cannot write beside {out}: {e.strerror or e}") from None
    os.close(fd)
    try:
        w = gguf.GGUFWriter(path, p.arch)
        w.data_alignment = align
        if align != gguf.GGUF_DEFAULT_ALIGNMENT:
            w.add_custom_alignment(align)
        for key, value, vtype, sub in stamp_gguf(w, kv):
            w.add_key_value(key, value, vtype, sub_type=sub)
        for t in p.tensors:
            w.add_tensor_info(t.name, t.np_shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.flush()
        n = w.fout[0].tell()
        w.close()
    finally:
        discard(path)
    return _pad(n, align)


def _file_bytes(p: _Plan, header: int, n_ff: int, align: int) -> int:
    widened = {e.index: e for e in p.experts}
    shared = {sh.index: sh for sh in p.shared}
    total = header
    for i, t in enumerate(p.tensors):
        if i in widened:
            shape = _widened_shape(widened[i].role, widened[i].kind, t.np_shape, n_ff)
        elif i in shared:
            shape = _shared_shape(shared[i], t.np_shape, n_ff)
        else:
            shape = t.np_shape
        total += _pad(tensor_nbytes(shape, t.qtype), align)
    return total


def _width_for_size(p: _Plan, header: int, size: int, align: int) -> int:
    """The smallest N, a multiple of the page step and above the source's width, whose output
    has at least `size` bytes."""
    step = p.page_step
    lo = p.n_ff // step + 1                     # N = step * j, j >= lo
    base = _file_bytes(p, header, step * lo, align)
    if base >= size:
        return step * lo
    # bytes grow linearly in N (up to padding): jump near the answer, then walk
    per_step = _file_bytes(p, header, step * (lo + 1), align) - base
    j = lo + max(0, (size - base) // max(per_step, 1) - 1)
    while _file_bytes(p, header, step * j, align) < size:
        j += 1
    while j > lo and _file_bytes(p, header, step * (j - 1), align) >= size:
        j -= 1
    return step * j


# -- the whole ------------------------------------------------------------------------------


def _check_paths(src: str, out: str) -> None:
    if not os.path.exists(src):
        raise ConvertError(f"{src}: no such file")
    if os.path.isdir(src):
        raise ConvertError(f"{src} is a directory, not a GGUF file")
    if os.path.isdir(out):
        raise ConvertError(f"output {out} is a directory")
    if os.path.exists(out) and os.path.samefile(src, out):
        raise ConvertError(f"output {out} is the source: edgemoe inflate never overwrites its input")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise ConvertError(f"output directory {os.path.dirname(os.path.abspath(out))} does not exist")


def inflate(src: PathLike, out: PathLike, expert_ff: Optional[int] = None, size: Optional[int] = None,
            seed: int = 0, align: int = DEFAULT_ALIGN,
            on_choice: Optional[Callable[[int, int, int], None]] = None, threads: int = 0) -> InflateResult:
    """Writes `out`: `src` with every routed expert's FFN widened (docs/inflate.md).

    Args:
        expert_ff: the new expert width N; exactly one of this and `size`.
        size: a target file size in bytes: N becomes the smallest multiple of the page step
            (expert slices of whole 4 KiB pages) whose output has at least this many bytes.
        seed: seeds the added rows; the same arguments give the same bytes.
        align: the output's data alignment (4096: expert tensors start on pages).
        on_choice: called with (N, output bytes, page step) before writing; expert slices are
            whole 4 KiB pages when N is a multiple of the page step.
        threads: tensors produced at once (0: the CPUs this process may use, at most
            MAX_THREADS); the bytes do not depend on it.

    Raises:
        ConvertError, EdgemoeIOError, ModelFormatError: one-line reasons; `out` is then untouched.
    """
    from edgemoe.convert.writer import write_gguf
    from edgemoe.files import discard, publish, temp_beside

    t0 = time.monotonic()
    src, out = os.fspath(src), os.fspath(out)
    if (expert_ff is None) == (size is None):
        raise ConvertError("give exactly one of --size and --expert-ff")
    if seed < 0 or seed >= 1 << 64:
        raise ConvertError(f"--seed {seed} must be in 0..2^64-1")
    if align < 32 or align & (align - 1):
        raise ConvertError(f"--align {align} must be a power of two of at least 32")
    if threads < 0:
        raise ConvertError(f"--threads {threads} must be 0 (the CPUs) or more")
    _check_paths(src, out)
    p = _plan(src)
    fill = _fill_kind(p)
    source = _source_id(src)
    # the width keys' values are fixed-size integers: any N gives the same header length
    header = _header_bytes(p, _kv(p, p.n_ff + p.block, seed, fill, source), align, out)
    if size is not None:
        if size <= 0:
            raise ConvertError("--size must be positive")
        n_ff = _width_for_size(p, header, size, align)
    else:
        n_ff = int(expert_ff)
        _check_width(p, n_ff)
    predicted = _file_bytes(p, header, n_ff, align)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(out))).free
    if predicted > free:
        raise ConvertError(f"the output needs {predicted:,} bytes but only {free:,} are free beside {out}")
    if on_choice is not None:
        on_choice(n_ff, predicted, p.page_step)

    fd, tmp = temp_beside(out)
    os.close(fd)
    try:
        # each producer has its own generator, seeded by (seed, tensor): threads give the same bytes
        written = write_gguf(tmp, p.arch, _kv(p, n_ff, seed, fill, source), _tensors(p, n_ff, seed), align,
                             label=f"inflating {os.path.basename(out)}",
                             workers=threads or min(default_threads(), MAX_THREADS))
        if written != predicted:
            raise ConvertError(f"internal: wrote {written} bytes, predicted {predicted}")
        publish(tmp, out)
    finally:
        discard(tmp)
    return InflateResult(path=out, arch=p.arch, source_expert_ff=p.n_ff, expert_ff=n_ff, seed=seed, fill=fill,
                         n_widened=sum(e.kind == "weight" for e in p.experts), size_bytes=written,
                         seconds=time.monotonic() - t0)


def _parse_size(value: str) -> int:
    from edgemoe.budget import parse_budget
    from edgemoe.errors import BudgetParseError

    try:
        budget = parse_budget(value.strip())
    except BudgetParseError:
        raise ConvertError(f"invalid --size {value!r} (examples: 3.5GB, 1.5GiB, 800MiB)") from None
    if budget is None or budget.bytes is None:  # off, a percentage, auto: not a size
        raise ConvertError(f"--size {value!r} must be bytes (examples: 3.5GB, 1.5GiB, 800MiB)")
    return budget.bytes


@click.command("inflate")
@click.argument("src", metavar="SRC")
@click.option("-o", "--output", "out", required=True, metavar="OUT.gguf", help="The GGUF to write.")
@click.option("--size", "size", default=None, metavar="BYTES",
              help="Target file size (3.5GB, 1.5GiB): the smallest page-friendly width reaching it.")
@click.option("--expert-ff", "expert_ff", type=int, default=None, metavar="N",
              help="The new expert FFN width (a multiple of ffn_down_exps' block size).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the added rows.")
@click.option("--align", type=int, default=DEFAULT_ALIGN, show_default=True, metavar="BYTES",
              help="Data alignment; expert tensors then start on page boundaries.")
@click.option("-t", "--threads", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help=f"Tensors filled at once (0: the CPUs, at most {MAX_THREADS}); the output is the same.")
def inflate_command(src: str, out: str, size: Optional[str], expert_ff: Optional[int], seed: int,
                    align: int, threads: int) -> None:
    """Widen every routed expert of SRC (a trained MoE GGUF) to a real model's size.

    The added gate/up rows are random, the added down columns exactly zero, so routing and
    logits stay the source's while the expert matmuls and reads cost what a model with
    N-wide experts costs. Give exactly one of --size and --expert-ff. The choice of N goes
    to stderr; `edgemoe info OUT` shows the recorded `edgemoe.inflate.*` keys.
    """
    def chosen(n_ff: int, nbytes: int, page_step: int) -> None:
        from edgemoe.budget import format_bytes

        click.echo(f"expert FFN width {n_ff}: {nbytes:,} bytes ({format_bytes(nbytes)})", err=True)
        if n_ff % page_step:
            click.echo(f"note: expert slices are not whole {PAGE}-byte pages (widths that are multiples of "
                       f"{page_step} give whole pages); O_DIRECT then reads the pages around each slice", err=True)

    try:
        if (size is None) == (expert_ff is None):
            raise ConvertError("give exactly one of --size and --expert-ff")
        target = _parse_size(size) if size is not None else None
        result = inflate(src, out, expert_ff=expert_ff, size=target, seed=seed, align=align, on_choice=chosen,
                         threads=threads)
    except EdgemoeError as e:
        raise CliError(str(e)) from None
    except KeyboardInterrupt:
        raise click.exceptions.Abort() from None
    click.echo(f"wrote {result.path}: {result.arch}, expert FFN {result.source_expert_ff} -> {result.expert_ff} "
               f"in {result.n_widened} tensors ({result.fill} fill, seed {result.seed}), "
               f"{result.size_bytes / 2**20:.1f} MiB in {result.seconds:.1f} s", err=True)
