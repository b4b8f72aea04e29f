"""Reads the character vectors of an R package's lazy-load data base (`data/Rdata.rdx` and
`data/Rdata.rdb`), so the corpus can be built from a Debian R package without R.

Only what such data bases hold is understood: R's XDR serialization (format versions 2 and 3)
of pairlists, symbols, character, logical, integer, real and generic vectors, references and the
usual environments as placeholders. Anything else raises RFormatError.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

# SEXP types (R's Rinternals.h) and the serialization's pseudo-types (serialize.c)
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP = 0, 1, 2, 9, 10
INTSXP, REALSXP, STRSXP, VECSXP = 13, 14, 16, 19
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP = 255, 254, 253, 252
MISSINGARG_SXP, BASENAMESPACE_SXP, EMPTYENV_SXP, BASEENV_SXP = 251, 250, 242, 241
_PLACEHOLDERS = {NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP,
                 BASENAMESPACE_SXP, EMPTYENV_SXP, BASEENV_SXP}
_NA_INTEGER = -(2 ** 31)


class RFormatError(ValueError):
    """The bytes are not an R serialization this reader understands."""


@dataclass
class RVector:
    """A vector with its attributes (names, class, ...); `values` is a Python list."""

    kind: int
    values: List[Any]
    attributes: Dict[str, Any] = field(default_factory=dict)


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: List[Any] = []

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RFormatError("truncated R serialization")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more words
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self) -> None:
        if self.take(2) != b"X\n":
            raise RFormatError("not an XDR R serialization")
        version = self.int()
        self.int(), self.int()  # writer's and minimal reader's R versions
        if version == 3:
            self.take(self.int())  # native encoding name
        elif version != 2:
            raise RFormatError(f"unsupported R serialization version {version}")

    def item(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in _PLACEHOLDERS:
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == LISTSXP:
            return self._pairlist(has_attr, has_tag)
        if kind == CHARSXP:
            n = self.int()
            return None if n == -1 else self.take(n).decode("utf-8", "surrogateescape")
        if kind in (LGLSXP, INTSXP):
            n = self.length()
            values = [None if v == _NA_INTEGER else v for v in struct.unpack(f">{n}i", self.take(4 * n))]
        elif kind == REALSXP:
            n = self.length()
            values = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif kind in (STRSXP, VECSXP):
            values = [self.item() for _ in range(self.length())]
        else:
            raise RFormatError(f"unsupported R object type {kind}")
        vec = RVector(kind, values)
        if has_attr:
            vec.attributes = self.item() or {}
        return vec

    def _pairlist(self, has_attr: bool, has_tag: bool) -> Dict[str, Any]:
        """A pairlist as a dict tag -> value (attribute lists and named arguments)."""
        out: Dict[str, Any] = {}
        while True:
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            out[tag if tag is not None else str(len(out))] = self.item()
            flags = self.int()
            kind = flags & 0xFF
            if kind == NILVALUE_SXP:
                return out
            if kind != LISTSXP:
                raise RFormatError(f"pairlist tail of type {kind}")
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))


def unserialize(data: bytes) -> Any:
    r = _Reader(data)
    r.header()
    return r.item()


def _names(vec: RVector) -> List[str]:
    names = vec.attributes.get("names")
    if not isinstance(names, RVector) or len(names.values) != len(vec.values):
        raise RFormatError("a named list without names")
    return names.values


def read_lazyload_db(rdx: bytes, rdb: bytes) -> Dict[str, Any]:
    """Every variable of a lazy-load data base: name -> unserialized object.

    Args:
        rdx: the bytes of `Rdata.rdx` (a gzip-compressed index).
        rdb: the bytes of `Rdata.rdb` (zlib-compressed serializations at the index's offsets).
    """
    try:
        index = unserialize(gzip.decompress(rdx))
    except (OSError, EOFError) as e:
        raise RFormatError(f"cannot decompress the index: {e}") from None
    if not isinstance(index, RVector) or index.kind != VECSXP:
        raise RFormatError("the index is not a list")
    parts = dict(zip(_names(index), index.values))
    variables: Optional[RVector] = parts.get("variables")
    if not isinstance(variables, RVector):
        raise RFormatError("the index has no variables")
    out = {}
    for name, where in zip(_names(variables), variables.values):
        offset, size = where.values
        blob = rdb[offset:offset + size]
        if len(blob) != size or size < 5:
            raise RFormatError(f"variable {name}: outside the data base")
        if blob[4:5] in (b"Z", b"2", b"X", b"0"):
            raise RFormatError(f"variable {name}: compression type {blob[4:5]!r} is not supported")
        try:
            raw = zlib.decompress(blob[4:])
        except zlib.error as e:
            raise RFormatError(f"variable {name}: {e}") from None
        if len(raw) != struct.unpack(">I", blob[:4])[0]:
            raise RFormatError(f"variable {name}: wrong uncompressed size")
        out[name] = unserialize(raw)
    return out
