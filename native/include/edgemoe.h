// edgemoe: an expert cache for Mixture-of-Experts models in llama.cpp.
//
// Experts are read on demand from the GGUF into a fixed pool of slots; the patched
// llama.cpp graph asks the cache (through llama_expert_provider) to make each selected
// expert resident and to translate expert ids into slot ids.
//
// Conventions: every function that can fail returns an int status (EDGEMOE_OK == 0);
// edgemoe_last_error() then describes the failure of the calling thread. No C++
// exception crosses this boundary.
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#    define EDGEMOE_API __declspec(dllexport)
#else
#    define EDGEMOE_API __attribute__((visibility("default")))
#endif

struct llama_context;
struct ggml_tensor;

typedef struct edgemoe_cache edgemoe_cache;

enum edgemoe_status {
    EDGEMOE_OK              = 0,
    EDGEMOE_ERR_INVALID_ARG = 1, // bad option or argument
    EDGEMOE_ERR_IO          = 2, // open/read failed
    EDGEMOE_ERR_FORMAT      = 3, // not a GGUF, truncated, unsupported layout
    EDGEMOE_ERR_BUDGET      = 4, // budget below the minimum (message names the minimum)
    EDGEMOE_ERR_NO_EXPERTS  = 5, // the model has no routed expert tensors
    EDGEMOE_ERR_NOMEM       = 6,
    EDGEMOE_ERR_STATE       = 7, // call not valid in the current state
};

enum edgemoe_policy {
    EDGEMOE_POLICY_DEFAULT = 0, // frequency with aging; see docs/cache.md for why
    EDGEMOE_POLICY_LRU     = 1,
    EDGEMOE_POLICY_LFU     = 2,
    EDGEMOE_POLICY_BELADY  = 3, // needs future routes (edgemoe_cache_set_routes); else behaves as DEFAULT
};

enum edgemoe_prefetch {
    EDGEMOE_PREFETCH_OFF       = 0, // experts load when the graph reaches them
    EDGEMOE_PREFETCH_LOOKAHEAD = 1, // layer l+d's router on layer l's input predicts and prefetches its experts
    EDGEMOE_PREFETCH_ROUTES    = 2, // routes queued with edgemoe_cache_set_routes load ahead, in order of first use
};

enum edgemoe_io {
    EDGEMOE_IO_DIRECT   = 0, // O_DIRECT pread into aligned buffers; falls back to BUFFERED with a notice
    EDGEMOE_IO_BUFFERED = 1, // pread through the page cache
    EDGEMOE_IO_MMAP     = 2, // memcpy from a private read-only mapping
    EDGEMOE_IO_PINNED   = 3, // VRAM pools only: the file's read-only mapping pinned for the GPU, whose
                             // copy engines DMA misses out of the page cache with no CPU copy; the
                             // whole file is read in and held in RAM while the cache lives
};

enum edgemoe_pool {
    EDGEMOE_POOL_HOST   = 0, // slots in host memory; the expert matmuls run on the CPU
    EDGEMOE_POOL_GPU    = 1, // slots where the first GPU computes on them: VRAM on a discrete GPU,
                             // mapped pinned host memory on an integrated one (a Jetson)
    EDGEMOE_POOL_VRAM   = 2, // VRAM: misses go through pinned staging and an upload stream per I/O thread
    EDGEMOE_POOL_MAPPED = 3, // pinned host memory the GPU reads in place (zero-copy); any CUDA GPU
};

typedef struct edgemoe_options {
    int64_t budget_bytes;    // > 0: the slot pools' size in bytes
    double  budget_fraction; // used when budget_bytes == 0: fraction of all expert bytes, (0, 1]
    int32_t policy;          // enum edgemoe_policy
    int32_t io;              // enum edgemoe_io
    int32_t n_io_threads;    // 0: default (4)
    bool    quiet;           // no notices on stderr
    int32_t prefetch;        // enum edgemoe_prefetch
    int32_t lookahead;       // layers ahead whose predicted experts load, 0 to 8 (0: predictions only steer eviction)
    int32_t prefetch_top;    // predicted experts per token it loads, most likely first; 0: half of top-k
    int32_t pool;            // enum edgemoe_pool: where the slots live
    bool    repack;          // host pools: repack slots where ggml's CPU backend repacks the weight
                             // type (stock's kernels, as llama.cpp's loader does); false: plain
    bool    hybrid;          // a ubatch that fits in one wave computes the experts not ready in
                             // the pool on the CPU (from the model's mapped tensors) instead of
                             // waiting for their reads, which go on behind for later tokens
} edgemoe_options;

