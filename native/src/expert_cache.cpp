#include "expert_cache.h"

#include "fault_injection.h"

#include "edgemoe.h"

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

#include <sys/mman.h>
#include <unistd.h>

namespace edgemoe {

namespace {

// the predictor runs for ubatches of at most this many tokens (decode steps, a few sequences)
constexpr int64_t MAX_PREDICT_ROWS = lookahead_predictor::MAX_ROWS;
// how long the other compute threads spin for a remap before they sleep
constexpr int REMAP_SPIN_US = 100;
// blocks ahead whose predicted experts eviction spares
constexpr int PROTECT_DEPTH = 8;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

double ms_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

std::string human_bytes(uint64_t n) {
    char buf[64];
    if (n >= (1ull << 30)) {
        snprintf(buf, sizeof(buf), "%.2f GiB", n/1073741824.0);
    } else if (n >= (1ull << 20)) {
        snprintf(buf, sizeof(buf), "%.1f MiB", n/1048576.0);
    } else {
        snprintf(buf, sizeof(buf), "%" PRIu64 " bytes", n);
    }
    return buf;
}

// a miss is read in pieces of at most this much, by several I/O threads at once: one thread
// copying a 16 MB expert from the page cache and uploading it took 3.5 ms on an H200 host
constexpr uint64_t PIECE_BYTES = 2u << 20;
constexpr int MAX_READ_RETRIES = 3; // a transient read error (EIO...) is tried this many times more

} // namespace

void layer_stats::add(const layer_stats & o) {
    hits += o.hits;
    misses += o.misses;
    prefetch_hits += o.prefetch_hits;
    prefetch_wasted += o.prefetch_wasted;
    prefetch_issued += o.prefetch_issued;
    bytes_read += o.bytes_read;
    prefetch_cancelled += o.prefetch_cancelled;
    pred_predicted += o.pred_predicted;
    pred_correct += o.pred_correct;
    pred_actual += o.pred_actual;
    steps += o.steps;
    read_ms += o.read_ms;
    stall_ms += o.stall_ms;
    book_ms += o.book_ms;
    predict_ms += o.predict_ms;
    convert_ms += o.convert_ms;
    cpu_uses += o.cpu_uses;
}

std::unique_ptr<expert_cache> expert_cache::create(const std::string & path, const cache_options & opts, std::string * err, int * status) {
    std::unique_ptr<expert_cache> c(new expert_cache());
    if (!c->init(path, opts, err, status)) {
        return nullptr;
    }
    return c;
}

namespace {

// a role's room in an uploader's staging buffer: whole pages, so that O_DIRECT reads of the
// next role land in place too
size_t staging_step(uint64_t slice_bytes) {
    return (size_t) ((slice_bytes + DIRECT_ALIGN - 1)/DIRECT_ALIGN*DIRECT_ALIGN);
}

} // namespace

size_t expert_cache::staging_bytes(const pool & p) {
    size_t n = 0;
    for (const piece & pc : p.pieces) {
        const segment & last = p.segments[pc.first + pc.count - 1];
        n = std::max(n, (size_t) last.staged + staging_step(last.bytes));
    }
    return n;
}

void expert_cache::split_pieces(pool & p) const {
    // each role's slice in chunks of at most piece_bytes_ (a repacked role whole: its buffer
    // repacks a whole slot on set), chunks packed into pieces of at most piece_bytes_
    p.pieces.clear();
    p.segments.clear();
    uint64_t piece_size = 0;
    for (int r = 0; r < ROLE_COUNT; ++r) {
        if (!p.tensors[r]) {
            continue;
        }
        const bool whole = !p.base[r] && memory_.kind() == pool_kind::host;
        const uint64_t step = whole ? p.slice[r] : piece_bytes_;
        for (uint64_t off = 0; off < p.slice[r]; off += step) {
            const uint64_t bytes = std::min(step, p.slice[r] - off);
            if (p.pieces.empty() || piece_size + bytes > piece_bytes_) {
                p.pieces.push_back(piece{ (int32_t) p.segments.size(), 0 });
                piece_size = 0;
            }
            piece & pc = p.pieces.back();
            const uint64_t staged = pc.count == 0 ? 0 : p.segments.back().staged + staging_step(p.segments.back().bytes);
            p.segments.push_back(segment{ r, off, bytes, staged });
            pc.count++;
            piece_size += bytes;
        }
    }
}

expert_cache::~expert_cache() {
    {
        std::lock_guard<std::mutex> lock(mu_);
        stop_ = true;
    }
    cv_jobs_.notify_all();
    for (auto & t : threads_) {
        t.join();
    }
    if (meta_) {
        ggml_free(meta_);
    }
}

bool expert_cache::init(const std::string & path, const cache_options & opts, std::string * err, int * status) {
    opts_ = opts;
    *status = EDGEMOE_ERR_FORMAT;
    if (!read_model_layout(path, layout_, err)) {
        *status = err->rfind("cannot open", 0) == 0 ? EDGEMOE_ERR_IO : EDGEMOE_ERR_FORMAT;
        return false;
    }
    if (layout_.blocks.empty()) {
        *status = EDGEMOE_ERR_NO_EXPERTS;
        *err = path + " has no routed expert tensors";
        return false;
    }

    // blocks of one layout share a pool: one slot holds every role of one expert
    pools_.resize(layout_.pools.size());
    for (size_t i = 0; i < pools_.size(); ++i) {
        pools_[i].slot_bytes = layout_.pools[i].slot_bytes;
    }
    for (const auto & b : layout_.blocks) {
        block bl;
        bl.layer = b.layer;
        bl.pool  = b.pool;
        bl.slot_of.assign(layout_.n_expert, -1);
        bl.expert_rank.assign(layout_.n_expert, -1);
        bl.uses_at.resize(layout_.n_expert);
        bl.unit.reset(new wave_ctx{ this, (int32_t) blocks_.size(), -1, 0 });
        blocks_.push_back(std::move(bl));
    }
    cur_block_ = (int32_t) blocks_.size() - 1;

    if (!memory_.init(opts.pool, err)) {
        *status = EDGEMOE_ERR_INVALID_ARG;
        return false;
    }
    memory_.set_repack(opts.repack);
    if (opts.io == io_kind::pinned && memory_.kind() != pool_kind::vram) {
        *status = EDGEMOE_ERR_INVALID_ARG;
        *err = std::string("io pinned is for a VRAM expert pool, whose misses the GPU copies out of the pinned "
                           "file; this pool is ") + pool_name(memory_.kind());
        return false;
    }
    // a GPU pool holds at least one block's experts, so that no ubatch runs in waves there:
    // waves over a GPU pool gave wrong logits in tests (docs/cache.md, GPU pools)
    const bool gpu = memory_.kind() != pool_kind::host;
    const int32_t k = gpu ? layout_.n_expert : layout_.n_expert_used;
    const uint64_t min_bytes = layout_.min_budget_bytes(gpu);
    double fraction = opts.budget_fraction;
    if (opts.budget_bytes > 0) {
        fraction = (double) opts.budget_bytes/(double) layout_.expert_bytes;
    }
    if (!(fraction > 0.0)) {
        *status = EDGEMOE_ERR_INVALID_ARG;
        *err = "expert cache budget must be positive";
        return false;
    }
    fraction = std::min(fraction, 1.0);
    const uint64_t asked = opts.budget_bytes > 0 ? (uint64_t) opts.budget_bytes : (uint64_t) (fraction*layout_.expert_bytes);
    if (asked < min_bytes) {
        *status = EDGEMOE_ERR_BUDGET;
        *err = "expert cache budget " + human_bytes(asked) + " is below the minimum " + human_bytes(min_bytes) +
               " (" + std::to_string(min_bytes) + " bytes: " +
               (gpu ? "a GPU pool holds one layer's " + std::to_string(k) + " experts"
                    : "top-" + std::to_string(k) + " experts") + " in each of " +
               std::to_string(pools_.size()) + " pool" + (pools_.size() == 1 ? "" : "s") + ")";
        return false;
    }

    // the same fraction of every pool's experts, never fewer than one token's top-k
    budget_bytes_ = 0;
    for (size_t i = 0; i < pools_.size(); ++i) {
        pool & p = pools_[i];
        const int64_t all = (int64_t) layout_.pools[i].n_blocks*layout_.n_expert;
        int64_t n = (int64_t) std::floor(fraction*(double) all + 1e-9);
        n = std::max<int64_t>(n, k);
        n = std::min<int64_t>(n, all);
        p.n_slots = (int32_t) n;
        budget_bytes_ += (uint64_t) n*p.slot_bytes;
    }
    // raising a pool to its k-slot floor may overshoot: take the excess from the others
    while (budget_bytes_ > asked) {
        pool * most = nullptr;
        for (auto & p : pools_) {
            if (p.n_slots > k && (!most || p.slot_bytes*(p.n_slots - k) > most->slot_bytes*(most->n_slots - k))) {
                most = &p;
            }
        }
        if (!most) {
            break; // only floors left, and asked >= min_bytes: cannot happen
        }
        most->n_slots--;
        budget_bytes_ -= most->slot_bytes;
    }

    std::string notice;
    if (!store_.open(path, opts.io, err, &notice)) {
        *status = EDGEMOE_ERR_IO;
        return false;
    }
    if (store_.kind() == io_kind::pinned) {
        // pinning faults the whole file in (a cold file is read here, once) and holds it in RAM
        std::string why;
        if (!memory_.pin(store_.mapping(), store_.size(), &why)) {
            store_.pin_refused();
            notice = "cannot pin " + path + " for " + memory_.device_name() + " (" + why +
                     "); misses are copied through staging, as with io mmap";
        }
    }
    if (!notice.empty() && !opts.quiet) {
        fprintf(stderr, "edgemoe: %s\n", notice.c_str());
    }

    ggml_init_params ip = { /*.mem_size =*/ ggml_tensor_overhead()*((pools_.size() + blocks_.size())*ROLE_COUNT + 1), /*.mem_buffer =*/ nullptr, /*.no_alloc =*/ true };
    meta_ = ggml_init(ip);
    if (!meta_) {
        *status = EDGEMOE_ERR_NOMEM;
        *err = "cannot create the pool metadata";
        return false;
    }

    for (size_t i = 0; i < pools_.size(); ++i) {
        pool & p = pools_[i];
        const moe_block * proto = &layout_.blocks[layout_.pools[i].first_block];
        for (int r = 0; r < ROLE_COUNT; ++r) {
            const role_tensor & rt = proto->roles[r];
            if (!rt.present) {
                continue;
            }
            ggml_tensor * t = ggml_new_tensor_3d(meta_, rt.type, rt.ne0, rt.ne1, p.n_slots);
            char name[GGML_MAX_NAME];
            snprintf(name, sizeof(name), "edgemoe.slots.%zu.%s", i, role_name(r));
            ggml_set_name(t, name);
            if ((uint64_t) t->nb[2] != rt.slice_bytes) {
                *err = std::string("tensor ") + rt.name + ": " + std::to_string(rt.slice_bytes) +
                       " bytes per expert in the file, " + std::to_string((uint64_t) t->nb[2]) + " by its shape";
                *status = EDGEMOE_ERR_FORMAT;
                return false;
            }

            uint8_t * mem = nullptr;
            if (!memory_.alloc(t, &mem, err)) {
                *status = EDGEMOE_ERR_NOMEM;
                return false;
            }
            p.tensors[r] = t;
            p.base[r]    = mem; // nullptr for VRAM and repacked roles: loads go through an uploader
            p.slice[r]   = rt.slice_bytes;
        }
        p.slots.assign(p.n_slots, slot());
        p.candidates.reserve(p.n_slots);
        // aging over about 16 tokens' worth of steps of this pool's blocks
        const double half_life = 16.0*(double) layout_.pools[i].n_blocks;
        p.pol = make_policy(opts.policy, p.n_slots, (int32_t) blocks_.size(), layout_.n_expert, half_life);
    }

    if (gpu && !init_full_pools(err)) {
        *status = EDGEMOE_ERR_NOMEM;
        return false;
    }

    layer_block_.assign(std::max<int32_t>(layout_.n_layer, layout_.blocks.back().layer + 1), -1);
    for (size_t b = 0; b < blocks_.size(); ++b) {
        layer_block_[blocks_[b].layer] = (int32_t) b;
    }
    stats_.assign(layer_block_.size(), layer_stats());

    // EDGEMOE_READ_PIECE_KIB: another piece size, for tests and measurements (docs/cache.md)
    piece_bytes_ = PIECE_BYTES;
    if (const char * v = getenv("EDGEMOE_READ_PIECE_KIB")) {
        const long long kib = atoll(v);
        if (kib > 0) {
            piece_bytes_ = std::max<uint64_t>(DIRECT_ALIGN, (uint64_t) kib*1024/DIRECT_ALIGN*DIRECT_ALIGN);
        }
    }
    size_t n_pieces = 0, max_pieces = 1;
    for (auto & p : pools_) {
        split_pieces(p);
        n_pieces += (size_t) p.n_slots*p.pieces.size();
        max_pieces = std::max(max_pieces, p.pieces.size());
    }
    jobs_.resize(n_pieces);

    if (opts.prefetch == prefetch_kind::lookahead) {
        predictor_.reset(new lookahead_predictor());
        // predictions reach PROTECT_DEPTH blocks ahead for eviction, `lookahead` of them load
        if (!predictor_->load(layout_, std::max(opts.lookahead, PROTECT_DEPTH), err)) {
            *status = EDGEMOE_ERR_INVALID_ARG;
            *err = "lookahead prefetch: " + *err;
            return false;
        }
        // enough queued for every block it looks ahead to, not a backlog that outlives its use
        max_predicted_queued_ = (size_t) std::max(8, 2*k*std::max(1, opts.lookahead))*max_pieces;
        for (auto & bl : blocks_) {
            bl.predicted.reserve((size_t) layout_.n_expert);
        }
    }

    // injected read faults, for tests (a build with EDGEMOE_FAULT_INJECTION; fault_injection.h)
    if (const char * plan = getenv("EDGEMOE_FAULTS")) {
        if (!faults::set_plan(plan, err)) {
            *err = "EDGEMOE_FAULTS: " + *err;
            *status = EDGEMOE_ERR_INVALID_ARG;
            return false;
        }
    }
    // a slow disk on demand, for tests and for what-if measurements (docs/cache.md)
    if (const char * d = getenv("EDGEMOE_READ_DELAY_MS")) {
        read_delay_us_ = (int64_t) (atof(d)*1000.0);
    }
    const int n_threads = opts.n_io_threads > 0 ? opts.n_io_threads : 4;
    bool staged = false; // a role whose slots the CPU cannot write in place (VRAM, repacked)
    for (const auto & p : pools_) {
        for (int r = 0; r < ROLE_COUNT; ++r) {
            staged |= p.tensors[r] && !p.base[r];
        }
    }
    if (staged) {
        // each I/O thread reads a piece into its staging, then uploads or repacks it
        size_t staging = 0;
        for (const auto & p : pools_) {
            staging = std::max<size_t>(staging, staging_bytes(p));
        }
        for (int i = 0; i < n_threads; ++i) {
            auto u = uploader::create(memory_.device(), staging, err);
            if (!u) {
                *status = EDGEMOE_ERR_NOMEM;
                return false;
            }
            uploaders_.push_back(std::move(u));
        }
    }
    for (int i = 0; i < n_threads; ++i) {
        threads_.emplace_back([this, i] { io_worker(i); });
    }
    queue_full_pools();
    *status = EDGEMOE_OK;
    return true;
}

bool expert_cache::init_full_pools(std::string * err) {
    std::vector<int32_t> next(pools_.size(), 0);
    for (size_t i = 0; i < pools_.size(); ++i) {
        pool & p = pools_[i];
        // quantized pools only: MMQ splits its work by the number of expert matrices, which
        // the view restores (measured exact); for F16/F32 experts the view changed CUDA's
        // results on an H200 while the whole pool matched stock, so they keep the whole pool
        bool quantized = true;
        for (int r = 0; r < ROLE_COUNT; ++r) {
            quantized &= !p.tensors[r] || ggml_is_quantized(p.tensors[r]->type);
        }
        p.full = quantized && p.n_slots == layout_.pools[i].n_blocks*layout_.n_expert;
    }
    for (auto & bl : blocks_) {
        pool & p = pools_[bl.pool];
        if (!p.full) {
            continue;
        }
        bl.slot_base = next[bl.pool]++*layout_.n_expert;
        for (int r = 0; r < ROLE_COUNT; ++r) {
            const ggml_tensor * t = p.tensors[r];
            if (!t) {
                continue;
            }
            ggml_tensor * v = ggml_view_3d(meta_, p.tensors[r], t->ne[0], t->ne[1], layout_.n_expert, t->nb[1], t->nb[2],
                                           (size_t) bl.slot_base*t->nb[2]);
            if (!v || ggml_backend_view_init(v) != GGML_STATUS_SUCCESS) {
                *err = "cannot make a layer's view of the expert pool";
                return false;
            }
            bl.views[r] = v;
        }
    }
    return true;
}

void expert_cache::queue_full_pools() {
    // every expert of a full pool gets its own slot now and loads in layer order; nothing is
    // ever evicted, and a remap that finds its expert still queued promotes it to a demand read
    std::lock_guard<std::mutex> lock(mu_);
    for (int32_t b = 0; b < (int32_t) blocks_.size(); ++b) {
        block & bl = blocks_[b];
        pool & p = pools_[bl.pool];
        if (!p.full) {
            continue;
        }
        for (int32_t e = 0; e < layout_.n_expert; ++e) {
            const int32_t s = bl.slot_base + e;
            slot & sl = p.slots[s];
            sl.key = make_key(b, e);
            sl.state = SLOT_LOADING;
            bl.slot_of[e] = s;
            p.pol->on_fill(s, sl.key, step_);
            queue_load(bl.pool, s, false);
        }
    }
    cv_jobs_.notify_all();
}

int32_t expert_cache::n_repacked() const {
    int32_t n = 0;
    for (const auto & p : pools_) {
        for (int r = 0; r < ROLE_COUNT; ++r) {
            n += p.tensors[r] && memory_.kind() == pool_kind::host && !p.base[r];
        }
    }
    return n;
}

int32_t expert_cache::n_slots_total() const {
    int32_t n = 0;
    for (const auto & p : pools_) {
        n += p.n_slots;
    }
    return n;
}

int32_t expert_cache::max_waves() const {
    int32_t min_slots = std::numeric_limits<int32_t>::max();
    for (const auto & p : pools_) {
        min_slots = std::min(min_slots, p.full ? layout_.n_expert : p.n_slots);
    }
    return (layout_.n_expert + min_slots - 1)/min_slots;
}

int32_t expert_cache::block_of_layer(int32_t layer) const {
    return layer >= 0 && layer < (int32_t) layer_block_.size() ? layer_block_[layer] : -1;
}

bool expert_cache::bind(int32_t il, const ggml_tensor * up, const ggml_tensor * gate, const ggml_tensor * down,
                        const ggml_tensor * gate_up, ggml_tensor ** slots, int32_t * n_slots, void ** unit) {
    const int32_t b = block_of_layer(il);
    if (b < 0) {
        return false;
    }
    const moe_block & mb = layout_.blocks[b];
    const ggml_tensor * given[ROLE_COUNT] = { up, gate, down, gate_up };
    for (int r = 0; r < ROLE_COUNT; ++r) {
        const role_tensor & rt = mb.roles[r];
        // serve only the tensors this layout describes; anything else stays stock
        if (rt.present != (given[r] != nullptr)) {
            return false;
        }
        if (rt.present && (given[r]->type != rt.type || given[r]->ne[0] != rt.ne0 || given[r]->ne[1] != rt.ne1 ||
                           given[r]->ne[2] != layout_.n_expert || strcmp(given[r]->name, rt.name.c_str()) != 0)) {
            return false;
        }
    }
    pool & p = pools_[blocks_[b].pool];
    for (int r = 0; r < ROLE_COUNT; ++r) {
        slots[r] = p.full ? blocks_[b].views[r] : p.tensors[r];
    }
    if (opts_.hybrid && !blocks_[b].advised) {
        // the hybrid's CPU matmuls read the model's own mapping of these tensors, which llama.cpp
        // marks random-access (lazy tensors): each 4 KiB page would then fault alone, costing
        // milliseconds per expert on first touch. Normal access maps a page's neighbours with it.
        for (int r = 0; r < ROLE_COUNT; ++r) {
            if (given[r] && given[r]->data && given[r]->buffer && ggml_backend_buffer_is_host(given[r]->buffer)) {
                const uintptr_t page = (uintptr_t) sysconf(_SC_PAGESIZE);
                const uintptr_t beg = (uintptr_t) given[r]->data / page * page;
                const uintptr_t end = (uintptr_t) given[r]->data + ggml_nbytes(given[r]);
                posix_madvise((void *) beg, end - beg, POSIX_MADV_NORMAL);
            }
        }
        blocks_[b].advised = true;
    }
    *n_slots = p.full ? layout_.n_expert : p.n_slots;
    *unit = blocks_[b].unit.get();
    return true;
}

void * expert_cache::wave(void * unit, int32_t i, int32_t n) {
    const int32_t b = unit ? static_cast<const wave_ctx *>(unit)->block : -1;
    if (b < 0 || b >= (int32_t) blocks_.size()) {
        return nullptr;
    }
    auto & waves = blocks_[b].waves;
    auto it = waves.find({ i, n });
    if (it == waves.end()) {
        it = waves.emplace(std::make_pair(i, n), std::unique_ptr<wave_ctx>(new wave_ctx{ this, b, i, n })).first;
    }
    return it->second.get();
}

void * expert_cache::route_ctx(void * unit, int32_t n_ubatch_tokens) {
    const int32_t b = unit ? static_cast<const wave_ctx *>(unit)->block : -1;
    if (b < 0 || b >= (int32_t) blocks_.size()) {
        return nullptr;
    }
    auto & m = blocks_[b].routes_ctx;
    auto it = m.find(n_ubatch_tokens);
    if (it == m.end()) {
        it = m.emplace(n_ubatch_tokens, std::unique_ptr<wave_ctx>(new wave_ctx{ this, b, -1, n_ubatch_tokens })).first;
    }
    return it->second.get();
}

void expert_cache::op_route(ggml_tensor * dst, const wave_ctx & r) {
    const ggml_tensor * src = dst->src[0];
    const ggml_tensor * out_ids = dst->src[1]; // set when this block sees only the output rows
    const int64_t k = src->ne[0];
    const int64_t n_rows = src->ne[1];
    const int64_t n_ubatch = r.count;
    int32_t * out = (int32_t *) dst->data;

    std::lock_guard<std::mutex> lock(mu_);
    block & bl = blocks_[r.block];
    auto router_ids = [&] {
        for (int64_t t = 0; t < n_rows; ++t) {
            const int32_t * row = (const int32_t *) ((const char *) src->data + t*src->nb[1]);
            for (int64_t j = 0; j < k; ++j) {
                out[t*k + j] = row[j*src->nb[0]/sizeof(int32_t)];
            }
        }
    };
    if (faulted()) {
        router_ids(); // the graph is being aborted: in-range ids, nothing consumed
        return;
    }
    // the pin rule (a slot pinned by one step is evictable from the next) assumes a graph's
    // blocks run in order, one graph at a time: check it rather than trust it
    if (r.block != 0 && r.block <= order_block_) {
        set_fault(EDGEMOE_ERR_STATE, "internal: the route op of MoE block " + std::to_string(r.block) +
                  " ran after block " + std::to_string(order_block_) + "'s: graph nodes ran out of order");
        router_ids();
        return;
    }
    order_block_ = r.block;
    order_wave_  = 0;
    // the batch row of ubatch row t (llama.cpp may reorder a batch when it splits it by sequence)
    const bool mapped = (int64_t) ub_rows_.size() == n_ubatch;
    auto batch_row = [&](int64_t t) -> int64_t { return mapped ? ub_rows_[t] : t; };
    auto ubatch_row = [&](int64_t t) -> int64_t { return out_ids ? ((const int32_t *) out_ids->data)[t] : t; };
    const int64_t n_queued = (int64_t) bl.taken.size();
    auto queued_row = [&](int64_t t) -> int64_t { return mapped ? bl.batch_base + batch_row(t) - bl.routes_base : t; };
    // check everything before consuming anything: a misuse fails this decode, not the process
    for (int64_t t = 0; t < n_rows; ++t) {
        const int64_t tok = ubatch_row(t);
        if (tok < 0 || tok >= n_ubatch) {
            set_fault(EDGEMOE_ERR_STATE, "internal: output row " + std::to_string(tok) + " outside the ubatch");
            router_ids();
            return;
        }
    }
    if (!bl.routes.empty()) {
        if (!out_ids && n_rows != n_ubatch) {
            set_fault(EDGEMOE_ERR_STATE, "internal: a route op over " + std::to_string(n_rows) + " of " +
                      std::to_string(n_ubatch) + " rows");
            router_ids();
            return;
        }
        for (int64_t t = 0; t < n_ubatch; ++t) {
            const int64_t q = queued_row(t);
            if (bl.routes_k != k || q < 0 || q >= n_queued || bl.taken[q]) {
                set_fault(EDGEMOE_ERR_STATE, "external routes of layer " + std::to_string(bl.layer) + " cover " +
                          std::to_string(n_queued) + " tokens; the batch needs " + std::to_string(n_ubatch) +
                          " more (set routes for every token of every layer before decoding)");
                router_ids();
                return;
            }
        }
    }
    if (bl.routes.empty()) {
        router_ids();
    } else {
        // routes are queued per batch row, from the batch's first; a block computed only for
        // the output rows takes those rows' routes and still consumes the whole ubatch's
        for (int64_t t = 0; t < n_rows; ++t) {
            const int64_t q = queued_row(ubatch_row(t));
            for (int64_t j = 0; j < k; ++j) {
                out[t*k + j] = bl.routes[q*k + j];
            }
        }
        for (int64_t t = 0; t < n_ubatch; ++t) {
            const int64_t q = queued_row(t);
            bl.taken[q] = 1;
            for (int64_t j = 0; j < k; ++j) {
                // this token's use is no longer ahead; in order it is the front
                auto & uses = bl.uses_at[bl.routes[q*k + j]];
                const auto it = std::find(uses.begin(), uses.end(), bl.routes_base + q);
                if (it != uses.end()) {
                    uses.erase(it);
                }
            }
        }
        while (!bl.taken.empty() && bl.taken.front()) {
            bl.routes.erase(bl.routes.begin(), bl.routes.begin() + k);
            bl.taken.pop_front();
            bl.routes_base++;
        }
    }
    // what each batch row used, for the scheduler's estimate of its next token
    for (int64_t t = 0; t < n_rows; ++t) {
        const int64_t row = batch_row(ubatch_row(t));
        if (row >= 0 && row < last_rows_ && (int64_t) bl.last.size() >= (row + 1)*k) {
            std::copy(out + t*k, out + (t + 1)*k, bl.last.begin() + row*k);
        }
    }
    // this block has taken the ubatch's routes: distances from here on count from it
    cur_block_ = r.block;
}

void expert_cache::ubatch_rows(const int32_t * batch_idx, int32_t n_tokens, int32_t first_row) {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t k = layout_.n_expert_used;
    if (first_row == 0) {
        for (auto & bl : blocks_) {
            // rows of the last batch that this block never took are dropped: a ubatch with no
            // output rows has no route op in the last block (llama.cpp computes it for 0 rows),
            // and left queued they would become the new batch's routes, and Belady's future
            const int64_t prev_end = bl.batch_end;
            const int32_t kb = bl.routes_k;
            while (!bl.taken.empty() && bl.routes_base < prev_end) {
                for (int32_t j = 0; j < kb; ++j) {
                    auto & uses = bl.uses_at[bl.routes[j]];
                    if (!uses.empty() && uses.front() == bl.routes_base) {
                        uses.pop_front();
                    }
                }
                bl.routes.erase(bl.routes.begin(), bl.routes.begin() + kb);
                bl.taken.pop_front();
                bl.routes_base++;
            }
            // a new batch: its row 0 is the first token still queued
            bl.batch_base = bl.routes_base;
            bl.batch_end  = bl.batch_base;
            bl.batch_routed = !bl.taken.empty();
        }
        last_rows_ = 0;
    }
    ub_rows_.resize(n_tokens);
    int64_t rows = last_rows_;
    for (int32_t t = 0; t < n_tokens; ++t) {
        ub_rows_[t] = batch_idx ? batch_idx[t] : first_row + t;
        rows = std::max<int64_t>(rows, (int64_t) ub_rows_[t] + 1);
    }
    for (auto & bl : blocks_) {
        if (first_row == 0) {
            std::fill(bl.last.begin(), bl.last.end(), -1);
        }
        if (bl.batch_routed) {
            bl.batch_end = std::max(bl.batch_end, bl.batch_base + rows); // this batch's rows, queued
        }
        if ((int64_t) bl.last.size() < rows*k) {
            bl.last.resize(rows*k, -1);
        }
    }
    last_rows_ = rows;
}

int expert_cache::last_routes(int32_t * out, int32_t n_rows, int32_t n_blocks, int32_t k, std::string * err) const {
    if (n_blocks != (int32_t) blocks_.size() || k != layout_.n_expert_used || n_rows < 0) {
        *err = "last routes are [rows][" + std::to_string(blocks_.size()) + "][" + std::to_string(layout_.n_expert_used) + "]";
        return EDGEMOE_ERR_INVALID_ARG;
    }
    std::lock_guard<std::mutex> lock(mu_);
    for (int64_t row = 0; row < n_rows; ++row) {
        for (int32_t b = 0; b < n_blocks; ++b) {
            const auto & last = blocks_[b].last;
            for (int32_t j = 0; j < k; ++j) {
                const size_t i = (size_t) (row*k + j);
                out[(row*n_blocks + b)*k + j] = row < last_rows_ && i < last.size() ? last[i] : -1;
            }
        }
    }
    return EDGEMOE_OK;
}

int expert_cache::resident(uint8_t * out, int32_t n_blocks, int32_t n_expert, std::string * err) const {
    if (n_blocks != (int32_t) blocks_.size() || n_expert != layout_.n_expert) {
        *err = "resident experts are [" + std::to_string(blocks_.size()) + "][" + std::to_string(layout_.n_expert) + "]";
        return EDGEMOE_ERR_INVALID_ARG;
    }
    std::lock_guard<std::mutex> lock(mu_);
    for (int32_t b = 0; b < n_blocks; ++b) {
        for (int32_t e = 0; e < n_expert; ++e) {
            out[(size_t) b*n_expert + e] = blocks_[b].slot_of[e] >= 0;
        }
    }
    return EDGEMOE_OK;
}

int64_t expert_cache::next_use(expert_key key) const {
    // distance in (token, block) steps to the next known use
    const int32_t b = key_block(key);
    const int32_t e = key_expert(key);
    const block & bl = blocks_[b];
    const auto & q = bl.uses_at[e];
    if (q.empty()) {
        return std::numeric_limits<int64_t>::max();
    }
    // blocks up to the current one have already taken this ubatch's routes: their queue
    // starts at the next token, the blocks after it still at this one
    const int64_t n_blocks = (int64_t) blocks_.size();
    const int64_t ahead = ((b - cur_block_ - 1 + n_blocks) % n_blocks) + 1;
    return (q.front() - bl.routes_base)*n_blocks + ahead;
}

void expert_cache::evict(pool & p, int32_t s) {
    slot & sl = p.slots[s];
    if (sl.state == SLOT_EMPTY) {
        return;
    }
    const int32_t b = key_block(sl.key);
    blocks_[b].slot_of[key_expert(sl.key)] = -1;
    if (sl.prefetched) {
        stats_[blocks_[b].layer].prefetch_wasted++;
    }
    p.pol->on_evict(s);
    empty_slot(p, s);
}

void expert_cache::queue_prefetch(pool & p, int32_t s, int32_t b, int32_t e, uint64_t now, bool predicted) {
    block & bl = blocks_[b];
    slot & sl = p.slots[s];
    sl.key = make_key(b, e);
    sl.state = SLOT_LOADING;
    sl.prefetched = true;
    sl.predicted = predicted;
    bl.slot_of[e] = s;
    p.pol->on_fill(s, sl.key, now);
    stats_[bl.layer].prefetch_issued++;
    queue_load(bl.pool, s, false);
}

int32_t expert_cache::queue_load(int32_t pool_index, int32_t s, bool urgent) {
    pool & p = pools_[pool_index];
    slot & sl = p.slots[s];
    const int32_t n = (int32_t) p.pieces.size();
    sl.pieces_left = n;
    sl.piece_failed = false;
    io_job j{ pool_index, s, key_block(sl.key), key_expert(sl.key), sl.gen, 0 };
    if (urgent) {
        for (int32_t i = n - 1; i >= 0; --i) { // each goes to the front: the first piece ends first
            j.piece = i;
            push_job(j, true);
        }
    } else {
        for (int32_t i = 0; i < n; ++i) {
            j.piece = i;
            prefetch_jobs_.push_back(j);
        }
    }
    return n;
}

int32_t expert_cache::load_now(int32_t pool_index, int32_t s, int32_t b, int32_t e, uint64_t now) {
    pool & p = pools_[pool_index];
    slot & sl = p.slots[s];
    sl.key   = make_key(b, e);
    sl.state = SLOT_LOADING;
    sl.pin   = now;
    blocks_[b].slot_of[e] = s;
    p.pol->on_fill(s, sl.key, now);
    return queue_load(pool_index, s, true);
}

int32_t expert_cache::promote_prefetch(int32_t pool_index, int32_t s) {
    io_job j{};
    const int32_t n = unqueue_prefetch(pool_index, s, &j);
    // queued pieces are the last ones, in order: pushed to the front from the last back
    const int32_t first = j.piece - n + 1;
    for (int32_t i = j.piece; n > 0 && i >= first; --i) {
        j.piece = i;
        push_job(j, true);
    }
    return n;
}

void expert_cache::empty_slot(pool & p, int32_t s) {
    const uint32_t gen = p.slots[s].gen + 1;
    p.slots[s] = slot();
    p.slots[s].gen = gen;
}

int32_t expert_cache::unqueue_prefetch(int32_t pool_index, int32_t s, io_job * last) {
    // one pass that keeps the other slots' pieces in order
    int32_t n = 0;
    auto keep = prefetch_jobs_.begin();
    for (auto it = prefetch_jobs_.begin(); it != prefetch_jobs_.end(); ++it) {
        if (it->pool == pool_index && it->slot == s) {
            if (last) {
                *last = *it;
            }
            n++;
        } else {
            *keep++ = *it;
        }
    }
    prefetch_jobs_.erase(keep, prefetch_jobs_.end());
    return n;
}

int32_t expert_cache::acquire_slot(pool & p, uint64_t now, bool for_prefetch) {
    // victims by tier: ordinary slots by the policy; then slots the predictor expects a later
    // layer of this token to use, the one expected last first (Belady over what is known);
    // then, for a demand load only, prefetches not used yet. A prefetch takes ordinary slots only.
    p.candidates.clear();
    int32_t wanted_last = -1, n_prefetched = 0;
    for (int32_t s = 0; s < p.n_slots; ++s) {
        const slot & sl = p.slots[s];
        if (sl.state == SLOT_EMPTY) {
            return s;
        }
        if (sl.state != SLOT_READY || sl.pin >= now) {
            continue;
        }
        if (sl.prefetched) {
            n_prefetched++;
        } else if (sl.want > now) {
            if (wanted_last < 0 || sl.want > p.slots[wanted_last].want) {
                wanted_last = s;
            }
        } else {
            p.candidates.push_back(s);
        }
    }
    if (p.candidates.empty() && for_prefetch) {
        return -1;
    }
    if (p.candidates.empty() && wanted_last >= 0) {
        evict(p, wanted_last);
        return wanted_last;
    }
    if (p.candidates.empty() && n_prefetched > 0) {
        // an expert loaded because it is expected soon is a poor victim: only when nothing else is left
        for (int32_t s = 0; s < p.n_slots; ++s) {
            const slot & sl = p.slots[s];
            if (sl.state == SLOT_READY && sl.pin < now && sl.prefetched) {
                p.candidates.push_back(s);
            }
        }
    }
    if (p.candidates.empty()) {
        return -1;
    }
    next_use_fn nu;
    if (opts_.policy == policy_kind::belady) {
        // only Belady reads the queued routes, and only while some are queued
        bool known_future = false;
        for (const auto & bl : blocks_) {
            known_future |= !bl.routes.empty();
        }
        if (known_future) {
            nu = [this](expert_key key) { return next_use(key); };
        }
    }
    const int32_t v = p.pol->victim(p.candidates, now, nu);
    evict(p, v);
    return v;
}

void expert_cache::op_remap(ggml_tensor * dst, const wave_ctx & w) {
    const ggml_tensor * ids = dst->src[0];
    const ggml_tensor * hidden = dst->src[1]; // the block's input: the predictor reads it
    const int64_t k = ids->ne[0];
    const int64_t n_tokens = ids->ne[1];
    const int64_t n_pairs = k*n_tokens;
    const int32_t * sel = (const int32_t *) ids->data; // the route op's contiguous output
    int32_t * out = (int32_t *) dst->data;

    const auto t0 = std::chrono::steady_clock::now();
    double waited_ms = 0.0;
    double predict_ms = 0.0;
    std::unique_lock<std::mutex> lock(mu_);
    block & bl = blocks_[w.block];
    pool & p = pools_[bl.pool];
    layer_stats & st = stats_[bl.layer];
    // a fault ends the remap here: the graph stops after this node (the abort callback)
    auto fail = [&](int status, const std::string & msg) {
        set_fault(status, msg);
        safe_ids(out, k, n_tokens);
    };
    if (faulted()) {
        safe_ids(out, k, n_tokens);
        return;
    }
    if (w.block != order_block_ || w.index != order_wave_) {
        return fail(EDGEMOE_ERR_STATE, "internal: wave " + std::to_string(w.index) + " of MoE block " +
                    std::to_string(w.block) + " ran where wave " + std::to_string(order_wave_) + " of block " +
                    std::to_string(order_block_) + " was due: graph nodes ran out of order");
    }
    order_wave_++;
    const uint64_t now = ++step_;
    cur_block_ = w.block;

    if (w.index == 0) {
        // the ubatch's distinct experts, in order of first use
        for (int32_t e : bl.distinct) {
            bl.expert_rank[e] = -1;
        }
        bl.distinct.clear();
        bl.uses.clear();
        for (int64_t i = 0; i < n_pairs; ++i) {
            const int32_t e = sel[i];
            if (e < 0 || e >= layout_.n_expert) {
                for (int64_t j = 0; j < i; ++j) { // leave no half-built partition behind
                    bl.expert_rank[sel[j]] = -1;
                }
                bl.distinct.clear();
                bl.uses.clear();
                return fail(EDGEMOE_ERR_INVALID_ARG, "expert id " + std::to_string(e) + " out of range in layer " +
                            std::to_string(bl.layer));
            }
            if (bl.expert_rank[e] < 0) {
                bl.expert_rank[e] = (int32_t) bl.distinct.size();
                bl.distinct.push_back(e);
                bl.uses.push_back(0);
            }
            bl.uses[bl.expert_rank[e]]++;
        }
        if ((int64_t) bl.distinct.size() > (int64_t) p.n_slots*w.count) {
            return fail(EDGEMOE_ERR_STATE, "internal: more distinct experts than the waves can hold");
        }
        judge_predictions(w.block);
        if (w.count > 1) {
            // a split ubatch takes its resident experts first, so that one wave does not
            // evict what a later wave finds resident; the mask op reads the pairs' waves
            std::vector<int32_t> & d = bl.distinct;
            auto & order = bl.order;
            order.clear();
            for (int32_t e : d) {
                order.emplace_back(bl.slot_of[e] >= 0 ? 0 : 1, e);
            }
            std::sort(order.begin(), order.end());
            auto & uses = bl.uses_sorted;
            uses.resize(d.size());
            for (size_t i = 0; i < order.size(); ++i) {
                const int32_t e = order[i].second;
                uses[i] = bl.uses[bl.expert_rank[e]];
                d[i] = e;
            }
            for (size_t i = 0; i < d.size(); ++i) {
                bl.expert_rank[d[i]] = (int32_t) i;
            }
            bl.uses.swap(uses);
            bl.pair_wave.resize(n_pairs);
            for (int64_t i = 0; i < n_pairs; ++i) {
                bl.pair_wave[i] = bl.expert_rank[sel[i]]/p.n_slots;
            }
        }
    }

    if (opts_.hybrid && w.count == 1) {
        int32_t n_queued = remap_hybrid(bl, p, st, sel, k, n_tokens, out, now, w.block);
        n_queued += prefetch_routes(now);
        if (predictor_) {
            const auto tp = std::chrono::steady_clock::now();
            n_queued += predict_ahead(w.block, hidden, now);
            predict_ms = ms_since(tp);
        }
        if (n_queued > 0) {
            cv_jobs_.notify_all();
        }
        st.steps++;
        st.predict_ms += predict_ms;
        st.book_ms    += std::max(0.0, ms_since(t0) - predict_ms);
        return;
    }

    const int64_t first = (int64_t) w.index*p.n_slots;
    const int64_t last  = std::min<int64_t>(first + p.n_slots, (int64_t) bl.distinct.size());
    // pin what is resident, claim slots for the rest, then queue the loads
    int32_t n_queued = 0;
    for (int64_t i = first; i < last; ++i) {
        const int32_t e = bl.distinct[i];
        const int32_t s = bl.slot_of[e];
        if (s >= 0) {
            p.slots[s].pin = now;
        }
    }
    auto use_resident = [&](int32_t s, int32_t uses) {
        slot & sl = p.slots[s];
        sl.pin = now;
        if (sl.state == SLOT_LOADING) {
            st.misses += 1; // still in flight: this use waits for it
            st.hits   += uses - 1;
            // a prefetch's pieces not begun yet: demand reads now, ahead of every prefetch
            n_queued += promote_prefetch(bl.pool, s);
        } else {
            st.hits += uses;
        }
        if (sl.prefetched) {
            st.prefetch_hits++;
            sl.prefetched = false;
            sl.predicted = false;
        }
        p.pol->on_use(s, sl.key, now, (uint32_t) uses);
    };
    for (int64_t i = first; i < last; ++i) {
        const int32_t e = bl.distinct[i];
        const int32_t uses = bl.uses[i];
        int32_t s = bl.slot_of[e];
        if (s >= 0 && p.slots[s].failed) {
            // an earlier decode's load failed here and nobody took the slot back: read again
            p.slots[s].failed = false;
            n_queued += queue_load(bl.pool, s, true);
        }
        if (s >= 0) {
            use_resident(s, uses);
            continue;
        }
        while ((s = acquire_slot(p, now, false)) < 0) {
            // every other slot is pinned or being filled by a prefetch: wait for a fill
            bool loading = false;
            bool failed = false;
            for (const auto & o : p.slots) {
                loading |= o.state == SLOT_LOADING;
                failed  |= o.failed;
            }
            if (failed) {
                return fail(EDGEMOE_ERR_IO, io_error_);
            }
            if (!loading) {
                return fail(EDGEMOE_ERR_STATE, "internal: no evictable slot in layer " + std::to_string(bl.layer));
            }
            if (n_queued > 0) {
                cv_jobs_.notify_all();
            }
            const auto tw = std::chrono::steady_clock::now();
            cv_done_.wait(lock);
            waited_ms += ms_since(tw);
        }
        if (bl.slot_of[e] >= 0) {
            // a concurrent prefetch claimed it while we waited: give the slot back
            empty_slot(p, s);
            use_resident(bl.slot_of[e], uses);
            continue;
        }
        n_queued += load_now(bl.pool, s, w.block, e, now);
        p.pol->on_use(s, p.slots[s].key, now, (uint32_t) uses);
        st.misses += 1;
        st.hits   += uses - 1;
    }

    // known routes: the next experts in order of first use load behind this step's reads
    n_queued += prefetch_routes(now);
    // while this block's loads run and its matmuls compute, later blocks' predicted experts load
    if (predictor_ && w.count == 1) {
        const auto tp = std::chrono::steady_clock::now();
        n_queued += predict_ahead(w.block, hidden, now);
        predict_ms = ms_since(tp);
    }
    if (n_queued > 0) {
        cv_jobs_.notify_all();
    }

    // wait for this wave's loads, queued here or by a prefetch
    for (int64_t i = first; i < last; ++i) {
        const int32_t s = bl.slot_of[bl.distinct[i]];
        if (p.slots[s].state != SLOT_READY && !p.slots[s].failed) {
            const auto tw = std::chrono::steady_clock::now();
            cv_done_.wait(lock, [&] { return p.slots[s].state == SLOT_READY || p.slots[s].failed; });
            waited_ms += ms_since(tw);
        }
        if (p.slots[s].failed) {
            return fail(EDGEMOE_ERR_IO, io_error_);
        }
    }

    const int32_t base = p.full ? bl.slot_base : 0; // a full pool's block sees its own view
    if (w.count == 1) {
        for (int64_t i = 0; i < n_pairs; ++i) {
            out[i] = bl.slot_of[sel[i]] - base;
        }
    } else {
        // pairs of other waves are computed over some pinned, ready slot and masked out. Each
        // token's k pairs get k distinct slots: mul_mat_id's kernels (ggml's repacked CPU ones,
        // CUDA's) size their per-expert row maps for one use of an expert per token, and pointing
        // a token's masked pairs at one slot overran them (wrong logits, NaN). The carriers are
        // this wave's slots, then other ready slots pinned now, so no load can replace them.
        const int64_t k_used = ids->ne[0];
        auto & carriers = bl.uses_sorted; // scratch: wave 0's partition is done with it
        carriers.clear();
        for (int64_t i = first; i < last; ++i) {
            carriers.push_back(bl.slot_of[bl.distinct[i]]);
        }
        while ((int64_t) carriers.size() < k_used) {
            for (int32_t s = 0; s < p.n_slots && (int64_t) carriers.size() < k_used; ++s) {
                slot & sl = p.slots[s];
                if (sl.state == SLOT_READY && std::find(carriers.begin(), carriers.end(), s) == carriers.end()) {
                    sl.pin = now;
                    carriers.push_back(s);
                }
            }
            if ((int64_t) carriers.size() < k_used) {
                // the rest are loading (prefetches of known routes): they finish soon
                bool loading = false;
                bool failed = false;
                int32_t empty = -1;
                for (int32_t s = 0; s < p.n_slots; ++s) {
                    const slot & o = p.slots[s];
                    loading |= o.state == SLOT_LOADING && !o.failed;
                    failed  |= o.failed;
                    if (empty < 0 && o.state == SLOT_EMPTY) {
                        empty = s;
                    }
                }
                if (failed) {
                    return fail(EDGEMOE_ERR_IO, io_error_);
                }
                if (!loading) {
                    // a prefetch that failed gave its slot back: fill it with some other expert
                    // of this block, so that every carrier holds real (finite) weights
                    int32_t e = 0;
                    while (e < layout_.n_expert && bl.slot_of[e] >= 0) {
                        ++e;
                    }
                    if (empty < 0 || e == layout_.n_expert) {
                        return fail(EDGEMOE_ERR_STATE, "internal: fewer than top-k ready slots for a wave in layer " +
                                    std::to_string(bl.layer));
                    }
                    load_now(bl.pool, empty, w.block, e, now);
                }
                cv_jobs_.notify_all();
                const auto tw = std::chrono::steady_clock::now();
                cv_done_.wait(lock);
                waited_ms += ms_since(tw);
            }
        }
        for (int64_t t = 0; t < n_tokens; ++t) {
            const int32_t * row = sel + t*k_used;
            int32_t * dst = out + t*k_used;
            // this token's in-wave pairs first: the slots they take are not carriers for it
            int64_t n_own = 0;
            for (int64_t j = 0; j < k_used; ++j) {
                const int32_t r = bl.expert_rank[row[j]];
                dst[j] = r >= first && r < last ? bl.slot_of[row[j]] : -1;
                n_own += dst[j] >= 0;
            }
            size_t c = 0;
            for (int64_t j = 0; j < k_used && n_own < k_used; ++j) {
                if (dst[j] >= 0) {
                    continue;
                }
                while (std::find(dst, dst + k_used, carriers[c]) != dst + k_used) {
                    ++c;
                }
                dst[j] = carriers[c++];
            }
            for (int64_t j = 0; base && j < k_used; ++j) {
                dst[j] -= base;
            }
        }
    }
    const double total_ms = ms_since(t0);
    st.steps++;
    st.stall_ms   += waited_ms;
    st.predict_ms += predict_ms;
    st.book_ms    += std::max(0.0, total_ms - waited_ms - predict_ms);
}

int32_t expert_cache::remap_hybrid(block & bl, pool & p, layer_stats & st, const int32_t * sel, int64_t k,
                                   int64_t n_tokens, int32_t * out, uint64_t now, int32_t b) {
    // a miss is computed on the CPU now and loads behind for later tokens, while the prefetch
    // queue is shallow: deeper, the storage or the upload is the bottleneck and the expert
    // stays on the CPU only. Nothing here waits for a read.
    const size_t max_behind = std::max<size_t>(2*threads_.size(), p.pieces.size());
    int32_t n_queued = 0;
    auto & in_pool = bl.uses_sorted; // scratch, per distinct expert
    in_pool.assign(bl.distinct.size(), 0);
    for (size_t i = 0; i < bl.distinct.size(); ++i) {
        const int32_t e = bl.distinct[i];
        const uint32_t uses = (uint32_t) bl.uses[i];
        int32_t s = bl.slot_of[e];
        if (s >= 0 && p.slots[s].failed) {
            evict(p, s); // an earlier load failed: load it again behind
            s = -1;
        }
        if (s >= 0 && p.slots[s].state == SLOT_READY) {
            slot & sl = p.slots[s];
            sl.pin = now;
            st.hits += uses;
            if (sl.prefetched) {
                st.prefetch_hits++;
                sl.prefetched = false;
                sl.predicted = false;
            }
            p.pol->on_use(s, sl.key, now, uses);
            in_pool[i] = 1;
            continue;
        }
        st.misses   += uses;
        st.cpu_uses += uses;
        if (s < 0 && prefetch_jobs_.size() < max_behind && (s = acquire_slot(p, now, true)) >= 0) {
            queue_prefetch(p, s, b, e, now, false);
            p.pol->on_use(s, p.slots[s].key, now, uses);
            n_queued++;
        }
    }
    // the pool's pairs read their slots; the CPU's pairs get stand-ins that are masked out: k
    // distinct slots per token (CUDA's mul_mat_id sizes its row maps for one use of an expert
    // per token), which hold finite weights whatever they hold (pools start zeroed)
    const int32_t base = p.full ? bl.slot_base : 0;
    bl.pair_wave.resize(k*n_tokens);
    for (int64_t t = 0; t < n_tokens; ++t) {
        const int32_t * row = sel + t*k;
        int32_t * dst = out + t*k;
        for (int64_t j = 0; j < k; ++j) {
            const bool pooled = in_pool[bl.expert_rank[row[j]]] != 0;
            dst[j] = pooled ? bl.slot_of[row[j]] - base : -1;
            bl.pair_wave[t*k + j] = pooled ? 0 : -1;
        }
        int32_t c = 0;
        for (int64_t j = 0; j < k; ++j) {
            if (dst[j] >= 0) {
                continue;
            }
            while (std::find(dst, dst + k, c) != dst + k) {
                ++c;
            }
            dst[j] = c++;
        }
    }
    return n_queued;
}

void expert_cache::op_cpu_ids(ggml_tensor * dst, const wave_ctx & w) {
    const int32_t * sel = (const int32_t *) dst->src[1]->data;
    int32_t * out = (int32_t *) dst->data;
    const int64_t n_pairs = ggml_nelements(dst);
    std::lock_guard<std::mutex> lock(mu_);
    const block & bl = blocks_[w.block];
    if (faulted() || (int64_t) bl.pair_wave.size() < n_pairs) {
        std::fill(out, out + n_pairs, 0); // the graph stops after the fault; any valid id will do
        return;
    }
    // the pool's pairs repeat one of the CPU's experts, which it computes anyway (the CPU's
    // mul_mat_id takes an expert many times per token); expert 0 when the CPU has none
    int32_t stand_in = 0;
    for (int64_t i = 0; i < n_pairs; ++i) {
        if (bl.pair_wave[i] < 0) {
            stand_in = sel[i];
            break;
        }
    }
    for (int64_t i = 0; i < n_pairs; ++i) {
        out[i] = bl.pair_wave[i] < 0 ? sel[i] : stand_in;
    }
}

void expert_cache::op_cpu_mask(ggml_tensor * dst, const wave_ctx & w) {
    const int64_t n_pairs = ggml_nelements(dst);
    float * out = (float *) dst->data;
    std::lock_guard<std::mutex> lock(mu_);
    const block & bl = blocks_[w.block];
    const bool known = !faulted() && (int64_t) bl.pair_wave.size() >= n_pairs;
    for (int64_t i = 0; i < n_pairs; ++i) {
        out[i] = known && bl.pair_wave[i] < 0 ? 1.0f : 0.0f;
    }
}

void expert_cache::judge_predictions(int32_t b) {
    block & bl = blocks_[b];
    layer_stats & st = stats_[bl.layer];
    if (!bl.predicted.empty()) {
        // the step's distinct experts have expert_rank >= 0 here
        uint64_t correct = 0;
        for (int32_t e : bl.predicted) {
            correct += bl.expert_rank[e] >= 0 ? 1 : 0;
        }
        st.pred_predicted += bl.predicted.size();
        st.pred_correct   += correct;
        st.pred_actual    += bl.distinct.size();
        bl.predicted.clear();
    }
    if (!predictor_) {
        return;
    }
    // predicted loads of this block that its step does not use: drop those not begun, and let
    // the rest be ordinary cached experts
    pool & p = pools_[bl.pool];
    for (int32_t s = 0; s < p.n_slots; ++s) {
        slot & sl = p.slots[s];
        if (!sl.predicted || !sl.prefetched || key_block(sl.key) != b || bl.expert_rank[key_expert(sl.key)] >= 0) {
            continue;
        }
        st.prefetch_wasted++;
        if (sl.state == SLOT_LOADING && load_untouched(p, sl) && unqueue_prefetch(bl.pool, s) > 0) {
            st.prefetch_cancelled++;
            bl.slot_of[key_expert(sl.key)] = -1;
            p.pol->on_evict(s);
            empty_slot(p, s);
        } else {
            sl.prefetched = false;
            sl.predicted = false;
        }
    }
}

int32_t expert_cache::predict_ahead(int32_t b, const ggml_tensor * hidden, uint64_t now) {
    const int64_t n_rows = hidden ? hidden->ne[1] : 0;
    if (!hidden || hidden->type != GGML_TYPE_F32 || hidden->ne[0] != predictor_->n_embd() ||
        n_rows <= 0 || n_rows > MAX_PREDICT_ROWS) {
        return 0; // a prefill's next layer needs most experts anyway: its remap loads them
    }
    const int32_t n_blocks = (int32_t) blocks_.size();
    // predict every later block of this token (up to the predictor's depth) before loading
    // anything: a resident expert predicted for block b+d is expected d steps from now, and
    // eviction takes it only when nothing else is left (acquire_slot); the next block's are
    // kept through this step outright, so that its loads cannot take them
    for (int32_t d = 1; d <= predictor_->depth() && b + d < n_blocks; ++d) {
        block & tb = blocks_[b + d];
        if (!predictor_->can_predict(b, d)) {
            continue;
        }
        tb.predicted.clear();
        predictor_->predict(b, d, (const float *) hidden->data, n_rows, hidden->nb[1], tb.predicted);
        pool & p = pools_[tb.pool];
        for (int32_t e : tb.predicted) {
            const int32_t s = tb.slot_of[e];
            if (s >= 0) {
                p.slots[s].want = std::max(p.slots[s].want, now + (uint64_t) d);
                if (d == 1) {
                    p.slots[s].pin = std::max(p.slots[s].pin, now);
                }
            }
        }
    }
    int32_t n_queued = 0;
    for (int32_t d = 1; d <= opts_.lookahead && b + d < n_blocks; ++d) {
        const int32_t t = b + d;
        block & tb = blocks_[t];
        if (!predictor_->can_predict(b, d)) {
            continue;
        }
        pool & p = pools_[tb.pool];
        // the predictions come best first for every row: load the first prefetch_top per row.
        // By default the better half: on the trained model's text the top half of the top-8 is
        // right 96 % of the time, the whole top-8 82 %, and every wrong load costs a read
        const int64_t top = opts_.prefetch_top > 0 ? std::min(opts_.prefetch_top, layout_.n_expert_used)
                                                   : (layout_.n_expert_used + 1)/2;
        const int64_t n_load = top*n_rows;
        for (int64_t i = 0; i < std::min<int64_t>(n_load, (int64_t) tb.predicted.size()); ++i) {
            const int32_t e = tb.predicted[i];
            if (tb.slot_of[e] >= 0) {
                continue;
            }
            if (prefetch_jobs_.size() >= max_predicted_queued_) {
                return n_queued; // the disk is behind: more guesses would only delay the next ones
            }
            const int32_t s = acquire_slot(p, now, true);
            if (s < 0) {
                break;
            }
            queue_prefetch(p, s, t, e, now, true);
            n_queued++;
        }
    }
    return n_queued;
}

void expert_cache::remap_wait(wave_ctx & w, int ith) {
    if (ith <= 0 || ith >= (int) (sizeof(w.calls)/sizeof(w.calls[0]))) {
        return; // thread 0 does the remap; threads past the table go on to ggml's barrier
    }
    // thread ith enters each remap once, as thread 0 does: its count says which one this is
    const uint64_t n = ++w.calls[ith];
    // a hit-only remap takes microseconds: spin that long (with the CPU's pause hint, not
    // sched_yield, which on a busy machine gives the core away for a whole time slice), then sleep
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; w.done.load(std::memory_order_acquire) < n; ++i) {
        if ((i & 63) == 63 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(REMAP_SPIN_US)) {
            std::unique_lock<std::mutex> lock(wait_mu_);
            wait_cv_.wait(lock, [&] { return w.done.load(std::memory_order_acquire) >= n; });
            return;
        }
        cpu_relax();
    }
}

