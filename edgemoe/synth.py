"""Writes small random-weight GGUF models, deterministically, for tests and the default model.

Architectures: `qwen3moe`, `qwen2moe` (routed + shared experts), `olmoe`, and the dense
`qwen3` and `llama`. Tensor names and hyperparameter keys are the ones llama.cpp's loader
expects for each; the tokenizer (every `tokenizer.*` key) is copied from a vocab GGUF such as
llama.cpp's `models/ggml-vocab-qwen2.gguf`.

Each tensor is drawn from its own generator, seeded by (seed, tensor name), and written as
soon as it is drawn, so memory stays at one tensor however large the model. The file is
written under a temporary name in the target directory and renamed when complete.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
import struct
import zlib
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QType
from gguf import Keys, MODEL_TENSOR, TENSOR_NAMES

from edgemoe.files import discard, publish, temp_beside

MOE_ARCHS = ("qwen3moe", "qwen2moe", "olmoe")
DENSE_ARCHS = ("qwen3", "llama")
ARCHS = MOE_ARCHS + DENSE_ARCHS

# the shared embedding component that carries router_skew (RMS norm keeps it near this size)
_EMBD_OFFSET = 4.0

_TYPES = {"F32": QType.F32, "F16": QType.F16, "Q8_0": QType.Q8_0, "Q4_0": QType.Q4_0}


@dataclass(frozen=True)
class SynthConfig:
    """Shape and encoding of a synthetic model.

    Args:
        arch: one of ARCHS.
        n_ff: FFN width of dense layers; for qwen2moe, the shared expert's width.
        n_ff_exp: width of one routed expert.
        expert_type: ggml type of the `*_exps` tensors (F32, F16, Q8_0, Q4_0).
        weight_type: ggml type of the other matrices (attention, router, shared expert).
        embd_type: ggml type of token_embd and output.
        tie_output: omit `output.weight` (llama.cpp then reuses token_embd; qwen3* and llama only).
        vocab: path of a vocab GGUF whose tokenizer is copied.
        alignment: GGUF data alignment (32 is llama.cpp's default; 4096 aligns expert slices
            for O_DIRECT when a slice is a multiple of 4 KiB).
        router_skew: 0 routes near uniformly. Above 0, every token embedding gets a constant
            component in dimension 0 and each router a per-expert weight on it, so that each
            layer favours some experts, with a bias of this standard deviation in logit units,
            as trained models (and some random initialisations) do.
    """

    arch: str = "qwen3moe"
    vocab: Union[str, os.PathLike] = ""
    n_layer: int = 2
    n_embd: int = 64
    n_ff: int = 128
    n_ff_exp: int = 64
    n_expert: int = 8
    n_expert_used: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ctx_train: int = 4096
    expert_type: str = "F16"
    weight_type: str = "F32"
    embd_type: str = "F16"
    tie_output: bool = False
    seed: int = 0
    alignment: int = 32
    name: str = "edgemoe-synthetic"
    router_skew: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_moe(self) -> bool:
        return self.arch in MOE_ARCHS

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {', '.join(ARCHS)}")
        if not self.vocab:
            raise ValueError("vocab: path of a vocab GGUF is required")
        for key in ("expert_type", "weight_type", "embd_type"):
            if getattr(self, key) not in _TYPES:
                raise ValueError(f"{key} must be one of {', '.join(_TYPES)}")
        if self.n_embd % self.n_head or self.head_dim % 2:
            raise ValueError("n_embd must be a multiple of n_head, with an even head size (RoPE)")
        if self.n_head % self.n_head_kv:
            raise ValueError("n_head must be a multiple of n_head_kv")
        if self.arch == "olmoe" and self.n_head_kv != self.n_head:
            # olmoe's k_norm spans n_embd, so K must be as wide as Q
            raise ValueError("olmoe needs n_head_kv == n_head")
        if self.is_moe and not 0 < self.n_expert_used <= self.n_expert:
            raise ValueError("need 0 < n_expert_used <= n_expert")
        if self.tie_output and self.arch not in ("qwen3moe", "qwen3", "llama"):
            raise ValueError(f"{self.arch} requires output.weight; tie_output is not possible")
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise ValueError("alignment must be a power of two")
        quant = [getattr(self, k) for k in ("expert_type", "weight_type", "embd_type")]
        if any(t.startswith("Q") for t in quant):
            # every row length (ne0) must hold whole 32-element blocks
            for width in (self.n_embd, self.n_ff, self.n_ff_exp):
                if width % 32:
                    raise ValueError("quantized types need n_embd, n_ff and n_ff_exp multiples of 32")


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    ne: Tuple[int, ...]  # ggml order: ne[0] is the row length
    qtype: QType
    init: str            # "normal", "ones", or "normal+offset0" / "normal+skew0" (router_skew)
    scale: float = 1.0
    extra: float = 0.0   # router_skew / _EMBD_OFFSET for "normal+skew0"

    @property
    def np_shape(self) -> Tuple[int, ...]:
        return tuple(reversed(self.ne))

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.ne) // block * size


@dataclass(frozen=True)
class SynthResult:
    path: pathlib.Path
    n_vocab: int
    expert_bytes: int
    non_expert_bytes: int
    tensors: List[str] = field(default_factory=list)


# GGUF value types -> struct format of a scalar (8: string, 9: array)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _read_metadata(path: str) -> Iterator[Tuple[str, object, int, Optional[int]]]:
    """Yields (key, value, type, array element type) of a GGUF's key-value section.

    A direct reader: gguf.GGUFReader takes seconds on a 150k-token vocab, this a fraction.
    """
    data = pathlib.Path(path).read_bytes()
    if data[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    version, _, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported")
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        return data[pos - n:pos].decode("utf-8")

    def scalar(vtype: int):
        nonlocal pos
        fmt = "<" + _SCALAR[vtype]
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v

    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vtype == 8:
            yield key, string(), vtype, None
        elif vtype == 9:
            sub, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if sub == 8:
                value = [string() for _ in range(n)]
            else:
                fmt = "<" + _SCALAR[sub]
                size = struct.calcsize(fmt)
                value = np.frombuffer(data, dtype=np.dtype(fmt), count=n, offset=pos).tolist()
                pos += n * size
            yield key, value, vtype, sub
        else:
            yield key, scalar(vtype), vtype, None


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(vocab_path: str) -> Tuple[Tuple[str, object, gguf.GGUFValueType, Optional[gguf.GGUFValueType]], ...]:
    """Every tokenizer.* key of a vocab GGUF as (key, value, type, array element type)."""
    out = []
    for key, value, vtype, sub in _read_metadata(vocab_path):
        if key.startswith("tokenizer."):
            out.append((key, value, gguf.GGUFValueType(vtype),
                        gguf.GGUFValueType(sub) if sub is not None else None))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in out):
        raise ValueError(f"{vocab_path} has no tokenizer.ggml.tokens")
    return tuple(out)


def _n_vocab(fields) -> int:
    return next(len(v) for k, v, *_ in fields if k == "tokenizer.ggml.tokens")


def _name(tensor: MODEL_TENSOR, bid: Optional[int] = None) -> str:
    base = TENSOR_NAMES[tensor]
    return (base.format(bid=bid) if bid is not None else base) + ".weight"


def _tensor_specs(cfg: SynthConfig, n_vocab: int) -> Iterator[_TensorSpec]:
    wt, et, xt = _TYPES[cfg.weight_type], _TYPES[cfg.embd_type], _TYPES[cfg.expert_type]
    E, F, Fx, X = cfg.n_embd, cfg.n_ff, cfg.n_ff_exp, cfg.n_expert
    hd = cfg.head_dim
    q_dim, kv_dim = hd * cfg.n_head, hd * cfg.n_head_kv
    f32 = QType.F32
    T = MODEL_TENSOR

    def proj(name, n_in, n_out, qtype=wt, gain=0.5):
        # variance 1/n_in keeps activations O(1) through the residual stream
        return _TensorSpec(name, (n_in, n_out), qtype, "normal", gain / math.sqrt(n_in))

    # embeddings are RMS-normed before use, so their scale only sets the residual mix
    skew = cfg.router_skew > 0
    yield _TensorSpec(_name(T.TOKEN_EMBD), (E, n_vocab), et, "normal+offset0" if skew else "normal", 1.0)
    yield _TensorSpec(_name(T.OUTPUT_NORM), (E,), f32, "ones")
    if not cfg.tie_output:
        # logit std about 2: peaked enough to generate words, far from overflow
        yield proj(_name(T.OUTPUT), E, n_vocab, et, gain=2.0)

    for i in range(cfg.n_layer):
        yield _TensorSpec(_name(T.ATTN_NORM, i), (E,), f32, "ones")
        yield proj(_name(T.ATTN_Q, i), E, q_dim)
        yield proj(_name(T.ATTN_K, i), E, kv_dim)
        yield proj(_name(T.ATTN_V, i), E, kv_dim)
        yield proj(_name(T.ATTN_OUT, i), q_dim, E)
        if cfg.arch in ("qwen3moe", "qwen3"):
            yield _TensorSpec(_name(T.ATTN_Q_NORM, i), (hd,), f32, "ones")
            yield _TensorSpec(_name(T.ATTN_K_NORM, i), (hd,), f32, "ones")
        elif cfg.arch == "olmoe":
            yield _TensorSpec(_name(T.ATTN_Q_NORM, i), (E,), f32, "ones")
            yield _TensorSpec(_name(T.ATTN_K_NORM, i), (E,), f32, "ones")
        yield _TensorSpec(_name(T.FFN_NORM, i), (E,), f32, "ones")

        if not cfg.is_moe:
            yield proj(_name(T.FFN_GATE, i), E, F)
            yield proj(_name(T.FFN_UP, i), E, F)
            yield proj(_name(T.FFN_DOWN, i), F, E)
            continue

        # router logits with std about 3 so that top-k varies from token to token
        router = proj(_name(T.FFN_GATE_INP, i), E, X, wt, gain=3.0)
        if skew:
            router = _TensorSpec(router.name, router.ne, router.qtype, "normal+skew0", router.scale,
                                 cfg.router_skew / _EMBD_OFFSET)
        yield router
        yield _TensorSpec(_name(T.FFN_GATE_EXP, i), (E, Fx, X), xt, "normal", 0.5 / math.sqrt(E))
        yield _TensorSpec(_name(T.FFN_DOWN_EXP, i), (Fx, E, X), xt, "normal", 0.5 / math.sqrt(Fx))
        yield _TensorSpec(_name(T.FFN_UP_EXP, i), (E, Fx, X), xt, "normal", 0.5 / math.sqrt(E))
        if cfg.arch == "qwen2moe":
            yield _TensorSpec(_name(T.FFN_GATE_INP_SHEXP, i), (E,), f32, "normal", 1.0 / math.sqrt(E))
            yield proj(_name(T.FFN_GATE_SHEXP, i), E, F)
            yield proj(_name(T.FFN_UP_SHEXP, i), E, F)
            yield proj(_name(T.FFN_DOWN_SHEXP, i), F, E)


def _draw(spec: _TensorSpec, seed: int) -> np.ndarray:
    if spec.init == "ones":
        data = np.ones(spec.np_shape, dtype=np.float32)
    else:
        rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
        data = rng.standard_normal(spec.np_shape, dtype=np.float32)
        data *= np.float32(spec.scale)
        if spec.init == "normal+offset0":
            data[:, 0] = _EMBD_OFFSET  # rows are tokens: a component every token shares
        elif spec.init == "normal+skew0":
            data[:, 0] = rng.standard_normal(data.shape[0], dtype=np.float32) * np.float32(spec.extra)
    if spec.qtype == QType.F32:
        return data
    if spec.qtype == QType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, spec.qtype)


def _add_hparams(w: gguf.GGUFWriter, cfg: SynthConfig) -> None:
    a = cfg.arch
    L = Keys.LLM
    A = Keys.Attention
    w.add_name(cfg.name)
    w.add_uint32(L.CONTEXT_LENGTH.format(arch=a), cfg.n_ctx_train)
    w.add_uint32(L.EMBEDDING_LENGTH.format(arch=a), cfg.n_embd)
    w.add_uint32(L.BLOCK_COUNT.format(arch=a), cfg.n_layer)
    w.add_uint32(A.HEAD_COUNT.format(arch=a), cfg.n_head)
    w.add_uint32(A.HEAD_COUNT_KV.format(arch=a), cfg.n_head_kv)
    w.add_float32(A.LAYERNORM_RMS_EPS.format(arch=a), 1e-6)
    w.add_float32(Keys.Rope.FREQ_BASE.format(arch=a), 1_000_000.0)
    w.add_uint32(Keys.Rope.DIMENSION_COUNT.format(arch=a), cfg.head_dim)
    if a == "olmoe":
        # olmoe reads the expert width from feed_forward_length
        w.add_uint32(L.FEED_FORWARD_LENGTH.format(arch=a), cfg.n_ff_exp)
    else:
        w.add_uint32(L.FEED_FORWARD_LENGTH.format(arch=a), cfg.n_ff)
    if cfg.is_moe:
        w.add_uint32(L.EXPERT_COUNT.format(arch=a), cfg.n_expert)
        w.add_uint32(L.EXPERT_USED_COUNT.format(arch=a), cfg.n_expert_used)
        if a != "olmoe":
            w.add_uint32(L.EXPERT_FEED_FORWARD_LENGTH.format(arch=a), cfg.n_ff_exp)
        if a == "qwen2moe":
            w.add_uint32(L.EXPERT_SHARED_FEED_FORWARD_LENGTH.format(arch=a), cfg.n_ff)
    if cfg.alignment != 32:
        w.add_custom_alignment(cfg.alignment)


def write_model(path: Union[str, os.PathLike], cfg: SynthConfig) -> SynthResult:
    """Writes the model described by `cfg` to `path` (atomically: temp file, then rename).

    The same config always yields the same bytes.
    """
    cfg.validate()
    path = pathlib.Path(path)
    fields = _tokenizer_fields(str(cfg.vocab))
    n_vocab = _n_vocab(fields)
    specs = list(_tensor_specs(cfg, n_vocab))

    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, cfg.arch)
        w.data_alignment = cfg.alignment
        _add_hparams(w, cfg)
        for key, value, vtype, sub in fields:
            w.add_key_value(key, value, vtype, sub_type=sub)
        for s in specs:
            # element shape (numpy order) plus raw type: the writer derives the file shape
            w.add_tensor_info(s.name, s.np_shape, np.dtype(np.float32), s.nbytes, raw_dtype=s.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for s in specs:
            w.write_tensor_data(_draw(s, cfg.seed))
        w.flush()
        os.fsync(w.fout[0].fileno())
        w.close()
        publish(tmp, path)
    except BaseException:
        discard(tmp)
        raise

    expert = sum(s.nbytes for s in specs if s.name.endswith("_exps.weight"))
    return SynthResult(
        path=path,
        n_vocab=n_vocab,
        expert_bytes=expert,
        non_expert_bytes=sum(s.nbytes for s in specs) - expert,
        tensors=[s.name for s in specs],
    )