typedef struct edgemoe_stats {
    uint64_t hits;            // expert uses served from a resident slot
    uint64_t misses;          // expert uses that had to be loaded (or waited for)
    uint64_t prefetch_hits;   // hits on slots filled by a prefetch and not yet used
    uint64_t prefetch_wasted; // prefetched slots evicted before any use
    uint64_t prefetch_issued;
    uint64_t bytes_read;
    double   read_ms;         // summed time of reads (all I/O threads)
    double   stall_ms;        // time compute waited for expert reads
    uint64_t prefetch_cancelled; // predicted loads dropped before their read began (part of wasted)
    uint64_t pred_predicted;  // experts the lookahead predictor named for a step of this layer
    uint64_t pred_correct;    // of those, the ones the step used (precision = correct / predicted)
    uint64_t pred_actual;     // distinct experts of the predicted steps (recall = correct / actual)
    uint64_t steps;           // remap steps: one per MoE layer, ubatch and wave
    double   book_ms;         // the cache's own work in those steps, waits and prediction excluded
    double   predict_ms;      // the lookahead predictor's work (charged to the layer it runs in)
    double   convert_ms;      // of read_ms: repacking slots (host pools) or uploading them (VRAM)
    uint64_t cpu_uses;        // hybrid: expert uses computed on the CPU (counted in misses)
} edgemoe_stats;

typedef struct edgemoe_model_info {
    int32_t n_layer;          // layers of the model
    int32_t n_moe_layer;      // layers with routed experts
    int32_t n_expert;
    int32_t n_expert_used;
    int32_t n_pools;          // distinct slot layouts (role types and shapes)
    int64_t expert_bytes;     // all routed expert weights
    int64_t non_expert_bytes; // every other tensor
    int64_t slot_bytes_max;   // bytes of one expert (all roles), largest pool
    int64_t min_budget_bytes; // what one token needs in every pool
    int64_t data_alignment;   // alignment of the tensor data section
    int32_t slices_aligned;   // 1 when every expert slice starts on a 4 KiB boundary
    int64_t min_gpu_budget_bytes; // what a GPU pool needs: a whole layer's experts in every pool
} edgemoe_model_info;

typedef struct edgemoe_cache_info {
    int64_t budget_bytes;     // bytes actually given to the pools
    int32_t n_slots;          // all pools
    int32_t n_pools;
    int32_t policy;           // the policy in use
    int32_t io;               // the backing store in use (after a fallback)
    int32_t prefetch;         // enum edgemoe_prefetch in use
    int32_t pool;             // enum edgemoe_pool in use (GPU resolved to VRAM or MAPPED)
    int32_t n_repacked;       // pool tensors (one per role and pool) held in a repacked layout
    char    pool_device[64];  // the ggml device holding the slots ("CPU" for HOST)
} edgemoe_cache_info;

typedef struct edgemoe_gpu_info {
    int32_t n_gpu;            // GPU devices ggml registered (0 on a CPU build)
    int32_t integrated;       // the first GPU shares host memory (a Jetson): GPU pools are MAPPED
    int64_t memory_free;      // the first GPU's memory, bytes
    int64_t memory_total;
    char    name[64];         // the first GPU's ggml device name ("CUDA0")
    char    description[128];
} edgemoe_gpu_info;

EDGEMOE_API const char * edgemoe_last_error(void);

EDGEMOE_API edgemoe_options edgemoe_default_options(void);

// The GPU an EDGEMOE_POOL_GPU pool would use; n_gpu == 0 where there is none.
EDGEMOE_API int edgemoe_gpu_inspect(edgemoe_gpu_info * out);

// ggml's CPU buffer type (a ggml_backend_buffer_type_t), for llama_model_params'
// tensor_buft_overrides: llama.cpp's --n-cpu-moe keeps layers' experts on the host with it.
EDGEMOE_API void * edgemoe_cpu_buffer_type(void);

// Describes a GGUF's experts without loading it.
EDGEMOE_API int edgemoe_model_inspect(const char * model_path, edgemoe_model_info * out);

EDGEMOE_API int  edgemoe_cache_create(const char * model_path, const edgemoe_options * opts, edgemoe_cache ** out);
// Detaches from its context first if attached: free the cache before the context, or detach it.
EDGEMOE_API void edgemoe_cache_free(edgemoe_cache * cache);

// Attaches the cache to a context of the same model (NULL detaches). One context per cache.
// Load the model with the kv override "edgemoe.cache.lazy_experts" = true so that its *_exps
// weights stay unread, and create the context with op_offload = false on GPU builds: otherwise
// large batches copy the whole slot pool to the device and compute there with other kernels.
EDGEMOE_API int edgemoe_cache_attach(edgemoe_cache * cache, struct llama_context * ctx);

EDGEMOE_API int edgemoe_cache_info_get(const edgemoe_cache * cache, edgemoe_cache_info * out);

