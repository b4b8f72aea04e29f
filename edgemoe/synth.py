"""Writes random-weight GGUF models, deterministically and fast, for tests, benchmarks and
the default model.

Architectures: `qwen3moe`, `qwen2moe` (routed + one gated shared expert), `olmoe`,
`deepseek2` (MLA attention, leading dense layers, shared experts), `llama` with experts
(Mixtral's layout: `moe=True`), and the dense `qwen3` and `llama`. Tensor names and
hyperparameter keys are the ones llama.cpp's loader expects for each; the tokenizer (every
`tokenizer.*` key) is copied from a vocab GGUF such as llama.cpp's
`models/ggml-vocab-qwen2.gguf`.

Every tensor is cut into chunks of whole rows (about 4 MiB each, a function of the tensor's
shape only); each chunk is drawn by its own generator, seeded by (seed, tensor name, chunk
index), so the bytes do not depend on the number of threads. Chunks are produced by a pool
of threads and written in order as they complete, so memory stays at a few chunks however
large the model. Matrices get uniform random values or random quant blocks of the scaled
(1/sqrt(fan-in)) standard deviation (edgemoe.synth_fill); routers and token embeddings keep
Gaussian values, whose tails shape the routing. The file is written under a temporary name
beside the target and renamed when complete.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import math
import os
import pathlib
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple, Union

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QType
from gguf import Keys, MODEL_TENSOR, TENSOR_NAMES

from edgemoe.cpus import default_threads
from edgemoe.files import discard, publish, temp_beside
from edgemoe.gguf_header import read_header
from edgemoe.synth_fill import (ENCODE_TYPES, RANDOM_TYPES, block_size, encode_rows, random_rows,
                                row_bytes)
from edgemoe.version import stamp_gguf

MOE_ARCHS = ("qwen3moe", "qwen2moe", "olmoe", "deepseek2")
DENSE_ARCHS = ("qwen3", "llama")
ARCHS = MOE_ARCHS + DENSE_ARCHS
# archs whose attention is as wide as the model (wq is n_embd x n_embd in llama.cpp)
_TIED_HEAD_ARCHS = ("qwen2moe", "olmoe")

# the shared embedding component that carries router_skew (RMS norm keeps it near this size)
_EMBD_OFFSET = 4.0

TYPES = {t.name: t for t in RANDOM_TYPES}
# types that can also hold Gaussian data (routers, embeddings): gguf.quants has no K-quant encoder
EXACT_TYPES = {t.name: t for t in ENCODE_TYPES}

_CHUNK_BYTES = 4 << 20

_GATING_SOFTMAX = 1  # llama_expert_gating_func_type


@dataclass(frozen=True)
class SynthConfig:
    """Shape and encoding of a synthetic model.

    Args:
        arch: one of ARCHS (the llama.cpp architecture written to the file).
        moe: None lets the arch decide (qwen3 and llama dense, the others MoE); True gives
            `llama` routed experts (Mixtral's layout).
        n_ff: FFN width of dense layers; for qwen2moe, the shared expert's width.
        n_ff_exp: width of one routed expert (and of each deepseek2 shared expert).
        head_dim: query/key head size; 0 means n_embd // n_head. For deepseek2 the MLA head
            size (no-RoPE part + RoPE part).
        rope_dim: rotated dimensions per head; 0 means head_dim (deepseek2: the RoPE part).
        v_head_dim: deepseek2's value head size; 0 means head_dim.
        kv_lora_rank: deepseek2's compressed KV width (MLA).
        n_dense_lead: deepseek2's leading layers with a dense FFN instead of experts.
        n_expert_shared: deepseek2's always-on experts (width n_ff_exp each).
        attn_bias: Q/K/V biases (Qwen1.5's attention has them).
        expert_type: ggml type of the `*_exps` tensors (see TYPES).
        weight_type: ggml type of the other matrices (attention, shared experts, dense FFN).
        router_type: ggml type of the routers (`ffn_gate_inp`); "" means weight_type.
        embd_type: ggml type of token_embd and output.
        tie_output: omit `output.weight` (llama.cpp then reuses token_embd).
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
    moe: Optional[bool] = None
    head_dim: int = 0
    rope_dim: int = 0
    v_head_dim: int = 0
    kv_lora_rank: int = 0
    n_dense_lead: int = 0
    n_expert_shared: int = 0
    attn_bias: bool = False
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6
    expert_type: str = "F16"
    weight_type: str = "F32"
    router_type: str = ""
    embd_type: str = "F16"
    tie_output: bool = False
    seed: int = 0
    alignment: int = 32
    name: str = "edgemoe-synthetic"
    router_skew: float = 0.0

    @property
    def is_moe(self) -> bool:
        return self.moe if self.moe is not None else self.arch in MOE_ARCHS

    @property
    def n_embd_head(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def n_rot(self) -> int:
        return self.rope_dim or self.n_embd_head

    @property
    def n_embd_head_v(self) -> int:
        return self.v_head_dim or self.n_embd_head

    @property
    def router_qtype(self) -> str:
        return self.router_type or self.weight_type

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {', '.join(ARCHS)}")
        if self.moe is not None and self.moe != (self.arch in MOE_ARCHS) and self.arch != "llama":
            raise ValueError(f"{self.arch} is {'an MoE' if self.arch in MOE_ARCHS else 'a dense'} architecture; "
                             f"moe={self.moe} is only for llama")
        if not self.vocab:
            raise ValueError("vocab: path of a vocab GGUF is required")
        for key in ("expert_type", "weight_type"):
            if getattr(self, key) not in TYPES:
                raise ValueError(f"{key} must be one of {', '.join(TYPES)}")
        for key, value in (("router_type", self.router_qtype), ("embd_type", self.embd_type)):
            if value not in EXACT_TYPES:
                raise ValueError(f"{key} must be one of {', '.join(EXACT_TYPES)}")
        for key in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ctx_train"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        if not self.head_dim and self.n_embd % self.n_head:
            raise ValueError("n_embd must be a multiple of n_head (or give head_dim)")
        if self.n_embd_head <= 0 or self.n_rot % 2 or self.n_rot > self.n_embd_head:
            raise ValueError("RoPE needs an even rope_dim no larger than the head size")
        if self.n_head % self.n_head_kv:
            raise ValueError("n_head must be a multiple of n_head_kv")
        if self.arch in _TIED_HEAD_ARCHS and self.n_embd_head * self.n_head != self.n_embd:
            raise ValueError(f"{self.arch} needs n_head * head_dim == n_embd")
        if self.arch == "olmoe" and self.n_head_kv != self.n_head:
            # olmoe's k_norm spans n_embd, so K must be as wide as Q
            raise ValueError("olmoe needs n_head_kv == n_head")
        if self.arch == "llama" and self.n_rot != self.n_embd_head:
            raise ValueError("llama rotates whole heads: rope_dim must equal head_dim")
        if self.arch == "deepseek2":
            if self.kv_lora_rank <= 0:
                raise ValueError("deepseek2 needs kv_lora_rank > 0")
            if self.n_rot >= self.n_embd_head:
                raise ValueError("deepseek2 needs head_dim > rope_dim (a no-RoPE part)")
            if not 0 <= self.n_dense_lead < self.n_layer:
                raise ValueError("deepseek2 needs 0 <= n_dense_lead < n_layer (at least one MoE layer)")
        elif self.kv_lora_rank or self.n_dense_lead or self.n_expert_shared or self.v_head_dim:
            raise ValueError("kv_lora_rank, n_dense_lead, n_expert_shared and v_head_dim are for deepseek2 only")
        if self.is_moe:
            if not 0 < self.n_expert_used <= self.n_expert:
                raise ValueError("need 0 < n_expert_used <= n_expert")
            if self.n_ff_exp <= 0:
                raise ValueError("n_ff_exp must be positive")
        if self.n_ff <= 0 and (not self.is_moe or self.arch == "qwen2moe" or self.n_dense_lead):
            raise ValueError("n_ff must be positive")
        if self.tie_output and self.arch not in ("qwen3moe", "qwen3", "llama", "deepseek2"):
            raise ValueError(f"{self.arch} requires output.weight; tie_output is not possible")
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise ValueError("alignment must be a power of two")


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    ne: Tuple[int, ...]  # ggml order: ne[0] is the row length
    qtype: QType
    # "random": uniform values / random quants (fast); "normal": Gaussian; "ones";
    # "normal+offset0" / "normal+skew0": Gaussian with a router_skew column (see SynthConfig)
    init: str
    scale: float = 1.0   # standard deviation
    extra: float = 0.0   # router_skew / _EMBD_OFFSET for "normal+skew0"

    @property
    def n_rows(self) -> int:
        return math.prod(self.ne[1:])

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.qtype, self.ne[0])

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.row_bytes

    @property
    def rows_per_chunk(self) -> int:
        return max(1, _CHUNK_BYTES // self.row_bytes)


@dataclass(frozen=True)
class SynthResult:
    path: pathlib.Path
    n_vocab: int
    expert_bytes: int
    non_expert_bytes: int
    tensors: List[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.expert_bytes + self.non_expert_bytes


_Field = Tuple[str, object, gguf.GGUFValueType, Optional[gguf.GGUFValueType]]


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(vocab_path: str) -> Tuple[_Field, ...]:
    """Every tokenizer.* key of a vocab GGUF as (key, value, type, array element type)."""
    header = read_header(vocab_path)
    out = []
    for key, value in header.kv.items():
        if key.startswith("tokenizer."):
            vtype, sub = header.kv_types[key]
            out.append((key, value, gguf.GGUFValueType(vtype),
                        gguf.GGUFValueType(sub) if sub is not None else None))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in out):
        raise ValueError(f"{vocab_path} has no tokenizer.ggml.tokens")
    return tuple(out)


def _n_vocab(fields) -> int:
    return next(len(v) for k, v, *_ in fields if k == "tokenizer.ggml.tokens")


def _name(tensor: MODEL_TENSOR, bid: Optional[int] = None, suffix: str = "weight") -> str:
    base = TENSOR_NAMES[tensor]
    return (base.format(bid=bid) if bid is not None else base) + "." + suffix


def _tensor_specs(cfg: SynthConfig, n_vocab: int) -> Iterator[_TensorSpec]:
    wt, et, xt = TYPES[cfg.weight_type], TYPES[cfg.embd_type], TYPES[cfg.expert_type]
    rt = TYPES[cfg.router_qtype]
    E, F, Fx, X = cfg.n_embd, cfg.n_ff, cfg.n_ff_exp, cfg.n_expert
    hd = cfg.n_embd_head
    q_dim, kv_dim = hd * cfg.n_head, hd * cfg.n_head_kv
    f32 = QType.F32
    T = MODEL_TENSOR

    def proj(name, n_in, n_out, qtype=wt, gain=0.5, ne2=None):
        # std gain/sqrt(n_in) keeps activations O(1) through the residual stream
        ne = (n_in, n_out) if ne2 is None else (n_in, n_out, ne2)
        return _TensorSpec(name, ne, qtype, "random", gain / math.sqrt(n_in))

    def norm(name, n):
        return _TensorSpec(name, (n,), f32, "ones")

    # embeddings are RMS-normed before use, so their scale only sets the residual mix
    skew = cfg.router_skew > 0
    yield _TensorSpec(_name(T.TOKEN_EMBD), (E, n_vocab), et, "normal+offset0" if skew else "normal", 1.0)
    yield norm(_name(T.OUTPUT_NORM), E)
    if not cfg.tie_output:
        # logit std about 2: peaked enough to generate words, far from overflow
        yield proj(_name(T.OUTPUT), E, n_vocab, et, gain=2.0)

    for i in range(cfg.n_layer):
        yield norm(_name(T.ATTN_NORM, i), E)
        if cfg.arch == "deepseek2":
            yield from _mla_specs(cfg, i, proj, norm)
        else:
            yield proj(_name(T.ATTN_Q, i), E, q_dim)
            yield proj(_name(T.ATTN_K, i), E, kv_dim)
            yield proj(_name(T.ATTN_V, i), E, kv_dim)
            if cfg.attn_bias:
                for t, n in ((T.ATTN_Q, q_dim), (T.ATTN_K, kv_dim), (T.ATTN_V, kv_dim)):
                    yield _TensorSpec(_name(t, i, "bias"), (n,), f32, "random", 0.1)
            yield proj(_name(T.ATTN_OUT, i), q_dim, E)
        if cfg.arch in ("qwen3moe", "qwen3"):
            yield norm(_name(T.ATTN_Q_NORM, i), hd)
            yield norm(_name(T.ATTN_K_NORM, i), hd)
        elif cfg.arch == "olmoe":
            yield norm(_name(T.ATTN_Q_NORM, i), E)
            yield norm(_name(T.ATTN_K_NORM, i), E)
        yield norm(_name(T.FFN_NORM, i), E)

        if not cfg.is_moe or i < cfg.n_dense_lead:
            yield proj(_name(T.FFN_GATE, i), E, F)
            yield proj(_name(T.FFN_UP, i), E, F)
            yield proj(_name(T.FFN_DOWN, i), F, E)
            continue

        # router logits with std about 3 so that top-k varies from token to token
        router = _TensorSpec(_name(T.FFN_GATE_INP, i), (E, X), rt, "normal", 3.0 / math.sqrt(E))
        if skew:
            router = _TensorSpec(router.name, router.ne, router.qtype, "normal+skew0", router.scale,
                                 cfg.router_skew / _EMBD_OFFSET)
        yield router
        yield proj(_name(T.FFN_GATE_EXP, i), E, Fx, xt, ne2=X)
        yield proj(_name(T.FFN_DOWN_EXP, i), Fx, E, xt, ne2=X)
        yield proj(_name(T.FFN_UP_EXP, i), E, Fx, xt, ne2=X)
        shared = F if cfg.arch == "qwen2moe" else Fx * cfg.n_expert_shared
        if cfg.arch == "qwen2moe":
            yield _TensorSpec(_name(T.FFN_GATE_INP_SHEXP, i), (E,), f32, "normal", 1.0 / math.sqrt(E))
        if shared:
            yield proj(_name(T.FFN_GATE_SHEXP, i), E, shared)
            yield proj(_name(T.FFN_UP_SHEXP, i), E, shared)
            yield proj(_name(T.FFN_DOWN_SHEXP, i), shared, E)


def _mla_specs(cfg: SynthConfig, i: int, proj, norm) -> Iterator[_TensorSpec]:
    """DeepSeek-V2(-Lite) attention as llama.cpp stores it: no query compression (Lite),
    the KV compression with its RoPE part, and kv_b split into per-head k_b and v_b."""
    T = MODEL_TENSOR
    E, H, r = cfg.n_embd, cfg.n_head, cfg.kv_lora_rank
    nope = cfg.n_embd_head - cfg.n_rot
    yield proj(_name(T.ATTN_Q, i), E, H * cfg.n_embd_head)
    yield proj(_name(T.ATTN_KV_A_MQA, i), E, r + cfg.n_rot)
    yield norm(_name(T.ATTN_KV_A_NORM, i), r)
    yield proj(_name(T.ATTN_K_B, i), nope, r, ne2=H)
    yield proj(_name(T.ATTN_V_B, i), r, cfg.n_embd_head_v, ne2=H)
    yield proj(_name(T.ATTN_OUT, i), H * cfg.n_embd_head_v, E)


def _check_rows(specs: List[_TensorSpec]) -> None:
    for s in specs:
        block = block_size(s.qtype)
        if s.ne[0] % block:
            raise ValueError(f"{s.name}: rows of {s.ne[0]} values do not hold whole {s.qtype.name} "
                             f"blocks of {block}; choose widths that are multiples of {block} or another type")


def _draw_chunk(spec: _TensorSpec, seed: int, index: int) -> np.ndarray:
    """Rows [index * rows_per_chunk, ...) of one tensor, as the file's bytes."""
    row0 = index * spec.rows_per_chunk
    n_rows = min(spec.rows_per_chunk, spec.n_rows - row0)
    ne0 = spec.ne[0]
    if spec.init == "ones":
        return encode_rows(spec.qtype, np.ones((n_rows, ne0), dtype=np.float32))
    bitgen = np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(spec.name.encode()), index]))
    if spec.init == "random":
        return random_rows(spec.qtype, n_rows, ne0, spec.scale, bitgen)
    rng = np.random.Generator(bitgen)
    data = rng.standard_normal((n_rows, ne0), dtype=np.float32)
    data *= np.float32(spec.scale)
    if spec.init == "normal+offset0":
        data[:, 0] = _EMBD_OFFSET  # rows are tokens: a component every token shares
    elif spec.init == "normal+skew0":
        data[:, 0] = rng.standard_normal(n_rows, dtype=np.float32) * np.float32(spec.extra)  # rows are experts
    return encode_rows(spec.qtype, data)


