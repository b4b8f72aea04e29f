// The C API of edgemoe.h and the llama_expert_provider glue. No exception leaves this file.
#include "edgemoe.h"
#include "expert_cache.h"
#include "fault_injection.h"

#include "llama.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <string>

using namespace edgemoe;

struct edgemoe_cache {
    std::unique_ptr<expert_cache> impl;
    llama_expert_provider provider = {};
    llama_context * ctx = nullptr;
};

namespace {

thread_local std::string g_last_error;

int fail(int status, const std::string & msg) {
    g_last_error = msg;
    return status;
}

// every entry point runs its body through this: exceptions become status codes
template <typename F>
int guarded(F && f) {
    try {
        return f();
    } catch (const std::bad_alloc &) {
        return fail(EDGEMOE_ERR_NOMEM, "out of memory");
    } catch (const std::exception & e) {
        return fail(EDGEMOE_ERR_STATE, e.what());
    } catch (...) {
        return fail(EDGEMOE_ERR_STATE, "unknown error");
    }
}

expert_cache * cache_of(void * user) {
    return static_cast<edgemoe_cache *>(user)->impl.get();
}

bool provider_bind(void * user, int32_t il, const ggml_tensor * up, const ggml_tensor * gate, const ggml_tensor * down,
                   const ggml_tensor * gate_up, llama_expert_slots * out) {
    ggml_tensor * slots[ROLE_COUNT] = {};
    int32_t n_slots = 0;
    void * unit = nullptr;
    if (!cache_of(user)->bind(il, up, gate, down, gate_up, slots, &n_slots, &unit)) {
        return false;
    }
    out->up      = slots[ROLE_UP];
    out->gate    = slots[ROLE_GATE];
    out->down    = slots[ROLE_DOWN];
    out->gate_up = slots[ROLE_GATE_UP];
    out->n_slots = n_slots;
    out->unit    = unit;
    out->hybrid  = cache_of(user)->hybrid();
    return true;
}

void * provider_wave(void * user, void * unit, int32_t i, int32_t n) {
    return cache_of(user)->wave(unit, i, n);
}

void * provider_route_ctx(void * user, void * unit, int32_t n_ubatch_tokens) {
    return cache_of(user)->route_ctx(unit, n_ubatch_tokens);
}

void provider_ubatch_rows(void * user, const int32_t * batch_idx, int32_t n_tokens, int32_t first_row) {
    cache_of(user)->ubatch_rows(batch_idx, n_tokens, first_row);
}

// llama.cpp's abort callback: ggml's CPU backend asks it after every node, so a fault recorded
// by a custom op stops the graph right after that op and llama_decode fails (and rolls back)
bool abort_on_fault(void * user) {
    return cache_of(user)->faulted();
}

// ggml's CPU backend calls a custom op on every compute thread (n_tasks only sizes its work
// buffer), so thread 0 does the work (the cache's method on the op's wave_ctx: the block's
// route_ctx or a wave's); the barrier after the node holds the others
template <void (expert_cache::*F)(ggml_tensor *, const wave_ctx &)>
void op_on_thread0(ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) nth;
    if (ith != 0) {
        return;
    }
    const wave_ctx * w = static_cast<const wave_ctx *>(userdata);
    (w->cache->*F)(dst, *w);
}

void op_remap(ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) nth;
    wave_ctx * w = static_cast<wave_ctx *>(userdata);
    if (ith != 0) {
        // a remap may wait milliseconds for the disk: sleep through it rather than spin at the
        // barrier that follows
        w->cache->remap_wait(*w, ith);
        return;
    }
    w->cache->op_remap(dst, *w);
    w->cache->remap_done(*w);
}

} // namespace

