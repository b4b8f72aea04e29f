// Shared pieces of the cache tests: tiny models on disk, a cache with its graph driver, and
// the small queries the tests make of it.
#pragma once

#include "check.h"
#include "edgemoe.h"
#include "expert_cache.h"
#include "graph_sim.h"
#include "slot_memory.h"
#include "tiny_moe.h"

#include "ggml-alloc.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace util {

// ggml's debug and info lines (a repacked pool logs one per load) off; warnings and errors stay
inline void quiet_ggml() {
    // ggml logs from the I/O threads too (repacking): a continued line's level per thread
    ggml_log_set([](ggml_log_level level, const char * text, void *) {
        static thread_local int last = GGML_LOG_LEVEL_WARN;
        last = level == GGML_LOG_LEVEL_CONT ? last : (int) level;
        if (last >= GGML_LOG_LEVEL_WARN) {
            fputs(text, stderr);
        }
    }, nullptr);
}

// models written by a test, removed at exit
inline std::vector<std::string> & model_files() {
    static std::vector<std::string> files;
    return files;
}

inline void remove_models() {
    for (const auto & f : model_files()) {
        tiny::remove_file(f);
    }
    model_files().clear();
}

inline tiny::model write_model(const tiny::config & cfg, const char * tag) {
    tiny::model m;
    std::string err;
    const std::string path = tiny::temp_path(tag);
    if (path.empty() || !tiny::write(path, cfg, &m, &err)) {
        fprintf(stderr, "cannot write the test model %s: %s\n", path.c_str(), err.c_str());
        exit(2);
    }
    model_files().push_back(path);
    return m;
}

// a dense layer 0, then n_moe MoE layers of one shape (one pool)
inline tiny::config basic_config(int n_moe = 3, int32_t n_expert = 8, int32_t k = 2) {
    tiny::config c;
    c.n_expert = n_expert;
    c.n_expert_used = k;
    c.layers.assign(1 + n_moe, tiny::layer_spec());
    c.layers[0].moe = false;
    return c;
}

// only MoE layers
inline tiny::config moe_only_config(int n_moe, int32_t n_expert, int32_t k) {
    tiny::config c;
    c.n_expert = n_expert;
    c.n_expert_used = k;
    c.layers.assign(n_moe, tiny::layer_spec());
    return c;
}

// two pools: layers 0 and 3 (n_ff 16, up/gate/down), layer 2 (n_ff 24, merged gate_up), layer 1 dense
inline tiny::config mixed_config() {
    tiny::config c;
    c.layers.assign(4, tiny::layer_spec());
    c.layers[1].moe = false;
    c.layers[2].n_ff = 24;
    c.layers[2].gate_up = true;
    return c;
}

// every expert slice 4 KiB and page aligned in the file: O_DIRECT reads land in place
inline tiny::config aligned_config() {
    tiny::config c;
    c.n_embd = 64;
    c.page_aligned = true;
    c.layers.assign(3, tiny::layer_spec());
    return c;
}

inline edgemoe::cache_options options(uint64_t budget_bytes, edgemoe::io_kind io = edgemoe::io_kind::direct,
                                      edgemoe::policy_kind pol = edgemoe::policy_kind::freq_aged, int n_io_threads = 2) {
    edgemoe::cache_options o;
    o.budget_bytes = budget_bytes;
    o.io = io;
    o.policy = pol;
    o.n_io_threads = n_io_threads;
    o.quiet = true;
    o.repack = false;
    return o;
}

// bytes of n slots in every pool
inline uint64_t slots_bytes(const tiny::model & m, int n) {
    uint64_t b = 0;
    for (uint64_t s : m.pool_slot_bytes) {
        b += (uint64_t) n*s;
    }
    return b;
}

inline uint64_t all_expert_bytes(const tiny::model & m) {
    uint64_t b = 0;
    for (int32_t bl = 0; bl < m.n_blocks(); ++bl) {
        b += (uint64_t) m.cfg.n_expert*m.pool_slot_bytes[m.block_pool[bl]];
    }
    return b;
}

struct rig {
    const tiny::model * m = nullptr;
    std::unique_ptr<edgemoe::expert_cache> cache;
    llama_expert_provider prov = {};
    std::unique_ptr<sim::graph> g;
    std::string err;
    int status = 0;

    bool open(const tiny::model & model, const edgemoe::cache_options & o, int n_compute_threads = 1) {
        m = &model;
        g.reset();
        cache = edgemoe::expert_cache::create(model.path, o, &err, &status);
        if (!cache) {
            return false;
        }
        prov = sim::direct_provider(cache.get());
        g.reset(new sim::graph(prov, model, n_compute_threads));
        edgemoe::expert_cache * c = cache.get();
        g->set_abort([c] { return c->faulted(); });
        if (!g->bind_all(&err)) {
            status = -1;
            return false;
        }
        return true;
    }

    void close() {
        g.reset();
        cache.reset();
    }

    int32_t layer(int32_t block) const { return m->block_layer[block]; }