def _add_hparams(w: gguf.GGUFWriter, cfg: SynthConfig) -> None:
    a = cfg.arch
    L = Keys.LLM
    A = Keys.Attention
    w.add_name(cfg.name)
    w.add_uint32(L.CONTEXT_LENGTH.format(arch=a), cfg.n_ctx_train)
    w.add_uint32(L.EMBEDDING_LENGTH.format(arch=a), cfg.n_embd)
    w.add_uint32(L.BLOCK_COUNT.format(arch=a), cfg.n_layer)
    w.add_uint32(A.HEAD_COUNT.format(arch=a), cfg.n_head)
    w.add_float32(A.LAYERNORM_RMS_EPS.format(arch=a), cfg.rms_eps)
    w.add_float32(Keys.Rope.FREQ_BASE.format(arch=a), cfg.rope_theta)
    w.add_uint32(Keys.Rope.DIMENSION_COUNT.format(arch=a), cfg.n_rot)
    if a == "deepseek2":
        # MLA runs as multi-query attention over the compressed KV (+ its RoPE part)
        w.add_uint32(A.HEAD_COUNT_KV.format(arch=a), 1)
        w.add_uint32(A.KEY_LENGTH.format(arch=a), cfg.kv_lora_rank + cfg.n_rot)
        w.add_uint32(A.VALUE_LENGTH.format(arch=a), cfg.kv_lora_rank)
        w.add_uint32(A.KEY_LENGTH_MLA.format(arch=a), cfg.n_embd_head)
        w.add_uint32(A.VALUE_LENGTH_MLA.format(arch=a), cfg.n_embd_head_v)
        w.add_uint32(A.KV_LORA_RANK.format(arch=a), cfg.kv_lora_rank)
        # 0: no query compression (Lite); llama.cpp reads the key unless it has 26/27 layers
        w.add_uint32(A.Q_LORA_RANK.format(arch=a), 0)
        w.add_uint32(L.LEADING_DENSE_BLOCK_COUNT.format(arch=a), cfg.n_dense_lead)
        w.add_uint32(L.EXPERT_SHARED_COUNT.format(arch=a), cfg.n_expert_shared)
        w.add_float32(L.EXPERT_WEIGHTS_SCALE.format(arch=a), 1.0)
        w.add_bool(L.EXPERT_WEIGHTS_NORM.format(arch=a), False)
        w.add_uint32(L.EXPERT_GATING_FUNC.format(arch=a), _GATING_SOFTMAX)
    else:
        w.add_uint32(A.HEAD_COUNT_KV.format(arch=a), cfg.n_head_kv)
        if cfg.head_dim and cfg.head_dim * cfg.n_head != cfg.n_embd:
            w.add_uint32(A.KEY_LENGTH.format(arch=a), cfg.n_embd_head)
            w.add_uint32(A.VALUE_LENGTH.format(arch=a), cfg.n_embd_head)
    if a == "olmoe" or (a == "llama" and cfg.is_moe):
        # these read the expert width from feed_forward_length
        w.add_uint32(L.FEED_FORWARD_LENGTH.format(arch=a), cfg.n_ff_exp)
    else:
        w.add_uint32(L.FEED_FORWARD_LENGTH.format(arch=a), cfg.n_ff)
    if cfg.is_moe:
        w.add_uint32(L.EXPERT_COUNT.format(arch=a), cfg.n_expert)
        w.add_uint32(L.EXPERT_USED_COUNT.format(arch=a), cfg.n_expert_used)
        if a in ("qwen3moe", "qwen2moe", "deepseek2"):
            w.add_uint32(L.EXPERT_FEED_FORWARD_LENGTH.format(arch=a), cfg.n_ff_exp)
        if a == "qwen2moe":
            w.add_uint32(L.EXPERT_SHARED_FEED_FORWARD_LENGTH.format(arch=a), cfg.n_ff)
    if cfg.alignment != 32:
        w.add_custom_alignment(cfg.alignment)


