"""The expert cache: an owning wrapper around libedgemoe's cache handle, and model inspection."""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from edgemoe import bindings as B
from edgemoe.budget import Budget
from edgemoe.errors import EdgemoeError, InvalidArgumentError, StateError, error_for_status


@dataclass(frozen=True)
class ModelInfo:
    """What edgemoe_model_inspect reports about a GGUF's experts."""

    n_layer: int
    n_moe_layer: int
    n_expert: int
    n_expert_used: int
    n_pools: int
    expert_bytes: int
    non_expert_bytes: int
    slot_bytes_max: int
    min_budget_bytes: int
    data_alignment: int
    slices_aligned: bool
    min_gpu_budget_bytes: int  # a GPU pool's minimum: a whole layer's experts in every pool


@dataclass(frozen=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    prefetch_wasted: int = 0
    prefetch_issued: int = 0
    bytes_read: int = 0
    read_ms: float = 0.0
    stall_ms: float = 0.0
    prefetch_cancelled: int = 0
    pred_predicted: int = 0
    pred_correct: int = 0
    pred_actual: int = 0
    steps: int = 0
    book_ms: float = 0.0
    predict_ms: float = 0.0
    convert_ms: float = 0.0  # of read_ms: repacking (host pools) or uploading (VRAM) the slots
    cpu_uses: int = 0        # hybrid: expert uses computed on the CPU (counted in misses)

    @property
    def hit_rate(self) -> Optional[float]:
        uses = self.hits + self.misses
        return self.hits / uses if uses else None

    @property
    def pred_precision(self) -> Optional[float]:
        """Share of the lookahead predictor's experts that the predicted step used."""
        return self.pred_correct / self.pred_predicted if self.pred_predicted else None

    @property
    def pred_recall(self) -> Optional[float]:
        """Share of the predicted steps' experts that the predictor named."""
        return self.pred_correct / self.pred_actual if self.pred_actual else None


@dataclass(frozen=True)
class CacheInfo:
    budget_bytes: int
    n_slots: int
    n_pools: int
    policy: str
    io: str
    prefetch: str
    pool: str = "host"          # where the slots live: host, vram or mapped
    pool_device: str = "CPU"    # the ggml device holding them
    n_repacked: int = 0         # pool tensors held in ggml's repacked layout (stock's CPU kernels)


@dataclass(frozen=True)
class GpuInfo:
    """The GPU a "gpu" pool would use (edgemoe_gpu_inspect); n_gpu == 0 on a CPU build."""

    n_gpu: int
    integrated: bool
    memory_free: int
    memory_total: int
    name: str
    description: str


def inspect_gpu() -> GpuInfo:
    out = B.edgemoe_gpu_info()
    B.check(B.edgemoe_gpu_inspect(ctypes.byref(out)))
    return GpuInfo(n_gpu=out.n_gpu, integrated=bool(out.integrated), memory_free=out.memory_free,
                   memory_total=out.memory_total, name=out.name.decode(errors="replace"),
                   description=out.description.decode(errors="replace"))


def _encode_path(path) -> bytes:
    return os.fsencode(os.fspath(path))


def inspect_model(path) -> ModelInfo:
    """Describes a GGUF's experts without loading it; a dense model has n_moe_layer == 0."""
    out = B.edgemoe_model_info()
    B.check(B.edgemoe_model_inspect(_encode_path(path), ctypes.byref(out)))
    return ModelInfo(**{name: getattr(out, name) for name, _ in B.edgemoe_model_info._fields_}
                     | {"slices_aligned": bool(out.slices_aligned)})


def _name_of(table: dict, value: int) -> str:
    return next((k for k, v in table.items() if v == value), str(value))


class ExpertCache:
    """Owns one native cache. Create it before loading the model, so a bad budget fails fast.

    Args:
        model_path: the GGUF the cache reads experts from.
        budget: bytes or a fraction of all expert bytes.
        policy: "default", "lru", "lfu" or "belady".
        io: "direct", "buffered", "mmap" or "pinned" (VRAM pools only).
        n_io_threads: 0 for the native default.
        quiet: suppress the native side's notices on stderr.
        prefetch: "off"; "lookahead": each MoE layer predicts the experts of the next
            `lookahead` layers with their routers and loads them while it computes; "auto":
            lookahead where the model's layers can be predicted (two or more MoE layers with
            routers), else off; "routes": the routes queued with set_routes / set_routes_all
            load ahead in order of first use (router-decoupled models).
        lookahead: layers ahead, 0 to 8 (0: the predictions only steer eviction).
        prefetch_top: predicted experts per token to load, the router's most likely first
            (0: half of the model's top-k).
        repack: host pools hold quantized experts repacked where ggml's CPU backend repacks the
            weight type, as llama.cpp's loader does for stock (False: llama.cpp's --no-repack).
        hybrid: a ubatch that fits in one wave computes the experts not ready in the pool on the
            CPU, from the model's mapped tensors, instead of waiting for their reads (which go on
            behind for later tokens). Exact on host pools of types the CPU does not repack; on a
            GPU the CPU's kernels round differently from CUDA's.
        pool: where the slots live and so where the expert matmuls run: "host" (the CPU),
            "gpu" (VRAM on a discrete GPU, pinned host memory read in place on an integrated
            one), "vram" or "mapped" (either, forced).
    """

    def __init__(self, model_path, budget: Budget, policy: str = "default", io: str = "direct",
                 n_io_threads: int = 0, quiet: bool = False, prefetch: str = "off", lookahead: int = 1,
                 prefetch_top: int = 0, pool: str = "host", repack: bool = True, hybrid: bool = False):
        self._handle: Optional[int] = None  # close() must work however far __init__ got
        self._attached = False
        if policy not in B.POLICIES:
            raise InvalidArgumentError(f"unknown policy {policy!r}; expected one of {', '.join(B.POLICIES)}")
        if io not in B.IO_MODES:
            raise InvalidArgumentError(f"unknown io {io!r}; expected one of {', '.join(B.IO_MODES)}")
        if prefetch not in B.PREFETCH_MODES and prefetch != "auto":
            raise InvalidArgumentError(f"unknown prefetch {prefetch!r}; expected one of auto, "
                                       f"{', '.join(B.PREFETCH_MODES)}")
        if pool not in B.POOLS:
            raise InvalidArgumentError(f"unknown pool {pool!r}; expected one of {', '.join(B.POOLS)}")
        if budget.auto:
            raise InvalidArgumentError("an auto budget is sized by the Engine (edgemoe.auto_budget); "
                                       "give ExpertCache bytes or a fraction")
        opts = B.edgemoe_default_options()
        opts.budget_bytes = budget.bytes or 0
        opts.budget_fraction = budget.fraction or 0.0
        opts.policy = B.POLICIES[policy]
        opts.io = B.IO_MODES[io]
        opts.n_io_threads = n_io_threads
        opts.quiet = quiet
        opts.prefetch = B.PREFETCH_MODES["lookahead" if prefetch == "auto" else prefetch]
        opts.lookahead = lookahead
        opts.prefetch_top = prefetch_top
        opts.pool = B.POOLS[pool]
        opts.repack = repack
        opts.hybrid = hybrid
        handle = B.edgemoe_cache_p()
        status = B.edgemoe_cache_create(_encode_path(model_path), ctypes.byref(opts), ctypes.byref(handle))
        if prefetch == "auto" and status == B.EDGEMOE_ERR_INVALID_ARG and \
                B.last_error().startswith("lookahead prefetch"):
            opts.prefetch = B.EDGEMOE_PREFETCH_OFF  # nothing to predict from: load on demand
            status = B.edgemoe_cache_create(_encode_path(model_path), ctypes.byref(opts), ctypes.byref(handle))
        B.check(status)
        self._handle = handle.value
        self._model_path = model_path

    @functools.cached_property
    def layout(self) -> ModelInfo:
        """The model's expert counts (last_routes and resident are shaped by them), read once."""
        return inspect_model(self._model_path)

    @property
    def handle(self) -> int:
        if self._handle is None:
            raise StateError("the expert cache is closed")
        return self._handle

    def attach(self, ctx) -> None:
        B.check(B.edgemoe_cache_attach(self.handle, ctx))
        self._attached = True

    def detach(self) -> None:
        if self._handle is not None and self._attached:
            B.check(B.edgemoe_cache_attach(self._handle, None))
            self._attached = False

    def info(self) -> CacheInfo:
        out = B.edgemoe_cache_info()
        B.check(B.edgemoe_cache_info_get(self.handle, ctypes.byref(out)))
        return CacheInfo(budget_bytes=out.budget_bytes, n_slots=out.n_slots, n_pools=out.n_pools,
                         policy=_name_of(B.POLICIES, out.policy), io=_name_of(B.IO_MODES, out.io),
                         prefetch=_name_of(B.PREFETCH_MODES, out.prefetch),
                         pool=_name_of(B.POOLS, out.pool), pool_device=out.pool_device.decode(errors="replace"),
                         n_repacked=out.n_repacked)

    def stats(self, layer: int = -1) -> CacheStats:
        """Totals for layer < 0; zeros for layers without experts."""
        out = B.edgemoe_stats()
        B.check(B.edgemoe_cache_stats(self.handle, layer, ctypes.byref(out)))
        return CacheStats(**{name: getattr(out, name) for name, _ in B.edgemoe_stats._fields_})

    def reset_stats(self) -> None:
        B.check(B.edgemoe_cache_reset_stats(self.handle))

    def prefetch(self, layer: int, experts) -> None:
        ids = (ctypes.c_int32 * len(experts))(*experts)
        B.check(B.edgemoe_cache_prefetch(self.handle, layer, ids, len(experts)))

    def set_routes(self, layer: int, routes) -> None:
        """routes: [n_tokens][k] expert ids for the next ubatch of one layer."""
        arr = np.ascontiguousarray(routes, dtype=np.int32)
        if arr.ndim != 2:
            raise InvalidArgumentError("routes must be a [n_tokens, k] array")
        ptr = arr.ctypes.data_as(B.int32_p)
        B.check(B.edgemoe_cache_set_routes(self.handle, layer, ptr, arr.shape[0], arr.shape[1]))

    def set_routes_all(self, routes) -> None:
        """routes: [n_tokens][n_moe_layer][k] expert ids, every MoE layer in model order; with
        prefetch "routes" they start loading at once, in order of first use."""
        arr = np.ascontiguousarray(routes, dtype=np.int32)
        if arr.ndim != 3:
            raise InvalidArgumentError("routes must be a [n_tokens, n_moe_layer, k] array")
        ptr = arr.ctypes.data_as(B.int32_p)
        B.check(B.edgemoe_cache_set_routes_all(self.handle, ptr, arr.shape[0], arr.shape[1], arr.shape[2]))

    def clear_routes(self) -> None:
        B.check(B.edgemoe_cache_clear_routes(self.handle))

    def take_fault(self) -> Optional[EdgemoeError]:
        """The fault that stopped the last llama_decode (an expert read that failed after its
        retries, a replaced model file, a route queue too short), as its typed exception
        (EdgemoeIOError for I/O), or None; taking it clears it."""
        status = B.edgemoe_cache_take_fault(self.handle)
        return error_for_status(status, B.last_error()) if status else None

    def check_file(self) -> None:
        """EdgemoeIOError when the model file is no longer the one the cache opened."""
        B.check(B.edgemoe_cache_check_file(self.handle))

    def last_routes(self, n_rows: int) -> np.ndarray:
        """int32 [n_rows, n_moe_layer, k]: the experts each MoE layer used for each row of the
        last llama_decode batch, -1 where a layer did not compute that row."""
        lay = self.layout
        out = np.empty((n_rows, lay.n_moe_layer, lay.n_expert_used), dtype=np.int32)
        if n_rows:
            B.check(B.edgemoe_cache_last_routes(self.handle, out.ctypes.data_as(B.int32_p), n_rows,
                                                lay.n_moe_layer, lay.n_expert_used))
        return out

    def resident(self) -> np.ndarray:
        """bool [n_moe_layer, n_expert]: experts resident or loading now, MoE layers in model order."""
        lay = self.layout
        out = np.zeros((lay.n_moe_layer, lay.n_expert), dtype=np.uint8)
        B.check(B.edgemoe_cache_resident(self.handle, out.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                         lay.n_moe_layer, lay.n_expert))
        return out.astype(bool)

    def close(self) -> None:
        """Frees the cache; detach it (and free its context) first. Idempotent."""
        if self._handle is not None:
            B.edgemoe_cache_free(self._handle)
            self._handle = None

    def __del__(self):
        self.close()