void expert_cache::remap_done(wave_ctx & w) {
    {
        std::lock_guard<std::mutex> lock(wait_mu_);
        w.done.fetch_add(1, std::memory_order_release);
    }
    wait_cv_.notify_all();
}

void expert_cache::op_mask(ggml_tensor * dst, const wave_ctx & w) {
    const int64_t n_pairs = ggml_nelements(dst);
    float * out = (float *) dst->data;
    std::lock_guard<std::mutex> lock(mu_);
    const block & bl = blocks_[w.block];
    const bool known = (int64_t) bl.pair_wave.size() >= n_pairs; // else a fault stopped the remap
    for (int64_t i = 0; i < n_pairs; ++i) {
        out[i] = known && bl.pair_wave[i] == w.index ? 1.0f : 0.0f;
    }
}

void expert_cache::push_job(const io_job & j, bool urgent) {
    GGML_ASSERT(jobs_count_ < jobs_.size());
    if (urgent) {
        // compute waits for this one: ahead of queued prefetches
        jobs_head_ = (jobs_head_ + jobs_.size() - 1) % jobs_.size();
        jobs_[jobs_head_] = j;
    } else {
        jobs_[(jobs_head_ + jobs_count_) % jobs_.size()] = j;
    }
    jobs_count_++;
}

