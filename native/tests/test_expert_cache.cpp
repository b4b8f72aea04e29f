// expert_cache driven directly, as the patched llama.cpp graph drives it (graph_sim.h): slot
// pools, pins, waves, prefetch against demand, the route queue, Belady, stats, faults. Every
// remap is checked by the driver: each (token, k) pair's slot holds exactly its expert's bytes.
#include "cache_test_util.h"
#include "fault_injection.h"
#include "model_layout.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <cstring>
#include <fcntl.h>
#include <map>
#include <unistd.h>

using namespace edgemoe;
using util::rig;

namespace {

constexpr io_kind IO_KINDS[] = { io_kind::direct, io_kind::buffered, io_kind::mmap };

uint64_t stat_sum(const rig & r, uint64_t layer_stats::*field) {
    uint64_t n = 0;
    for (int32_t il = 0; il < (int32_t) r.m->cfg.layers.size(); ++il) {
        n += r.cache->stats(il).*field;
    }
    return n;
}

// ---------------------------------------------------------------------------------------------
// the tiny model helper and model_layout agree on where every expert lies

void test_tiny_model() {
    const tiny::model m = util::write_model(util::mixed_config(), "layout");
    model_layout l;
    std::string err;
    CHECK(read_model_layout(m.path, l, &err));
    CHECK_EQ(l.n_expert, m.cfg.n_expert);
    CHECK_EQ(l.n_expert_used, m.cfg.n_expert_used);
    CHECK_EQ(l.n_layer, (int32_t) m.cfg.layers.size());
    CHECK_EQ((int32_t) l.blocks.size(), m.n_blocks());
    CHECK_EQ((int32_t) l.pools.size(), m.n_pools);
    CHECK_EQ(m.n_pools, 2);
    CHECK_EQ(l.expert_bytes, util::all_expert_bytes(m));
    CHECK_EQ(l.min_budget_bytes(), util::slots_bytes(m, m.cfg.n_expert_used));
    const int fd = open(m.path.c_str(), O_RDONLY);
    CHECK(fd >= 0);
    for (int32_t b = 0; b < (int32_t) l.blocks.size() && b < m.n_blocks(); ++b) {
        CHECK_EQ(l.blocks[b].layer, m.block_layer[b]);
        CHECK_EQ(l.blocks[b].pool, m.block_pool[b]);
        CHECK_EQ(l.pools[l.blocks[b].pool].slot_bytes, m.pool_slot_bytes[m.block_pool[b]]);
        for (int r = 0; r < ROLE_COUNT; ++r) {
            const role_tensor & rt = l.blocks[b].roles[r];
            CHECK_EQ(rt.present, m.has_role(b, r));
            if (!rt.present) {
                continue;
            }
            CHECK_EQ(rt.slice_bytes, m.slice_bytes(b, r));
            CHECK(rt.name == m.tensor_name(b, r));
            std::vector<uint8_t> buf(rt.slice_bytes);
            for (int32_t e = 0; e < m.cfg.n_expert; ++e) {
                CHECK(pread(fd, buf.data(), buf.size(), (off_t) (rt.file_offset + e*rt.slice_bytes)) == (ssize_t) buf.size());
                CHECK(memcmp(buf.data(), m.expected(b, e, r), buf.size()) == 0);
                int32_t il, ee, rr;
                CHECK(tiny::model::identify(buf.data(), &il, &ee, &rr));
                CHECK(il == m.block_layer[b] && ee == e && rr == r);
            }
        }
    }
    close(fd);
    // the aligned model's slices are page aligned: direct reads land in place
    const tiny::model a = util::write_model(util::aligned_config(), "aligned");
    model_layout la;
    CHECK(read_model_layout(a.path, la, &err));
    CHECK(la.slices_aligned(DIRECT_ALIGN));
    CHECK(!l.slices_aligned(DIRECT_ALIGN));
}

// ---------------------------------------------------------------------------------------------
// the driver's check is not vacuous: a slot with one wrong byte is reported

void test_checker_catches_wrong_weights() {
    const tiny::model m = util::write_model(util::moe_only_config(1, 8, 2), "checker");
    rig r;
    CHECK(r.open(m, util::options(0)));
    if (!r.cache) {
        return;
    }
    int32_t slot = -1;
    CHECK_EQ(r.g->run(r.same({ { 1, 2 } }), [&](const sim::wave_view & v) { slot = v.slots[0]; }), 0);
    CHECK(slot >= 0);
    if (slot < 0) {
        return;
    }
    ggml_tensor * t = r.g->pool_tensor(0, tiny::ROLE_DOWN);
    uint8_t * p = (uint8_t *) t->data + (size_t) slot*t->nb[2] + 100;
    *p ^= 0x40;
    fprintf(stderr, "(a wrong byte planted on purpose: the next check failure is expected)\n");
    CHECK_EQ(r.g->run(r.same({ { 1, 2 } })), 1);
    *p ^= 0x40;
    CHECK_EQ(r.g->run(r.same({ { 2, 1 } })), 0);
}

// ---------------------------------------------------------------------------------------------
// create: budgets, errors; bind: what it accepts and what it refuses

void test_create_and_bind() {
    const tiny::model m = util::write_model(util::mixed_config(), "bind");
    const int32_t k = m.cfg.n_expert_used;
    rig r;
    CHECK(r.open(m, util::options(0)));
    if (!r.cache) {
        return;
    }
    // budget 0 bytes: the fraction (1.0) decides
    CHECK_EQ(r.cache->n_pools(), 2);
    CHECK_EQ(r.cache->n_slots_total(), m.n_blocks()*m.cfg.n_expert);
    CHECK_EQ(r.cache->budget_bytes(), util::all_expert_bytes(m));
    CHECK_EQ(r.cache->max_waves(), 1);
    for (int32_t b = 0; b < m.n_blocks(); ++b) {
        int32_t same_pool = 0;
        for (int32_t c = 0; c < m.n_blocks(); ++c) {
            same_pool += m.block_pool[c] == m.block_pool[b];
        }
        CHECK_EQ(r.g->n_slots(b), same_pool*m.cfg.n_expert);
    }

    // bind refuses what the layout does not describe; each refusal leaves the block stock
    ggml_init_params ip = { ggml_tensor_overhead()*16, nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    auto t3 = [&](ggml_type type, int64_t a, int64_t b, int64_t c, const std::string & name) {
        ggml_tensor * t = ggml_new_tensor_3d(ctx, type, a, b, c);
        ggml_set_name(t, name.c_str());
        return t;
    };
    const int64_t E = m.cfg.n_embd, F = 16, X = m.cfg.n_expert;
    ggml_tensor * up   = t3(GGML_TYPE_F32, E, F, X, "blk.0.ffn_up_exps.weight");
    ggml_tensor * gate = t3(GGML_TYPE_F32, E, F, X, "blk.0.ffn_gate_exps.weight");
    ggml_tensor * down = t3(GGML_TYPE_F32, F, E, X, "blk.0.ffn_down_exps.weight");
    ggml_tensor * slots[ROLE_COUNT] = {};
    int32_t n_slots = -1;
    void * unit = nullptr;
    CHECK(r.cache->bind(0, up, gate, down, nullptr, slots, &n_slots, &unit));
    CHECK(slots[ROLE_UP] && slots[ROLE_GATE] && slots[ROLE_DOWN] && !slots[ROLE_GATE_UP]);
    CHECK(unit != nullptr);
    CHECK(!r.cache->bind(1, up, gate, down, nullptr, slots, &n_slots, &unit));   // a dense layer
    CHECK(!r.cache->bind(9, up, gate, down, nullptr, slots, &n_slots, &unit));   // no such layer
    CHECK(!r.cache->bind(-1, up, gate, down, nullptr, slots, &n_slots, &unit));
    CHECK(!r.cache->bind(0, up, nullptr, down, nullptr, slots, &n_slots, &unit)); // a role missing
    CHECK(!r.cache->bind(0, up, gate, down, up, slots, &n_slots, &unit));        // a role too many
    ggml_tensor * renamed = t3(GGML_TYPE_F32, E, F, X, "blk.0.ffn_up_exps.other");
    CHECK(!r.cache->bind(0, renamed, gate, down, nullptr, slots, &n_slots, &unit));
    ggml_tensor * f16 = t3(GGML_TYPE_F16, E, F, X, "blk.0.ffn_up_exps.weight");
    CHECK(!r.cache->bind(0, f16, gate, down, nullptr, slots, &n_slots, &unit));
    ggml_tensor * wide = t3(GGML_TYPE_F32, E, F + 1, X, "blk.0.ffn_up_exps.weight");
    CHECK(!r.cache->bind(0, wide, gate, down, nullptr, slots, &n_slots, &unit));
    ggml_tensor * fewer = t3(GGML_TYPE_F32, E, F, X - 1, "blk.0.ffn_up_exps.weight");
    CHECK(!r.cache->bind(0, fewer, gate, down, nullptr, slots, &n_slots, &unit));
    ggml_free(ctx);

    // the custom ops' userdata is stable: one per (wave, count) and per ubatch size
    CHECK(r.cache->wave(unit, 0, 2) == r.cache->wave(unit, 0, 2));
    CHECK(r.cache->wave(unit, 0, 2) != r.cache->wave(unit, 1, 2));
    CHECK(r.cache->wave(unit, 0, 1) != r.cache->wave(unit, 0, 2));
    CHECK(r.cache->route_ctx(unit, 4) == r.cache->route_ctx(unit, 4));
    CHECK(r.cache->route_ctx(unit, 4) != r.cache->route_ctx(unit, 5));
    CHECK(r.cache->wave(nullptr, 0, 1) == nullptr);
    CHECK(r.cache->route_ctx(nullptr, 1) == nullptr);
    r.close();

    // budgets: the minimum is top-k experts in every pool
    const uint64_t min = util::slots_bytes(m, k);
    int status = 0;
    std::string err;
    auto c = expert_cache::create(m.path, util::options(min - 1), &err, &status);
    CHECK(!c);
    CHECK_EQ(status, EDGEMOE_ERR_BUDGET);
    CHECK_CONTAINS(err, "below the minimum");
    CHECK_CONTAINS(err, "(" + std::to_string(min) + " bytes");
    CHECK(r.open(m, util::options(min)));
    if (r.cache) {
        CHECK_EQ(r.cache->budget_bytes(), min);
        CHECK_EQ(r.cache->n_slots_total(), 2*k);
        for (int32_t b = 0; b < m.n_blocks(); ++b) {
            CHECK_EQ(r.g->n_slots(b), k);
        }
        CHECK_EQ(r.cache->max_waves(), (m.cfg.n_expert + k - 1)/k);
    }
    r.close();
    // any budget in between: no pool below top-k, the sum within what was asked
    sim::route_gen rng(7);
    for (int i = 0; i < 20; ++i) {
        const uint64_t asked = min + (uint64_t) (rng.unit()*(double) (util::all_expert_bytes(m) - min));
        CHECK(r.open(m, util::options(asked)));
        if (!r.cache) {
            continue;
        }
        CHECK(r.cache->budget_bytes() <= asked);
        uint64_t sum = 0;
        std::map<int32_t, int32_t> pool_slots;
        for (int32_t b = 0; b < m.n_blocks(); ++b) {
            CHECK(r.g->n_slots(b) >= k);
            pool_slots[m.block_pool[b]] = r.g->n_slots(b);
        }
        for (auto & ps : pool_slots) {
            sum += (uint64_t) ps.second*m.pool_slot_bytes[ps.first];
        }
        CHECK_EQ(sum, r.cache->budget_bytes());
        r.close();
    }
    // fraction budgets
    cache_options o = util::options(0);
    o.budget_fraction = 0.0;
    CHECK(!expert_cache::create(m.path, o, &err, &status));
    CHECK_EQ(status, EDGEMOE_ERR_INVALID_ARG);
    o.budget_fraction = NAN;
    CHECK(!expert_cache::create(m.path, o, &err, &status));
    CHECK_EQ(status, EDGEMOE_ERR_INVALID_ARG);
    o.budget_fraction = 0.5;
    c = expert_cache::create(m.path, o, &err, &status);
    CHECK(c && c->budget_bytes() <= util::all_expert_bytes(m)/2);
    c.reset();

    // files
    CHECK(!expert_cache::create("/nonexistent/edgemoe.gguf", util::options(0), &err, &status));
    CHECK_EQ(status, EDGEMOE_ERR_IO);
    const std::string junk = tiny::temp_path("junk");
    util::model_files().push_back(junk);
    FILE * f = fopen(junk.c_str(), "wb");
    fputs("not a gguf file at all", f);
    fclose(f);
    CHECK(!expert_cache::create(junk, util::options(0), &err, &status));
    CHECK_EQ(status, EDGEMOE_ERR_FORMAT);
    tiny::config dense = util::basic_config(1);
    dense.layers[1].moe = false;
    const tiny::model d = util::write_model(dense, "dense");
    CHECK(!expert_cache::create(d.path, util::options(0), &err, &status));
    CHECK_EQ(status, EDGEMOE_ERR_NO_EXPERTS);
    cache_options gpu = util::options(0);
    gpu.pool = pool_kind::gpu;
    CHECK(!expert_cache::create(m.path, gpu, &err, &status));
    CHECK_EQ(status, EDGEMOE_ERR_INVALID_ARG);
    CHECK_CONTAINS(err, "needs a GPU");
}

// ---------------------------------------------------------------------------------------------
// serving: the right bytes in every slot, over io kinds, compute threads and budgets; stats agree

void check_stats(const rig & r, bool prefetching) {
    const layer_stats t = r.total();
    CHECK_EQ(t.hits + t.misses, (uint64_t) r.g->pairs());
    CHECK_EQ(t.steps, (uint64_t) r.g->remaps());
    CHECK_EQ(t.hits, stat_sum(r, &layer_stats::hits));
    CHECK_EQ(t.misses, stat_sum(r, &layer_stats::misses));
    CHECK_EQ(t.bytes_read, stat_sum(r, &layer_stats::bytes_read));
    CHECK(t.prefetch_hits <= t.prefetch_issued);
    CHECK(t.prefetch_wasted <= t.prefetch_issued);
    for (int32_t il = 0; il < (int32_t) r.m->cfg.layers.size(); ++il) {
        const int32_t b = r.m->block_of_layer(il);
        const layer_stats s = r.cache->stats(il);
        if (b < 0) {
            CHECK_EQ(s.hits + s.misses + s.steps + s.bytes_read, 0u); // a dense layer
        } else if (!prefetching) {
            // every miss is one read of the whole expert, nothing else reads
            CHECK_EQ(s.bytes_read, s.misses*util::expert_bytes(*r.m, b));
            CHECK_EQ(s.prefetch_issued, 0u);
        } else {
            CHECK(s.bytes_read <= (s.misses + s.prefetch_issued)*util::expert_bytes(*r.m, b));
        }
    }
    CHECK_EQ(r.cache->stats(1000).hits, 0u);
}

void test_serving() {
    const tiny::model models[] = {
        util::write_model(util::basic_config(), "serve"),
        util::write_model(util::aligned_config(), "serve_aligned"),
        util::write_model(util::mixed_config(), "serve_mixed"),
    };
    sim::route_gen rng(11);
    int run = 0;
    for (const tiny::model & m : models) {
        for (io_kind io : IO_KINDS) {
            for (int threads : { 1, 3 }) {
                const uint64_t min = util::slots_bytes(m, m.cfg.n_expert_used);
                const uint64_t budget = min + (uint64_t) ((run % 3)*0.3*(double) (util::all_expert_bytes(m) - min));
                const policy_kind pol = (policy_kind) (run % 4);
                run++;
                rig r;
                CHECK(r.open(m, util::options(budget, io, pol, 1 + run % 3), threads));
                if (!r.cache) {
                    fprintf(stderr, "create failed: %s\n", r.err.c_str());
                    continue;
                }
                CHECK(r.cache->io() == io); // ext4 and the like take O_DIRECT
                for (int i = 0; i < 60; ++i) {
                    const int32_t n = i % 5 == 4 ? 6 : 1 + i % 3;
                    CHECK_EQ(r.g->run(r.random(rng, n)), 0);
                }
                CHECK(!r.g->aborted());
                check_stats(r, false);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// waves: a ubatch whose distinct experts exceed the pool

void test_waves() {
    const tiny::model m = util::write_model(util::moe_only_config(1, 8, 2), "waves");
    const int32_t k = 2;
    rig r;
    CHECK(r.open(m, util::options(util::slots_bytes(m, k)), 2));
    if (!r.cache) {
        return;
    }
    CHECK_EQ(r.g->n_slots(0), k);
    // two resident experts, then a ubatch of 4 tokens over all 8: 4 waves, the resident first
    CHECK_EQ(r.g->run(r.same({ { 5, 2 } })), 0);
    const layer_stats before = r.total();
    std::vector<std::set<int32_t>> own_by_wave;
    std::vector<layer_stats> after_wave;
    CHECK_EQ(r.g->run(r.same({ { 0, 5 }, { 1, 3 }, { 2, 4 }, { 6, 7 } }), [&](const sim::wave_view & v) {
        CHECK_EQ(v.count, 4);
        CHECK(v.mask != nullptr);
        std::set<int32_t> own;
        for (int64_t i = 0; i < v.n_tokens*v.k; ++i) {
            if (v.mask[i] == 1.0f) {
                own.insert(v.ids[i]);
            }
        }
        CHECK((int32_t) own.size() <= v.n_slots);
        for (int32_t e : own) {
            CHECK(r.is_resident(0, e));
        }
        own_by_wave.push_back(own);
        after_wave.push_back(r.total());
    }), 0);
    CHECK_EQ(r.g->max_waves_seen(), 4);
    CHECK_EQ((int) own_by_wave.size(), 4);
    if (own_by_wave.size() == 4) {
        CHECK((own_by_wave[0] == std::set<int32_t>{ 2, 5 }));  // the resident experts go first ...
        CHECK_EQ(after_wave[0].hits - before.hits, 2u);       // ... and hit
        CHECK_EQ(after_wave[0].misses - before.misses, 0u);
        std::set<int32_t> all;
        for (const auto & s : own_by_wave) {
            all.insert(s.begin(), s.end());
        }
        CHECK_EQ(all.size(), 8u);
    }
    CHECK_EQ(r.total().steps - before.steps, 4u);
    // fewer distinct experts than the waves the graph sized: the later waves compute nothing
    // of their own (carriers only), every pair still exactly once
    CHECK_EQ(r.g->run(r.same({ { 0, 1 }, { 1, 0 }, { 0, 1 }, { 1, 0 } }), [&](const sim::wave_view & v) {
        int own = 0;
        for (int64_t i = 0; i < v.n_tokens*v.k; ++i) {
            own += v.mask[i] == 1.0f;
        }
        CHECK_EQ(own, v.index == 0 ? 8 : 0);
    }), 0);
    // random ubatches of every size at the minimum, several compute threads
    sim::route_gen rng(5);
    for (int i = 0; i < 200; ++i) {
        CHECK_EQ(r.g->run(r.random(rng, 1 + i % 7, 1.0)), 0);
    }
    check_stats(r, false);
    r.close();

    // two pools at their minimum, waves in both
    const tiny::model mm = util::write_model(util::mixed_config(), "waves_mixed");
    CHECK(r.open(mm, util::options(util::slots_bytes(mm, k)), 3));
    if (r.cache) {
        for (int i = 0; i < 150; ++i) {
            CHECK_EQ(r.g->run(r.random(rng, 1 + i % 6, 1.5)), 0);
        }
        CHECK(r.g->max_waves_seen() >= 4);
        check_stats(r, false);
    }
}

// ---------------------------------------------------------------------------------------------
// pins: a slot used by the step in progress is not evicted within it

void test_pins() {
    const int32_t k = 2;
    {
        // the minimum: the step's k slots are the whole pool, so a prefetch finds nothing to take
        const tiny::model m = util::write_model(util::basic_config(3, 8, k), "pins_min");
        rig r;
        CHECK(r.open(m, util::options(util::slots_bytes(m, k))));
        if (r.cache) {
            const int32_t all[8] = { 0, 1, 2, 3, 4, 5, 6, 7 };
            int waves = 0;
            CHECK_EQ(r.g->run(r.same({ { 1, 6 } }), [&](const sim::wave_view & v) {
                const auto before = r.resident();
                const uint64_t issued = r.total().prefetch_issued;
                std::string err;
                for (int32_t b = 0; b < m.n_blocks(); ++b) {
                    CHECK_EQ(r.cache->prefetch(r.layer(b), all, 8, &err), EDGEMOE_OK);
                }
                CHECK_EQ(r.total().prefetch_issued, issued); // dropped: every slot is pinned
                CHECK(r.resident() == before);
                CHECK(r.is_resident(v.block, 1) && r.is_resident(v.block, 6));
                waves++;
            }), 0);
            CHECK_EQ(waves, m.n_blocks());
            // the pin lasts one step: the next block's remap (the next graph node that loads)
            // takes those slots, so a block's matmuls must run before the next block's remap.
            // That is the order rule the attach refuses contexts for (pipeline parallelism).
            CHECK_EQ(r.g->run(r.make(1, [](int32_t b, int32_t, int32_t j) { return 2*b + j; })), 0);
            CHECK(!r.is_resident(0, 0) && !r.is_resident(0, 1));
            CHECK(r.is_resident(2, 4) && r.is_resident(2, 5));
        }
    }
    {
        // a larger pool: prefetches during the step fill every unpinned slot; once their reads
        // are done, the step's slots still hold the step's experts
        const tiny::model m = util::write_model(util::basic_config(3, 8, k), "pins");
        rig r;
        CHECK(r.open(m, util::options(util::all_expert_bytes(m)/2, io_kind::direct, policy_kind::lru, 3), 2));
        if (r.cache) {
            sim::route_gen rng(3);
            const int32_t all[8] = { 0, 1, 2, 3, 4, 5, 6, 7 };
            for (int i = 0; i < 40; ++i) {
                CHECK_EQ(r.g->run(r.random(rng, 1 + i % 5, 1.0), [&](const sim::wave_view & v) {
                    const layer_stats s0 = r.total();
                    std::string err;
                    for (int32_t b = 0; b < m.n_blocks(); ++b) {
                        CHECK_EQ(r.cache->prefetch(r.layer(b), all, 8, &err), EDGEMOE_OK);
                    }
                    const layer_stats s1 = r.total();
                    // every load this wave started, demand and prefetch, has finished
                    CHECK(r.wait_bytes(s0.bytes_read + (s1.prefetch_issued - s0.prefetch_issued)*util::expert_bytes(m, 0)));
                    for (int64_t t = 0; t < v.n_tokens; ++t) {
                        for (int64_t j = 0; j < v.k; ++j) {
                            const int64_t p = t*v.k + j;
                            if (!v.mask || v.mask[p] == 1.0f) {
                                CHECK(r.g->slot_holds(v.block, v.slots[p], v.block, v.ids[p]));
                            } else {
                                int32_t hb, he;
                                CHECK(r.g->slot_identity(v.block, v.slots[p], &hb, &he));
                            }
                        }
                    }
                }), 0);
            }
            CHECK(r.total().prefetch_issued > 0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// prefetch against demand

struct env_guard {
    std::string name;
    env_guard(const char * n, const char * v) : name(n) { setenv(n, v, 1); }
    ~env_guard() { unsetenv(name.c_str()); }
};

void test_prefetch_vs_demand() {
    const int32_t k = 2;
    {
        // a queued prefetch that a remap needs becomes a demand read, ahead of the other prefetches
        const tiny::model m = util::write_model(util::moe_only_config(1, 8, k), "promote");
        rig r;
        {
            env_guard slow("EDGEMOE_READ_DELAY_MS", "60");
            CHECK(r.open(m, util::options(0, io_kind::buffered, policy_kind::freq_aged, 1)));
        }
        if (r.cache) {
            const int32_t all[8] = { 0, 1, 2, 3, 4, 5, 6, 7 };
            std::string err;
            const auto t0 = std::chrono::steady_clock::now();
            CHECK_EQ(r.cache->prefetch(0, all, 8, &err), EDGEMOE_OK);
            CHECK_EQ(r.total().prefetch_issued, 8u);
            CHECK_EQ(r.g->run(r.same({ { 7, 6 } })), 0);
            const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
            // promoted: the read in progress and the two demanded ones, about 180 ms; in queue
            // order it would be 8 reads, 480 ms
            CHECK(ms < 400.0);
            const layer_stats s = r.total();
            CHECK_EQ(s.prefetch_hits, 2u);
            CHECK_EQ(s.misses, 2u); // both were still loading
            CHECK_EQ(s.hits, 0u);
            printf("promoted prefetch served in %.0f ms (8 queued reads of 60 ms)\n", ms);
            CHECK(r.wait_bytes(8*util::expert_bytes(m, 0)));
            // the rest arrive as prefetches; using one counts a prefetch hit
            CHECK_EQ(r.g->run(r.same({ { 0, 3 } })), 0);
            CHECK_EQ(r.total().prefetch_hits, 4u);
            CHECK_EQ(r.total().hits, 2u);
            CHECK_EQ(r.total().bytes_read, 8*util::expert_bytes(m, 0));
        }
    }
    {
        // argument errors; resident experts are no-ops
        const tiny::model m = util::write_model(util::basic_config(2, 8, k), "prefetch_args");
        rig r;
        CHECK(r.open(m, util::options(0)));
        if (r.cache) {
            std::string err;
            const int32_t bad[2] = { 1, 8 };
            CHECK_EQ(r.cache->prefetch(0, bad, 1, &err), EDGEMOE_ERR_INVALID_ARG); // the dense layer
            CHECK_CONTAINS(err, "no routed experts");
            CHECK_EQ(r.cache->prefetch(7, bad, 1, &err), EDGEMOE_ERR_INVALID_ARG);
            CHECK_EQ(r.cache->prefetch(1, bad, 2, &err), EDGEMOE_ERR_INVALID_ARG);
            CHECK_CONTAINS(err, "out of range");
            const int32_t neg[1] = { -1 };
            CHECK_EQ(r.cache->prefetch(1, neg, 1, &err), EDGEMOE_ERR_INVALID_ARG);
            CHECK_EQ(r.cache->prefetch(1, bad, 0, &err), EDGEMOE_OK);
            CHECK_EQ(r.g->run(r.same({ { 1, 2 } })), 0);
            const uint64_t issued = r.total().prefetch_issued;
            const int32_t res[2] = { 1, 2 };
            CHECK_EQ(r.cache->prefetch(1, res, 2, &err), EDGEMOE_OK);
            CHECK_EQ(r.total().prefetch_issued, issued);
        }
    }
    {
        // a thread of prefetches racing the compute thread's remaps (and its compute threads)
        const tiny::model m = util::write_model(util::basic_config(3, 8, k), "race");
        for (io_kind io : IO_KINDS) {
            rig r;
            CHECK(r.open(m, util::options(util::all_expert_bytes(m)*3/10, io, policy_kind::freq_aged, 2), 2));
            if (!r.cache) {
                continue;
            }
            std::atomic<bool> stop{ false };
            std::atomic<int64_t> calls{ 0 };
            std::thread racer([&] {
                sim::route_gen rng(99);
                std::string err;
                while (!stop.load()) {
                    int32_t ex[4];
                    const int32_t n = 1 + rng.uniform(4);
                    rng.token(8, n, ex, 1.0);
                    if (r.cache->prefetch(r.layer(rng.uniform(m.n_blocks())), ex, n, &err) != EDGEMOE_OK) {
                        fprintf(stderr, "prefetch failed: %s\n", err.c_str());
                        g_failures++;
                    }
                    calls++;
                    std::this_thread::sleep_for(std::chrono::microseconds(50 + rng.uniform(200)));
                }
            });
            sim::route_gen rng(1234);
            for (int i = 0; i < 150; ++i) {
                CHECK_EQ(r.g->run(r.random(rng, 1 + i % 4, 1.5)), 0);
            }
            stop = true;
            racer.join();
            CHECK(calls.load() > 0);
            check_stats(r, true);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the route queue

std::vector<int32_t> block_rows(const std::vector<int32_t> & routed, int32_t b, int64_t rows, int32_t k) {
    return std::vector<int32_t>(routed.begin() + (size_t) b*rows*k, routed.begin() + (size_t) (b + 1)*rows*k);
}

void test_route_queue() {
    const tiny::model m = util::write_model(util::basic_config(3, 8, 2), "routes");
    const int32_t k = 2, nb = m.n_blocks();
    rig r;
    CHECK(r.open(m, util::options(0), 2));
    if (!r.cache) {
        return;
    }
    sim::route_gen rng(17);
    std::string err;
    std::vector<int32_t> routed;
    // routes for token t, block b: ids R[t][b][k]
    auto make_routes = [&](int32_t n_tokens) {
        std::vector<int32_t> R((size_t) n_tokens*nb*k);
        for (size_t i = 0; i < R.size(); i += k) {
            rng.token(8, k, R.data() + i, 1.0);
        }
        return R;
    };
    auto route_of = [&](const std::vector<int32_t> & R, int32_t t, int32_t b) {
        return std::vector<int32_t>(R.begin() + ((size_t) t*nb + b)*k, R.begin() + ((size_t) t*nb + b + 1)*k);
    };
    auto passthrough = [&](int32_t n) {
        sim::ubatch u = r.random(rng, n);
        CHECK_EQ(r.g->run(u, nullptr, &routed), 0);
        CHECK(routed == u.ids);
    };

    passthrough(3);

    // per-layer queues, one token per ubatch; the graph's ids are ignored
    const std::vector<int32_t> R = make_routes(3);
    for (int32_t b = 0; b < nb; ++b) {
        std::vector<int32_t> per((size_t) 3*k);
        for (int32_t t = 0; t < 3; ++t) {
            const auto row = route_of(R, t, b);
            std::copy(row.begin(), row.end(), per.begin() + (size_t) t*k);
        }
        CHECK_EQ(r.cache->set_routes(r.layer(b), per.data(), 3, k, &err), EDGEMOE_OK);
    }
    for (int32_t t = 0; t < 3; ++t) {
        CHECK_EQ(r.g->run(r.random(rng, 1), nullptr, &routed), 0);
        for (int32_t b = 0; b < nb; ++b) {
            CHECK(block_rows(routed, b, 1, k) == route_of(R, t, b));
        }
    }
    passthrough(2); // consumed

    // every layer at once, one ubatch of 4
    const std::vector<int32_t> R4 = make_routes(4);
    CHECK_EQ(r.cache->set_routes_all(R4.data(), 4, nb, k, &err), EDGEMOE_OK);
    CHECK_EQ(r.g->run(r.random(rng, 4), nullptr, &routed), 0);
    for (int32_t b = 0; b < nb; ++b) {
        for (int32_t t = 0; t < 4; ++t) {
            const auto got = std::vector<int32_t>(routed.begin() + ((size_t) b*4 + t)*k, routed.begin() + ((size_t) b*4 + t + 1)*k);
            CHECK(got == route_of(R4, t, b));
        }
    }
    // last_routes: what each block used per batch row
    std::vector<int32_t> last((size_t) 4*nb*k, 7);
    CHECK_EQ(r.cache->last_routes(last.data(), 4, nb, k, &err), EDGEMOE_OK);
    CHECK(last == R4);
    CHECK_EQ(r.cache->last_routes(last.data(), 4, nb + 1, k, &err), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(r.cache->last_routes(last.data(), 4, nb, k + 1, &err), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(r.cache->last_routes(last.data(), -1, nb, k, &err), EDGEMOE_ERR_INVALID_ARG);
    std::vector<int32_t> more((size_t) 6*nb*k, 7);
    CHECK_EQ(r.cache->last_routes(more.data(), 6, nb, k, &err), EDGEMOE_OK);
    CHECK(std::equal(R4.begin(), R4.end(), more.begin()));
    CHECK(std::all_of(more.begin() + (ptrdiff_t) R4.size(), more.end(), [](int32_t x) { return x == -1; }));
    passthrough(1);

    // the last block computes only the output row (llama.cpp's out_ids): it takes that row's
    // route and still consumes the whole ubatch
    const std::vector<int32_t> R3 = make_routes(3);
    CHECK_EQ(r.cache->set_routes_all(R3.data(), 3, nb, k, &err), EDGEMOE_OK);
    {
        sim::ubatch u = r.random(rng, 3);
        u.out_ids = { 2 };
        CHECK_EQ(r.g->run(u, nullptr, &routed), 0);
        CHECK_EQ(routed.size(), (size_t) ((nb - 1)*3 + 1)*k);
        for (int32_t b = 0; b + 1 < nb; ++b) {
            for (int32_t t = 0; t < 3; ++t) {
                CHECK(std::equal(routed.begin() + ((size_t) b*3 + t)*k, routed.begin() + ((size_t) b*3 + t + 1)*k,
                                 route_of(R3, t, b).begin()));
            }
        }
        CHECK(std::equal(routed.end() - k, routed.end(), route_of(R3, 2, nb - 1).begin()));
        std::vector<int32_t> lr((size_t) 3*nb*k);
        CHECK_EQ(r.cache->last_routes(lr.data(), 3, nb, k, &err), EDGEMOE_OK);
        for (int32_t t = 0; t < 3; ++t) {
            const int32_t * row = lr.data() + ((size_t) t*nb + nb - 1)*k;
            if (t == 2) {
                CHECK(std::equal(row, row + k, route_of(R3, 2, nb - 1).begin()));
            } else {
                CHECK(row[0] == -1 && row[k - 1] == -1); // the last block did not compute this row
            }
        }
    }
    passthrough(2);

    // a batch that llama.cpp splits and reorders: routes go by batch row
    const std::vector<int32_t> R5 = make_routes(4);
    CHECK_EQ(r.cache->set_routes_all(R5.data(), 4, nb, k, &err), EDGEMOE_OK);
    {
        sim::ubatch a = r.random(rng, 2);
        a.batch_idx = { 2, 0 };
        a.first_row = 0;
        CHECK_EQ(r.g->run(a, nullptr, &routed), 0);
        for (int32_t b = 0; b < nb; ++b) {
            CHECK(std::equal(routed.begin() + (size_t) b*2*k, routed.begin() + (size_t) (b*2 + 1)*k, route_of(R5, 2, b).begin()));
            CHECK(std::equal(routed.begin() + (size_t) (b*2 + 1)*k, routed.begin() + (size_t) (b*2 + 2)*k, route_of(R5, 0, b).begin()));
        }
        sim::ubatch c = r.random(rng, 2);
        c.batch_idx = { 3, 1 };
        c.first_row = 2;
        CHECK_EQ(r.g->run(c, nullptr, &routed), 0);
        for (int32_t b = 0; b < nb; ++b) {
            CHECK(std::equal(routed.begin() + (size_t) b*2*k, routed.begin() + (size_t) (b*2 + 1)*k, route_of(R5, 3, b).begin()));
            CHECK(std::equal(routed.begin() + (size_t) (b*2 + 1)*k, routed.begin() + (size_t) (b*2 + 2)*k, route_of(R5, 1, b).begin()));
        }
        std::vector<int32_t> lr((size_t) 4*nb*k);
        CHECK_EQ(r.cache->last_routes(lr.data(), 4, nb, k, &err), EDGEMOE_OK);
        CHECK(lr == R5);
    }
    passthrough(3);

    // misuse: refused with a reason, nothing queued
    std::vector<int32_t> ok_ids = make_routes(2);
    CHECK_EQ(r.cache->set_routes(r.layer(0), ok_ids.data(), 1, k + 1, &err), EDGEMOE_ERR_INVALID_ARG);
    CHECK_CONTAINS(err, "experts per token");
    CHECK_EQ(r.cache->set_routes(0, ok_ids.data(), 1, k, &err), EDGEMOE_ERR_INVALID_ARG); // the dense layer
    CHECK_CONTAINS(err, "no routed experts");
    CHECK_EQ(r.cache->set_routes(99, ok_ids.data(), 1, k, &err), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(r.cache->set_routes(-1, ok_ids.data(), 1, k, &err), EDGEMOE_ERR_INVALID_ARG);
    std::vector<int32_t> bad = ok_ids;
    bad.back() = 8;
    CHECK_EQ(r.cache->set_routes_all(bad.data(), 2, nb, k, &err), EDGEMOE_ERR_INVALID_ARG);
    CHECK_CONTAINS(err, "out of range");
    bad.back() = -3;
    CHECK_EQ(r.cache->set_routes_all(bad.data(), 2, nb, k, &err), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(r.cache->set_routes_all(ok_ids.data(), 1, nb + 1, k, &err), EDGEMOE_ERR_INVALID_ARG);
    CHECK_CONTAINS(err, "MoE layers");
    CHECK_EQ(r.cache->set_routes_all(ok_ids.data(), 1, nb, k - 1, &err), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(r.cache->set_routes(r.layer(1), bad.data() + (bad.size() - k), 1, k, &err), EDGEMOE_ERR_INVALID_ARG);
    passthrough(2); // nothing of the refused calls was queued

    // a queue too short for the batch fails that ubatch (a fault, not the process); taking
    // the fault empties the queue, so the token is queued again for a ubatch that fits
    const std::vector<int32_t> R1 = make_routes(1);
    CHECK_EQ(r.cache->set_routes_all(R1.data(), 1, nb, k, &err), EDGEMOE_OK);
    CHECK_EQ(r.g->run(r.random(rng, 2), nullptr, &routed), 0);
    CHECK(r.g->aborted());
    CHECK(r.cache->faulted());
    std::string msg;
    CHECK_EQ(r.cache->take_fault(&msg), EDGEMOE_ERR_STATE);
    CHECK_CONTAINS(msg, "external routes of layer");
    CHECK(!r.cache->faulted());
    CHECK_EQ(r.cache->take_fault(&msg), EDGEMOE_OK); // handed over once
    CHECK_EQ(r.cache->set_routes_all(R1.data(), 1, nb, k, &err), EDGEMOE_OK);
    CHECK_EQ(r.g->run(r.random(rng, 1), nullptr, &routed), 0);
    CHECK(!r.g->aborted());
    for (int32_t b = 0; b < nb; ++b) {
        CHECK(block_rows(routed, b, 1, k) == route_of(R1, 0, b));
    }
    passthrough(1);

    // clear_routes drops the queue
    const std::vector<int32_t> R2 = make_routes(2);
    CHECK_EQ(r.cache->set_routes_all(R2.data(), 2, nb, k, &err), EDGEMOE_OK);
    r.cache->clear_routes();
    passthrough(2);
    check_stats(r, false);
}

// A ubatch without output rows: llama.cpp's last layer then computes 0 rows, and build_moe_ffn
// builds no route op for it (ep_on needs n_tokens > 0). That layer's queued routes for those
// rows are never taken, so its queue keeps them at the front and the next batch's rows read
// them: the last layer computes later tokens with earlier tokens' routes, silently. Two ways
// to get there: a prompt chunk decoded without logits (engine.py asks logits only of a
// prompt's last chunk, so any prompt longer than n_batch), and a batch split into ubatches
// (n_batch > n_ubatch) with logits at its end only.
void test_route_queue_no_outputs() {
    const tiny::model m = util::write_model(util::basic_config(3, 8, 2), "routes_no_out");
    const int32_t k = 2, nb = m.n_blocks();
    sim::route_gen rng(71);
    auto make_routes = [&](int32_t n_tokens) {
        std::vector<int32_t> R((size_t) n_tokens*nb*k);
        for (size_t i = 0; i < R.size(); i += k) {
            rng.token(8, k, R.data() + i, 1.0);
        }
        return R;
    };
    auto row = [&](const std::vector<int32_t> & R, int32_t t, int32_t b) { return R.data() + ((size_t) t*nb + b)*k; };
    for (int scenario = 0; scenario < 2; ++scenario) {
        rig r;
        CHECK(r.open(m, util::options(0)));
        if (!r.cache) {
            return;
        }
        std::string err;
        std::vector<int32_t> routed;
        std::vector<int32_t> R;
        if (scenario == 0) {
            // batch 1: a prompt chunk of 3 rows, no logits
            R = make_routes(3);
            CHECK_EQ(r.cache->set_routes_all(R.data(), 3, nb, k, &err), EDGEMOE_OK);
            sim::ubatch a = r.random(rng, 3);
            a.no_outputs = true;
            CHECK_EQ(r.g->run(a, nullptr, &routed), 0);
            CHECK(!r.g->aborted());
            CHECK_EQ(routed.size(), (size_t) (nb - 1)*3*k);
        } else {
            // batch 1: rows 0-3 in two ubatches; only row 3 is an output
            R = make_routes(4);
            CHECK_EQ(r.cache->set_routes_all(R.data(), 4, nb, k, &err), EDGEMOE_OK);
            sim::ubatch a = r.random(rng, 2);
            a.first_row = 0;
            a.no_outputs = true;
            CHECK_EQ(r.g->run(a, nullptr, &routed), 0);
            sim::ubatch b = r.random(rng, 2);
            b.first_row = 2;
            b.out_ids = { 1 };
            CHECK_EQ(r.g->run(b, nullptr, &routed), 0);
            CHECK(!r.g->aborted());
            CHECK(std::equal(routed.end() - k, routed.end(), row(R, 3, nb - 1)));
        }
        // batch 2: one row, its own routes
        const std::vector<int32_t> R2 = make_routes(1);
        CHECK_EQ(r.cache->set_routes_all(R2.data(), 1, nb, k, &err), EDGEMOE_OK);
        CHECK_EQ(r.g->run(r.random(rng, 1), nullptr, &routed), 0);
        CHECK(!r.g->aborted());
        for (int32_t bl = 0; bl + 1 < nb; ++bl) {
            CHECK(std::equal(routed.begin() + (size_t) bl*k, routed.begin() + (size_t) (bl + 1)*k, row(R2, 0, bl)));
        }
        // the rows the last layer never took (no output rows: no route op) were dropped at the
        // new batch, not read as its routes
        const bool last_ok = std::equal(routed.end() - k, routed.end(), row(R2, 0, nb - 1));
        CHECK(last_ok);
        if (!last_ok) {
            const bool stale = std::equal(routed.end() - k, routed.end(), row(R, 0, nb - 1));
            fprintf(stderr, "  the last layer used %s\n", stale ? "batch 1's row 0 routes (stale)" : "other routes");
        }
    }
}

// Routes queued from another thread (a scheduler) while the compute thread's ubatches take
// them; with route prefetch, that thread's set_routes_all walks and queues loads meanwhile
void test_routes_concurrent() {
    const tiny::model m = util::write_model(util::basic_config(3, 8, 2), "routes_conc");
    const int32_t k = 2, nb = m.n_blocks();
    for (prefetch_kind pf : { prefetch_kind::off, prefetch_kind::routes }) {
        cache_options o = util::options(util::all_expert_bytes(m)/3, io_kind::buffered, policy_kind::belady, 2);
        o.prefetch = pf;
        rig r;
        CHECK(r.open(m, o, 2));
        if (!r.cache) {
            continue;
        }
        std::mutex mu;
        std::condition_variable cv;
        std::vector<int32_t> produced; // [token][nb][k]
        const int64_t total = 600;
        std::thread producer([&] {
            sim::route_gen rng(5);
            std::string err;
            int64_t n = 0;
            while (n < total) {
                const int32_t add = (int32_t) std::min<int64_t>(1 + rng.uniform(3), total - n);
                std::vector<int32_t> ids((size_t) add*nb*k);
                for (size_t i = 0; i < ids.size(); i += k) {
                    rng.token(8, k, ids.data() + i, 1.5);
                }
                {
                    // queued and recorded together, so the consumer never sees one without the other
                    std::lock_guard<std::mutex> lock(mu);
                    CHECK_EQ(r.cache->set_routes_all(ids.data(), add, nb, k, &err), EDGEMOE_OK);
                    produced.insert(produced.end(), ids.begin(), ids.end());
                }
                cv.notify_all();
                n += add;
                std::this_thread::sleep_for(std::chrono::microseconds(rng.uniform(400)));
            }
        });
        sim::route_gen rng(6);
        int64_t consumed = 0;
        std::vector<int32_t> routed;
        while (consumed < total) {
            int32_t n = 1 + rng.uniform(4);
            std::vector<int32_t> expect;
            {
                std::unique_lock<std::mutex> lock(mu);
                cv.wait(lock, [&] { return (int64_t) produced.size()/(nb*k) > consumed; });
                n = (int32_t) std::min<int64_t>(n, (int64_t) produced.size()/(nb*k) - consumed);
                for (int32_t b = 0; b < nb; ++b) {
                    for (int32_t t = 0; t < n; ++t) {
                        const int32_t * row = produced.data() + ((size_t) (consumed + t)*nb + b)*k;
                        expect.insert(expect.end(), row, row + k);
                    }
                }
            }
            CHECK_EQ(r.g->run(r.random(rng, n), nullptr, &routed), 0);
            CHECK(!r.g->aborted());
            CHECK(routed == expect);
            consumed += n;
        }
        producer.join();
        check_stats(r, pf != prefetch_kind::off);
    }
}

// ---------------------------------------------------------------------------------------------
// the order rule: a slot pinned by one step is evictable from the next, which is safe only if
// the graph runs a block's route, then its waves in order, then the next block's. The cache
// checks the order and fails the ubatch (a fault) where it is broken

struct op_runner {
    rig & r;
    ggml_context * ctx;
    explicit op_runner(rig & rr) : r(rr) {
        ggml_init_params ip = { 1 << 20, nullptr, false };
        ctx = ggml_init(ip);
    }
    ~op_runner() { ggml_free(ctx); }
    // the route op of block b over n tokens, graph ids e, e+1, ...; returns its output
    ggml_tensor * route(int32_t b, int32_t n, int32_t e = 0) {
        const int32_t k = r.m->cfg.n_expert_used;
        ggml_tensor * sel = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, k, n);
        for (int32_t i = 0; i < k*n; ++i) {
            ((int32_t *) sel->data)[i] = (e + i) % r.m->cfg.n_expert;
        }
        ggml_tensor * dst = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, k, n);
        dst->src[0] = sel;
        r.prov.route(dst, 0, 1, r.prov.route_ctx(r.prov.user, r.g->unit(b), n));
        return dst;
    }
    // wave i of n of block b over the route op's output
    ggml_tensor * remap(int32_t b, ggml_tensor * ids, int32_t i, int32_t n) {
        ggml_tensor * dst = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, ids->ne[0], ids->ne[1]);
        dst->src[0] = ids;
        r.prov.remap(dst, 0, 1, r.prov.wave(r.prov.user, r.g->unit(b), i, n));
        return dst;
    }
};

void test_order_rule() {
    const tiny::model m = util::write_model(util::basic_config(3, 8, 2), "order");
    rig r;
    CHECK(r.open(m, util::options(util::slots_bytes(m, 2))));
    if (!r.cache) {
        return;
    }
    op_runner op(r);
    std::string msg;
    auto expect_fault = [&](const char * what) {
        CHECK(r.cache->faulted());
        const int st = r.cache->take_fault(&msg);
        CHECK_EQ(st, EDGEMOE_ERR_STATE);
        CHECK_CONTAINS(msg, "out of order");
        if (st != EDGEMOE_ERR_STATE) {
            fprintf(stderr, "  (%s)\n", what);
        }
        // the next ubatch in order works
        CHECK_EQ(r.g->run(r.same({ { 0, 1 }, { 2, 3 } })), 0);
        CHECK(!r.g->aborted());
    };
    // in order: no fault
    for (int32_t b = 0; b < 3; ++b) {
        ggml_tensor * ids = op.route(b, 4);
        for (int32_t w = 0; w < 4; ++w) {
            op.remap(b, ids, w, 4);
        }
    }
    CHECK(!r.cache->faulted());
    // block 1's remap where block 0's waves are due
    ggml_tensor * ids0 = op.route(0, 1);
    op.remap(1, ids0, 0, 1);
    expect_fault("a remap of another block");
    // blocks out of order
    op.remap(0, op.route(0, 1), 0, 1);
    op.route(2, 1);
    op.route(1, 1);
    expect_fault("block 1's route after block 2's");
    // waves out of order, and one twice
    ggml_tensor * ids = op.route(0, 4);
    op.remap(0, ids, 1, 4);
    expect_fault("wave 1 before wave 0");
    ids = op.route(0, 4);
    op.remap(0, ids, 0, 4);
    op.remap(0, ids, 0, 4);
    expect_fault("wave 0 twice");
    // a remap with no route op before it in this graph: block 0's waves after block 2's
    r.g->run(r.same({ { 0, 1 } }));
    op.remap(0, ids, 0, 1);
    expect_fault("a remap without its route op");
}

// ---------------------------------------------------------------------------------------------
// Belady: the victim is the expert whose next use is farthest

void test_belady() {
    {
        // one block, k = 1, three slots
        const tiny::model m = util::write_model(util::moe_only_config(1, 8, 1), "belady1");
        for (policy_kind pol : { policy_kind::belady, policy_kind::lru }) {
            rig r;
            CHECK(r.open(m, util::options(3*util::expert_bytes(m, 0), io_kind::direct, pol)));
            if (!r.cache) {
                continue;
            }
            std::string err;
            for (int32_t e : { 0, 1, 2 }) {
                CHECK_EQ(r.g->run(r.same({ { e } })), 0);
            }
            const int32_t future[5] = { 3, 1, 0, 2, 5 };
            CHECK_EQ(r.cache->set_routes(0, future, 5, 1, &err), EDGEMOE_OK);
            CHECK_EQ(r.g->run(r.same({ { 7 } })), 0); // the queue's 3, not the graph's 7
            if (pol == policy_kind::belady) {
                // next uses: 1 in one token, 0 in two, 2 in three: 2 goes
                CHECK((r.resident_of(0) == std::set<int32_t>{ 0, 1, 3 }));
            } else {
                CHECK((r.resident_of(0) == std::set<int32_t>{ 1, 2, 3 })); // LRU: the oldest, 0
            }
            for (int i = 0; i < 4; ++i) {
                CHECK_EQ(r.g->run(r.same({ { 7 } })), 0);
            }
            const layer_stats s = r.total();
            if (pol == policy_kind::belady) {
                CHECK_EQ(s.hits, 2u);   // 1 and 0
                CHECK_EQ(s.misses, 6u); // 0, 1, 2 cold; 3, 2, 5
            } else {
                CHECK_EQ(s.hits, 1u);
                CHECK_EQ(s.misses, 7u);
            }
        }
    }
    {
        // two blocks in one pool of three slots: distances count (token, block) steps
        const tiny::model m = util::write_model(util::moe_only_config(2, 4, 1), "belady2");
        rig r;
        CHECK(r.open(m, util::options(3*util::expert_bytes(m, 0), io_kind::buffered, policy_kind::belady)));
        if (!r.cache) {
            return;
        }
        CHECK_EQ(r.g->n_slots(0), 3);
        std::string err;
        CHECK_EQ(r.g->run(r.make(1, [](int32_t, int32_t, int32_t) { return 0; })), 0);         // (0,0) (1,0)
        CHECK_EQ(r.g->run(r.make(1, [](int32_t b, int32_t, int32_t) { return b == 0 ? 1 : 0; })), 0); // (0,1), hit (1,0)
        // tokens: t2 (2, 0), t3 (0, 3), t4 (1, 0) for blocks (0, 1)
        const int32_t R[6] = { 2, 0, 0, 3, 1, 0 };
        CHECK_EQ(r.cache->set_routes_all(R, 3, 2, 1, &err), EDGEMOE_OK);
        // t2, block 0 needs (0,2): (1,0) is next used 1 step ahead, (0,0) 2, (0,1) 4: (0,1) goes
        CHECK_EQ(r.g->run(r.make(1, [](int32_t, int32_t, int32_t) { return 3; }), [&](const sim::wave_view & v) {
            if (v.block == 0) {
                CHECK(!r.is_resident(0, 1));
                CHECK(r.is_resident(0, 0) && r.is_resident(1, 0) && r.is_resident(0, 2));
            }
        }), 0);
        // t3, block 1 needs (1,3): (0,0) and (0,2) are not used again, (1,0) is: it stays
        CHECK_EQ(r.g->run(r.make(1, [](int32_t, int32_t, int32_t) { return 3; }), [&](const sim::wave_view & v) {
            if (v.block == 1) {
                CHECK(r.is_resident(1, 0) && r.is_resident(1, 3));
            }
        }), 0);
        CHECK_EQ(r.g->run(r.make(1, [](int32_t, int32_t, int32_t) { return 3; })), 0);
        const layer_stats s1 = r.cache->stats(1);
        CHECK_EQ(s1.hits, 3u);   // (1,0) at t1, t2, t4
        CHECK_EQ(s1.misses, 2u); // (1,0) cold, (1,3)
    }
}

// ---------------------------------------------------------------------------------------------
// route prefetch: queued routes load in order of first use, never evicting a sooner use

void test_route_prefetch() {
    {
        const tiny::model m = util::write_model(util::moe_only_config(2, 8, 2), "route_prefetch");
        cache_options o = util::options(6*util::expert_bytes(m, 0), io_kind::direct, policy_kind::belady, 2);
        o.prefetch = prefetch_kind::routes;
        rig r;
        CHECK(r.open(m, o, 2));
        if (!r.cache) {
            return;
        }
        CHECK(r.cache->prefetch_mode() == prefetch_kind::routes);
        sim::route_gen rng(23);
        std::vector<int32_t> R((size_t) 6*2*2);
        for (size_t i = 0; i < R.size(); i += 2) {
            rng.token(8, 2, R.data() + i, 1.0);
        }
        // in order of use (token, then block), the first 6 distinct (block, expert) get the 6 slots
        std::vector<std::pair<int32_t, int32_t>> order;
        for (int32_t t = 0; t < 6; ++t) {
            for (int32_t b = 0; b < 2; ++b) {
                for (int32_t j = 0; j < 2; ++j) {
                    const auto key = std::make_pair(b, R[((size_t) t*2 + b)*2 + j]);
                    if (std::find(order.begin(), order.end(), key) == order.end()) {
                        order.push_back(key);
                    }
                }
            }
        }
        std::string err;
        CHECK_EQ(r.cache->set_routes_all(R.data(), 6, 2, 2, &err), EDGEMOE_OK);
        const auto res = r.resident();
        int n_res = 0;
        for (uint8_t x : res) {
            n_res += x;
        }
        CHECK_EQ(n_res, 6);
        for (size_t i = 0; i < order.size() && i < 6; ++i) {
            CHECK(res[(size_t) order[i].first*8 + order[i].second] != 0);
        }
        CHECK_EQ(r.total().prefetch_issued, 6u);
        std::set<std::pair<int32_t, int32_t>> t0;
        for (int32_t b = 0; b < 2; ++b) {
            for (int32_t j = 0; j < 2; ++j) {
                t0.insert(std::make_pair(b, R[(size_t) b*2 + j]));
            }
        }
        CHECK_EQ(r.g->run(r.random(rng, 1)), 0);
        CHECK_EQ(r.total().prefetch_hits, (uint64_t) t0.size()); // the first token's experts were all prefetched
        for (int i = 1; i < 6; ++i) {
            CHECK_EQ(r.g->run(r.random(rng, 1)), 0);
        }
        check_stats(r, true);
    }
    {
        // LRU would evict expert 0 first; the walk may not, as token 0 uses it
        const tiny::model m = util::write_model(util::moe_only_config(1, 8, 2), "route_sooner");
        cache_options o = util::options(4*util::expert_bytes(m, 0), io_kind::buffered, policy_kind::lru, 1);
        o.prefetch = prefetch_kind::routes;
        rig r;
        CHECK(r.open(m, o));
        if (!r.cache) {
            return;
        }
        CHECK_EQ(r.g->run(r.same({ { 0, 1 } })), 0);
        CHECK_EQ(r.g->run(r.same({ { 2, 3 } })), 0);
        CHECK((r.resident_of(0) == std::set<int32_t>{ 0, 1, 2, 3 }));
        const int32_t R[4] = { 0, 4, 5, 6 };
        std::string err;
        CHECK_EQ(r.cache->set_routes(0, R, 2, 2, &err), EDGEMOE_OK);
        // token 0's 4 may take 1 (not used again) but not 0 (used by token 0 itself), nor 2 and 3,
        // pinned by the step in progress; token 1's 5 and 6 find no slot yet
        CHECK((r.resident_of(0) == std::set<int32_t>{ 0, 2, 3, 4 }));
        CHECK_EQ(r.total().prefetch_issued, 1u);
        CHECK_EQ(r.g->run(r.same({ { 7, 7 } })), 0);
        CHECK_EQ(r.g->run(r.same({ { 7, 7 } })), 0);
        // token 0's step freed 2 and 3 for token 1's 5 and 6, which its walk then loaded
        CHECK_EQ(r.total().prefetch_issued, 3u);
        CHECK_EQ(r.total().prefetch_hits, 3u);
        CHECK(r.total().hits >= 1u); // expert 0, resident all along
        check_stats(r, true);
    }
}

// ---------------------------------------------------------------------------------------------
// lookahead prefetch: the predictor's loads run beside the demand loads

void test_lookahead() {
    const tiny::model m = util::write_model(util::basic_config(4, 8, 2), "lookahead");
    cache_options o = util::options(util::all_expert_bytes(m)/2, io_kind::direct, policy_kind::freq_aged, 2);
    o.prefetch = prefetch_kind::lookahead;
    o.lookahead = 2;
    rig r;
    CHECK(r.open(m, o, 2));
    if (!r.cache) {
        fprintf(stderr, "lookahead: %s\n", r.err.c_str());
        return;
    }
    CHECK(r.cache->prefetch_mode() == prefetch_kind::lookahead);
    sim::route_gen rng(31);
    for (int i = 0; i < 150; ++i) {
        const int32_t n = i % 10 == 9 ? 12 : 1 + i % 3; // 12 rows: past the predictor's limit
        sim::ubatch u = r.random(rng, n, 1.5);
        u.hidden.resize((size_t) m.n_blocks()*n*m.cfg.n_embd);
        for (float & x : u.hidden) {
            x = (float) rng.unit() - 0.5f;
        }
        CHECK_EQ(r.g->run(u), 0);
    }
    const layer_stats s = r.total();
    CHECK(s.pred_predicted > 0);
    CHECK(s.prefetch_issued > 0);
    CHECK(s.pred_correct <= s.pred_predicted);
    check_stats(r, true);
}

// ---------------------------------------------------------------------------------------------
// a repacked host pool (Q4_0 experts where ggml's CPU backend repacks them): the I/O threads
// read into staging and repack into the slot; every slot must hold its expert's repacked bytes

void test_repacked_pool() {
    const tiny::model m = util::write_model(util::q4_config(), "repack");
    const util::repacked_experts repacked = util::repack_experts(m);
    if (repacked.empty()) {
        printf("no CPU repack buffer type for Q4_0 here: repacked pools not tested\n");
        return;
    }
    CHECK(memcmp(repacked.at(0, 0, tiny::ROLE_UP), m.expected(0, 0, tiny::ROLE_UP), m.slice_bytes(0, tiny::ROLE_UP)) != 0);
    for (io_kind io : IO_KINDS) {
        cache_options o = util::options(util::all_expert_bytes(m)/2, io, policy_kind::freq_aged, 3);
        o.repack = true;
        rig r;
        CHECK(r.open(m, o, 2));
        if (!r.cache) {
            continue;
        }
        CHECK_EQ(r.cache->n_repacked(), 3); // up, gate, down of the one pool
        r.g->set_expected([&](int32_t b, int32_t e, int role) { return repacked.at(b, e, role); });
        sim::route_gen rng(13);
        for (int i = 0; i < 60; ++i) {
            CHECK_EQ(r.g->run(r.random(rng, 1 + i % 5, 1.5)), 0);
        }
        check_stats(r, false);
        CHECK(r.total().convert_ms > 0.0);
    }
}

// ---------------------------------------------------------------------------------------------
// faults: a failed read fails the ubatch (the graph stops), the cache heals

void test_faults() {
    if (!faults::available()) {
        printf("fault injection not compiled in: skipped\n");
        return;
    }
    const tiny::model m = util::write_model(util::basic_config(2, 8, 2), "faults");
    int late = 0;
    for (int n_io : { 1, 3 }) {
        for (io_kind io : IO_KINDS) {
            rig r;
            CHECK(r.open(m, util::options(util::all_expert_bytes(m)/2, io, policy_kind::lru, n_io)));
            if (!r.cache) {
                continue;
            }
            std::string err;
            // transient errors are retried: nothing fails
            CHECK(faults::set_plan("eio@0+2", &err));
            CHECK_EQ(r.g->run(r.same({ { 0, 1 } })), 0);
            CHECK(!r.g->aborted());
            // a read that keeps failing stops the graph; the fault is handed over once
            CHECK(faults::set_plan("eof@0+inf", &err));
            CHECK_EQ(r.g->run(r.same({ { 2, 3 } })), 0);
            CHECK(r.g->aborted());
            std::string msg;
            CHECK_EQ(r.cache->take_fault(&msg), EDGEMOE_ERR_IO);
            CHECK(!msg.empty());
            CHECK(faults::set_plan(nullptr, &err));
            // the same experts load again and are right, at once: take_fault waited for every
            // read of the failed step, so none fails later under the old plan
            CHECK_EQ(r.g->run(r.same({ { 2, 3 }, { 0, 4 } })), 0);
            if (r.g->aborted()) {
                late++;
                r.cache->take_fault(&msg);
            }
            CHECK_EQ(r.cache->take_fault(&msg), EDGEMOE_OK);
        }
    }
    CHECK_EQ(late, 0); // a decode after the fault failed on a read of the failed one
    std::string err;
    faults::set_plan(nullptr, &err);
}

// A fault part way through a graph (a read failing in block 1's remap) fails that llama_decode,
// which llama.cpp rolls back, and the caller decodes the same batch again. Block 0's route op
// had already taken the batch's routes from its queue; on the retry, every block must still
// get the batch's own routes.
void test_fault_retry_keeps_routes() {
    if (!faults::available()) {
        return;
    }
    const tiny::model m = util::write_model(util::basic_config(3, 8, 2), "fault_routes");
    const int32_t k = 2, nb = m.n_blocks();
    rig r;
    CHECK(r.open(m, util::options(0, io_kind::buffered, policy_kind::lru, 1)));
    if (!r.cache) {
        return;
    }
    std::string err, msg;
    std::vector<int32_t> R((size_t) 2*nb*k);
    for (size_t i = 0; i < R.size(); ++i) {
        R[i] = (int32_t) ((i/2)*2 % 8 + i % 2); // distinct pairs
    }
    CHECK_EQ(r.cache->set_routes_all(R.data(), 2, nb, k, &err), EDGEMOE_OK);
    // block 0's two experts are 6 reads (3 roles each); every read after them fails
    CHECK(faults::set_plan("eof@6+inf", &err));
    std::vector<int32_t> routed;
    sim::route_gen g1(1);
    CHECK_EQ(r.g->run(r.random(g1, 1), nullptr, &routed), 0);
    CHECK(r.g->aborted());
    CHECK_EQ(r.cache->take_fault(&msg), EDGEMOE_ERR_IO);
    CHECK(faults::set_plan(nullptr, &err));
    // taking the fault emptied the queue (the failed batch took blocks 0 and 1's routes and
    // not the others'): a retry without queueing again computes the graph's own routes
    sim::route_gen rng(2);
    const sim::ubatch own = r.random(rng, 1);
    CHECK_EQ(r.g->run(own, nullptr, &routed), 0);
    CHECK(!r.g->aborted());
    CHECK_EQ(routed.size(), (size_t) nb*k);
    // what the engine does after a failed decode (engine.py): clear the queue, queue the
    // batch's routes again, decode again: every block gets them
    if (r.cache->faulted()) {
        r.cache->take_fault(&msg);
    }
    r.cache->clear_routes();
    CHECK_EQ(r.cache->set_routes_all(R.data(), 2, nb, k, &err), EDGEMOE_OK);
    CHECK_EQ(r.g->run(r.random(rng, 2), nullptr, &routed), 0);
    CHECK(!r.g->aborted());
    CHECK_EQ(routed.size(), (size_t) 2*nb*k);
    for (int32_t b = 0; b < nb && routed.size() == (size_t) 2*nb*k; ++b) {
        for (int32_t t = 0; t < 2; ++t) {
            CHECK(std::equal(routed.begin() + ((size_t) b*2 + t)*k, routed.begin() + ((size_t) b*2 + t + 1)*k,
                             R.begin() + ((size_t) t*nb + b)*k));
        }
    }
}

} // namespace

int main() {
    util::quiet_ggml();
    test_tiny_model();
    test_checker_catches_wrong_weights();
    test_create_and_bind();
    test_serving();
    test_waves();
    test_pins();
    test_prefetch_vs_demand();
    test_route_queue();
    test_route_queue_no_outputs();
    test_routes_concurrent();
    test_order_rule();
    test_belady();
    test_route_prefetch();
    test_lookahead();
    test_repacked_pool();
    test_faults();
    test_fault_retry_keeps_routes();
    util::remove_models();
    return finish("test_expert_cache");
}
