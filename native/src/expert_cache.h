// The expert cache: slot pools shared by the MoE blocks of one layout, an eviction policy per
// pool, an in-flight table and I/O threads. The patched llama.cpp graph calls it through the
// llama_expert_provider callbacks (see provider.cpp).
#pragma once

#include "backing_store.h"
#include "model_layout.h"
#include "policy.h"
#include "predictor.h"
#include "slot_memory.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace edgemoe {

enum class prefetch_kind { off = 0, lookahead = 1, routes = 2 };

struct cache_options {
    uint64_t    budget_bytes    = 0;   // > 0 wins over budget_fraction
    double      budget_fraction = 1.0;
    policy_kind policy          = policy_kind::freq_aged;
    io_kind     io              = io_kind::direct;
    int         n_io_threads    = 4;
    bool        quiet           = false;
    prefetch_kind prefetch      = prefetch_kind::off;
    int         lookahead       = 1;   // blocks ahead the predictor prefetches (0: it only steers eviction)
    int         prefetch_top    = 0;   // predicted experts per token to load, best first (0: half of top-k)
    pool_kind   pool            = pool_kind::host;
    bool        repack          = true;  // host pools: repack where ggml's CPU backend would (stock's kernels)
    // a one-wave ubatch computes the experts not ready in the pool on the CPU, from the model's
    // mapped tensors, while their loads go on behind; nothing waits for a read
    bool        hybrid          = false;
};

struct layer_stats {
    uint64_t hits = 0, misses = 0, prefetch_hits = 0, prefetch_wasted = 0, prefetch_issued = 0, bytes_read = 0;
    uint64_t prefetch_cancelled = 0;   // predicted loads dropped before their read began
    uint64_t pred_predicted = 0, pred_correct = 0, pred_actual = 0; // predictor vs the actual routes
    uint64_t steps = 0;                // remap steps (one per ubatch and wave)
    double   read_ms = 0.0, stall_ms = 0.0, book_ms = 0.0, predict_ms = 0.0;
    double   convert_ms = 0.0;         // of read_ms: repacking or uploading after the reads
    uint64_t cpu_uses = 0;             // hybrid: expert uses computed on the CPU (part of misses)

    void add(const layer_stats & o);
};

class expert_cache;

// the custom ops' userdata: one wave of one block (index < count), or a block's route op
// for ubatches of `count` tokens (index == -1)
struct wave_ctx {
    expert_cache * cache;
    int32_t block;
    int32_t index;
    int32_t count;
    // the hand-off between the compute thread that runs a remap and the others, which sleep
    // meanwhile instead of spinning at ggml's barrier: done counts finished remaps, calls[i]
    // the remaps compute thread i has entered
    std::atomic<uint64_t> done{0};
    uint64_t calls[64] = {};
};

class expert_cache {
public:
    ~expert_cache();

    static std::unique_ptr<expert_cache> create(const std::string & path, const cache_options & opts, std::string * err, int * status);

    const model_layout & layout() const { return layout_; }
    uint64_t budget_bytes() const { return budget_bytes_; }
    int32_t  n_slots_total() const;
    int32_t  n_pools() const { return (int32_t) pools_.size(); }
    io_kind  io() const { return store_.kind(); }
    policy_kind policy() const { return opts_.policy; }
    pool_kind pool_in_use() const { return memory_.kind(); }
    int32_t n_repacked() const; // pool tensors in a repacked layout
    std::string pool_device() const { return memory_.device_name(); }
    int32_t  max_waves() const;

    // graph build (llama_expert_provider::bind / ::wave)
    bool   bind(int32_t il, const ggml_tensor * up, const ggml_tensor * gate, const ggml_tensor * down,
                const ggml_tensor * gate_up, ggml_tensor ** slots, int32_t * n_slots, void ** unit);
    void * wave(void * unit, int32_t i, int32_t n);
    void * route_ctx(void * unit, int32_t n_ubatch_tokens);

