// The C API (edgemoe.h): options and their errors, inspect/info/stats, attach/detach and the
// provider it hands to llama.cpp (driven here as the graph drives it, on several compute
// threads), resident(), last_routes(), the route queue, faults, the file check, the recorder.
#include "cache_test_util.h"
#include "fake_llama_context.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <set>
#include <thread>
#include <unistd.h>

namespace {

std::string last_error() { return edgemoe_last_error(); }

edgemoe_options quiet_options() {
    edgemoe_options o = edgemoe_default_options();
    o.quiet = true;
    o.repack = false;
    return o;
}

// -----------------------------------------------------------------------------------------

void test_defaults() {
    const edgemoe_options o = edgemoe_default_options();
    CHECK_EQ(o.budget_bytes, 0);
    CHECK(o.budget_fraction == 1.0);
    CHECK_EQ(o.policy, EDGEMOE_POLICY_DEFAULT);
    CHECK_EQ(o.io, EDGEMOE_IO_DIRECT);
    CHECK_EQ(o.n_io_threads, 0);
    CHECK(!o.quiet);
    CHECK_EQ(o.prefetch, EDGEMOE_PREFETCH_OFF);
    CHECK_EQ(o.lookahead, 1);
    CHECK_EQ(o.prefetch_top, 0);
    CHECK_EQ(o.pool, EDGEMOE_POOL_HOST);
    CHECK(o.repack);
    CHECK(!o.hybrid);
}

// create with one option changed: the status, and the message names the option
void expect_refused(const tiny::model & m, void (*change)(edgemoe_options &), int status, const char * names) {
    edgemoe_options o = quiet_options();
    change(o);
    edgemoe_cache * c = reinterpret_cast<edgemoe_cache *>(0x1);
    CHECK_EQ(edgemoe_cache_create(m.path.c_str(), &o, &c), status);
    CHECK(c == nullptr);
    CHECK_CONTAINS(last_error(), names);
    edgemoe_cache_free(c == reinterpret_cast<edgemoe_cache *>(0x1) ? nullptr : c);
}

void test_create_errors() {
    const tiny::model m = util::write_model(util::basic_config(), "api_create");
    edgemoe_options o = quiet_options();
    edgemoe_cache * c = nullptr;
    CHECK_EQ(edgemoe_cache_create(nullptr, &o, &c), EDGEMOE_ERR_INVALID_ARG);
    CHECK_CONTAINS(last_error(), "model_path");
    CHECK_EQ(edgemoe_cache_create(m.path.c_str(), &o, nullptr), EDGEMOE_ERR_INVALID_ARG);

    expect_refused(m, [](edgemoe_options & x) { x.policy = 4; }, EDGEMOE_ERR_INVALID_ARG, "unknown policy 4");
    expect_refused(m, [](edgemoe_options & x) { x.policy = -1; }, EDGEMOE_ERR_INVALID_ARG, "unknown policy");
    expect_refused(m, [](edgemoe_options & x) { x.prefetch = 3; }, EDGEMOE_ERR_INVALID_ARG, "unknown prefetch mode 3");
    expect_refused(m, [](edgemoe_options & x) { x.io = 4; }, EDGEMOE_ERR_INVALID_ARG, "unknown io 4");
    // the GPU DMAs from a pinned file only into VRAM slots: a host pool cannot use it
    expect_refused(m, [](edgemoe_options & x) { x.io = EDGEMOE_IO_PINNED; }, EDGEMOE_ERR_INVALID_ARG,
                   "io pinned is for a VRAM expert pool");
    expect_refused(m, [](edgemoe_options & x) { x.pool = 4; }, EDGEMOE_ERR_INVALID_ARG, "unknown pool 4");
    expect_refused(m, [](edgemoe_options & x) { x.lookahead = -1; }, EDGEMOE_ERR_INVALID_ARG, "lookahead");
    expect_refused(m, [](edgemoe_options & x) { x.lookahead = 9; }, EDGEMOE_ERR_INVALID_ARG, "lookahead must be 0 to 8");
    expect_refused(m, [](edgemoe_options & x) { x.prefetch_top = -1; }, EDGEMOE_ERR_INVALID_ARG, "prefetch_top");
    expect_refused(m, [](edgemoe_options & x) { x.budget_bytes = -1; }, EDGEMOE_ERR_INVALID_ARG, "budget");
    expect_refused(m, [](edgemoe_options & x) { x.budget_fraction = 0.0; }, EDGEMOE_ERR_INVALID_ARG, "budget");
    expect_refused(m, [](edgemoe_options & x) { x.budget_fraction = 1.5; }, EDGEMOE_ERR_INVALID_ARG, "budget");
    expect_refused(m, [](edgemoe_options & x) { x.budget_fraction = NAN; }, EDGEMOE_ERR_INVALID_ARG, "budget");
    expect_refused(m, [](edgemoe_options & x) { x.budget_fraction = -0.5; }, EDGEMOE_ERR_INVALID_ARG, "budget");
    edgemoe_gpu_info gi;
    CHECK_EQ(edgemoe_gpu_inspect(&gi), EDGEMOE_OK);
    CHECK_EQ(edgemoe_gpu_inspect(nullptr), EDGEMOE_ERR_INVALID_ARG);
    if (gi.n_gpu == 0) {
        expect_refused(m, [](edgemoe_options & x) { x.pool = EDGEMOE_POOL_GPU; }, EDGEMOE_ERR_INVALID_ARG, "needs a GPU");
        expect_refused(m, [](edgemoe_options & x) { x.pool = EDGEMOE_POOL_VRAM; }, EDGEMOE_ERR_INVALID_ARG, "needs a GPU");
    }

    // the budget's minimum, named in the message
    const uint64_t min = util::slots_bytes(m, m.cfg.n_expert_used);
    o.budget_bytes = (int64_t) min - 1;
    CHECK_EQ(edgemoe_cache_create(m.path.c_str(), &o, &c), EDGEMOE_ERR_BUDGET);
    CHECK(c == nullptr);
    CHECK_CONTAINS(last_error(), std::to_string(min) + " bytes");
    o.budget_bytes = (int64_t) min;
    CHECK_EQ(edgemoe_cache_create(m.path.c_str(), &o, &c), EDGEMOE_OK);
    edgemoe_cache_info info;
    CHECK_EQ(edgemoe_cache_info_get(c, &info), EDGEMOE_OK);
    CHECK_EQ(info.budget_bytes, (int64_t) min);
    CHECK_EQ(info.n_slots, m.cfg.n_expert_used);
    edgemoe_cache_free(c);
    c = nullptr;

    // files
    CHECK_EQ(edgemoe_cache_create("/nonexistent/model.gguf", &o, &c), EDGEMOE_ERR_IO);
    CHECK_CONTAINS(last_error(), "cannot open");
    const std::string junk = tiny::temp_path("api_junk");
    util::model_files().push_back(junk);
    FILE * f = fopen(junk.c_str(), "wb");
    fputs("GGUF but not really", f);
    fclose(f);
    CHECK_EQ(edgemoe_cache_create(junk.c_str(), &o, &c), EDGEMOE_ERR_FORMAT);
    CHECK(!last_error().empty());
    tiny::config dense = util::basic_config(1);
    dense.layers[1].moe = false;
    const tiny::model d = util::write_model(dense, "api_dense");
    CHECK_EQ(edgemoe_cache_create(d.path.c_str(), &o, &c), EDGEMOE_ERR_NO_EXPERTS);
    CHECK_CONTAINS(last_error(), "no routed expert tensors");

    // NULL options: the defaults
    CHECK_EQ(edgemoe_cache_create(m.path.c_str(), nullptr, &c), EDGEMOE_OK);
    CHECK_EQ(edgemoe_cache_info_get(c, &info), EDGEMOE_OK);
    CHECK_EQ(info.policy, EDGEMOE_POLICY_DEFAULT);
    CHECK_EQ(info.n_slots, m.n_blocks()*m.cfg.n_expert);
    edgemoe_cache_free(c);
    edgemoe_cache_free(nullptr);

    // the last error is per thread
    CHECK_EQ(edgemoe_cache_create(nullptr, &o, &c), EDGEMOE_ERR_INVALID_ARG);
    const std::string mine = last_error();
    std::string theirs;
    std::thread t([&] {
        edgemoe_cache * x = nullptr;
        edgemoe_options bad = quiet_options();
        bad.io = 77;
        edgemoe_cache_create(m.path.c_str(), &bad, &x);
        theirs = last_error();
    });
    t.join();
    CHECK_CONTAINS(theirs, "unknown io 77");
    CHECK(last_error() == mine);
}

void test_inspect_info_stats() {
    const tiny::model m = util::write_model(util::mixed_config(), "api_info");
    edgemoe_model_info mi;
    CHECK_EQ(edgemoe_model_inspect(m.path.c_str(), &mi), EDGEMOE_OK);
    CHECK_EQ(mi.n_layer, 4);
    CHECK_EQ(mi.n_moe_layer, m.n_blocks());
    CHECK_EQ(mi.n_expert, m.cfg.n_expert);
    CHECK_EQ(mi.n_expert_used, m.cfg.n_expert_used);
    CHECK_EQ(mi.n_pools, 2);
    CHECK_EQ(mi.expert_bytes, (int64_t) util::all_expert_bytes(m));
    CHECK(mi.non_expert_bytes > 0);
    CHECK_EQ(mi.min_budget_bytes, (int64_t) util::slots_bytes(m, m.cfg.n_expert_used));
    CHECK_EQ(mi.slot_bytes_max, (int64_t) std::max(m.pool_slot_bytes[0], m.pool_slot_bytes[1]));
    CHECK_EQ(mi.data_alignment, 32);
    CHECK_EQ(mi.slices_aligned, 0);
    CHECK_EQ(edgemoe_model_inspect(nullptr, &mi), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(edgemoe_model_inspect(m.path.c_str(), nullptr), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(edgemoe_model_inspect("/nonexistent.gguf", &mi), EDGEMOE_ERR_IO);
    const tiny::model a = util::write_model(util::aligned_config(), "api_aligned");
    CHECK_EQ(edgemoe_model_inspect(a.path.c_str(), &mi), EDGEMOE_OK);
    CHECK_EQ(mi.slices_aligned, 1);

    struct { int policy, io, prefetch; } cases[] = {
        { EDGEMOE_POLICY_LRU, EDGEMOE_IO_BUFFERED, EDGEMOE_PREFETCH_OFF },
        { EDGEMOE_POLICY_LFU, EDGEMOE_IO_MMAP, EDGEMOE_PREFETCH_ROUTES },
        { EDGEMOE_POLICY_BELADY, EDGEMOE_IO_DIRECT, EDGEMOE_PREFETCH_LOOKAHEAD },
        { EDGEMOE_POLICY_DEFAULT, EDGEMOE_IO_DIRECT, EDGEMOE_PREFETCH_OFF },
    };
    for (const auto & cs : cases) {
        edgemoe_options o = quiet_options();
        o.policy = cs.policy;
        o.io = cs.io;
        o.prefetch = cs.prefetch;
        o.budget_fraction = 0.5;
        edgemoe_cache * c = nullptr;
        CHECK_EQ(edgemoe_cache_create(m.path.c_str(), &o, &c), EDGEMOE_OK);
        if (!c) {
            fprintf(stderr, "create: %s\n", edgemoe_last_error());
            continue;
        }
        edgemoe_cache_info info;
        CHECK_EQ(edgemoe_cache_info_get(c, &info), EDGEMOE_OK);
        CHECK_EQ(info.policy, cs.policy);
        CHECK_EQ(info.io, cs.io);
        CHECK_EQ(info.prefetch, cs.prefetch);
        CHECK_EQ(info.pool, EDGEMOE_POOL_HOST);
        CHECK_EQ(info.n_pools, 2);
        CHECK_EQ(info.n_repacked, 0);
        CHECK(std::string(info.pool_device) == "CPU");
        CHECK(info.budget_bytes <= (int64_t) util::all_expert_bytes(m)/2);
        CHECK(info.n_slots >= 2*m.cfg.n_expert_used);
        edgemoe_stats s;
        for (int32_t layer : { -1, 0, 1, 2, 3, 4, 1000 }) {
            memset(&s, 0xff, sizeof(s));
            CHECK_EQ(edgemoe_cache_stats(c, layer, &s), EDGEMOE_OK);
            CHECK_EQ(s.hits + s.misses + s.steps + s.bytes_read + s.prefetch_issued, 0u);
        }
        CHECK_EQ(edgemoe_cache_stats(c, 0, nullptr), EDGEMOE_ERR_INVALID_ARG);
        CHECK_EQ(edgemoe_cache_stats(nullptr, 0, &s), EDGEMOE_ERR_INVALID_ARG);
        CHECK_EQ(edgemoe_cache_info_get(c, nullptr), EDGEMOE_ERR_INVALID_ARG);
        CHECK_EQ(edgemoe_cache_info_get(nullptr, &info), EDGEMOE_ERR_INVALID_ARG);
        CHECK_EQ(edgemoe_cache_reset_stats(nullptr), EDGEMOE_ERR_INVALID_ARG);
        CHECK_EQ(edgemoe_cache_reset_stats(c), EDGEMOE_OK);
        edgemoe_cache_free(c);
    }
}

// -----------------------------------------------------------------------------------------
// attach hands llama.cpp a provider; that provider, driven as the graph drives it

struct attached {
    edgemoe_cache * c = nullptr;
    llama_context * ctx = nullptr;
    std::unique_ptr<sim::graph> g;

    bool make(const tiny::model & m, const edgemoe_options & o, llama_context * x, int threads) {
        if (edgemoe_cache_create(m.path.c_str(), &o, &c) != EDGEMOE_OK) {
            fprintf(stderr, "create: %s\n", edgemoe_last_error());
            return false;
        }
        if (edgemoe_cache_attach(c, x) != EDGEMOE_OK) {
            fprintf(stderr, "attach: %s\n", edgemoe_last_error());
            return false;
        }
        ctx = x;
        const fake::context_state & st = fake::state(x);
        if (!st.provider || !st.abort_cb) {
            return false;
        }
        g.reset(new sim::graph(*st.provider, m, threads));
        ggml_abort_callback cb = st.abort_cb;
        void * data = st.abort_data;
        g->set_abort([cb, data] { return cb(data); }); // ggml's CPU backend asks after every node
        std::string err;
        if (!g->bind_all(&err)) {
            fprintf(stderr, "bind: %s\n", err.c_str());
            return false;
        }
        return true;
    }
    ~attached() {
        g.reset();
        edgemoe_cache_free(c);
    }
};

void test_attach() {
    fake::reset();
    const tiny::model m = util::write_model(util::basic_config(), "api_attach");
    edgemoe_options o = quiet_options();
    edgemoe_cache * c = nullptr;
    CHECK_EQ(edgemoe_cache_create(m.path.c_str(), &o, &c), EDGEMOE_OK);
    llama_context * a = fake::context(0);
    llama_context * b = fake::context(1);
    CHECK_EQ(edgemoe_cache_attach(nullptr, a), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(edgemoe_cache_attach(c, a), EDGEMOE_OK);
    CHECK(fake::state(a).provider != nullptr);
    CHECK(fake::state(a).abort_cb != nullptr);
    if (fake::state(a).provider) {
        CHECK_EQ(fake::state(a).provider->max_waves, 1);
        CHECK(fake::state(a).provider->ubatch_rows != nullptr);
    }
    // one context per cache
    CHECK_EQ(edgemoe_cache_attach(c, b), EDGEMOE_ERR_STATE);
    CHECK_CONTAINS(last_error(), "another context");
    CHECK(fake::state(b).provider == nullptr);
    CHECK_EQ(edgemoe_cache_attach(c, a), EDGEMOE_OK); // the same one again
    // detach
    CHECK_EQ(edgemoe_cache_attach(c, nullptr), EDGEMOE_OK);
    CHECK(fake::state(a).provider == nullptr);
    CHECK(fake::state(a).abort_cb == nullptr);
    CHECK_EQ(edgemoe_cache_attach(c, b), EDGEMOE_OK);
    CHECK(fake::state(b).provider != nullptr);
    // free detaches
    edgemoe_cache_free(c);
    CHECK(fake::state(b).provider == nullptr);
    CHECK(fake::state(b).abort_cb == nullptr);

    // a context that could compute nodes out of order (llama.cpp refuses the provider there):
    // attach fails with the reason, and nothing is left attached
    CHECK_EQ(edgemoe_cache_create(m.path.c_str(), &o, &c), EDGEMOE_OK);
    llama_context * pp = fake::context(2);
    fake::state(pp).refuse = true;
    CHECK_EQ(edgemoe_cache_attach(c, pp), EDGEMOE_ERR_STATE);
    CHECK_CONTAINS(last_error(), "out of order");
    CHECK(fake::state(pp).provider == nullptr);
    CHECK(fake::state(pp).abort_cb == nullptr);
    CHECK_EQ(edgemoe_cache_attach(c, fake::context(3)), EDGEMOE_OK); // the cache is not attached to pp
    edgemoe_cache_free(c);
    CHECK(fake::state(fake::context(3)).provider == nullptr);

    // the model file must still be the one opened
    const tiny::model f = util::write_model(util::basic_config(), "api_file");
    CHECK_EQ(edgemoe_cache_create(f.path.c_str(), &o, &c), EDGEMOE_OK);
    CHECK_EQ(edgemoe_cache_check_file(c), EDGEMOE_OK);
    CHECK_EQ(edgemoe_cache_check_file(nullptr), EDGEMOE_ERR_INVALID_ARG);
    {
        // replaced: a new file renamed over the path
        tiny::model other;
        std::string err;
        const std::string tmp = f.path + ".new";
        CHECK(tiny::write(tmp, util::basic_config(), &other, &err));
        CHECK(rename(tmp.c_str(), f.path.c_str()) == 0);
    }
    CHECK_EQ(edgemoe_cache_check_file(c), EDGEMOE_ERR_IO);
    CHECK(!last_error().empty());
    CHECK_EQ(edgemoe_cache_attach(c, fake::context(4)), EDGEMOE_ERR_IO);
    CHECK(fake::state(fake::context(4)).provider == nullptr);
    edgemoe_cache_free(c);
}

void test_drive() {
    fake::reset();
    const tiny::model m = util::write_model(util::basic_config(), "api_drive");
    const int32_t k = m.cfg.n_expert_used, nb = m.n_blocks(), X = m.cfg.n_expert;
    attached at;
    CHECK(at.make(m, quiet_options(), fake::context(0), 3));
    if (!at.g) {
        return;
    }
    sim::route_gen rng(41);
    std::set<std::pair<int32_t, int32_t>> used;
    std::vector<int32_t> routed;
    for (int i = 0; i < 60; ++i) {
        sim::ubatch u;
        u.n_tokens = 1 + i % 4;
        u.ids.resize((size_t) nb*u.n_tokens*k);
        for (size_t j = 0; j < u.ids.size(); j += k) {
            rng.token(X, k, u.ids.data() + j, 2.0);
        }
        CHECK_EQ(at.g->run(u, nullptr, &routed), 0);
        CHECK(routed == u.ids);
        for (int32_t b = 0; b < nb; ++b) {
            for (int32_t t = 0; t < u.n_tokens*k; ++t) {
                used.insert(std::make_pair(b, u.ids[(size_t) b*u.n_tokens*k + t]));
            }
        }
        // last_routes: this batch's routes per row and block
        std::vector<int32_t> last((size_t) u.n_tokens*nb*k);
        CHECK_EQ(edgemoe_cache_last_routes(at.c, last.data(), u.n_tokens, nb, k), EDGEMOE_OK);
        for (int32_t t = 0; t < u.n_tokens; ++t) {
            for (int32_t b = 0; b < nb; ++b) {
                for (int32_t j = 0; j < k; ++j) {
                    CHECK_EQ(last[((size_t) t*nb + b)*k + j], u.ids[((size_t) b*u.n_tokens + t)*k + j]);
                }
            }
        }
    }
    // a full budget evicts nothing: resident is exactly what was used
    std::vector<uint8_t> res((size_t) nb*X, 9);
    CHECK_EQ(edgemoe_cache_resident(at.c, res.data(), nb, X), EDGEMOE_OK);
    for (int32_t b = 0; b < nb; ++b) {
        for (int32_t e = 0; e < X; ++e) {
            CHECK_EQ(res[(size_t) b*X + e], used.count(std::make_pair(b, e)) ? 1 : 0);
        }
    }
    CHECK_EQ(edgemoe_cache_resident(at.c, res.data(), nb + 1, X), EDGEMOE_ERR_INVALID_ARG);
    CHECK_CONTAINS(last_error(), "[" + std::to_string(nb) + "][" + std::to_string(X) + "]");
    CHECK_EQ(edgemoe_cache_resident(at.c, res.data(), nb, X - 1), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(edgemoe_cache_resident(at.c, nullptr, nb, X), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(edgemoe_cache_resident(nullptr, res.data(), nb, X), EDGEMOE_ERR_INVALID_ARG);
    std::vector<int32_t> last((size_t) 4*nb*k);
    CHECK_EQ(edgemoe_cache_last_routes(at.c, last.data(), 4, nb, k + 1), EDGEMOE_ERR_INVALID_ARG);
    CHECK_CONTAINS(last_error(), "last routes are");
    CHECK_EQ(edgemoe_cache_last_routes(at.c, nullptr, 4, nb, k), EDGEMOE_ERR_INVALID_ARG);
    // stats: every pair a hit or a miss, each miss one read
    edgemoe_stats s;
    CHECK_EQ(edgemoe_cache_stats(at.c, -1, &s), EDGEMOE_OK);
    CHECK_EQ(s.hits + s.misses, (uint64_t) at.g->pairs());
    CHECK_EQ(s.steps, (uint64_t) at.g->remaps());
    CHECK_EQ(s.misses, (uint64_t) used.size());
    CHECK_EQ(s.bytes_read, s.misses*m.pool_slot_bytes[0]);
    CHECK_EQ(edgemoe_cache_reset_stats(at.c), EDGEMOE_OK);
    CHECK_EQ(edgemoe_cache_stats(at.c, -1, &s), EDGEMOE_OK);
    CHECK_EQ(s.hits + s.misses + s.steps, 0u);

    // the route queue through the C API
    std::string err;
    const int32_t one[2] = { 3, 5 };
    CHECK_EQ(edgemoe_cache_set_routes(at.c, 1, nullptr, 1, k), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(edgemoe_cache_set_routes(at.c, 1, one, 0, k), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(edgemoe_cache_set_routes(at.c, 1, one, -1, k), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(edgemoe_cache_set_routes(at.c, 1, one, 1, 0), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(edgemoe_cache_set_routes(at.c, 1, one, 1, k + 1), EDGEMOE_ERR_INVALID_ARG);
    CHECK_CONTAINS(last_error(), "experts per token");
    CHECK_EQ(edgemoe_cache_set_routes(at.c, 0, one, 1, k), EDGEMOE_ERR_INVALID_ARG);
    CHECK_CONTAINS(last_error(), "no routed experts");
    CHECK_EQ(edgemoe_cache_set_routes(nullptr, 1, one, 1, k), EDGEMOE_ERR_INVALID_ARG);
    std::vector<int32_t> all((size_t) 2*nb*k);
    for (size_t i = 0; i < all.size(); i += k) {
        rng.token(X, k, all.data() + i, 1.0);
    }
    CHECK_EQ(edgemoe_cache_set_routes_all(at.c, all.data(), 2, 0, k), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(edgemoe_cache_set_routes_all(at.c, all.data(), 2, nb - 1, k), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(edgemoe_cache_set_routes_all(at.c, nullptr, 2, nb, k), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(edgemoe_cache_set_routes_all(at.c, all.data(), 2, nb, k), EDGEMOE_OK);
    {
        sim::ubatch u;
        u.n_tokens = 2;
        u.ids.assign((size_t) nb*2*k, 0);
        for (size_t i = 0; i < u.ids.size(); i += k) {
            rng.token(X, k, u.ids.data() + i, 1.0);
        }
        CHECK_EQ(at.g->run(u, nullptr, &routed), 0);
        for (int32_t b = 0; b < nb; ++b) {
            for (int32_t t = 0; t < 2; ++t) {
                for (int32_t j = 0; j < k; ++j) {
                    CHECK_EQ(routed[((size_t) b*2 + t)*k + j], all[((size_t) t*nb + b)*k + j]);
                }
            }
        }
    }
    CHECK_EQ(edgemoe_cache_clear_routes(nullptr), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(edgemoe_cache_clear_routes(at.c), EDGEMOE_OK);

    // a misuse in the graph (a queue too short for the batch) is a fault: the abort callback
    // stops the graph, take_fault hands it over once, the next decode works
    CHECK_EQ(edgemoe_cache_set_routes_all(at.c, all.data(), 1, nb, k), EDGEMOE_OK);
    {
        sim::ubatch u;
        u.n_tokens = 3;
        u.ids.assign((size_t) nb*3*k, 0);
        for (size_t i = 0; i < u.ids.size(); i += k) {
            rng.token(X, k, u.ids.data() + i, 1.0);
        }
        CHECK_EQ(at.g->run(u), 0);
        CHECK(at.g->aborted());
        const fake::context_state & st = fake::state(at.ctx);
        CHECK(st.abort_cb && st.abort_cb(st.abort_data));
        CHECK_EQ(edgemoe_cache_take_fault(at.c), EDGEMOE_ERR_STATE);
        CHECK_CONTAINS(last_error(), "external routes");
        CHECK(st.abort_cb && !st.abort_cb(st.abort_data));
        CHECK_EQ(edgemoe_cache_take_fault(at.c), EDGEMOE_OK);
        CHECK_EQ(edgemoe_cache_take_fault(nullptr), EDGEMOE_ERR_INVALID_ARG);
        CHECK_EQ(edgemoe_cache_clear_routes(at.c), EDGEMOE_OK);
        CHECK_EQ(at.g->run(u), 0);
        CHECK(!at.g->aborted());
    }

    // prefetch arguments
    const int32_t ex[3] = { 0, 1, 2 };
    CHECK_EQ(edgemoe_cache_prefetch(at.c, 1, nullptr, 2), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(edgemoe_cache_prefetch(at.c, 1, ex, -1), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(edgemoe_cache_prefetch(nullptr, 1, ex, 3), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(edgemoe_cache_prefetch(at.c, 0, ex, 3), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(edgemoe_cache_prefetch(at.c, 1, nullptr, 0), EDGEMOE_OK);
    CHECK_EQ(edgemoe_cache_prefetch(at.c, 1, ex, 3), EDGEMOE_OK);
}

// slow reads: the remap's other compute threads sleep through them (remap_wait) and wake
// when it is done; prefetches from another thread meanwhile
void test_slow_reads_many_threads() {
    fake::reset();
    const tiny::model m = util::write_model(util::basic_config(), "api_slow");
    setenv("EDGEMOE_READ_DELAY_MS", "2", 1);
    edgemoe_options o = quiet_options();
    o.budget_fraction = 0.4;
    o.n_io_threads = 2;
    attached at;
    const bool ok = at.make(m, o, fake::context(0), 4);
    unsetenv("EDGEMOE_READ_DELAY_MS");
    CHECK(ok);
    if (!ok) {
        return;
    }
    std::atomic<bool> stop{ false };
    std::thread racer([&] {
        sim::route_gen rng(5);
        while (!stop.load()) {
            int32_t ex[3];
            rng.token(m.cfg.n_expert, 3, ex, 1.0);
            CHECK_EQ(edgemoe_cache_prefetch(at.c, 1 + rng.uniform(3), ex, 3), EDGEMOE_OK);
            edgemoe_stats s;
            CHECK_EQ(edgemoe_cache_stats(at.c, -1, &s), EDGEMOE_OK);
            std::vector<uint8_t> res((size_t) m.n_blocks()*m.cfg.n_expert);
            CHECK_EQ(edgemoe_cache_resident(at.c, res.data(), m.n_blocks(), m.cfg.n_expert), EDGEMOE_OK);
            std::this_thread::sleep_for(std::chrono::microseconds(500));
        }
    });
    sim::route_gen rng(8);
    for (int i = 0; i < 40; ++i) {
        sim::ubatch u;
        u.n_tokens = 1 + i % 3;
        u.ids.resize((size_t) m.n_blocks()*u.n_tokens*m.cfg.n_expert_used);
        for (size_t j = 0; j < u.ids.size(); j += m.cfg.n_expert_used) {
            rng.token(m.cfg.n_expert, m.cfg.n_expert_used, u.ids.data() + j, 1.0);
        }
        CHECK_EQ(at.g->run(u), 0);
    }
    stop = true;
    racer.join();
    edgemoe_stats s;
    CHECK_EQ(edgemoe_cache_stats(at.c, -1, &s), EDGEMOE_OK);
    CHECK_EQ(s.hits + s.misses, (uint64_t) at.g->pairs());
    CHECK(s.stall_ms > 0.0);
}

// freeing a cache while its I/O threads read and more loads wait in the queues
void test_free_with_loads_in_flight() {
    const tiny::model m = util::write_model(util::basic_config(), "api_free");
    setenv("EDGEMOE_READ_DELAY_MS", "3", 1);
    for (int io : { EDGEMOE_IO_DIRECT, EDGEMOE_IO_BUFFERED, EDGEMOE_IO_MMAP }) {
        edgemoe_options o = quiet_options();
        o.io = io;
        o.n_io_threads = 3;
        o.prefetch = EDGEMOE_PREFETCH_ROUTES;
        edgemoe_cache * c = nullptr;
        CHECK_EQ(edgemoe_cache_create(m.path.c_str(), &o, &c), EDGEMOE_OK);
        if (!c) {
            continue;
        }
        const int32_t all[8] = { 0, 1, 2, 3, 4, 5, 6, 7 };
        CHECK_EQ(edgemoe_cache_prefetch(c, 1, all, 8), EDGEMOE_OK);
        std::vector<int32_t> routes((size_t) 4*m.n_blocks()*m.cfg.n_expert_used);
        for (size_t i = 0; i < routes.size(); ++i) {
            routes[i] = (int32_t) ((i*3 + i/2) % 8);
        }
        for (size_t i = 0; i < routes.size(); i += 2) {
            if (routes[i] == routes[i + 1]) {
                routes[i + 1] = (routes[i] + 1) % 8;
            }
        }
        CHECK_EQ(edgemoe_cache_set_routes_all(c, routes.data(), 4, m.n_blocks(), m.cfg.n_expert_used), EDGEMOE_OK);
        edgemoe_stats s;
        CHECK_EQ(edgemoe_cache_stats(c, -1, &s), EDGEMOE_OK);
        CHECK(s.prefetch_issued > 0);
        edgemoe_cache_free(c); // the reads in progress finish, the queued ones are dropped
    }
    unsetenv("EDGEMOE_READ_DELAY_MS");
}

// read faults through the C API (the test build compiles the hook in)
void test_fault_plan() {
    if (!edgemoe_fault_injection_available()) {
        CHECK_EQ(edgemoe_fault_plan("eio@0"), EDGEMOE_ERR_STATE);
        return;
    }
    CHECK_EQ(edgemoe_fault_plan("bogus@1"), EDGEMOE_ERR_INVALID_ARG);
    CHECK_CONTAINS(last_error(), "unknown kind");
    CHECK_EQ(edgemoe_fault_plan("eio"), EDGEMOE_ERR_INVALID_ARG);
    CHECK_EQ(edgemoe_fault_plan(nullptr), EDGEMOE_OK);
    fake::reset();
    const tiny::model m = util::write_model(util::basic_config(), "api_faults");
    attached at;
    CHECK(at.make(m, quiet_options(), fake::context(0), 2));
    if (!at.g) {
        return;
    }
    sim::ubatch u;
    u.n_tokens = 2;
    u.ids = std::vector<int32_t>((size_t) m.n_blocks()*2*2, 0);
    for (size_t i = 0; i < u.ids.size(); ++i) {
        u.ids[i] = (int32_t) (i % 8);
    }
    CHECK_EQ(edgemoe_fault_plan("eof@4+inf"), EDGEMOE_OK);
    CHECK_EQ(at.g->run(u), 0);
    CHECK(at.g->aborted());
    CHECK_EQ(edgemoe_cache_take_fault(at.c), EDGEMOE_ERR_IO);
    CHECK(!last_error().empty());
    CHECK_EQ(edgemoe_fault_plan(nullptr), EDGEMOE_OK);
    CHECK_EQ(at.g->run(u), 0);
    CHECK(!at.g->aborted());
    CHECK_EQ(edgemoe_cache_take_fault(at.c), EDGEMOE_OK);
}

// the route recorder: an eval callback that may run while another thread reads it
void test_route_recorder() {
    edgemoe_route_recorder * rec = edgemoe_route_recorder_new();
    CHECK(rec != nullptr);
    ggml_init_params ip = { ggml_tensor_overhead()*4, nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * topk = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 2, 3);
    ggml_set_name(topk, "ffn_moe_topk-5");
    ggml_tensor * other = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 2, 3);
    ggml_set_name(other, "ffn_moe_argsort-5");
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_cpu_buffer_type());
    CHECK(buf != nullptr);
    int32_t * d = (int32_t *) topk->data;
    for (int i = 0; i < 6; ++i) {
        d[i] = i;
    }
    CHECK(edgemoe_route_recorder_eval_cb(topk, true, rec));
    CHECK(!edgemoe_route_recorder_eval_cb(other, true, rec));
    CHECK_EQ(edgemoe_route_recorder_k(rec), 0);
    std::atomic<bool> stop{ false };
    std::thread reader([&] {
        std::vector<int32_t> out(4*400);
        while (!stop.load()) {
            const int64_t n = edgemoe_route_recorder_count(rec);
            const int64_t got = edgemoe_route_recorder_read(rec, out.data(), 400);
            CHECK(got >= std::min<int64_t>(n, 400));
        }
    });
    for (int i = 0; i < 100; ++i) {
        CHECK(edgemoe_route_recorder_eval_cb(topk, false, rec));
    }
    stop = true;
    reader.join();
    CHECK_EQ(edgemoe_route_recorder_k(rec), 2);
    CHECK_EQ(edgemoe_route_recorder_count(rec), 300);
    std::vector<int32_t> out(4*300);
    CHECK_EQ(edgemoe_route_recorder_read(rec, out.data(), 300), 300);
    CHECK_EQ(out[0], 5);  // layer
    CHECK_EQ(out[1], 0);  // token
    CHECK_EQ(out[4*299 + 1], 299);
    CHECK_EQ(out[4*2 + 2], 4);
    CHECK_EQ(out[4*2 + 3], 5);
    edgemoe_route_recorder_clear(rec);
    CHECK_EQ(edgemoe_route_recorder_count(rec), 0);
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    edgemoe_route_recorder_free(rec);
}

} // namespace

int main() {
    util::quiet_ggml();
    test_defaults();
    test_create_errors();
    test_inspect_info_stats();
    test_attach();
    test_drive();
    test_slow_reads_many_threads();
    test_free_with_loads_in_flight();
    test_fault_plan();
    test_route_recorder();
    util::remove_models();
    return finish("test_cache_api");
}