void expert_cache::io_worker(int index) {
    uploader * up = uploaders_.empty() ? nullptr : uploaders_[index].get();
    size_t bounce_size = 0;
    for (const auto & p : pools_) {
        for (int r = 0; r < ROLE_COUNT; ++r) {
            bounce_size = std::max<size_t>(bounce_size, backing_store::bounce_size_for(p.slice[r]));
        }
    }
    bool check_file_next = true;
    void * bounce = nullptr;
    if (store_.kind() == io_kind::direct && posix_memalign(&bounce, DIRECT_ALIGN, bounce_size) != 0) {
        bounce = nullptr;
    }
    for (;;) {
        io_job job;
        {
            std::unique_lock<std::mutex> lock(mu_);
            // a thread that finds no work ends its burst: its next load checks the file again
            const auto has_work = [&] { return stop_ || jobs_count_ > 0 || !prefetch_jobs_.empty(); };
            if (!has_work()) {
                check_file_next = true;
                cv_jobs_.wait(lock, has_work);
            }
            if (stop_) {
                break;
            }
            // demand loads first: compute waits for them
            if (jobs_count_ > 0) {
                job = jobs_[jobs_head_];
                jobs_head_ = (jobs_head_ + 1) % jobs_.size();
                jobs_count_--;
            } else {
                job = prefetch_jobs_.front();
                prefetch_jobs_.pop_front();
            }
            slot & sl = pools_[job.pool].slots[job.slot];
            if (sl.gen != job.gen || sl.state != SLOT_LOADING || sl.pieces_left <= 0) {
                cv_done_.notify_all(); // a queue emptied: take_fault may be waiting for that
                continue; // a cancelled load's piece
            }
            sl.reading++;
        }
        load(job, bounce, bounce ? bounce_size : 0, up, check_file_next);
        check_file_next = false;
    }
    free(bounce);
}

