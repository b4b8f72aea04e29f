// Drives an expert provider the way the patched llama.cpp graph does (native/patches/llama.cpp/
// 0001-expert-provider.patch, build_moe_ffn): per ubatch, ubatch_rows; then per MoE block in
// order the route op, and per wave the remap op, the expert matmuls over the slot pool and,
// with several waves, the mask op. Every custom op runs on all "compute threads" with a barrier
// after each node, as ggml's CPU backend runs it; the matmuls are replaced by a check, split
// over those threads, that every (token, k) pair's slot holds exactly its expert's bytes
// (the pair's own expert where the mask is 1, and some whole, ready expert of the same pool
// where it is 0), and that a token's k pairs use k distinct slots.
#pragma once

#include "expert_cache.h"
#include "llama.h"
#include "tiny_moe.h"

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace sim {

// A provider table over an expert_cache that calls it as api.cpp's glue does.
llama_expert_provider direct_provider(edgemoe::expert_cache * cache);

// n threads run each node; thread 0 is the caller. A barrier ends every node.
class compute_pool {
public:
    explicit compute_pool(int n_threads);
    ~compute_pool();
    compute_pool(const compute_pool &) = delete;
    compute_pool & operator=(const compute_pool &) = delete;
    int n_threads() const { return n_; }
    void run(const std::function<void(int ith, int nth)> & fn);

private:
    void worker(int ith);
    int n_;
    std::mutex mu_;
    std::condition_variable cv_start_, cv_done_;
    uint64_t gen_ = 0;
    int pending_ = 0;
    bool stop_ = false;
    const std::function<void(int, int)> * job_ = nullptr;
    std::vector<std::thread> threads_;
};

// one wave of one block, after its matmuls
struct wave_view {
    int32_t block = -1, index = 0, count = 1;
    int64_t k = 0, n_tokens = 0;
    const int32_t * ids = nullptr;   // the route op's output [n_tokens][k]
    const int32_t * slots = nullptr; // the remap's output [n_tokens][k]
    const float * mask = nullptr;    // [n_tokens][k]; nullptr for a single wave
    int32_t n_slots = 0;
};

struct ubatch {
    int32_t n_tokens = 1;
    // graph top-k per block: [n_blocks][n_tokens][k]
    std::vector<int32_t> ids;
    // batch rows of the ubatch's tokens (empty: first_row + t), and first_row (0 for a batch's first ubatch)
    std::vector<int32_t> batch_idx;
    int32_t first_row = 0;
    bool call_ubatch_rows = true;
    // the last block computes only these ubatch rows (llama.cpp's out_ids); empty: every row
    std::vector<int32_t> out_ids;
    // a ubatch without output rows (a batch split into ubatches, logits wanted only at its end):
    // llama.cpp's last layer gets 0 rows, and build_moe_ffn builds no provider ops for it
    bool no_outputs = false;
    // the MoE input per block [n_blocks][n_tokens][n_embd] for the lookahead predictor; empty: none
    std::vector<float> hidden;
};

class graph {
public:
    graph(const llama_expert_provider & p, const tiny::model & m, int n_threads);
    ~graph();

    // bind() every block with tensors shaped and named like the model's *_exps; false if one refuses
    bool bind_all(std::string * err);
    int32_t n_slots(int32_t block) const { return slots_[block].n_slots; }
    void * unit(int32_t block) const { return slots_[block].unit; }
    ggml_tensor * pool_tensor(int32_t block, int role) const;

    // runs one ubatch through every block; after each wave's matmul check, on_wave (thread 0).
    // routed receives the route ops' outputs [n_blocks][rows][k]. Returns the failures the
    // content checks found in this ubatch (also added to failures()); messages go to stderr.
    int64_t run(const ubatch & u, const std::function<void(const wave_view &)> & on_wave = nullptr,
                std::vector<int32_t> * routed = nullptr);

    // ggml's CPU backend asks the context's abort callback after every node and stops the graph
    // when it says so (the cache's faults do); run() then returns early and aborted() is true
    void set_abort(std::function<bool()> f) { abort_ = std::move(f); }
    bool aborted() const { return aborted_; }

    int64_t failures() const { return failures_.load(); }
    int64_t remaps() const { return remaps_; }
    int64_t pairs() const { return pairs_; }  // (token, k) pairs remapped (each counted in one wave)
    int32_t max_waves_seen() const { return max_waves_; }
    compute_pool & pool() { return pool_; }

    // what a slot of (block, expert, role) must hold; default: the file's bytes (a repacked pool
    // holds them in the CPU backend's repacked layout instead)
    void set_expected(std::function<const uint8_t *(int32_t, int32_t, int)> f) { expected_ = std::move(f); }

    // checks one slot holds (block, expert) exactly: every role's bytes
    bool slot_holds(int32_t block, int32_t slot, int32_t want_block, int32_t expert) const;
    // which (block, expert) slot `slot` of block's pool holds, if it is whole and consistent
    bool slot_identity(int32_t block, int32_t slot, int32_t * held_block, int32_t * expert) const;

private:
    void fail(const std::string & msg);
    bool node(const std::function<void(int, int)> & fn); // runs one node; false: the graph aborts

    llama_expert_provider p_;
    const tiny::model & m_;
    compute_pool pool_;
    ggml_context * meta_ = nullptr;   // the model's expert tensors (no data), for bind
    ggml_context * work_ = nullptr;   // the op tensors, reset per ubatch
    size_t work_size_ = 0;
    std::vector<llama_expert_slots> slots_;
    std::atomic<int64_t> failures_{0};
    int64_t remaps_ = 0, pairs_ = 0;
    int32_t max_waves_ = 0;
    std::function<bool()> abort_;
    std::function<const uint8_t *(int32_t, int32_t, int)> expected_;
    bool aborted_ = false;
    std::mutex msg_mu_;
    int n_msgs_ = 0;
};

// k distinct experts per token, drawn from a skewed distribution over n_expert (a working set
// that a cache can partly hold), with a generator of its own
struct route_gen {
    explicit route_gen(uint64_t seed) : s(seed ? seed : 1) {}
    uint64_t s;
    uint64_t next() { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return s; }
    int32_t uniform(int32_t n) { return (int32_t) (next() % (uint64_t) n); }
    double unit() { return (double) (next() >> 11)/9007199254740992.0; }
    void token(int32_t n_expert, int32_t k, int32_t * out, double skew);
};

} // namespace sim