    // graph compute (custom ops, one thread)
    void op_route(ggml_tensor * dst, const wave_ctx & r);
    void op_remap(ggml_tensor * dst, const wave_ctx & w);
    void op_mask(ggml_tensor * dst, const wave_ctx & w);
    // hybrid blocks: the expert ids the CPU computes (stand-ins for the pool's pairs), and the
    // mask of the CPU's pairs
    void op_cpu_ids(ggml_tensor * dst, const wave_ctx & w);
    void op_cpu_mask(ggml_tensor * dst, const wave_ctx & w);
    bool hybrid() const { return opts_.hybrid; }
    // the remap's other compute threads: sleep until thread 0 has done the remap
    void remap_wait(wave_ctx & w, int ith);
    void remap_done(wave_ctx & w);
    prefetch_kind prefetch_mode() const {
        return predictor_ ? prefetch_kind::lookahead : opts_.prefetch == prefetch_kind::routes ? prefetch_kind::routes : prefetch_kind::off;
    }

    int  prefetch(int32_t layer, const int32_t * experts, int32_t n, std::string * err);
    int  set_routes(int32_t layer, const int32_t * ids, int32_t n_tokens, int32_t k, std::string * err);
    // ids [n_tokens][n_blocks][k]: every MoE block's routes, then one prefetch pass
    int  set_routes_all(const int32_t * ids, int32_t n_tokens, int32_t n_blocks, int32_t k, std::string * err);
    void clear_routes();
    // before each ubatch (llama_expert_provider::ubatch_rows): its rows' indices in the batch
    void ubatch_rows(const int32_t * batch_idx, int32_t n_tokens, int32_t first_row);
    // ids [n_rows][n_blocks][k] each block used for the last llama_decode's rows (-1: not computed)
    int  last_routes(int32_t * out, int32_t n_rows, int32_t n_blocks, int32_t k, std::string * err) const;
    // out [n_blocks][n_expert] = 1 where the expert is resident or loading
    int  resident(uint8_t * out, int32_t n_blocks, int32_t n_expert, std::string * err) const;

    layer_stats stats(int32_t layer) const; // layer < 0: total
    void reset_stats();

    // A fault (a failed expert read, a replaced model file, a misused route queue) cannot be
    // returned from a custom op: the op records it, writes ids that are safe to compute on,
    // and llama.cpp's abort callback (faulted()) stops the graph after that node, so
    // llama_decode fails and rolls the ubatch back. take_fault hands over the status and
    // message once and clears it; the cache is usable again.
    bool faulted() const { return fault_status_.load(std::memory_order_relaxed) != 0; }
    int  take_fault(std::string * msg);
    // the model file is still the one opened (backing_store::check_identity); an error status
    int  check_file(std::string * err) const;
    // after llama.cpp mapped the model: a SIGBUS in its mapping ends the process in one line
    void guard_file_mappings() const { store_.guard_file_mappings(); }

private:
    enum slot_state : uint8_t { SLOT_EMPTY, SLOT_LOADING, SLOT_READY };

    struct slot {
        expert_key key   = 0;
        slot_state state = SLOT_EMPTY;
        uint64_t   pin   = 0;     // step that pinned it; evictable when below the current step
        bool       prefetched = false; // filled by a prefetch and not used yet
        bool       predicted  = false; // that prefetch came from the predictor: judged at its block's step
        bool       failed = false;     // its load ended and some piece of it failed
        bool       piece_failed = false; // ... some piece of the load in progress failed
        int16_t    pieces_left = 0;    // pieces of the load in progress not finished yet
        int16_t    reading = 0;        // pieces being read by an I/O thread now
        uint64_t   want = 0;      // step at which the predictor expects its use (a later layer of this token)
        uint32_t   gen = 0;       // bumped whenever the slot is emptied: queued jobs of older contents are stale
    };

    // a part of one expert's load that one I/O thread reads (and uploads): the pieces of a large
    // miss are read by several threads at once, a small expert is one piece
    struct segment {
        int32_t  role;
        uint64_t offset;  // within the role's slice
        uint64_t bytes;
        uint64_t staged;  // where it lies in the staging buffer
    };
    struct piece {
        int32_t first = 0, count = 0; // its segments in pool::segments
    };

    struct pool {
        int32_t n_slots = 0;
        std::vector<piece> pieces; // a load of this pool's slots, in parts
        std::vector<segment> segments;
        uint64_t slot_bytes = 0;
        std::array<ggml_tensor *, ROLE_COUNT> tensors {};
        std::array<uint8_t *, ROLE_COUNT> base {};
        std::array<uint64_t, ROLE_COUNT> slice {};
        std::vector<slot> slots;
        std::unique_ptr<edgemoe::policy> pol;
        std::vector<int32_t> candidates; // scratch
        // a GPU pool with a slot for every expert of its blocks: each block's experts sit at
        // slot_base + expert and its matmuls see a view exactly n_expert wide, the shape of the
        // stock expert tensor, so CUDA's kernels (MMQ's stream-k split) sum in stock's order
        bool full = false;
    };

