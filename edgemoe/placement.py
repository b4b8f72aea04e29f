"""Where experts live: the device of the cache's slot pool, and llama.cpp's --n-cpu-moe placement
for runs without a cache."""

from __future__ import annotations

import ctypes

from edgemoe import bindings as B
from edgemoe.errors import InvalidArgumentError


def check_pool(pool: str) -> str:
    """An --expert-pool value, or InvalidArgumentError."""
    if pool != "auto" and pool not in B.POOLS:
        raise InvalidArgumentError(f"unknown expert pool {pool!r}; expected one of auto, {', '.join(B.POOLS)}")
    return pool


def resolve_pool(pool: str, n_gpu_layers: int) -> str:
    """"auto" becomes "gpu" where layers are offloaded and ggml has a GPU, else "host"; an
    explicit choice is kept (the native side refuses a GPU pool without a GPU)."""
    if check_pool(pool) != "auto":
        return pool
    if n_gpu_layers <= 0:
        return "host"
    from edgemoe.cache import inspect_gpu

    return "gpu" if inspect_gpu().n_gpu > 0 else "host"


def vram_gpu(pool: str):
    """The GPU (edgemoe.cache.GpuInfo) whose VRAM a resolved pool lives in, else None: "vram",
    and "gpu" on a discrete device (on an integrated one, a Jetson, "gpu" is mapped host memory)."""
    if pool not in ("vram", "gpu"):
        return None
    from edgemoe.cache import inspect_gpu

    gpu = inspect_gpu()
    if gpu.n_gpu == 0 or (pool == "gpu" and gpu.integrated):
        return None
    return gpu


# struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; };
class llama_model_tensor_buft_override(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def cpu_moe_pattern(layer: int) -> str:
    """llama.cpp's pattern (common's llm_ffn_exps_block_regex) for one layer's routed experts."""
    return rf"blk\.{layer}\.ffn_(up|down|gate|gate_up)_(ch|)exps"


def cpu_moe_overrides(n_cpu_moe: int) -> ctypes.Array:
    """tensor_buft_overrides that keep the routed experts of layers 0..n_cpu_moe-1 in host
    memory (llama.cpp's --n-cpu-moe N), terminated by a null pattern."""
    if n_cpu_moe <= 0:
        raise InvalidArgumentError(f"n_cpu_moe must be positive, not {n_cpu_moe}")
    cpu = B.edgemoe_cpu_buffer_type()
    arr = (llama_model_tensor_buft_override * (n_cpu_moe + 1))()
    for i in range(n_cpu_moe):
        arr[i].pattern = cpu_moe_pattern(i).encode()
        arr[i].buft = cpu
    return arr
