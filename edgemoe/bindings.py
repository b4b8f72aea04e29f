"""ctypes bindings for every function of native/include/edgemoe.h.

Structs mirror the header field by field. The C declaration stands as a comment above
each binding. Functions resolve against libedgemoe on first call, so importing this
module works without the library (cache-off runs on a stock libllama).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Callable

from edgemoe._native import edgemoe_library
from edgemoe.errors import error_for_status

# enum edgemoe_status
EDGEMOE_OK = 0
EDGEMOE_ERR_INVALID_ARG = 1
EDGEMOE_ERR_IO = 2
EDGEMOE_ERR_FORMAT = 3
EDGEMOE_ERR_BUDGET = 4
EDGEMOE_ERR_NO_EXPERTS = 5
EDGEMOE_ERR_NOMEM = 6
EDGEMOE_ERR_STATE = 7

# enum edgemoe_policy
EDGEMOE_POLICY_DEFAULT = 0
EDGEMOE_POLICY_LRU = 1
EDGEMOE_POLICY_LFU = 2
EDGEMOE_POLICY_BELADY = 3

# enum edgemoe_prefetch
EDGEMOE_PREFETCH_OFF = 0
EDGEMOE_PREFETCH_LOOKAHEAD = 1
EDGEMOE_PREFETCH_ROUTES = 2

# enum edgemoe_io
EDGEMOE_IO_DIRECT = 0
EDGEMOE_IO_BUFFERED = 1
EDGEMOE_IO_MMAP = 2
EDGEMOE_IO_PINNED = 3

# enum edgemoe_pool
EDGEMOE_POOL_HOST = 0
EDGEMOE_POOL_GPU = 1
EDGEMOE_POOL_VRAM = 2
EDGEMOE_POOL_MAPPED = 3

POLICIES = {"default": EDGEMOE_POLICY_DEFAULT, "lru": EDGEMOE_POLICY_LRU,
            "lfu": EDGEMOE_POLICY_LFU, "belady": EDGEMOE_POLICY_BELADY}
IO_MODES = {"direct": EDGEMOE_IO_DIRECT, "buffered": EDGEMOE_IO_BUFFERED, "mmap": EDGEMOE_IO_MMAP,
            "pinned": EDGEMOE_IO_PINNED}
PREFETCH_MODES = {"off": EDGEMOE_PREFETCH_OFF, "lookahead": EDGEMOE_PREFETCH_LOOKAHEAD,
                  "routes": EDGEMOE_PREFETCH_ROUTES}
POOLS = {"host": EDGEMOE_POOL_HOST, "gpu": EDGEMOE_POOL_GPU, "vram": EDGEMOE_POOL_VRAM,
         "mapped": EDGEMOE_POOL_MAPPED}


# typedef struct edgemoe_options {
#     int64_t budget_bytes;    // > 0: the slot pools' size in bytes
#     double  budget_fraction; // used when budget_bytes == 0: fraction of all expert bytes, (0, 1]
#     int32_t policy;          // enum edgemoe_policy
#     int32_t io;              // enum edgemoe_io
#     int32_t n_io_threads;    // 0: default (4)
#     bool    quiet;           // no notices on stderr
#     int32_t prefetch;        // enum edgemoe_prefetch
#     int32_t lookahead;       // layers ahead whose predicted experts load, 0 to 8 (0: predictions only steer eviction)
#     int32_t prefetch_top;    // predicted experts per token it loads, most likely first; 0: half of top-k
#     int32_t pool;            // enum edgemoe_pool: where the slots live
#     bool    repack;          // host pools: repack slots where ggml's CPU backend repacks the weight
#                              // type (stock's kernels, as llama.cpp's loader does); false: plain
# } edgemoe_options;
class edgemoe_options(ctypes.Structure):
    _fields_ = [
        ("budget_bytes", ctypes.c_int64),
        ("budget_fraction", ctypes.c_double),
        ("policy", ctypes.c_int32),
        ("io", ctypes.c_int32),
        ("n_io_threads", ctypes.c_int32),
        ("quiet", ctypes.c_bool),
        ("prefetch", ctypes.c_int32),
        ("lookahead", ctypes.c_int32),
        ("prefetch_top", ctypes.c_int32),
        ("pool", ctypes.c_int32),
        ("repack", ctypes.c_bool),
        ("hybrid", ctypes.c_bool),
    ]


# typedef struct edgemoe_stats {
#     uint64_t hits;            // expert uses served from a resident slot
#     uint64_t misses;          // expert uses that had to be loaded (or waited for)
#     uint64_t prefetch_hits;   // hits on slots filled by a prefetch and not yet used
#     uint64_t prefetch_wasted; // prefetched slots evicted before any use
#     uint64_t prefetch_issued;
#     uint64_t bytes_read;
#     double   read_ms;         // summed time of reads (all I/O threads)
#     double   stall_ms;        // time compute waited for expert reads
#     uint64_t prefetch_cancelled; // predicted loads dropped before their read began (part of wasted)
#     uint64_t pred_predicted;  // experts the lookahead predictor named for a step of this layer
#     uint64_t pred_correct;    // of those, the ones the step used (precision = correct / predicted)
#     uint64_t pred_actual;     // distinct experts of the predicted steps (recall = correct / actual)
#     uint64_t steps;           // remap steps: one per MoE layer, ubatch and wave
#     double   book_ms;         // the cache's own work in those steps, waits and prediction excluded
#     double   predict_ms;      // the lookahead predictor's work (charged to the layer it runs in)
#     double   convert_ms;      // of read_ms: repacking slots (host pools) or uploading them (VRAM)
# } edgemoe_stats;
class edgemoe_stats(ctypes.Structure):
    _fields_ = [
        ("hits", ctypes.c_uint64),
        ("misses", ctypes.c_uint64),
        ("prefetch_hits", ctypes.c_uint64),
        ("prefetch_wasted", ctypes.c_uint64),
        ("prefetch_issued", ctypes.c_uint64),
        ("bytes_read", ctypes.c_uint64),
        ("read_ms", ctypes.c_double),
        ("stall_ms", ctypes.c_double),
        ("prefetch_cancelled", ctypes.c_uint64),
        ("pred_predicted", ctypes.c_uint64),
        ("pred_correct", ctypes.c_uint64),
        ("pred_actual", ctypes.c_uint64),
        ("steps", ctypes.c_uint64),
        ("book_ms", ctypes.c_double),
        ("predict_ms", ctypes.c_double),
        ("convert_ms", ctypes.c_double),
        ("cpu_uses", ctypes.c_uint64),
    ]


# typedef struct edgemoe_model_info {
#     int32_t n_layer;          // layers of the model
#     int32_t n_moe_layer;      // layers with routed experts
#     int32_t n_expert;
#     int32_t n_expert_used;
#     int32_t n_pools;          // distinct slot layouts (role types and shapes)
#     int64_t expert_bytes;     // all routed expert weights
#     int64_t non_expert_bytes; // every other tensor
#     int64_t slot_bytes_max;   // bytes of one expert (all roles), largest pool
#     int64_t min_budget_bytes; // what one token needs in every pool
#     int64_t data_alignment;   // alignment of the tensor data section
#     int32_t slices_aligned;   // 1 when every expert slice starts on a 4 KiB boundary
#     int64_t min_gpu_budget_bytes; // what a GPU pool needs: a whole layer's experts in every pool
# } edgemoe_model_info;
class edgemoe_model_info(ctypes.Structure):
    _fields_ = [
        ("n_layer", ctypes.c_int32),
        ("n_moe_layer", ctypes.c_int32),
        ("n_expert", ctypes.c_int32),
        ("n_expert_used", ctypes.c_int32),
        ("n_pools", ctypes.c_int32),
        ("expert_bytes", ctypes.c_int64),
        ("non_expert_bytes", ctypes.c_int64),
        ("slot_bytes_max", ctypes.c_int64),
        ("min_budget_bytes", ctypes.c_int64),
        ("data_alignment", ctypes.c_int64),
        ("slices_aligned", ctypes.c_int32),
        ("min_gpu_budget_bytes", ctypes.c_int64),
    ]


# typedef struct edgemoe_cache_info {
#     int64_t budget_bytes;     // bytes actually given to the pools
#     int32_t n_slots;          // all pools
#     int32_t n_pools;
#     int32_t policy;           // the policy in use
#     int32_t io;               // the backing store in use (after a fallback)
#     int32_t prefetch;         // enum edgemoe_prefetch in use
#     int32_t pool;             // enum edgemoe_pool in use (GPU resolved to VRAM or MAPPED)
#     int32_t n_repacked;       // pool tensors (one per role and pool) held in a repacked layout
#     char    pool_device[64];  // the ggml device holding the slots ("CPU" for HOST)
# } edgemoe_cache_info;
class edgemoe_cache_info(ctypes.Structure):
    _fields_ = [
        ("budget_bytes", ctypes.c_int64),
        ("n_slots", ctypes.c_int32),
        ("n_pools", ctypes.c_int32),
        ("policy", ctypes.c_int32),
        ("io", ctypes.c_int32),
        ("prefetch", ctypes.c_int32),
        ("pool", ctypes.c_int32),
        ("n_repacked", ctypes.c_int32),
        ("pool_device", ctypes.c_char * 64),
    ]


# typedef struct edgemoe_gpu_info {
#     int32_t n_gpu;            // GPU devices ggml registered (0 on a CPU build)
#     int32_t integrated;       // the first GPU shares host memory (a Jetson): GPU pools are MAPPED
#     int64_t memory_free;      // the first GPU's memory, bytes
#     int64_t memory_total;
#     char    name[64];         // the first GPU's ggml device name ("CUDA0")
#     char    description[128];
# } edgemoe_gpu_info;
class edgemoe_gpu_info(ctypes.Structure):
    _fields_ = [
        ("n_gpu", ctypes.c_int32),
        ("integrated", ctypes.c_int32),
        ("memory_free", ctypes.c_int64),
        ("memory_total", ctypes.c_int64),
        ("name", ctypes.c_char * 64),
        ("description", ctypes.c_char * 128),
    ]


edgemoe_cache_p = ctypes.c_void_p
edgemoe_route_recorder_p = ctypes.c_void_p
llama_context_p = ctypes.c_void_p
int32_p = ctypes.POINTER(ctypes.c_int32)


def _native(name: str, argtypes: list, restype) -> Callable[[Callable], Callable]:
    """Binds the decorated stub to `name` in libedgemoe, resolved on the first call."""

    def decorator(stub: Callable) -> Callable:
        fn = None

        @functools.wraps(stub)
        def call(*args):
            nonlocal fn
            if fn is None:
                fn = getattr(edgemoe_library(), name)
                fn.argtypes = argtypes
                fn.restype = restype
            return fn(*args)

        return call

    return decorator


# EDGEMOE_API const char * edgemoe_last_error(void);
@_native("edgemoe_last_error", [], ctypes.c_char_p)
def edgemoe_last_error() -> bytes: ...


# EDGEMOE_API edgemoe_options edgemoe_default_options(void);
@_native("edgemoe_default_options", [], edgemoe_options)
def edgemoe_default_options() -> edgemoe_options: ...


# EDGEMOE_API int edgemoe_gpu_inspect(edgemoe_gpu_info * out);
@_native("edgemoe_gpu_inspect", [ctypes.POINTER(edgemoe_gpu_info)], ctypes.c_int)
def edgemoe_gpu_inspect(out, /) -> int: ...


# EDGEMOE_API void * edgemoe_cpu_buffer_type(void);
@_native("edgemoe_cpu_buffer_type", [], ctypes.c_void_p)
def edgemoe_cpu_buffer_type() -> int: ...


# EDGEMOE_API int edgemoe_model_inspect(const char * model_path, edgemoe_model_info * out);
@_native("edgemoe_model_inspect", [ctypes.c_char_p, ctypes.POINTER(edgemoe_model_info)], ctypes.c_int)
def edgemoe_model_inspect(model_path: bytes, out, /) -> int: ...


# EDGEMOE_API int  edgemoe_cache_create(const char * model_path, const edgemoe_options * opts, edgemoe_cache ** out);
@_native("edgemoe_cache_create",
         [ctypes.c_char_p, ctypes.POINTER(edgemoe_options), ctypes.POINTER(edgemoe_cache_p)], ctypes.c_int)
def edgemoe_cache_create(model_path: bytes, opts, out, /) -> int: ...


# EDGEMOE_API void edgemoe_cache_free(edgemoe_cache * cache);
@_native("edgemoe_cache_free", [edgemoe_cache_p], None)
def edgemoe_cache_free(cache, /) -> None: ...


# EDGEMOE_API int edgemoe_cache_attach(edgemoe_cache * cache, struct llama_context * ctx);
@_native("edgemoe_cache_attach", [edgemoe_cache_p, llama_context_p], ctypes.c_int)
def edgemoe_cache_attach(cache, ctx, /) -> int: ...


# EDGEMOE_API int edgemoe_cache_info_get(const edgemoe_cache * cache, edgemoe_cache_info * out);
@_native("edgemoe_cache_info_get", [edgemoe_cache_p, ctypes.POINTER(edgemoe_cache_info)], ctypes.c_int)
def edgemoe_cache_info_get(cache, out, /) -> int: ...


# EDGEMOE_API int edgemoe_cache_prefetch(edgemoe_cache * cache, int32_t layer, const int32_t * experts, int32_t n);
@_native("edgemoe_cache_prefetch", [edgemoe_cache_p, ctypes.c_int32, int32_p, ctypes.c_int32], ctypes.c_int)
def edgemoe_cache_prefetch(cache, layer: int, experts, n: int, /) -> int: ...


# EDGEMOE_API int edgemoe_cache_set_routes(edgemoe_cache * cache, int32_t layer, const int32_t * ids, int32_t n_tokens, int32_t k);
@_native("edgemoe_cache_set_routes",
         [edgemoe_cache_p, ctypes.c_int32, int32_p, ctypes.c_int32, ctypes.c_int32], ctypes.c_int)
def edgemoe_cache_set_routes(cache, layer: int, ids, n_tokens: int, k: int, /) -> int: ...


# EDGEMOE_API int edgemoe_cache_set_routes_all(edgemoe_cache * cache, const int32_t * ids, int32_t n_tokens, int32_t n_moe_layer, int32_t k);
@_native("edgemoe_cache_set_routes_all",
         [edgemoe_cache_p, int32_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32], ctypes.c_int)
def edgemoe_cache_set_routes_all(cache, ids, n_tokens: int, n_moe_layer: int, k: int, /) -> int: ...


# EDGEMOE_API int edgemoe_cache_take_fault(edgemoe_cache * cache);
@_native("edgemoe_cache_take_fault", [edgemoe_cache_p], ctypes.c_int)
def edgemoe_cache_take_fault(cache, /) -> int: ...


# EDGEMOE_API int edgemoe_cache_check_file(const edgemoe_cache * cache);
@_native("edgemoe_cache_check_file", [edgemoe_cache_p], ctypes.c_int)
def edgemoe_cache_check_file(cache, /) -> int: ...


# EDGEMOE_API int edgemoe_fault_plan(const char * plan);
@_native("edgemoe_fault_plan", [ctypes.c_char_p], ctypes.c_int)
def edgemoe_fault_plan(plan, /) -> int: ...


# EDGEMOE_API bool edgemoe_fault_injection_available(void);
@_native("edgemoe_fault_injection_available", [], ctypes.c_bool)
def edgemoe_fault_injection_available() -> bool: ...


# EDGEMOE_API int edgemoe_cache_clear_routes(edgemoe_cache * cache);
@_native("edgemoe_cache_clear_routes", [edgemoe_cache_p], ctypes.c_int)
def edgemoe_cache_clear_routes(cache, /) -> int: ...


# EDGEMOE_API int edgemoe_cache_last_routes(const edgemoe_cache * cache, int32_t * out, int32_t n_rows, int32_t n_moe_layer, int32_t k);
@_native("edgemoe_cache_last_routes",
         [edgemoe_cache_p, int32_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32], ctypes.c_int)
def edgemoe_cache_last_routes(cache, out, n_rows: int, n_moe_layer: int, k: int, /) -> int: ...


# EDGEMOE_API int edgemoe_cache_resident(const edgemoe_cache * cache, uint8_t * out, int32_t n_moe_layer, int32_t n_expert);
@_native("edgemoe_cache_resident",
         [edgemoe_cache_p, ctypes.POINTER(ctypes.c_uint8), ctypes.c_int32, ctypes.c_int32], ctypes.c_int)
def edgemoe_cache_resident(cache, out, n_moe_layer: int, n_expert: int, /) -> int: ...


# EDGEMOE_API int edgemoe_cache_stats(const edgemoe_cache * cache, int32_t layer, edgemoe_stats * out);
@_native("edgemoe_cache_stats", [edgemoe_cache_p, ctypes.c_int32, ctypes.POINTER(edgemoe_stats)], ctypes.c_int)
def edgemoe_cache_stats(cache, layer: int, out, /) -> int: ...


# EDGEMOE_API int edgemoe_cache_reset_stats(edgemoe_cache * cache);
@_native("edgemoe_cache_reset_stats", [edgemoe_cache_p], ctypes.c_int)
def edgemoe_cache_reset_stats(cache, /) -> int: ...


# EDGEMOE_API edgemoe_route_recorder * edgemoe_route_recorder_new(void);
@_native("edgemoe_route_recorder_new", [], edgemoe_route_recorder_p)
def edgemoe_route_recorder_new() -> int: ...


# EDGEMOE_API void    edgemoe_route_recorder_free(edgemoe_route_recorder * rec);
@_native("edgemoe_route_recorder_free", [edgemoe_route_recorder_p], None)
def edgemoe_route_recorder_free(rec, /) -> None: ...


# EDGEMOE_API void    edgemoe_route_recorder_clear(edgemoe_route_recorder * rec);
@_native("edgemoe_route_recorder_clear", [edgemoe_route_recorder_p], None)
def edgemoe_route_recorder_clear(rec, /) -> None: ...


# EDGEMOE_API int32_t edgemoe_route_recorder_k(const edgemoe_route_recorder * rec);
@_native("edgemoe_route_recorder_k", [edgemoe_route_recorder_p], ctypes.c_int32)
def edgemoe_route_recorder_k(rec, /) -> int: ...


# EDGEMOE_API int64_t edgemoe_route_recorder_count(const edgemoe_route_recorder * rec);
@_native("edgemoe_route_recorder_count", [edgemoe_route_recorder_p], ctypes.c_int64)
def edgemoe_route_recorder_count(rec, /) -> int: ...


# EDGEMOE_API int64_t edgemoe_route_recorder_read(const edgemoe_route_recorder * rec, int32_t * out, int64_t cap_rows);
@_native("edgemoe_route_recorder_read", [edgemoe_route_recorder_p, int32_p, ctypes.c_int64], ctypes.c_int64)
def edgemoe_route_recorder_read(rec, out, cap_rows: int, /) -> int: ...


# EDGEMOE_API bool    edgemoe_route_recorder_eval_cb(struct ggml_tensor * t, bool ask, void * rec);
def edgemoe_route_recorder_eval_cb_address() -> int:
    """Address of the C eval callback, for llama_context_params.cb_eval (never called from Python)."""
    return ctypes.cast(edgemoe_library().edgemoe_route_recorder_eval_cb, ctypes.c_void_p).value


def last_error() -> str:
    msg = edgemoe_last_error()
    return msg.decode("utf-8", "replace") if msg else ""


def check(status: int) -> None:
    """Raises the typed exception for a non-zero status, with edgemoe_last_error() as message."""
    if status != EDGEMOE_OK:
        raise error_for_status(status, last_error())