    struct block {
        int32_t layer = -1;
        int32_t pool  = -1;
        int32_t slot_base = 0;                   // full pools: the block's first slot
        std::array<ggml_tensor *, ROLE_COUNT> views {}; // full pools: the block's n_expert slots
        std::vector<int32_t> slot_of;            // expert -> slot or -1
        bool advised = false;                    // hybrid: the model's mapping of its experts made normal-access
        std::unique_ptr<wave_ctx> unit;          // the block's handle in the graph (route op userdata)
        std::map<std::pair<int32_t, int32_t>, std::unique_ptr<wave_ctx>> waves;
        std::map<int32_t, std::unique_ptr<wave_ctx>> routes_ctx; // per ubatch size
        // the partition of the current ubatch, fixed by wave 0
        std::vector<int32_t> distinct;           // experts, wave order
        std::vector<int32_t> uses;               // per distinct expert
        std::vector<int32_t> pair_wave;          // per (token, k) pair; -1: computed on the CPU (hybrid)
        std::vector<int32_t> expert_rank;        // expert -> index in distinct or -1
        std::vector<std::pair<int, int32_t>> order; // scratch
        std::vector<int32_t> uses_sorted;        // scratch
        std::deque<int32_t> routes;              // external routes, k per token
        std::deque<uint8_t> taken;               // per queued token: a ubatch has used it
        int32_t routes_k = 0;
        int64_t routes_base = 0;                 // running index of the token at the queue's front
        int64_t batch_base = 0;                  // running index of the current batch's row 0
        int64_t batch_end = 0;                   // ... and past its last row, where it took routes
        bool    batch_routed = false;            // routes were queued when the batch began
        std::vector<int32_t> last;               // the last batch's ids, k per row (-1: not computed)
        // expert -> running indices of the queued tokens that use it, ascending: the next use
        // is the front, so Belady's lookup is O(1) instead of a scan of the queue
        std::vector<std::deque<int64_t>> uses_at;
        // what the predictor expects this block's next step to use (set by earlier blocks)
        std::vector<int32_t> predicted;          // cleared when its step has judged it
    };

    struct io_job {
        int32_t pool;
        int32_t slot;
        int32_t block;
        int32_t expert;
        uint32_t gen;
        int32_t piece;  // index in the pool's pieces
    };

    expert_cache() = default;
    static size_t staging_bytes(const pool & p); // an uploader's room for one piece of p
    void split_pieces(pool & p) const; // p.pieces from its slices and where they are written