void expert_cache::load(const io_job & job, void * bounce, size_t bounce_size, uploader * up, bool check_file) {
    const moe_block & mb = layout_.blocks[job.block];
    pool & p = pools_[job.pool];
    const piece & pc = p.pieces[job.piece];
    const auto t0 = std::chrono::steady_clock::now();
    uint64_t bytes = 0;
    std::string err;
    if (read_delay_us_ > 0 && job.piece == 0) { // per expert: its pieces are read side by side
        std::this_thread::sleep_for(std::chrono::microseconds(read_delay_us_));
    }
    double convert_ms = 0.0;
    // the bytes must be the file llama.cpp loaded: a replaced or rewritten model is an error.
    // Checked at the start of each burst of reads (two syscalls), not before every piece
    bool ok = !check_file || store_.check_identity(&err);
    // io pinned: the file's mapping, which the GPU copies from (a pin that failed reads as mmap)
    const uint8_t * pinned = store_.kind() == io_kind::pinned ? store_.mapping() : nullptr;
    for (int32_t i = pc.first; i < pc.first + pc.count && ok; ++i) {
        const segment & sg = p.segments[i];
        const int r = sg.role;
        const role_tensor & rt = mb.roles[r];
        const bool direct = p.base[r] != nullptr; // the CPU writes this role's slots in place
        uint8_t * dst = direct ? p.base[r] + (uint64_t) job.slot*p.slice[r] + sg.offset : up->staging() + sg.staged;
        const uint64_t offset = rt.file_offset + (uint64_t) job.expert*rt.slice_bytes + sg.offset;
        const bool from_file = pinned && !direct; // the GPU reads the pinned file: nothing to read here
        std::string first_err;
        for (int attempt = 0; !from_file; ++attempt) {
            bool transient = false;
            ok = store_.read(dst, offset, sg.bytes, bounce, bounce_size, &err, &transient);
            if (ok && attempt > 0) {
                // healed: say so, once a read succeeds (a lasting fault's error says the rest)
                read_notice(first_err + "; read again after " + std::to_string(attempt) +
                            (attempt == 1 ? " retry" : " retries"));
            }
            if (ok || !transient) {
                break;
            }
            if (attempt == MAX_READ_RETRIES) {
                err += " (after " + std::to_string(MAX_READ_RETRIES) + " retries)";
                break;
            }
            if (first_err.empty()) {
                first_err = err;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(2 << (2*attempt))); // 2, 8, 32 ms
        }
        if (ok && !direct) {
            // VRAM: queued on this thread's own stream, overlapping the next segment's read and
            // the compute; a repacked role: converted here
            const auto tc = std::chrono::steady_clock::now();
            if (from_file) {
                up->upload_pinned(p.tensors[r], job.slot, sg.offset, sg.bytes, pinned + offset);
            } else {
                up->upload(p.tensors[r], job.slot, sg.offset, sg.bytes, sg.staged);
            }
            convert_ms += ms_since(tc);
        }
        bytes += sg.bytes;
    }
    if (up) {
        const auto tc = std::chrono::steady_clock::now();
        up->wait(); // the piece is done only when its bytes are on the device
        convert_ms += ms_since(tc);
    }
    const double ms = ms_since(t0);
    {
        std::lock_guard<std::mutex> lock(mu_);
        slot & sl = p.slots[job.slot];
        layer_stats & st = stats_[mb.layer];
        st.read_ms += ms;
        st.convert_ms += convert_ms;
        sl.reading--;
        sl.pieces_left--;
        if (ok) {
            st.bytes_read += bytes;
        } else {
            sl.piece_failed = true;
            io_error_ = err;
        }
        if (sl.pieces_left == 0) { // the last piece of the load: it is ready, or it failed
            if (!sl.piece_failed) {
                sl.state = SLOT_READY;
            } else if (sl.prefetched) {
                // nobody waits for a hint: give the slot back, silently; a later use reads on
                // demand and fails its decode if the fault lasts
                blocks_[job.block].slot_of[job.expert] = -1;
                p.pol->on_evict(job.slot);
                empty_slot(p, job.slot);
            } else {
                sl.failed = true;
            }
        }
    }
    cv_done_.notify_all();
}