extern "C" {

const char * edgemoe_last_error(void) {
    return g_last_error.c_str();
}

edgemoe_options edgemoe_default_options(void) {
    edgemoe_options o;
    o.budget_bytes    = 0;
    o.budget_fraction = 1.0;
    o.policy          = EDGEMOE_POLICY_DEFAULT;
    o.io              = EDGEMOE_IO_DIRECT;
    o.n_io_threads    = 0;
    o.quiet           = false;
    o.prefetch        = EDGEMOE_PREFETCH_OFF;
    o.lookahead       = 1;
    o.prefetch_top    = 0;
    o.pool            = EDGEMOE_POOL_HOST;
    o.repack          = true;
    o.hybrid          = false;
    return o;
}

void * edgemoe_cpu_buffer_type(void) {
    return ggml_backend_cpu_buffer_type();
}

int edgemoe_gpu_inspect(edgemoe_gpu_info * out) {
    return guarded([&] {
        if (!out) {
            return fail(EDGEMOE_ERR_INVALID_ARG, "out is required");
        }
        *out = edgemoe_gpu_info{};
        bool integrated = false;
        ggml_backend_dev_t dev = first_gpu(&integrated);
        if (!dev) {
            return (int) EDGEMOE_OK;
        }
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            const auto t = ggml_backend_dev_type(ggml_backend_dev_get(i));
            out->n_gpu += t == GGML_BACKEND_DEVICE_TYPE_GPU || t == GGML_BACKEND_DEVICE_TYPE_IGPU;
        }
        out->integrated = integrated ? 1 : 0;
        size_t free_b = 0, total_b = 0;
        ggml_backend_dev_memory(dev, &free_b, &total_b);
        out->memory_free  = (int64_t) free_b;
        out->memory_total = (int64_t) total_b;
        snprintf(out->name, sizeof(out->name), "%s", ggml_backend_dev_name(dev));
        snprintf(out->description, sizeof(out->description), "%s", ggml_backend_dev_description(dev));
        return (int) EDGEMOE_OK;
    });
}

int edgemoe_model_inspect(const char * model_path, edgemoe_model_info * out) {
    return guarded([&] {
        if (!model_path || !out) {
            return fail(EDGEMOE_ERR_INVALID_ARG, "model_path and out are required");
        }
        model_layout l;
        std::string err;
        if (!read_model_layout(model_path, l, &err)) {
            return fail(err.rfind("cannot open", 0) == 0 ? EDGEMOE_ERR_IO : EDGEMOE_ERR_FORMAT, err);
        }
        memset(out, 0, sizeof(*out));
        out->n_layer          = l.n_layer;
        out->n_moe_layer      = (int32_t) l.blocks.size();
        out->n_expert         = l.n_expert;
        out->n_expert_used    = l.n_expert_used;
        out->expert_bytes     = (int64_t) l.expert_bytes;
        out->non_expert_bytes = (int64_t) l.non_expert_bytes;
        out->min_budget_bytes = (int64_t) l.min_budget_bytes();
        out->min_gpu_budget_bytes = (int64_t) l.min_budget_bytes(true);
        out->data_alignment   = (int64_t) l.alignment;
        out->slices_aligned   = l.blocks.empty() ? 0 : (l.slices_aligned(DIRECT_ALIGN) ? 1 : 0);
        out->n_pools = (int32_t) l.pools.size();
        for (const auto & p : l.pools) {
            out->slot_bytes_max = std::max<int64_t>(out->slot_bytes_max, (int64_t) p.slot_bytes);
        }
        return (int) EDGEMOE_OK;
    });
}