// A fault during llama_decode (an expert read that failed after its retries, a model file
// replaced or rewritten while in use, a route queue too short for the batch) stops the graph
// through the context's abort callback, which attach sets: llama_decode returns 2 and rolls
// the ubatch back. This returns that fault's status once (EDGEMOE_OK if none) with its message
// in edgemoe_last_error, and clears it; the cache and the context stay usable. Taking a fault
// also empties the route queues (the failed batch took some layers' routes and not others'):
// queue the routes again before decoding that batch again.
EDGEMOE_API int edgemoe_cache_take_fault(edgemoe_cache * cache);
// EDGEMOE_ERR_IO when the model file at the cache's path is no longer the one it opened
// (replaced, removed, resized or modified): check before a decode, as the cache does at the
// start of each burst of expert reads.
EDGEMOE_API int edgemoe_cache_check_file(const edgemoe_cache * cache);

// Test hook: a plan of injected read faults (see native/src/fault_injection.h; the variable
// EDGEMOE_FAULTS sets one at cache creation). EDGEMOE_ERR_STATE in a build without the hook
// (release builds), EDGEMOE_ERR_INVALID_ARG for a malformed plan; NULL clears it.
EDGEMOE_API int  edgemoe_fault_plan(const char * plan);
EDGEMOE_API bool edgemoe_fault_injection_available(void);

// Asynchronous load hints; resident or in-flight experts are no-ops.
EDGEMOE_API int edgemoe_cache_prefetch(edgemoe_cache * cache, int32_t layer, const int32_t * experts, int32_t n);

// Routes of the next n_tokens tokens for one layer ([n_tokens][k] expert ids), queued. The graph
// obeys them instead of its own top-k (router-decoupled models): each llama_decode batch takes
// its rows' routes, in batch order, from the front of every layer's queue, so queue every token
// of every MoE layer (a queue that is not empty but too short for a batch fails that
// llama_decode: see edgemoe_cache_take_fault). BELADY uses the queue
// as the future. With EDGEMOE_PREFETCH_ROUTES the queued experts start loading at once, in
// order of first use, each into a slot whose next use comes after its own (never evicting an
// expert needed sooner); more start as each layer's step frees slots.
EDGEMOE_API int edgemoe_cache_set_routes(edgemoe_cache * cache, int32_t layer, const int32_t * ids, int32_t n_tokens, int32_t k);
// Every MoE layer at once: ids [n_tokens][n_moe_layer][k], MoE layers in model order (the
// prefetches then follow the order of first use across layers, which per-layer calls cannot).
EDGEMOE_API int edgemoe_cache_set_routes_all(edgemoe_cache * cache, const int32_t * ids, int32_t n_tokens, int32_t n_moe_layer, int32_t k);
EDGEMOE_API int edgemoe_cache_clear_routes(edgemoe_cache * cache);
// Routes are queued per row of each llama_decode batch, so a batch of several sequences that
// llama.cpp splits (and reorders) by sequence still gives every token its own routes.

// The expert ids every MoE layer used for each row of the last llama_decode batch,
// out [n_rows][n_moe_layer][k]; -1 where a layer did not compute the row (the last layer
// computes only output rows). A scheduler's estimate of a sequence's next experts.
EDGEMOE_API int edgemoe_cache_last_routes(const edgemoe_cache * cache, int32_t * out, int32_t n_rows, int32_t n_moe_layer, int32_t k);
// out [n_moe_layer][n_expert], MoE layers in model order as last_routes: 1 for each expert
// resident or loading now.
EDGEMOE_API int edgemoe_cache_resident(const edgemoe_cache * cache, uint8_t * out, int32_t n_moe_layer, int32_t n_expert);

// layer < 0: totals. Layers without experts report zeros.
EDGEMOE_API int edgemoe_cache_stats(const edgemoe_cache * cache, int32_t layer, edgemoe_stats * out);
EDGEMOE_API int edgemoe_cache_reset_stats(edgemoe_cache * cache);

// Route recorder: an eval callback for llama_context_params.cb_eval that records the
// expert ids every MoE layer selected (tensors named "ffn_moe_topk-<il>"), independent of
// any cache. Rows are (layer, token index within that layer, k ids).
typedef struct edgemoe_route_recorder edgemoe_route_recorder;

EDGEMOE_API edgemoe_route_recorder * edgemoe_route_recorder_new(void);
EDGEMOE_API void    edgemoe_route_recorder_free(edgemoe_route_recorder * rec);
EDGEMOE_API bool    edgemoe_route_recorder_eval_cb(struct ggml_tensor * t, bool ask, void * rec);
EDGEMOE_API void    edgemoe_route_recorder_clear(edgemoe_route_recorder * rec);
EDGEMOE_API int32_t edgemoe_route_recorder_k(const edgemoe_route_recorder * rec); // 0 before the first record
EDGEMOE_API int64_t edgemoe_route_recorder_count(const edgemoe_route_recorder * rec);
// Copies up to cap_rows rows of (2 + k) int32 each; returns the number copied.
EDGEMOE_API int64_t edgemoe_route_recorder_read(const edgemoe_route_recorder * rec, int32_t * out, int64_t cap_rows);

#ifdef __cplusplus
}
#endif