void expert_cache::read_notice(const std::string & msg) {
    // a failing device fails every read: a few lines tell it, the decode's error says the rest
    constexpr int MAX_NOTICES = 6;
    const int n = notices_.fetch_add(1, std::memory_order_relaxed);
    if (opts_.quiet || n > MAX_NOTICES) {
        return;
    }
    if (n == MAX_NOTICES) {
        fprintf(stderr, "edgemoe: further read errors are not shown\n");
    } else {
        fprintf(stderr, "edgemoe: %s\n", msg.c_str());
    }
}

void expert_cache::set_fault(int status, const std::string & msg) {
    if (fault_status_.load(std::memory_order_relaxed) == 0) {
        fault_msg_ = msg;
        fault_status_.store(status, std::memory_order_relaxed);
    }
    drop_failed_slots();
}

void expert_cache::drop_failed_slots() {
    for (size_t pi = 0; pi < pools_.size(); ++pi) {
        pool & p = pools_[pi];
        for (int32_t s = 0; s < p.n_slots; ++s) {
            if (p.slots[s].failed) {
                blocks_[key_block(p.slots[s].key)].slot_of[key_expert(p.slots[s].key)] = -1;
                p.pol->on_evict(s);
                empty_slot(p, s);
            }
        }
    }
}

void expert_cache::safe_ids(int32_t * out, int64_t k, int64_t n_tokens) {
    // slots 0..k-1: distinct per token (kernels size row maps for one use per token) and in
    // range of every pool and view, which hold at least top-k slots
    for (int64_t t = 0; t < n_tokens; ++t) {
        for (int64_t j = 0; j < k; ++j) {
            out[t*k + j] = (int32_t) j;
        }
    }
}