int edgemoe_cache_create(const char * model_path, const edgemoe_options * opts, edgemoe_cache ** out) {
    return guarded([&] {
        if (!model_path || !out) {
            return fail(EDGEMOE_ERR_INVALID_ARG, "model_path and out are required");
        }
        *out = nullptr;
        const edgemoe_options o = opts ? *opts : edgemoe_default_options();
        cache_options co;
        co.budget_bytes    = o.budget_bytes > 0 ? (uint64_t) o.budget_bytes : 0;
        co.budget_fraction = o.budget_fraction;
        co.n_io_threads    = o.n_io_threads;
        co.quiet           = o.quiet;
        switch (o.policy) {
            case EDGEMOE_POLICY_DEFAULT: co.policy = policy_kind::freq_aged; break;
            case EDGEMOE_POLICY_LRU:     co.policy = policy_kind::lru;       break;
            case EDGEMOE_POLICY_LFU:     co.policy = policy_kind::lfu;       break;
            case EDGEMOE_POLICY_BELADY:  co.policy = policy_kind::belady;    break;
            default: return fail(EDGEMOE_ERR_INVALID_ARG, "unknown policy " + std::to_string(o.policy));
        }
        switch (o.prefetch) {
            case EDGEMOE_PREFETCH_OFF:       co.prefetch = prefetch_kind::off;       break;
            case EDGEMOE_PREFETCH_LOOKAHEAD: co.prefetch = prefetch_kind::lookahead; break;
            case EDGEMOE_PREFETCH_ROUTES:    co.prefetch = prefetch_kind::routes;    break;
            default: return fail(EDGEMOE_ERR_INVALID_ARG, "unknown prefetch mode " + std::to_string(o.prefetch));
        }
        if (o.lookahead < 0 || o.lookahead > 8) {
            return fail(EDGEMOE_ERR_INVALID_ARG, "lookahead must be 0 to 8 layers, got " + std::to_string(o.lookahead));
        }
        co.lookahead = o.lookahead;
        if (o.prefetch_top < 0) {
            return fail(EDGEMOE_ERR_INVALID_ARG, "prefetch_top must be 0 (half of top-k) or more, got " + std::to_string(o.prefetch_top));
        }
        co.prefetch_top = o.prefetch_top;
        switch (o.pool) {
            case EDGEMOE_POOL_HOST:   co.pool = pool_kind::host;   break;
            case EDGEMOE_POOL_GPU:    co.pool = pool_kind::gpu;    break;
            case EDGEMOE_POOL_VRAM:   co.pool = pool_kind::vram;   break;
            case EDGEMOE_POOL_MAPPED: co.pool = pool_kind::mapped; break;
            default: return fail(EDGEMOE_ERR_INVALID_ARG, "unknown pool " + std::to_string(o.pool));
        }
        co.repack = o.repack;
        co.hybrid = o.hybrid;
        switch (o.io) {
            case EDGEMOE_IO_DIRECT:   co.io = io_kind::direct;   break;
            case EDGEMOE_IO_BUFFERED: co.io = io_kind::buffered; break;
            case EDGEMOE_IO_MMAP:     co.io = io_kind::mmap;     break;
            case EDGEMOE_IO_PINNED:   co.io = io_kind::pinned;   break;
            default: return fail(EDGEMOE_ERR_INVALID_ARG, "unknown io " + std::to_string(o.io));
        }
        if (o.budget_bytes < 0 || (o.budget_bytes == 0 && !(o.budget_fraction > 0.0 && o.budget_fraction <= 1.0))) {
            return fail(EDGEMOE_ERR_INVALID_ARG, "budget must be bytes > 0 or a fraction in (0, 1]");
        }
        std::string err;
        int status = EDGEMOE_OK;
        auto impl = expert_cache::create(model_path, co, &err, &status);
        if (!impl) {
            return fail(status, err);
        }
        auto * c = new edgemoe_cache();
        c->impl = std::move(impl);
        c->provider.user      = c;
        c->provider.bind      = provider_bind;
        c->provider.wave      = provider_wave;
        c->provider.route_ctx = provider_route_ctx;
        c->provider.route     = op_on_thread0<&expert_cache::op_route>;
        c->provider.remap     = op_remap;
        c->provider.mask      = op_on_thread0<&expert_cache::op_mask>;
        c->provider.cpu_ids   = op_on_thread0<&expert_cache::op_cpu_ids>;
        c->provider.cpu_mask  = op_on_thread0<&expert_cache::op_cpu_mask>;
        c->provider.max_waves = c->impl->max_waves();
        c->provider.ubatch_rows = provider_ubatch_rows;
        *out = c;
        return (int) EDGEMOE_OK;
    });
}

void edgemoe_cache_free(edgemoe_cache * cache) {
    if (!cache) {
        return;
    }
    try {
        if (cache->ctx) {
            llama_set_expert_provider(cache->ctx, nullptr);
            llama_set_abort_callback(cache->ctx, nullptr, nullptr);
        }
        delete cache;
    } catch (...) {
    }
}