def plan(cfg: SynthConfig) -> Tuple[int, List[_TensorSpec]]:
    """(n_vocab, tensor specs) of the model `cfg` describes, after validating it."""
    cfg.validate()
    n_vocab = _n_vocab(_tokenizer_fields(str(cfg.vocab)))
    specs = list(_tensor_specs(cfg, n_vocab))
    _check_rows(specs)
    return n_vocab, specs


def _is_expert(name: str) -> bool:
    return name.endswith("_exps.weight")


def _chunks(specs: List[_TensorSpec], seed: int, n_threads: int) -> Iterator[Tuple[_TensorSpec, np.ndarray]]:
    """Every chunk of every tensor, in file order, drawn ahead by `n_threads` threads."""
    jobs = ((s, k) for s in specs for k in range(-(-s.n_rows // s.rows_per_chunk)))
    window = collections.deque()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="edgemoe-synth")
    try:
        for spec, k in jobs:
            window.append((spec, pool.submit(_draw_chunk, spec, seed, k)))
            # a bounded look-ahead: memory stays at a few chunks per thread
            if len(window) > 2 * n_threads:
                s, fut = window.popleft()
                yield s, fut.result()
        while window:
            s, fut = window.popleft()
            yield s, fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _pad(f, n: int, align: int) -> None:
    pad = -n % align
    if pad:
        f.write(bytes(pad))


def write_model(path: Union[str, os.PathLike], cfg: SynthConfig, n_threads: Optional[int] = None,
                progress: Optional[Callable[[int], None]] = None) -> SynthResult:
    """Writes the model described by `cfg` to `path` (atomically: temp file, then rename).

    The same config always yields the same bytes, whatever `n_threads`.

    Args:
        n_threads: threads drawing random data (default: the CPUs this process may use).
        progress: called with the number of tensor-data bytes written since the last call.
    """
    path = pathlib.Path(path)
    n_vocab, specs = plan(cfg)
    fields = _tokenizer_fields(str(cfg.vocab))
    if n_threads is None:
        n_threads = default_threads()
    n_threads = max(1, n_threads)

    fd, tmp = temp_beside(path)
    os.close(fd)
    w = None
    try:
        w = gguf.GGUFWriter(tmp, cfg.arch)
        w.data_alignment = cfg.alignment
        _add_hparams(w, cfg)
        for key, value, vtype, sub in stamp_gguf(w, fields):
            w.add_key_value(key, value, vtype, sub_type=sub)
        for s in specs:
            # element shape (numpy order) plus raw type: the writer derives the file shape
            w.add_tensor_info(s.name, tuple(reversed(s.ne)), np.dtype(np.float32), s.nbytes, raw_dtype=s.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        f = w.fout[0]
        _pad(f, f.tell(), cfg.alignment)
        # the data is written here rather than by the writer, chunk by chunk
        written = {}
        for spec, chunk in _chunks(specs, cfg.seed, n_threads):
            f.write(memoryview(chunk).cast("B"))
            done = written[spec.name] = written.get(spec.name, 0) + chunk.nbytes
            if done == spec.nbytes:
                _pad(f, done, cfg.alignment)
            if progress is not None:
                progress(chunk.nbytes)
        f.flush()
        os.fsync(f.fileno())
        w.close()
        publish(tmp, path)
    except BaseException:
        if w is not None:
            w.close()
        discard(tmp)
        raise

    expert = sum(s.nbytes for s in specs if _is_expert(s.name))
    return SynthResult(
        path=path,
        n_vocab=n_vocab,
        expert_bytes=expert,
        non_expert_bytes=sum(s.nbytes for s in specs) - expert,
        tensors=[s.name for s in specs],
    )