int expert_cache::take_fault(std::string * msg) {
    std::unique_lock<std::mutex> lock(mu_);
    const int status = fault_status_.load(std::memory_order_relaxed);
    if (status != 0) {
        // the stopped graph's demand loads may still be queued or reading: let them end now, so
        // none fails later under the old fault and is blamed on the next decode (a remap that
        // failed may have queued loads without waking a thread)
        cv_jobs_.notify_all();
        cv_done_.wait(lock, [&] {
            if (jobs_count_ > 0) {
                return false;
            }
            for (const auto & p : pools_) {
                for (const auto & sl : p.slots) {
                    if (sl.reading > 0) {
                        return false;
                    }
                }
            }
            return true;
        });
        *msg = fault_msg_;
        fault_msg_.clear();
        fault_status_.store(0, std::memory_order_relaxed);
        drop_failed_slots(); // loads that failed while the graph was stopping
        // the failed batch took some blocks' routes and not others': queue them again
        clear_routes_locked();
    }
    return status;
}

int expert_cache::check_file(std::string * err) const {
    return store_.check_identity(err) ? EDGEMOE_OK : EDGEMOE_ERR_IO;
}

int expert_cache::prefetch(int32_t layer, const int32_t * experts, int32_t n, std::string * err) {
    const int32_t b = block_of_layer(layer);
    if (b < 0) {
        *err = "layer " + std::to_string(layer) + " has no routed experts";
        return EDGEMOE_ERR_INVALID_ARG;
    }
    std::lock_guard<std::mutex> lock(mu_);
    block & bl = blocks_[b];
    pool & p = pools_[bl.pool];
    int32_t n_queued = 0;
    for (int32_t i = 0; i < n; ++i) {
        const int32_t e = experts[i];
        if (e < 0 || e >= layout_.n_expert) {
            *err = "expert id " + std::to_string(e) + " out of range";
            return EDGEMOE_ERR_INVALID_ARG;
        }
        if (bl.slot_of[e] >= 0) {
            continue; // resident or in flight
        }
        // slots pinned by the step in progress (pin == step_) are not candidates
        const int32_t s = acquire_slot(p, step_, true);
        if (s < 0) {
            break; // everything else is pinned or waiting to be used: drop the hint
        }
        queue_prefetch(p, s, b, e, step_, false);
        n_queued++;
    }
    if (n_queued > 0) {
        cv_jobs_.notify_all();
    }
    return EDGEMOE_OK;
}