    std::vector<uint8_t> resident() const {
        std::vector<uint8_t> r((size_t) m->n_blocks()*m->cfg.n_expert, 0);
        std::string e;
        if (cache->resident(r.data(), m->n_blocks(), m->cfg.n_expert, &e) != EDGEMOE_OK) {
            fprintf(stderr, "resident() failed: %s\n", e.c_str());
            g_failures++;
        }
        return r;
    }
    bool is_resident(int32_t block, int32_t e) const { return resident()[(size_t) block*m->cfg.n_expert + e] != 0; }
    std::set<int32_t> resident_of(int32_t block) const {
        std::set<int32_t> s;
        const auto r = resident();
        for (int32_t e = 0; e < m->cfg.n_expert; ++e) {
            if (r[(size_t) block*m->cfg.n_expert + e]) {
                s.insert(e);
            }
        }
        return s;
    }

    edgemoe::layer_stats total() const { return cache->stats(-1); }

    // a ubatch whose graph ids come from f(block, token, j)
    sim::ubatch make(int32_t n_tokens, const std::function<int32_t(int32_t, int32_t, int32_t)> & f) const {
        sim::ubatch u;
        u.n_tokens = n_tokens;
        const int32_t k = m->cfg.n_expert_used;
        u.ids.resize((size_t) m->n_blocks()*n_tokens*k);
        for (int32_t b = 0; b < m->n_blocks(); ++b) {
            for (int32_t t = 0; t < n_tokens; ++t) {
                for (int32_t j = 0; j < k; ++j) {
                    u.ids[((size_t) b*n_tokens + t)*k + j] = f(b, t, j);
                }
            }
        }
        return u;
    }
    // every block routes token t to the given experts
    sim::ubatch same(const std::vector<std::vector<int32_t>> & tokens) const {
        return make((int32_t) tokens.size(), [&](int32_t, int32_t t, int32_t j) { return tokens[t][j]; });
    }
    sim::ubatch random(sim::route_gen & rng, int32_t n_tokens, double skew = 2.0) const {
        sim::ubatch u = make(n_tokens, [](int32_t, int32_t, int32_t) { return 0; });
        const int32_t k = m->cfg.n_expert_used;
        for (size_t i = 0; i < u.ids.size(); i += k) {
            rng.token(m->cfg.n_expert, k, u.ids.data() + i, skew);
        }
        return u;
    }

    // waits until the cache has read `bytes` in all (loads queued by prefetches finish)
    bool wait_bytes(uint64_t bytes, int timeout_ms = 20000) const {
        const auto t0 = std::chrono::steady_clock::now();
        while (cache->stats(-1).bytes_read < bytes) {
            if (std::chrono::steady_clock::now() - t0 > std::chrono::milliseconds(timeout_ms)) {
                return false;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        return true;
    }
};

// What the slots of a repacked host pool hold: each role's experts as ggml's CPU backend
// repacks them (into a buffer of the type the cache picks). Empty where nothing repacks.
struct repacked_experts {
    std::map<std::pair<int32_t, int>, std::vector<uint8_t>> bytes; // (block, role) -> all experts
    const tiny::model * m = nullptr;
    bool empty() const { return bytes.empty(); }
    const uint8_t * at(int32_t b, int32_t e, int role) const {
        return bytes.at({ b, role }).data() + (size_t) e*m->slice_bytes(b, role);
    }
};

inline repacked_experts repack_experts(const tiny::model & m) {
    repacked_experts out;
    out.m = &m;
    ggml_init_params ip = { ggml_tensor_overhead()*4, nullptr, true };
    for (int32_t b = 0; b < m.n_blocks(); ++b) {
        for (int r = 0; r < tiny::N_ROLES; ++r) {
            if (!m.has_role(b, r)) {
                continue;
            }
            ggml_context * ctx = ggml_init(ip);
            ggml_tensor * t = ggml_new_tensor_3d(ctx, m.cfg.layers[m.block_layer[b]].type, m.ne0(b, r), m.ne1(b, r), m.cfg.n_expert);
            ggml_backend_buffer_type_t buft = edgemoe::slot_memory::repack_type_for(t);
            ggml_backend_buffer_t buf = buft ? ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft) : nullptr;
            if (!buf) {
                ggml_free(ctx);
                out.bytes.clear();
                return out;
            }
            ggml_backend_tensor_set(t, m.expected(b, 0, r), 0, ggml_nbytes(t));
            const uint8_t * raw = (const uint8_t *) t->data;
            out.bytes[{ b, r }].assign(raw, raw + ggml_nbytes(t));
            ggml_backend_buffer_free(buf);
            ggml_free(ctx);
        }
    }
    return out;
}

// Q4_0 experts, which ggml's CPU backend repacks on x86 with AVX2 and on ARM
inline tiny::config q4_config(int n_moe = 3) {
    tiny::config c = basic_config(n_moe, 8, 2);
    for (auto & l : c.layers) {
        l.type = GGML_TYPE_Q4_0;
        l.n_ff = 32;
    }
    return c;
}

// the expert's bytes, all roles of a block
inline uint64_t expert_bytes(const tiny::model & m, int32_t block) { return m.pool_slot_bytes[m.block_pool[block]]; }

} // namespace util
