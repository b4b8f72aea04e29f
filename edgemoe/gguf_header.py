"""Reads a GGUF's header (key-values and tensor infos) without touching its tensor data.

gguf.GGUFReader parses every field into numpy views and takes seconds on a 150k-token
vocab; this reader walks the header of a memory map with struct and is a fraction of that,
so that `edgemoe info` and the synthetic-model writer stay quick on any model size. Every
read is bounds-checked: a short or corrupt header is a ModelFormatError, never a struct
error or a crash.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

import gguf

from edgemoe.errors import EdgemoeIOError, ModelFormatError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32  # llama.cpp's, when general.alignment is absent

# GGUF value type -> struct format of a scalar (8: string, 9: array)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# far above any real model; a corrupt count must not make us loop or allocate for hours
_MAX_COUNT = 1 << 28
_MAX_DIMS = 8


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: Tuple[int, ...]  # ggml order: ne[0] is the row length
    qtype: int           # ggml type id (gguf.GGMLQuantizationType value)
    offset: int          # from the start of the data section
    nbytes: int

    @property
    def type_name(self) -> str:
        return gguf.GGMLQuantizationType(self.qtype).name


@dataclass(frozen=True)
class GGUFHeader:
    path: str
    version: int
    file_size: int
    alignment: int
    header_bytes: int                                 # key-values and tensor infos, unpadded
    data_offset: int                                  # absolute offset of the data section
    kv: Dict[str, object] = field(default_factory=dict)
    kv_types: Dict[str, Tuple[int, Optional[int]]] = field(default_factory=dict)  # (type, array element type)
    tensors: List[TensorInfo] = field(default_factory=list)

    def get(self, key: str, default=None):
        return self.kv.get(key, default)

    @property
    def data_end(self) -> int:
        """Where the last tensor's data ends (the header's end for a file without tensors)."""
        return max((self.data_offset + t.offset + t.nbytes for t in self.tensors), default=self.header_bytes)


class _Cursor:
    """Bounds-checked little-endian reads from a buffer.

    With string_arrays False, a string array is stepped over and read as its length.
    """

    def __init__(self, buf, path: str, string_arrays: bool = True):
        self.buf, self.pos, self.path = buf, 0, path
        self.string_arrays = string_arrays

    def _fail(self) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: truncated or corrupt GGUF header (at byte {self.pos})")

    def unpack(self, fmt: str):
        try:
            values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error:
            raise self._fail() from None
        self.pos += struct.calcsize("<" + fmt)
        return values

    def count(self) -> int:
        (n,) = self.unpack("Q")
        if n > _MAX_COUNT:
            raise self._fail()
        return n

    def string(self) -> str:
        n = self.count()
        if self.pos + n > len(self.buf):
            raise self._fail()
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, n: int) -> int:
        """Steps over n strings without decoding them; returns n."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        length = struct.Struct("<Q").unpack_from
        for _ in range(n):
            if pos + 8 > end:
                raise self._fail()
            pos += 8 + length(buf, pos)[0]
        if pos > end:
            raise self._fail()
        self.pos = pos
        return n

    def array(self, sub: int, n: int):
        if sub == _STRING:
            if not self.string_arrays:
                return self.skip_strings(n)
            return [self.string() for _ in range(n)]
        if sub == _ARRAY:
            raise ModelFormatError(f"{self.path}: nested GGUF arrays are not supported")
        if sub not in _SCALAR:
            raise self._fail()
        dtype = np.dtype("<" + _SCALAR[sub])
        end = self.pos + n * dtype.itemsize
        if end > len(self.buf):
            raise self._fail()
        values = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
        self.pos = end
        return values.tolist()

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string(), None
        if vtype == _ARRAY:
            sub, = self.unpack("I")
            return self.array(sub, self.count()), sub
        if vtype not in _SCALAR:
            raise self._fail()
        (v,) = self.unpack(_SCALAR[vtype])
        return v, None


def tensor_nbytes(qtype: int, ne: Tuple[int, ...], name: str = "", path: str = "") -> int:
    """Bytes of a tensor of ggml type `qtype` and shape `ne` (ggml order)."""
    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    except (ValueError, KeyError):
        raise ModelFormatError(f"{path}: tensor {name} has unknown ggml type {qtype}") from None
    if ne and ne[0] % block:
        raise ModelFormatError(f"{path}: tensor {name} has rows of {ne[0]} elements, "
                               f"not a multiple of its type's block of {block}")
    return math.prod(ne) // block * size


def _parse(buf, path: str, file_size: int, string_arrays: bool = True) -> GGUFHeader:
    c = _Cursor(buf, path, string_arrays)
    if bytes(buf[:4]) != MAGIC:
        raise ModelFormatError(f"{path} is not a GGUF file")
    c.pos = 4
    version, = c.unpack("I")
    if version not in (2, 3):
        raise ModelFormatError(f"{path}: GGUF version {version} is not supported")
    n_tensors, n_kv = c.unpack("QQ")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise c._fail()

    kv: Dict[str, object] = {}
    kv_types: Dict[str, Tuple[int, Optional[int]]] = {}
    for _ in range(n_kv):
        key = c.string()
        vtype, = c.unpack("I")
        value, sub = c.value(vtype)
        kv[key] = value
        kv_types[key] = (vtype, sub)

    infos = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims, = c.unpack("I")
        if not 0 < n_dims <= _MAX_DIMS:
            raise ModelFormatError(f"{path}: tensor {name} has {n_dims} dimensions")
        ne = c.unpack("Q" * n_dims)
        qtype, offset = c.unpack("IQ")
        infos.append(TensorInfo(name, tuple(ne), qtype, offset, tensor_nbytes(qtype, ne, name, path)))

    alignment = kv.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFormatError(f"{path}: general.alignment {alignment!r} is not a power of two")
    data_offset = -(-c.pos // alignment) * alignment
    return GGUFHeader(path=path, version=version, file_size=file_size, alignment=alignment,
                      header_bytes=c.pos, data_offset=data_offset, kv=kv, kv_types=kv_types, tensors=infos)


def read_header(path, check_data: bool = True, string_arrays: bool = True) -> GGUFHeader:
    """Parses the header of the GGUF at `path`.

    Args:
        check_data: also fail when the tensor data extends past the end of the file
            (a truncated download or copy).
        string_arrays: False leaves string arrays (the vocabulary, the merges) undecoded: kv
            holds their length, an int, instead of a list (7 times quicker on a 102k vocabulary).

    Raises:
        EdgemoeIOError: the file cannot be opened.
        ModelFormatError: not a GGUF, unsupported version, corrupt or truncated.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except IsADirectoryError:
        raise EdgemoeIOError(f"{path} is a directory, not a GGUF file") from None
    except OSError as e:
        raise EdgemoeIOError(f"cannot open {path}: {e.strerror or e}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            head = f.read(4)
            if head != MAGIC[:len(head)] or not head:
                raise ModelFormatError(f"{path} is not a GGUF file")
            raise ModelFormatError(f"{path}: truncated GGUF header ({size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            # the mmap itself, not a memoryview: its slices are copies, so no buffer export
            # outlives the parse (an exception's frames would otherwise keep the map open)
            header = _parse(m, path, size, string_arrays)
    if check_data and header.data_end > size:
        raise ModelFormatError(f"{path}: truncated GGUF (tensor data ends at {header.data_end} bytes, "
                               f"the file has {size})")
    return header