int edgemoe_cache_attach(edgemoe_cache * cache, llama_context * ctx) {
    return guarded([&] {
        if (!cache) {
            return fail(EDGEMOE_ERR_INVALID_ARG, "cache is NULL");
        }
        if (cache->ctx && ctx && cache->ctx != ctx) {
            return fail(EDGEMOE_ERR_STATE, "the cache is attached to another context");
        }
        if (cache->ctx && !ctx) {
            llama_set_expert_provider(cache->ctx, nullptr);
            llama_set_abort_callback(cache->ctx, nullptr, nullptr);
            cache->ctx = nullptr;
        }
        if (ctx) {
            // llama.cpp opened the model by its path: it must be the file the cache opened
            std::string err;
            if (cache->impl->check_file(&err) != EDGEMOE_OK) {
                return fail(EDGEMOE_ERR_IO, err);
            }
            cache->impl->guard_file_mappings();
            if (!llama_set_expert_provider(ctx, &cache->provider)) {
                return fail(EDGEMOE_ERR_STATE, "this context may compute graph nodes out of order (pipeline "
                            "parallelism over several GPUs), which the cache's slot pins do not allow; "
                            "use one GPU or --split-mode none");
            }
            llama_set_abort_callback(ctx, abort_on_fault, cache);
            cache->ctx = ctx;
        }
        return (int) EDGEMOE_OK;
    });
}

int edgemoe_cache_take_fault(edgemoe_cache * cache) {
    return guarded([&] {
        if (!cache) {
            return fail(EDGEMOE_ERR_INVALID_ARG, "cache is NULL");
        }
        std::string msg;
        const int status = cache->impl->take_fault(&msg);
        return status == EDGEMOE_OK ? (int) EDGEMOE_OK : fail(status, msg);
    });
}

int edgemoe_cache_check_file(const edgemoe_cache * cache) {
    return guarded([&] {
        if (!cache) {
            return fail(EDGEMOE_ERR_INVALID_ARG, "cache is NULL");
        }
        std::string err;
        const int status = cache->impl->check_file(&err);
        return status == EDGEMOE_OK ? (int) EDGEMOE_OK : fail(status, err);
    });
}

int edgemoe_fault_plan(const char * plan) {
    return guarded([&] {
        std::string err;
        if (!faults::set_plan(plan, &err)) {
            return fail(faults::available() ? EDGEMOE_ERR_INVALID_ARG : EDGEMOE_ERR_STATE, err);
        }
        return (int) EDGEMOE_OK;
    });
}

bool edgemoe_fault_injection_available(void) {
    return faults::available();
}

int edgemoe_cache_info_get(const edgemoe_cache * cache, edgemoe_cache_info * out) {
    return guarded([&] {
        if (!cache || !out) {
            return fail(EDGEMOE_ERR_INVALID_ARG, "cache and out are required");
        }
        out->budget_bytes = (int64_t) cache->impl->budget_bytes();
        out->n_slots      = cache->impl->n_slots_total();
        out->n_pools      = cache->impl->n_pools();
        out->policy       = (int32_t) cache->impl->policy();
        out->io           = (int32_t) cache->impl->io();
        out->prefetch     = (int32_t) cache->impl->prefetch_mode();
        out->pool         = (int32_t) cache->impl->pool_in_use();
        out->n_repacked   = cache->impl->n_repacked();
        snprintf(out->pool_device, sizeof(out->pool_device), "%s", cache->impl->pool_device().c_str());
        return (int) EDGEMOE_OK;
    });
}

int edgemoe_cache_prefetch(edgemoe_cache * cache, int32_t layer, const int32_t * experts, int32_t n) {
    return guarded([&] {
        if (!cache || (n > 0 && !experts) || n < 0) {
            return fail(EDGEMOE_ERR_INVALID_ARG, "invalid prefetch arguments");
        }
        std::string err;
        const int st = cache->impl->prefetch(layer, experts, n, &err);
        return st == EDGEMOE_OK ? st : fail(st, err);
    });
}

