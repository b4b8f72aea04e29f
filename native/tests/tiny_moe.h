// Tiny MoE GGUF files for the cache tests, written with ggml's gguf writer. Every expert slice's
// bytes identify (block, expert, role): a 16-byte header (magic, layer, expert, role) and then
// bytes hashed from the same four numbers and the position, so a test can tell which expert a
// slot holds and that it holds all of it.
#pragma once

#include "ggml.h"

#include <cstdint>
#include <string>
#include <vector>

namespace tiny {

enum { ROLE_UP = 0, ROLE_GATE = 1, ROLE_DOWN = 2, ROLE_GATE_UP = 3, N_ROLES = 4 }; // as model_layout.h

struct layer_spec {
    bool      moe     = true;   // false: a dense layer (no *_exps tensors)
    int64_t   n_ff    = 16;     // one expert's width
    bool      gate_up = false;  // merged blk.N.ffn_gate_up_exps instead of up and gate
    ggml_type type    = GGML_TYPE_F32;
};

struct config {
    std::string arch = "qwen2moe";
    int64_t  n_embd        = 32;
    int32_t  n_expert      = 8;
    int32_t  n_expert_used = 2;
    // every expert tensor starts on a 4 KiB boundary of the file (the data section is padded to
    // one and the expert tensors come first), so slices of 4 KiB multiples are page aligned
    bool     page_aligned  = false;
    bool     routers       = true; // blk.N.ffn_gate_inp / ffn_norm (the lookahead predictor reads them)
    std::vector<layer_spec> layers = std::vector<layer_spec>(4);
};

struct model {
    std::string path;
    config cfg;
    std::vector<int32_t> block_layer;                  // MoE block -> layer
    std::vector<int32_t> block_pool;                   // MoE block -> pool (same shapes, same pool), as model_layout
    int32_t n_pools = 0;
    std::vector<uint64_t> pool_slot_bytes;             // per pool: all roles of one expert

    int32_t n_blocks() const { return (int32_t) block_layer.size(); }
    bool     has_role(int32_t block, int role) const;
    int64_t  ne0(int32_t block, int role) const;
    int64_t  ne1(int32_t block, int role) const;
    uint64_t slice_bytes(int32_t block, int role) const;   // one expert of that role (0: absent)
    std::string tensor_name(int32_t block, int role) const;
    // the bytes the file holds for that expert slice
    const uint8_t * expected(int32_t block, int32_t expert, int role) const;
    // which (layer, expert, role) a slice of these bytes claims to be, from its header; false
    // when the header is not one of ours
    static bool identify(const uint8_t * bytes, int32_t * layer, int32_t * expert, int32_t * role);
    int32_t block_of_layer(int32_t layer) const;

    std::vector<std::vector<uint8_t>> data;            // [block*N_ROLES + role]: n_expert slices
    std::vector<uint64_t> slices;                      // [block*N_ROLES + role]
};

// Byte i of expert `expert`'s `role` slice in layer `layer` (after the header).
uint8_t pattern_byte(int32_t layer, int32_t expert, int32_t role, uint64_t i);

// Writes cfg as a GGUF at path. False with *err on failure.
bool write(const std::string & path, const config & cfg, model * out, std::string * err);

// A fresh path under $TMPDIR (or /tmp) for a test file; removed by remove_file.
std::string temp_path(const char * tag);
void remove_file(const std::string & path);

} // namespace tiny
