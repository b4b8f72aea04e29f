"""Reads safetensors files (one file, or shards listed in an index) without torch.

Tensors are memory-mapped and decoded on demand, so converting a checkpoint larger than RAM
holds one tensor at a time. BF16 has no numpy type: it is widened to f32 exactly.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Dict, Iterator, List, Tuple

import numpy as np

from edgemoe.errors import ConvertError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}

_MAX_HEADER = 100 << 20


def _is_size(v) -> bool:
    """A shape dimension or a byte offset: a non-negative JSON integer."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _load_json(raw: bytes, error: str):
    """JSON read from a file; ConvertError(error) when it is not valid JSON."""
    try:
        return json.loads(raw)
    # JSONDecodeError and UnicodeDecodeError are ValueErrors, and so is an integer of more
    # digits than Python converts; nesting deeper than the interpreter's stack: RecursionError
    except (ValueError, RecursionError):
        raise ConvertError(error) from None


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """One .safetensors file: its tensor table, metadata and lazily mapped data."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) < 8:
                    raise ConvertError(f"{path}: truncated safetensors file")
                (n,) = struct.unpack("<Q", head)
                if n > min(_MAX_HEADER, size - 8):
                    raise ConvertError(f"{path}: not a safetensors file (header length {n})")
                raw = f.read(n)
        except OSError as e:
            raise ConvertError(f"cannot read {path}: {e.strerror or e}") from None
        header = _load_json(raw, f"{path}: corrupt safetensors header")
        if not isinstance(header, dict):
            raise ConvertError(f"{path}: corrupt safetensors header")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ConvertError(f"{path}: safetensors __metadata__ is not a map of strings")
        self.metadata: Dict[str, str] = meta
        self._base = 8 + n
        self._table: Dict[str, Tuple[str, List[int], int, int]] = {}
        for name, info in header.items():
            dtype, shape, offsets = (info.get("dtype"), info.get("shape"), info.get("data_offsets")) \
                if isinstance(info, dict) else (None, None, None)
            if not (isinstance(shape, list) and all(_is_size(d) for d in shape)
                    and isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)):
                raise ConvertError(f"{path}: corrupt entry for tensor {name}")
            if not isinstance(dtype, str) or dtype not in _DTYPES:
                raise ConvertError(f"{path}: tensor {name} has unsupported dtype {dtype}")
            begin, end = offsets
            count = math.prod(shape)
            if begin > end or end - begin != count * np.dtype(_DTYPES[dtype]).itemsize or self._base + end > size:
                raise ConvertError(f"{path}: tensor {name} lies outside the file (truncated?)")
            self._table[name] = (dtype, shape, begin, end)
        self._map = None

    def names(self) -> List[str]:
        return list(self._table)

    def dtype(self, name: str) -> str:
        return self._table[name][0]

    def shape(self, name: str) -> List[int]:
        return list(self._table[name][1])

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as a numpy array (a view of the mapped file; BF16 widened to f32)."""
        dtype, shape, begin, end = self._table[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._map[self._base + begin:self._base + end].view(_DTYPES[dtype]).reshape(shape)
        return bf16_to_f32(raw) if dtype == "BF16" else raw

    def close(self) -> None:
        self._map = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Checkpoint:
    """Every tensor of a Hugging Face checkpoint directory, across shards."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index, "rb") as f:
                    raw = f.read()
            except OSError:
                raise ConvertError(f"{index}: unreadable safetensors index") from None
            doc = _load_json(raw, f"{index}: unreadable safetensors index")
            weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConvertError(f"{index}: unreadable safetensors index")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                # a file beside the index: not a path that leads elsewhere (../x, /dev/stdin)
                if shard in ("", ".", "..") or "/" in shard or os.sep in shard or (os.altsep and os.altsep in shard):
                    raise ConvertError(f"{index}: shard {shard!r} is not a file name in {directory}")
        else:
            shards = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
            weight_map = None
            if not shards:
                raise ConvertError(f"{directory} has no *.safetensors files (PyTorch .bin checkpoints are not supported)")
        self._files: Dict[str, SafetensorsFile] = {}
        self._where: Dict[str, SafetensorsFile] = {}
        for shard in shards:
            path = os.path.join(directory, shard)
            if not os.path.exists(path):
                raise ConvertError(f"shard {shard} listed in the index is missing from {directory}")
            st = SafetensorsFile(path)
            self._files[shard] = st
            for name in st.names():
                self._where[name] = st
        if weight_map is not None:
            missing = [n for n in weight_map if n not in self._where]
            if missing:
                raise ConvertError(f"tensor {missing[0]} listed in the index is not in its shard")

    def names(self) -> List[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> List[int]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> str:
        return self._where[name].dtype(name)

    def tensor(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ConvertError(f"tensor {name} is missing from the checkpoint in {self.directory}")
        return self._where[name].tensor(name)

    def items(self) -> Iterator[Tuple[str, np.ndarray]]:
        for name in self._where:
            yield name, self.tensor(name)

    def close(self) -> None:
        for st in self._files.values():
            st.close()