int expert_cache::check_routes(const int32_t * ids, int64_t n, int32_t k, std::string * err) const {
    if (k != layout_.n_expert_used) {
        *err = "routes give " + std::to_string(k) + " experts per token, the model uses " + std::to_string(layout_.n_expert_used);
        return EDGEMOE_ERR_INVALID_ARG;
    }
    for (int64_t i = 0; i < n; ++i) {
        if (ids[i] < 0 || ids[i] >= layout_.n_expert) {
            *err = "expert id " + std::to_string(ids[i]) + " out of range";
            return EDGEMOE_ERR_INVALID_ARG;
        }
    }
    return EDGEMOE_OK;
}

void expert_cache::queue_routes(int32_t b, const int32_t * ids, int64_t n_tokens, int64_t stride, int32_t k) {
    block & bl = blocks_[b];
    bl.routes_k = k;
    int64_t tok = bl.routes_base + (int64_t) bl.routes.size()/k;
    for (int64_t t = 0; t < n_tokens; ++t, ++tok) {
        const int32_t * row = ids + t*stride;
        bl.routes.insert(bl.routes.end(), row, row + k);
        bl.taken.push_back(0);
        for (int32_t j = 0; j < k; ++j) {
            auto & q = bl.uses_at[row[j]];
            if (q.empty() || q.back() != tok) { // an id twice in one token is one use
                q.push_back(tok);
            }
        }
    }
}

