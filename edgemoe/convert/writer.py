"""Streams a GGUF to disk: header and tensor table first, then each tensor as it is produced,
so memory holds one tensor however large the model. Tensor data offsets are multiples of the
file's alignment; with 4 KiB alignment and slices of whole pages, every expert slice starts
on a page boundary, as O_DIRECT reads want."""

from __future__ import annotations

import errno
import os
import sys
import time
from dataclasses import dataclass
from collections import deque
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType as VT

from edgemoe.errors import ConvertError
from edgemoe.version import stamp_gguf

KV = Tuple[str, object, VT, Optional[VT]]


def tensor_nbytes(np_shape: Sequence[int], qtype: QType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(np_shape, dtype=np.int64))
    if n % block or np_shape[-1] % block:
        raise ConvertError(f"a row of {np_shape[-1]} elements does not fit {qtype.name} blocks of {block}")
    return n // block * size


@dataclass
class TensorPlan:
    """One output tensor: its place in the table, and how to make its bytes when its turn comes."""

    name: str
    np_shape: Tuple[int, ...]     # element shape, numpy order (GGUF ne reversed)
    qtype: QType
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.np_shape, self.qtype)


def encode(data: np.ndarray, qtype: QType) -> np.ndarray:
    """Float data in the requested float type (quantized types go through llama.cpp instead)."""
    if qtype == QType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == QType.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    if qtype == QType.BF16:
        return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), QType.BF16)
    raise ConvertError(f"cannot encode {qtype.name} directly")


class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, label: str, total: int, enabled: Optional[bool] = None):
        self.label, self.total, self.done = label, max(total, 1), 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% {self.done / 2**20:8.1f} MiB")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


AHEAD_BYTES = 1 << 30  # tensors produced ahead of the writes, at most (with several workers)


def _produced(tensors: List[TensorPlan], workers: int, ahead_bytes: int) -> Iterator[np.ndarray]:
    """Each tensor's data, in order. With workers > 1 the next tensors are produced on threads
    while earlier ones are written (large numpy calls release the interpreter's lock). Besides
    the tensor the caller holds, the ones started and not yet handed over stay within
    ahead_bytes (one at least)."""
    if workers <= 1:
        for t in tensors:
            yield t.produce()
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgemoe-produce") as pool:
        pending: deque = deque()
        held = 0
        i = 0
        try:
            while i < len(tensors) or pending:
                while i < len(tensors) and len(pending) < workers and (
                        not pending or held + tensors[i].nbytes <= ahead_bytes):
                    pending.append((tensors[i].nbytes, pool.submit(tensors[i].produce)))
                    held += tensors[i].nbytes
                    i += 1
                n, future = pending.popleft()
                held -= n
                yield future.result()
        finally:
            for _, future in pending:  # an error or a closed generator: nothing queued starts
                future.cancel()


def write_gguf(path: str, arch: str, kv: List[KV], tensors: List[TensorPlan], alignment: int,
               label: str = "writing", workers: int = 1, ahead_bytes: int = AHEAD_BYTES) -> int:
    """Writes a complete GGUF to `path` (the caller's temporary file); returns its size.

    workers > 1 produces tensors on that many threads, in order, ahead of the writes: only for
    producers that are safe to run concurrently (each with its own state)."""
    if alignment < 32 or alignment & (alignment - 1):
        raise ConvertError(f"alignment {alignment} must be a power of two of at least 32")
    seen = set()
    for t in tensors:
        if t.name in seen:
            raise ConvertError(f"tensor {t.name} would be written twice")
        seen.add(t.name)
    progress = Progress(label, sum(t.nbytes for t in tensors))
    produced = _produced(tensors, workers, ahead_bytes)
    try:
        w = gguf.GGUFWriter(path, arch)
        w.data_alignment = alignment
        if alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
            w.add_custom_alignment(alignment)
        for key, value, vtype, sub in stamp_gguf(w, kv):
            w.add_key_value(key, value, vtype, sub_type=sub)
        for t in tensors:
            w.add_tensor_info(t.name, t.np_shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t, data in zip(tensors, produced):
            if data.nbytes != t.nbytes:
                raise ConvertError(f"tensor {t.name}: produced {data.nbytes} bytes, expected {t.nbytes}")
            w.write_tensor_data(data)
            progress.advance(t.nbytes)
        w.flush()
        os.fsync(w.fout[0].fileno())
        w.close()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConvertError(f"no space left on the device while writing {path}") from None
        raise ConvertError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        produced.close()  # waits for the threads still producing
        progress.finish()
    return os.path.getsize(path)
