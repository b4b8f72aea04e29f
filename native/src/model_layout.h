// Where a GGUF keeps its routed experts: per MoE block, the file offset, type and shape of
// each role's *_exps tensor. Read from the header alone; no tensor data is touched.
#pragma once

#include "ggml.h"

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace edgemoe {

enum role : int { ROLE_UP = 0, ROLE_GATE = 1, ROLE_DOWN = 2, ROLE_GATE_UP = 3, ROLE_COUNT = 4 };

const char * role_name(int r);

struct role_tensor {
    bool      present = false;
    ggml_type type    = GGML_TYPE_F32;
    int64_t   ne0 = 0, ne1 = 0;  // one expert's matrix
    uint64_t  slice_bytes = 0;   // bytes of one expert
    uint64_t  file_offset = 0;   // absolute offset of expert 0
    std::string name;
};

// a small per-layer tensor the lookahead predictor reads (router, norm, selection bias)
struct aux_tensor {
    bool      present = false;
    ggml_type type    = GGML_TYPE_F32;
    int64_t   ne0 = 0, ne1 = 0;
    uint64_t  nbytes = 0;
    uint64_t  file_offset = 0;
};

// one build_moe_ffn call: a layer's routed experts
struct moe_block {
    int32_t layer = -1;
    int32_t pool  = -1;             // index into model_layout::pools
    std::array<role_tensor, ROLE_COUNT> roles;
    aux_tensor gate_inp;            // blk.N.ffn_gate_inp.weight: the router, [n_embd, n_expert]
    aux_tensor ffn_norm;            // blk.N.ffn_norm.weight: the norm before the MoE, [n_embd]
    aux_tensor probs_bias;          // blk.N.exp_probs_b.bias: selection bias (sigmoid routers)

    uint64_t expert_bytes() const;  // all roles of one expert
    std::string signature() const;  // equal for blocks that can share a slot pool
};

// blocks whose roles have the same types and shapes: one slot pool serves them all
struct pool_layout {
    int32_t  first_block = -1;      // a block of this layout (its roles describe the slots)
    int32_t  n_blocks    = 0;
    uint64_t slot_bytes  = 0;       // one expert, every role
};

struct model_layout {
    std::string path;
    std::string arch;
    uint64_t file_size        = 0;
    uint64_t data_offset      = 0;
    uint64_t alignment        = 0;
    int32_t  n_layer          = 0;
    int32_t  n_expert         = 0;
    int32_t  n_expert_used    = 0;
    uint64_t expert_bytes     = 0;
    uint64_t non_expert_bytes = 0;
    std::vector<moe_block> blocks; // ordered by layer
    std::vector<pool_layout> pools;

    // what one token needs resident in every pool at once
    uint64_t min_budget_bytes(bool gpu = false) const; // the smallest budget a host (GPU) pool takes
    bool slices_aligned(uint64_t align) const;
};

// Reads the layout; on failure returns false with a one-line message in *err.
bool read_model_layout(const std::string & path, model_layout & out, std::string * err);

} // namespace edgemoe