    bool init(const std::string & path, const cache_options & opts, std::string * err, int * status);
    bool init_full_pools(std::string * err); // GPU pools that hold every expert: per-block views
    void queue_full_pools();                 // ... and their loads, once the I/O threads run
    int32_t acquire_slot(pool & p, uint64_t now, bool for_prefetch); // under mu_
    void    evict(pool & p, int32_t s);                            // under mu_
    void    empty_slot(pool & p, int32_t s);                       // under mu_: to EMPTY, a new generation
    // under mu_: slot s of p now loads expert e of block b, queued behind every demand read
    void    queue_prefetch(pool & p, int32_t s, int32_t b, int32_t e, uint64_t now, bool predicted);
    // under mu_: every piece of slot s's load queued, as a demand read (urgent) or a prefetch
    int32_t queue_load(int32_t pool, int32_t s, bool urgent);
    // under mu_: empty slot s of pool now loads expert e of block b on demand, pinned for `now`
    int32_t load_now(int32_t pool, int32_t s, int32_t b, int32_t e, uint64_t now);
    // under mu_: takes slot s's queued prefetch pieces out of their queue; how many, the last in *last
    int32_t unqueue_prefetch(int32_t pool, int32_t s, io_job * last = nullptr);
    int32_t promote_prefetch(int32_t pool, int32_t s);             // under mu_: its queued pieces made demand reads
    // under mu_: a one-wave hybrid step: ready experts from the pool, the rest on the CPU with
    // their loads queued behind (as far as the queue allows); writes the slot ids
    int32_t remap_hybrid(block & bl, pool & p, layer_stats & st, const int32_t * sel, int64_t k, int64_t n_tokens,
                         int32_t * out, uint64_t now, int32_t b);
    // under mu_: no I/O thread has taken a piece of the slot's load (it can still be cancelled)
    static bool load_untouched(const pool & p, const slot & sl) {
        return sl.reading == 0 && sl.pieces_left == (int32_t) p.pieces.size();
    }
    void    judge_predictions(int32_t b);                          // under mu_, at block b's step
    int32_t predict_ahead(int32_t b, const ggml_tensor * hidden, uint64_t now); // under mu_: loads queued
    void    io_worker(int index);
    void    load(const io_job & job, void * bounce, size_t bounce_size, uploader * up, bool check_file); // one piece
    int64_t next_use(expert_key key) const;                        // under mu_
    int     check_routes(const int32_t * ids, int64_t n, int32_t k, std::string * err) const;
    void    queue_routes(int32_t b, const int32_t * ids, int64_t n_tokens, int64_t stride, int32_t k); // under mu_
    // under mu_: with routes prefetch, start the queued experts' loads in order of first use
    int32_t prefetch_routes(uint64_t now);
    int32_t acquire_for_route(pool & p, uint64_t now, int64_t use_at);  // under mu_
    std::vector<uint8_t> route_pool_full_; // prefetch_routes' scratch: pools with no victim left
    std::vector<int32_t> ub_rows_;  // batch row of each row of the ubatch being computed
    int64_t last_rows_ = 0;         // rows of the last batch seen so far
    int32_t block_of_layer(int32_t layer) const;
    // under mu_: records the first fault of a decode and empties the slots whose loads failed
    // (their next use reads again: a transient fault heals)
    void    set_fault(int status, const std::string & msg);
    void    drop_failed_slots(); // under mu_
    void    clear_routes_locked(); // under mu_
    void    read_notice(const std::string & msg); // a read error or retry on stderr, rate-limited
    // a fault's stand-in for a remap's output: k distinct in-range slots per token
    static void safe_ids(int32_t * out, int64_t k, int64_t n_tokens);

    cache_options opts_;
    model_layout  layout_;
    backing_store store_;
    uint64_t      budget_bytes_ = 0;

    std::vector<pool>  pools_;
    std::vector<block> blocks_;
    std::vector<int32_t> layer_block_;  // layer -> block or -1

    ggml_context *         meta_ = nullptr;
    slot_memory            memory_;
    std::vector<std::unique_ptr<uploader>> uploaders_; // per I/O thread, where some role is staged (VRAM, repacked)

    mutable std::mutex      mu_;
    std::condition_variable cv_done_;   // a load finished
    std::condition_variable cv_jobs_;   // a job queued or stop
    // queued demand pieces: a ring as large as all slots' pieces (a slot has at most one load
    // queued), so queueing never allocates
    std::vector<io_job>     jobs_;
    size_t jobs_head_ = 0, jobs_count_ = 0;
    void push_job(const io_job & j, bool urgent); // under mu_
    // prefetch pieces wait here until no demand piece is queued
    std::deque<io_job>      prefetch_jobs_;
    size_t max_predicted_queued_ = 0;   // the predictor's share of that queue, in pieces (throttle)
    uint64_t piece_bytes_ = 0;          // the most one I/O thread reads of a load at once

    std::unique_ptr<lookahead_predictor> predictor_;

    std::mutex              wait_mu_;   // remap_wait's sleep
    std::condition_variable wait_cv_;
    std::vector<std::thread> threads_;
    bool stop_ = false;
    std::string io_error_;        // the last failed demand load's reason
    std::atomic<int> fault_status_{0};
    std::string      fault_msg_;  // under mu_
    std::atomic<int> notices_{0};
    int32_t order_block_ = -1; // the block whose route op ran last, and its next wave
    int32_t order_wave_  = 0;

    int64_t  read_delay_us_ = 0; // EDGEMOE_READ_DELAY_MS: added to every expert read
    uint64_t step_ = 1; // advances per remap; pins and policy clocks use it
    // block of the step in progress (Belady's distances start there); the last block between
    // ubatches, so that the next ubatch's block 0 is one step ahead
    int32_t  cur_block_ = 0;
    std::vector<layer_stats> stats_; // per layer
};

} // namespace edgemoe