int edgemoe_cache_set_routes(edgemoe_cache * cache, int32_t layer, const int32_t * ids, int32_t n_tokens, int32_t k) {
    return guarded([&] {
        if (!cache || !ids || n_tokens <= 0 || k <= 0) {
            return fail(EDGEMOE_ERR_INVALID_ARG, "invalid route arguments");
        }
        std::string err;
        const int st = cache->impl->set_routes(layer, ids, n_tokens, k, &err);
        return st == EDGEMOE_OK ? st : fail(st, err);
    });
}

int edgemoe_cache_set_routes_all(edgemoe_cache * cache, const int32_t * ids, int32_t n_tokens, int32_t n_moe_layer, int32_t k) {
    return guarded([&] {
        if (!cache || !ids || n_tokens <= 0 || n_moe_layer <= 0 || k <= 0) {
            return fail(EDGEMOE_ERR_INVALID_ARG, "invalid route arguments");
        }
        std::string err;
        const int st = cache->impl->set_routes_all(ids, n_tokens, n_moe_layer, k, &err);
        return st == EDGEMOE_OK ? st : fail(st, err);
    });
}

int edgemoe_cache_clear_routes(edgemoe_cache * cache) {
    return guarded([&] {
        if (!cache) {
            return fail(EDGEMOE_ERR_INVALID_ARG, "cache is NULL");
        }
        cache->impl->clear_routes();
        return (int) EDGEMOE_OK;
    });
}

int edgemoe_cache_last_routes(const edgemoe_cache * cache, int32_t * out, int32_t n_rows, int32_t n_moe_layer, int32_t k) {
    return guarded([&] {
        if (!cache || !out) {
            return fail(EDGEMOE_ERR_INVALID_ARG, "cache and out are required");
        }
        std::string err;
        const int st = cache->impl->last_routes(out, n_rows, n_moe_layer, k, &err);
        return st == EDGEMOE_OK ? st : fail(st, err);
    });
}

int edgemoe_cache_resident(const edgemoe_cache * cache, uint8_t * out, int32_t n_moe_layer, int32_t n_expert) {
    return guarded([&] {
        if (!cache || !out) {
            return fail(EDGEMOE_ERR_INVALID_ARG, "cache and out are required");
        }
        std::string err;
        const int st = cache->impl->resident(out, n_moe_layer, n_expert, &err);
        return st == EDGEMOE_OK ? st : fail(st, err);
    });
}

int edgemoe_cache_stats(const edgemoe_cache * cache, int32_t layer, edgemoe_stats * out) {
    return guarded([&] {
        if (!cache || !out) {
            return fail(EDGEMOE_ERR_INVALID_ARG, "cache and out are required");
        }
        const layer_stats s = cache->impl->stats(layer);
        out->hits            = s.hits;
        out->misses          = s.misses;
        out->prefetch_hits   = s.prefetch_hits;
        out->prefetch_wasted = s.prefetch_wasted;
        out->prefetch_issued = s.prefetch_issued;
        out->bytes_read      = s.bytes_read;
        out->read_ms         = s.read_ms;
        out->stall_ms        = s.stall_ms;
        out->prefetch_cancelled = s.prefetch_cancelled;
        out->pred_predicted  = s.pred_predicted;
        out->pred_correct    = s.pred_correct;
        out->pred_actual     = s.pred_actual;
        out->steps           = s.steps;
        out->book_ms         = s.book_ms;
        out->predict_ms      = s.predict_ms;
        out->convert_ms      = s.convert_ms;
        out->cpu_uses        = s.cpu_uses;
        return (int) EDGEMOE_OK;
    });
}

int edgemoe_cache_reset_stats(edgemoe_cache * cache) {
    return guarded([&] {
        if (!cache) {
            return fail(EDGEMOE_ERR_INVALID_ARG, "cache is NULL");
        }
        cache->impl->reset_stats();
        return (int) EDGEMOE_OK;
    });
}

} // extern "C"