int expert_cache::set_routes(int32_t layer, const int32_t * ids, int32_t n_tokens, int32_t k, std::string * err) {
    const int32_t b = block_of_layer(layer);
    if (b < 0) {
        *err = "layer " + std::to_string(layer) + " has no routed experts";
        return EDGEMOE_ERR_INVALID_ARG;
    }
    const int st = check_routes(ids, (int64_t) n_tokens*k, k, err);
    if (st != EDGEMOE_OK) {
        return st;
    }
    std::lock_guard<std::mutex> lock(mu_);
    queue_routes(b, ids, n_tokens, k, k);
    if (prefetch_routes(step_) > 0) {
        cv_jobs_.notify_all();
    }
    return EDGEMOE_OK;
}

int expert_cache::set_routes_all(const int32_t * ids, int32_t n_tokens, int32_t n_blocks, int32_t k, std::string * err) {
    if (n_blocks != (int32_t) blocks_.size()) {
        *err = "routes cover " + std::to_string(n_blocks) + " MoE layers, the model has " + std::to_string(blocks_.size());
        return EDGEMOE_ERR_INVALID_ARG;
    }
    const int st = check_routes(ids, (int64_t) n_tokens*n_blocks*k, k, err);
    if (st != EDGEMOE_OK) {
        return st;
    }
    std::lock_guard<std::mutex> lock(mu_);
    for (int32_t b = 0; b < n_blocks; ++b) {
        queue_routes(b, ids + (int64_t) b*k, n_tokens, (int64_t) n_blocks*k, k);
    }
    if (prefetch_routes(step_) > 0) {
        cv_jobs_.notify_all();
    }
    return EDGEMOE_OK;
}

int32_t expert_cache::acquire_for_route(pool & p, uint64_t now, int64_t use_at) {
    // an empty slot, or the policy's victim among the ready, unpinned, already used slots whose
    // next use comes after use_at: a load never evicts an expert needed before its own use.
    // Belady picks the latest next use, and among slots outside the known future (a decode
    // step knows one token) its fallback's ranking, not an arbitrary one
    p.candidates.clear();
    for (int32_t s = 0; s < p.n_slots; ++s) {
        const slot & sl = p.slots[s];
        if (sl.state == SLOT_EMPTY) {
            return s;
        }
        if (sl.state == SLOT_READY && sl.pin < now && !sl.prefetched && next_use(sl.key) > use_at) {
            p.candidates.push_back(s);
        }
    }
    if (p.candidates.empty()) {
        return -1;
    }
    next_use_fn nu;
    if (opts_.policy == policy_kind::belady) {
        nu = [this](expert_key key) { return next_use(key); };
    }
    const int32_t v = p.pol->victim(p.candidates, now, nu);
    evict(p, v);
    return v;
}

int32_t expert_cache::prefetch_routes(uint64_t now) {
    if (opts_.prefetch != prefetch_kind::routes) {
        return 0;
    }
    const int32_t n_blocks = (int32_t) blocks_.size();
    int64_t max_tokens = 0;
    for (const auto & bl : blocks_) {
        if (bl.routes_k > 0) {
            max_tokens = std::max<int64_t>(max_tokens, (int64_t) bl.routes.size()/bl.routes_k);
        }
    }
    // walk the known uses by distance (token i of the queues, blocks in the order they run
    // next) until every pool is full of sooner uses; the walk is bounded by a few times the
    // slots, as a pool fills long before that on any queue worth prefetching
    // runs at every remap: the per-pool flags reuse one buffer
    std::vector<uint8_t> & full = route_pool_full_;
    full.assign(pools_.size(), 0);
    size_t n_full = 0;
    int64_t budget = 4*(int64_t) n_slots_total() + (int64_t) n_blocks*layout_.n_expert_used;
    int32_t n_queued = 0;
    for (int64_t i = 0; i < max_tokens && n_full < pools_.size() && budget > 0; ++i) {
        for (int32_t o = 1; o <= n_blocks && n_full < pools_.size(); ++o) {
            const int32_t b = (cur_block_ + o) % n_blocks;
            block & bl = blocks_[b];
            if (full[bl.pool] || bl.routes_k <= 0 || i >= (int64_t) bl.routes.size()/bl.routes_k || bl.taken[i]) {
                continue; // nothing queued there, or a split batch's ubatch already took that token
            }
            const int64_t use_at = i*n_blocks + o;
            for (int32_t j = 0; j < bl.routes_k && !full[bl.pool]; ++j, --budget) {
                const int32_t e = bl.routes[i*bl.routes_k + j];
                if (bl.slot_of[e] >= 0) {
                    continue; // resident or already loading
                }
                pool & p = pools_[bl.pool];
                const int32_t s = acquire_for_route(p, now, use_at);
                if (s < 0) {
                    full[bl.pool] = 1;
                    n_full++;
                    break;
                }
                queue_prefetch(p, s, b, e, now, false);
                n_queued++;
            }
        }
    }
    return n_queued;
}

void expert_cache::clear_routes() {
    std::lock_guard<std::mutex> lock(mu_);
    clear_routes_locked();
}

void expert_cache::clear_routes_locked() {
    for (auto & bl : blocks_) {
        bl.routes.clear();
        bl.taken.clear();
        bl.routes_k = 0;
        bl.routes_base = 0;
        bl.batch_base = 0;
        bl.batch_end = 0;
        bl.batch_routed = false;
        for (auto & q : bl.uses_at) {
            q.clear();
        }
    }
    cur_block_ = (int32_t) blocks_.size() - 1;
}

layer_stats expert_cache::stats(int32_t layer) const {
    std::lock_guard<std::mutex> lock(mu_);
    if (layer >= 0) {
        return layer < (int32_t) stats_.size() ? stats_[layer] : layer_stats();
    }
    layer_stats total;
    for (const auto & s : stats_) {
        total.add(s);
    }
    return total;
}

void expert_cache::reset_stats() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto & s : stats_) {
        s = layer_stats();
    }
}

} // namespace edgemoe
