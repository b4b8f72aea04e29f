"""Random tensor data of a ggml type, built straight from random bits.

Drawing floats and quantizing them runs at tens of MB/s in numpy, minutes for a model of a
few GB. Here quantized blocks are assembled directly instead: random quant bits, a scale
chosen so that the dequantized weights have the wanted standard deviation, and a zero mean
(a random sign on each block's scale, or an offset of minus half the quant range). Float
types get uniform values from random integers. Either way the bytes are a pure function of
the bit generator's state, produced at GB/s.

`encode_rows` is the slow, exact path for the few tensors whose values must follow a
pattern (Gaussian routers and embeddings, norms of ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QType


def _uniform_std(levels: int) -> float:
    """Standard deviation of a quant value drawn uniformly from `levels` consecutive integers."""
    return math.sqrt((levels * levels - 1) / 12.0)


@dataclass(frozen=True)
class _Blocks:
    """Where a block format keeps its scales, and what a uniform quant is worth.

    Values are d * (q - centre) (or d * q + m): with q uniform over `levels` integers their
    spread is level_std * d, so d = std / level_std.
    """

    levels: int
    d_at: int                          # byte offset of the f16 scale d
    sign: bool = False                 # random sign of d per block: zero mean for q - centre
    min_at: Optional[int] = None       # byte offset of an f16 offset: m (Q4_1/Q5_1) or dmin (Q4_K)
    min_factor: float = 0.0            # that offset is min_factor * d
    fixed: Tuple[Tuple[int, bytes], ...] = ()  # bytes written as is (K-quant sub-block scales)
    sign_bytes: Optional[Tuple[int, int]] = None  # (offset, count) of int8 sub-scales set to +-1

    @property
    def level_std(self) -> float:
        return _uniform_std(self.levels)


_BLOCKS: Dict[QType, _Blocks] = {
    QType.Q8_0: _Blocks(levels=256, d_at=0, sign=True),
    QType.Q5_0: _Blocks(levels=32, d_at=0, sign=True),
    QType.Q4_0: _Blocks(levels=16, d_at=0, sign=True),
    # d * q + m with q in 0..15 (0..31): m = -7.5 d (-15.5 d) centres it
    QType.Q4_1: _Blocks(levels=16, d_at=0, min_at=2, min_factor=-7.5),
    QType.Q5_1: _Blocks(levels=32, d_at=0, min_at=2, min_factor=-15.5),
    # Q4_K: d * sc * q - dmin * m per 32-value sub-block; all 6-bit sc and m are 1 (the 12
    # packed bytes below), dmin = 7.5 d centres q in 0..15
    QType.Q4_K: _Blocks(levels=16, d_at=0, min_at=2, min_factor=7.5,
                        fixed=((4, bytes([1, 1, 1, 1, 1, 1, 1, 1, 0x11, 0x11, 0x11, 0x11])),)),
    # Q6_K: d * sc * (q - 32) per 16-value sub-block, d at the end; sc = +-1 at random
    QType.Q6_K: _Blocks(levels=64, d_at=208, sign_bytes=(192, 16)),
}

FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
# Types random_rows can produce, and the subset encode_rows can encode exactly
# (gguf.quants has no K-quant encoder).
RANDOM_TYPES = FLOAT_TYPES + tuple(_BLOCKS)
ENCODE_TYPES = FLOAT_TYPES + (QType.Q8_0, QType.Q5_0, QType.Q5_1, QType.Q4_0, QType.Q4_1)


def block_size(qtype: QType) -> int:
    """Elements per block: every row length must be a multiple of it."""
    return gguf.GGML_QUANT_SIZES[qtype][0]


def row_bytes(qtype: QType, ne0: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return ne0 // block * size


def _random_bytes(bitgen: np.random.BitGenerator, n: int) -> np.ndarray:
    words = bitgen.random_raw((n + 7) // 8)
    # little-endian bytes on every platform, so the file does not depend on the host
    return words.astype("<u8", copy=False).view(np.uint8)[:n]


def _f16_bytes(value: float) -> Tuple[int, int]:
    raw = np.array([value], dtype="<f2").view(np.uint8)
    return int(raw[0]), int(raw[1])


def random_rows(qtype: QType, n_rows: int, ne0: int, std: float,
                bitgen: np.random.BitGenerator) -> np.ndarray:
    """`n_rows` rows of `ne0` random values of type `qtype`, mean 0 and standard deviation
    `std` once dequantized, as a C-contiguous array of the file's bytes.

    Values are uniform (float types) or uniform quants with a per-block scale.
    """
    n = n_rows * ne0
    if qtype == QType.F16:
        ints = _random_bytes(bitgen, 2 * n).view("<i2")
        vals = ints.astype(np.float32)
        vals *= np.float32(std / (65536 / math.sqrt(12)))
        return vals.astype("<f2").reshape(n_rows, ne0)
    if qtype in (QType.F32, QType.BF16):
        ints = _random_bytes(bitgen, 4 * n).view("<i4")
        vals = ints.astype(np.float32)
        vals *= np.float32(std / (2.0 ** 32 / math.sqrt(12)))
        if qtype == QType.F32:
            return vals.astype("<f4", copy=False).reshape(n_rows, ne0)
        # bf16 is the upper half of an f32 (truncated: the bias is far below the spread)
        return (vals.astype("<f4", copy=False).view("<u4") >> 16).astype("<u2").reshape(n_rows, ne0)

    fmt = _BLOCKS.get(qtype)
    if fmt is None:
        raise ValueError(f"no random generator for type {qtype.name}")
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = n // block
    raw = _random_bytes(bitgen, n_blocks * size).reshape(n_blocks, size)
    d = std / fmt.level_std
    lo, hi = _f16_bytes(d)
    raw[:, fmt.d_at] = lo
    if fmt.sign:
        # d > 0, so its top bit is free: keep the random bit there as the block's sign
        raw[:, fmt.d_at + 1] &= 0x80
        raw[:, fmt.d_at + 1] |= hi
    else:
        raw[:, fmt.d_at + 1] = hi
    if fmt.min_at is not None:
        mlo, mhi = _f16_bytes(fmt.min_factor * float(np.float16(d)))
        raw[:, fmt.min_at] = mlo
        raw[:, fmt.min_at + 1] = mhi
    for offset, value in fmt.fixed:
        raw[:, offset:offset + len(value)] = np.frombuffer(value, dtype=np.uint8)
    if fmt.sign_bytes is not None:
        at, count = fmt.sign_bytes
        part = raw[:, at:at + count]
        raw[:, at:at + count] = np.where(part & 1, np.uint8(1), np.uint8(0xFF))
    return raw.reshape(n_rows, -1)


def encode_rows(qtype: QType, data: np.ndarray) -> np.ndarray:
    """Encodes float32 rows exactly as llama.cpp's reference quantizers would (gguf.quants)."""
    if qtype == QType.F32:
        return np.ascontiguousarray(data, dtype="<f4")
    if qtype == QType.F16:
        return data.astype("<f2")
    if qtype not in ENCODE_TYPES:
        raise ValueError(f"cannot encode floats as {qtype.name}")
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)
