#include "graph_sim.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

using edgemoe::expert_cache;
using edgemoe::wave_ctx;

namespace sim {

namespace {

expert_cache * cache_of(void * user) { return static_cast<expert_cache *>(user); }

bool d_bind(void * user, int32_t il, const ggml_tensor * up, const ggml_tensor * gate, const ggml_tensor * down,
            const ggml_tensor * gate_up, llama_expert_slots * out) {
    ggml_tensor * slots[edgemoe::ROLE_COUNT] = {};
    int32_t n_slots = 0;
    void * unit = nullptr;
    if (!cache_of(user)->bind(il, up, gate, down, gate_up, slots, &n_slots, &unit)) {
        return false;
    }
    out->up      = slots[edgemoe::ROLE_UP];
    out->gate    = slots[edgemoe::ROLE_GATE];
    out->down    = slots[edgemoe::ROLE_DOWN];
    out->gate_up = slots[edgemoe::ROLE_GATE_UP];
    out->n_slots = n_slots;
    out->unit    = unit;
    return true;
}

void * d_wave(void * user, void * unit, int32_t i, int32_t n) { return cache_of(user)->wave(unit, i, n); }
void * d_route_ctx(void * user, void * unit, int32_t n) { return cache_of(user)->route_ctx(unit, n); }
void d_ubatch_rows(void * user, const int32_t * idx, int32_t n, int32_t first) { cache_of(user)->ubatch_rows(idx, n, first); }

void d_route(ggml_tensor * dst, int ith, int, void * ud) {
    if (ith != 0) {
        return;
    }
    const wave_ctx * w = static_cast<const wave_ctx *>(ud);
    w->cache->op_route(dst, *w);
}

void d_remap(ggml_tensor * dst, int ith, int, void * ud) {
    wave_ctx * w = static_cast<wave_ctx *>(ud);
    if (ith != 0) {
        w->cache->remap_wait(*w, ith);
        return;
    }
    w->cache->op_remap(dst, *w);
    w->cache->remap_done(*w);
}

void d_mask(ggml_tensor * dst, int ith, int, void * ud) {
    if (ith != 0) {
        return;
    }
    const wave_ctx * w = static_cast<const wave_ctx *>(ud);
    w->cache->op_mask(dst, *w);
}

} // namespace

llama_expert_provider direct_provider(expert_cache * cache) {
    llama_expert_provider p = {};
    p.user        = cache;
    p.bind        = d_bind;
    p.wave        = d_wave;
    p.route_ctx   = d_route_ctx;
    p.route       = d_route;
    p.remap       = d_remap;
    p.mask        = d_mask;
    p.max_waves   = cache->max_waves();
    p.ubatch_rows = d_ubatch_rows;
    return p;
}

compute_pool::compute_pool(int n_threads) : n_(std::max(1, n_threads)) {
    for (int i = 1; i < n_; ++i) {
        threads_.emplace_back([this, i] { worker(i); });
    }
}

compute_pool::~compute_pool() {
    {
        std::lock_guard<std::mutex> lock(mu_);
        stop_ = true;
    }
    cv_start_.notify_all();
    for (auto & t : threads_) {
        t.join();
    }
}

void compute_pool::run(const std::function<void(int, int)> & fn) {
    if (n_ == 1) {
        fn(0, 1);
        return;
    }
    {
        std::lock_guard<std::mutex> lock(mu_);
        job_ = &fn;
        pending_ = n_ - 1;
        gen_++;
    }
    cv_start_.notify_all();
    fn(0, n_);
    std::unique_lock<std::mutex> lock(mu_);
    cv_done_.wait(lock, [&] { return pending_ == 0; });
    job_ = nullptr;
}

void compute_pool::worker(int ith) {
    uint64_t seen = 0;
    for (;;) {
        const std::function<void(int, int)> * job;
        {
            std::unique_lock<std::mutex> lock(mu_);
            cv_start_.wait(lock, [&] { return stop_ || gen_ != seen; });
            if (stop_) {
                return;
            }
            seen = gen_;
            job = job_;
        }
        (*job)(ith, n_);
        std::lock_guard<std::mutex> lock(mu_);
        if (--pending_ == 0) {
            cv_done_.notify_all();
        }
    }
}

graph::graph(const llama_expert_provider & p, const tiny::model & m, int n_threads) : p_(p), m_(m), pool_(n_threads) {
    ggml_init_params ip = { ggml_tensor_overhead()*(size_t) (m.n_blocks()*tiny::N_ROLES + 1), nullptr, true };
    meta_ = ggml_init(ip);
    slots_.assign(m.n_blocks(), llama_expert_slots{});
}

graph::~graph() {
    if (work_) {
        ggml_free(work_);
    }
    ggml_free(meta_);
}

bool graph::bind_all(std::string * err) {
    ggml_reset(meta_);
    for (int32_t b = 0; b < m_.n_blocks(); ++b) {
        const ggml_tensor * t[tiny::N_ROLES] = {};
        for (int r = 0; r < tiny::N_ROLES; ++r) {
            if (!m_.has_role(b, r)) {
                continue;
            }
            ggml_tensor * x = ggml_new_tensor_3d(meta_, m_.cfg.layers[m_.block_layer[b]].type, m_.ne0(b, r), m_.ne1(b, r), m_.cfg.n_expert);
            ggml_set_name(x, m_.tensor_name(b, r).c_str());
            t[r] = x;
        }
        llama_expert_slots s = {};
        if (!p_.bind(p_.user, m_.block_layer[b], t[tiny::ROLE_UP], t[tiny::ROLE_GATE], t[tiny::ROLE_DOWN], t[tiny::ROLE_GATE_UP], &s)) {
            *err = "bind refused layer " + std::to_string(m_.block_layer[b]);
            return false;
        }
        ggml_tensor * got[tiny::N_ROLES] = { s.up, s.gate, s.down, s.gate_up };
        for (int r = 0; r < tiny::N_ROLES; ++r) {
            if ((got[r] != nullptr) != m_.has_role(b, r)) {
                *err = "bind gave a wrong set of slot tensors for layer " + std::to_string(m_.block_layer[b]);
                return false;
            }
            if (got[r] && (got[r]->ne[0] != m_.ne0(b, r) || got[r]->ne[1] != m_.ne1(b, r) || got[r]->ne[2] != s.n_slots ||
                           (uint64_t) got[r]->nb[2] != m_.slice_bytes(b, r) || !got[r]->data)) {
                *err = "a slot tensor of layer " + std::to_string(m_.block_layer[b]) + " is not shaped like the expert tensor";
                return false;
            }
        }
        if (s.n_slots < m_.cfg.n_expert_used || s.unit == nullptr) {
            *err = "bind gave " + std::to_string(s.n_slots) + " slots for layer " + std::to_string(m_.block_layer[b]);
            return false;
        }
        slots_[b] = s;
    }
    return true;
}

ggml_tensor * graph::pool_tensor(int32_t block, int role) const {
    const llama_expert_slots & s = slots_[block];
    ggml_tensor * t[tiny::N_ROLES] = { s.up, s.gate, s.down, s.gate_up };
    return t[role];
}

bool graph::slot_holds(int32_t block, int32_t slot, int32_t want_block, int32_t expert) const {
    for (int r = 0; r < tiny::N_ROLES; ++r) {
        const ggml_tensor * t = pool_tensor(block, r);
        if (!t) {
            continue;
        }
        const uint64_t n = m_.slice_bytes(want_block, r);
        const uint8_t * want = expected_ ? expected_(want_block, expert, r) : m_.expected(want_block, expert, r);
        if (n != (uint64_t) t->nb[2] || memcmp((const uint8_t *) t->data + (size_t) slot*t->nb[2], want, n) != 0) {
            return false;
        }
    }
    return true;
}

bool graph::slot_identity(int32_t block, int32_t slot, int32_t * held_block, int32_t * expert) const {
    int r0 = -1;
    for (int r = 0; r < tiny::N_ROLES && r0 < 0; ++r) {
        r0 = pool_tensor(block, r) ? r : -1;
    }
    const ggml_tensor * t = pool_tensor(block, r0);
    int32_t layer = -1, e = -1, role = -1;
    if (expected_) {
        // a transformed layout has no readable header: try every expert of the pool
        for (int32_t hb = 0; hb < m_.n_blocks(); ++hb) {
            for (int32_t x = 0; x < m_.cfg.n_expert && m_.block_pool[hb] == m_.block_pool[block]; ++x) {
                if (slot_holds(block, slot, hb, x)) {
                    *held_block = hb;
                    *expert = x;
                    return true;
                }
            }
        }
        return false;
    }
    if (!tiny::model::identify((const uint8_t *) t->data + (size_t) slot*t->nb[2], &layer, &e, &role) || role != r0) {
        return false;
    }
    const int32_t hb = m_.block_of_layer(layer);
    if (hb < 0 || e < 0 || e >= m_.cfg.n_expert || m_.block_pool[hb] != m_.block_pool[block]) {
        return false;
    }
    *held_block = hb;
    *expert = e;
    return slot_holds(block, slot, hb, e);
}

bool graph::node(const std::function<void(int, int)> & fn) {
    pool_.run(fn);
    if (abort_ && abort_()) {
        aborted_ = true;
    }
    return !aborted_;
}

void graph::fail(const std::string & msg) {
    failures_++;
    std::lock_guard<std::mutex> lock(msg_mu_);
    if (n_msgs_++ < 20) {
        fprintf(stderr, "graph check failed: %s\n", msg.c_str());
    }
}

int64_t graph::run(const ubatch & u, const std::function<void(const wave_view &)> & on_wave, std::vector<int32_t> * routed) {
    const int64_t before = failures_.load();
    const int32_t n_blocks = m_.n_blocks();
    const int64_t k = m_.cfg.n_expert_used;
    const int64_t n_tokens = u.n_tokens;
    const int64_t n_embd = m_.cfg.n_embd;
    const bool reduced = !u.out_ids.empty();

    // room for every op tensor of the ubatch
    int32_t max_waves = 1;
    for (int32_t b = 0; b < n_blocks; ++b) {
        max_waves = std::max<int32_t>(max_waves, (int32_t) ((std::min<int64_t>(k*n_tokens, m_.cfg.n_expert) + slots_[b].n_slots - 1)/slots_[b].n_slots));
    }
    const size_t need = (size_t) n_blocks*((size_t) (5 + 2*max_waves)*(ggml_tensor_overhead() + (size_t) m_.cfg.n_expert*n_tokens*4 + 64) +
                                           ggml_tensor_overhead() + (size_t) n_embd*n_tokens*4 + 64) + 4096;
    if (!work_ || need > work_size_) {
        if (work_) {
            ggml_free(work_);
        }
        work_size_ = std::max(need, work_size_*2);
        ggml_init_params ip = { work_size_, nullptr, false };
        work_ = ggml_init(ip);
    } else {
        ggml_reset(work_);
    }

    aborted_ = false;
    if (u.call_ubatch_rows && p_.ubatch_rows) {
        p_.ubatch_rows(p_.user, u.batch_idx.empty() ? nullptr : u.batch_idx.data(), u.n_tokens, u.first_row);
    }
    if (routed) {
        routed->clear();
    }
    for (int32_t b = 0; b < n_blocks; ++b) {
        const bool last = b == n_blocks - 1;
        if (last && u.no_outputs) {
            break; // ep_on is false for 0 rows: no route, remap or mask op
        }
        const int64_t rows = last && reduced ? (int64_t) u.out_ids.size() : n_tokens;
        auto ubatch_row = [&](int64_t t) { return last && reduced ? (int64_t) u.out_ids[t] : t; };

        // the router's top-k, as ggml_argsort_top_k gives it: the first k columns of an argsort
        // [n_expert, rows], a strided view (the rest of each row: the other experts)
        const int64_t X = m_.cfg.n_expert;
        ggml_tensor * sorted = ggml_new_tensor_2d(work_, GGML_TYPE_I32, X, rows);
        for (int64_t t = 0; t < rows; ++t) {
            int32_t * row = (int32_t *) sorted->data + t*X;
            for (int64_t j = 0; j < X; ++j) {
                row[j] = j < k ? u.ids[((size_t) b*n_tokens + ubatch_row(t))*k + j] : (int32_t) ((X - 1 - j + t) % X);
            }
        }
        ggml_tensor * sel = ggml_view_2d(work_, sorted, k, rows, sorted->nb[1], 0);
        ggml_tensor * out_ids = nullptr;
        if (last && reduced) {
            out_ids = ggml_new_tensor_1d(work_, GGML_TYPE_I32, rows);
            memcpy(out_ids->data, u.out_ids.data(), (size_t) rows*sizeof(int32_t));
        }
        ggml_tensor * hidden = nullptr;
        if (!u.hidden.empty()) {
            hidden = ggml_new_tensor_2d(work_, GGML_TYPE_F32, n_embd, rows);
            for (int64_t t = 0; t < rows; ++t) {
                memcpy((float *) hidden->data + t*n_embd, u.hidden.data() + ((size_t) b*n_tokens + ubatch_row(t))*n_embd,
                       (size_t) n_embd*sizeof(float));
            }
        }
        const llama_expert_slots & es = slots_[b];

        // route op: [k, rows] -> the ids to use
        ggml_tensor * route = ggml_new_tensor_2d(work_, GGML_TYPE_I32, k, rows);
        route->src[0] = sel;
        route->src[1] = out_ids;
        void * rctx = p_.route_ctx(p_.user, es.unit, u.n_tokens);
        if (!rctx) {
            fail("route_ctx returned NULL");
            continue;
        }
        if (!node([&](int ith, int nth) { p_.route(route, ith, nth, rctx); })) {
            break;
        }
        const int32_t * ids = (const int32_t *) route->data;
        if (routed) {
            routed->insert(routed->end(), ids, ids + rows*k);
        }

        const int64_t n_need = std::min<int64_t>(k*rows, m_.cfg.n_expert);
        const int32_t n_waves = (int32_t) ((n_need + es.n_slots - 1)/es.n_slots);
        max_waves_ = std::max(max_waves_, n_waves);
        std::vector<int32_t> own_count((size_t) (rows*k), 0);
        for (int32_t w = 0; w < n_waves; ++w) {
            void * wave = p_.wave(p_.user, es.unit, w, n_waves);
            if (!wave) {
                fail("wave returned NULL");
                break;
            }
            ggml_tensor * remap = ggml_new_tensor_2d(work_, GGML_TYPE_I32, k, rows);
            remap->src[0] = route;
            remap->src[1] = hidden;
            const bool go_on = node([&](int ith, int nth) { p_.remap(remap, ith, nth, wave); });
            remaps_++;
            if (!go_on) {
                break; // the matmuls over the slots do not run
            }
            const int32_t * slot_ids = (const int32_t *) remap->data;

            // the "matmuls": every thread reads its share of the pairs' slots
            std::vector<uint8_t> own((size_t) (rows*k), 0), valid((size_t) (rows*k), 0);
            node([&](int ith, int nth) {
                for (int64_t i = ith; i < rows*k; i += nth) {
                    const int32_t s = slot_ids[i];
                    if (s < 0 || s >= es.n_slots) {
                        continue;
                    }
                    own[i] = slot_holds(b, s, b, ids[i]) ? 1 : 0;
                    int32_t hb = -1, he = -1;
                    valid[i] = own[i] || slot_identity(b, s, &hb, &he) ? 1 : 0;
                }
            });
            const float * mask_data = nullptr;
            if (n_waves > 1) {
                ggml_tensor * mask = ggml_new_tensor_3d(work_, GGML_TYPE_F32, 1, k, rows);
                mask->src[0] = remap;
                node([&](int ith, int nth) { p_.mask(mask, ith, nth, wave); });
                mask_data = (const float *) mask->data;
            }
            for (int64_t t = 0; t < rows; ++t) {
                for (int64_t j = 0; j < k; ++j) {
                    const int64_t i = t*k + j;
                    const int32_t s = slot_ids[i];
                    const std::string where = "layer " + std::to_string(m_.block_layer[b]) + " wave " + std::to_string(w) + "/" +
                                              std::to_string(n_waves) + " token " + std::to_string(t) + " pair " + std::to_string(j) +
                                              " (expert " + std::to_string(ids[i]) + ", slot " + std::to_string(s) + ")";
                    if (s < 0 || s >= es.n_slots) {
                        fail(where + ": slot id out of range [0, " + std::to_string(es.n_slots) + ")");
                        continue;
                    }
                    const bool mine = !mask_data || mask_data[i] == 1.0f;
                    if (mask_data && mask_data[i] != 0.0f && mask_data[i] != 1.0f) {
                        fail(where + ": mask is neither 0 nor 1");
                    }
                    if (mine) {
                        own_count[i]++;
                        pairs_++;
                        if (!own[i]) {
                            fail(where + ": the slot does not hold the pair's expert (wrong weights served)");
                        }
                    } else if (!valid[i]) {
                        fail(where + ": a masked pair's slot holds no whole expert of the pool");
                    }
                    for (int64_t j2 = 0; j2 < j; ++j2) {
                        if (slot_ids[t*k + j2] == s && ids[t*k + j2] != ids[i]) {
                            fail(where + ": two pairs of one token share a slot");
                        }
                    }
                }
            }
            if (on_wave) {
                wave_view v;
                v.block = b;
                v.index = w;
                v.count = n_waves;
                v.k = k;
                v.n_tokens = rows;
                v.ids = ids;
                v.slots = slot_ids;
                v.mask = mask_data;
                v.n_slots = es.n_slots;
                on_wave(v);
            }
        }
        if (aborted_) {
            break;
        }
        for (int64_t i = 0; i < rows*k; ++i) {
            if (own_count[i] != 1) {
                fail("layer " + std::to_string(m_.block_layer[b]) + " pair " + std::to_string(i) + " computed in " +
                     std::to_string(own_count[i]) + " waves");
            }
        }
    }
    return failures_.load() - before;
}

void route_gen::token(int32_t n_expert, int32_t k, int32_t * out, double skew) {
    for (int32_t j = 0; j < k; ++j) {
        int32_t e;
        bool dup;
        do {
            e = std::min<int32_t>(n_expert - 1, (int32_t) (std::pow(unit(), skew)*n_expert));
            dup = false;
            for (int32_t i = 0; i < j; ++i) {
                dup |= out[i] == e;
            }
        } while (dup);
        out[j] = e;
    }
}

} // namespace sim
