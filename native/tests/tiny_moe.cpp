#include "tiny_moe.h"

#include "gguf.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <unistd.h>

namespace tiny {

namespace {

constexpr uint32_t MAGIC = 0x454d4f45u; // "EOME"
constexpr size_t HEADER = 16;

uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

const char * role_tensor(int role) {
    static const char * names[N_ROLES] = { "ffn_up_exps", "ffn_gate_exps", "ffn_down_exps", "ffn_gate_up_exps" };
    return names[role];
}

} // namespace

uint8_t pattern_byte(int32_t layer, int32_t expert, int32_t role, uint64_t i) {
    const uint64_t h = mix(((uint64_t) (uint32_t) layer << 40) ^ ((uint64_t) (uint32_t) expert << 20) ^
                           ((uint64_t) (uint32_t) role << 56) ^ (i >> 3)*0x9e3779b97f4a7c15ull);
    return (uint8_t) (h >> (8*(i & 7)));
}

bool model::has_role(int32_t block, int role) const {
    return slices[(size_t) block*N_ROLES + role] != 0;
}

int64_t model::ne0(int32_t block, int role) const {
    const layer_spec & l = cfg.layers[block_layer[block]];
    return role == ROLE_DOWN ? l.n_ff : cfg.n_embd;
}

int64_t model::ne1(int32_t block, int role) const {
    const layer_spec & l = cfg.layers[block_layer[block]];
    return role == ROLE_DOWN ? cfg.n_embd : role == ROLE_GATE_UP ? 2*l.n_ff : l.n_ff;
}

uint64_t model::slice_bytes(int32_t block, int role) const {
    return slices[(size_t) block*N_ROLES + role];
}

std::string model::tensor_name(int32_t block, int role) const {
    return "blk." + std::to_string(block_layer[block]) + "." + role_tensor(role) + ".weight";
}

const uint8_t * model::expected(int32_t block, int32_t expert, int role) const {
    const size_t i = (size_t) block*N_ROLES + role;
    return data[i].data() + (size_t) expert*slices[i];
}

bool model::identify(const uint8_t * bytes, int32_t * layer, int32_t * expert, int32_t * role) {
    uint32_t h[4];
    memcpy(h, bytes, sizeof(h));
    if (h[0] != MAGIC) {
        return false;
    }
    *layer  = (int32_t) h[1];
    *expert = (int32_t) h[2];
    *role   = (int32_t) h[3];
    return true;
}

int32_t model::block_of_layer(int32_t layer) const {
    for (int32_t b = 0; b < n_blocks(); ++b) {
        if (block_layer[b] == layer) {
            return b;
        }
    }
    return -1;
}

bool write(const std::string & path, const config & cfg, model * out, std::string * err) {
    *out = model();
    out->path = path;
    out->cfg  = cfg;
    const int32_t n_layer = (int32_t) cfg.layers.size();
    for (int32_t il = 0; il < n_layer; ++il) {
        if (cfg.layers[il].moe) {
            out->block_layer.push_back(il);
        }
    }
    const int32_t n_blocks = out->n_blocks();
    out->slices.assign((size_t) n_blocks*N_ROLES, 0);
    out->data.resize((size_t) n_blocks*N_ROLES);

    // one context holds every tensor's data until the file is written
    size_t need = 0;
    for (int32_t il = 0; il < n_layer; ++il) {
        const layer_spec & l = cfg.layers[il];
        if (l.moe) {
            need += 3*ggml_row_size(l.type, cfg.n_embd*2*l.n_ff)*cfg.n_expert + 4*ggml_tensor_overhead();
        }
        need += (size_t) (cfg.n_embd*cfg.n_expert + cfg.n_embd)*sizeof(float) + 2*ggml_tensor_overhead();
    }
    need += (size_t) cfg.n_embd*64*sizeof(float) + ggml_tensor_overhead() + 4096;
    ggml_init_params ip = { need, nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    if (!ctx) {
        *err = "ggml_init failed";
        return false;
    }
    gguf_context * g = gguf_init_empty();
    gguf_set_val_str(g, "general.architecture", cfg.arch.c_str());
    gguf_set_val_str(g, "general.name", "edgemoe tiny test model");
    const std::string a = cfg.arch;
    gguf_set_val_u32(g, (a + ".block_count").c_str(), (uint32_t) n_layer);
    gguf_set_val_u32(g, (a + ".embedding_length").c_str(), (uint32_t) cfg.n_embd);
    gguf_set_val_u32(g, (a + ".expert_count").c_str(), (uint32_t) cfg.n_expert);
    gguf_set_val_u32(g, (a + ".expert_used_count").c_str(), (uint32_t) cfg.n_expert_used);
    gguf_set_val_u32(g, (a + ".expert_feed_forward_length").c_str(), (uint32_t) cfg.layers[0].n_ff);

    // tensors in file order: a non-expert tensor first (expert data does not start the data
    // section), unless the experts must be page aligned: then they come first
    std::vector<ggml_tensor *> experts, others;
    ggml_tensor * emb = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, cfg.n_embd, 64);
    ggml_set_name(emb, "token_embd.weight");
    for (int64_t i = 0; i < ggml_nelements(emb); ++i) {
        ((float *) emb->data)[i] = (float) (i % 17) - 8.0f;
    }
    others.push_back(emb);

    std::map<std::string, int32_t> pool_of;
    uint32_t rng = 12345;
    auto frand = [&rng] {
        rng = rng*1664525u + 1013904223u;
        return (float) ((rng >> 8) & 0xffff)/65536.0f - 0.5f;
    };
    for (int32_t il = 0; il < n_layer; ++il) {
        const layer_spec & l = cfg.layers[il];
        if (cfg.routers) {
            ggml_tensor * norm = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, cfg.n_embd);
            ggml_set_name(norm, ("blk." + std::to_string(il) + ".ffn_norm.weight").c_str());
            for (int64_t i = 0; i < cfg.n_embd; ++i) {
                ((float *) norm->data)[i] = 1.0f + 0.25f*frand();
            }
            others.push_back(norm);
        }
        if (!l.moe) {
            continue;
        }
        const int32_t b = out->block_of_layer(il);
        if (cfg.routers) {
            ggml_tensor * gate = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, cfg.n_embd, cfg.n_expert);
            ggml_set_name(gate, ("blk." + std::to_string(il) + ".ffn_gate_inp.weight").c_str());
            for (int64_t i = 0; i < ggml_nelements(gate); ++i) {
                ((float *) gate->data)[i] = frand();
            }
            others.push_back(gate);
        }
        const int roles[3] = { l.gate_up ? (int) ROLE_GATE_UP : (int) ROLE_UP, l.gate_up ? -1 : (int) ROLE_GATE, ROLE_DOWN };
        std::string sig = ggml_type_name(l.type);
        for (int role : roles) {
            if (role < 0) {
                continue;
            }
            const int64_t ne0 = role == ROLE_DOWN ? l.n_ff : cfg.n_embd;
            const int64_t ne1 = role == ROLE_DOWN ? cfg.n_embd : role == ROLE_GATE_UP ? 2*l.n_ff : l.n_ff;
            ggml_tensor * t = ggml_new_tensor_3d(ctx, l.type, ne0, ne1, cfg.n_expert);
            ggml_set_name(t, ("blk." + std::to_string(il) + "." + role_tensor(role) + ".weight").c_str());
            const uint64_t slice = t->nb[2];
            if (slice < 16) {
                *err = "expert slices must hold at least 16 bytes";
                gguf_free(g);
                ggml_free(ctx);
                return false;
            }
            uint8_t * d = (uint8_t *) t->data;
            for (int32_t e = 0; e < cfg.n_expert; ++e) {
                uint8_t * s = d + (size_t) e*slice;
                const uint32_t h[4] = { MAGIC, (uint32_t) il, (uint32_t) e, (uint32_t) role };
                memcpy(s, h, sizeof(h));
                for (uint64_t i = 16; i < slice; ++i) {
                    s[i] = pattern_byte(il, e, role, i);
                }
            }
            out->slices[(size_t) b*N_ROLES + role] = slice;
            out->data[(size_t) b*N_ROLES + role].assign(d, d + (size_t) slice*cfg.n_expert);
            sig += ":" + std::to_string(role) + "x" + std::to_string(ne0) + "x" + std::to_string(ne1);
            experts.push_back(t);
        }
        const auto it = pool_of.emplace(sig, out->n_pools).first;
        if (it->second == out->n_pools) {
            out->n_pools++;
            uint64_t bytes = 0;
            for (int r = 0; r < N_ROLES; ++r) {
                bytes += out->slices[(size_t) b*N_ROLES + r];
            }
            out->pool_slot_bytes.push_back(bytes);
        }
        out->block_pool.push_back(it->second);
    }
    if (cfg.page_aligned) {
        // ggml's writer keeps its own 32-byte alignment whatever general.alignment says, so pad
        // the header instead: a string key sized to end it on a 4 KiB boundary
        for (ggml_tensor * t : experts) {
            if (t->nb[2] % 4096 != 0) {
                *err = "page_aligned needs expert slices of whole pages";
                gguf_free(g);
                ggml_free(ctx);
                return false;
            }
            gguf_add_tensor(g, t);
        }
        for (ggml_tensor * t : others) {
            gguf_add_tensor(g, t);
        }
        gguf_set_val_str(g, "edgemoe.test.pad", "");
        const size_t meta = gguf_get_meta_size(g);
        const std::string pad((4096 - meta % 4096) % 4096, 'p');
        gguf_set_val_str(g, "edgemoe.test.pad", pad.c_str());
        if (gguf_get_meta_size(g) % 4096 != 0) {
            *err = "cannot pad the header to a page";
            gguf_free(g);
            ggml_free(ctx);
            return false;
        }
    } else {
        for (ggml_tensor * t : others) {
            if (t == emb) {
                gguf_add_tensor(g, t);
            }
        }
        for (ggml_tensor * t : experts) {
            gguf_add_tensor(g, t);
        }
        for (ggml_tensor * t : others) {
            if (t != emb) {
                gguf_add_tensor(g, t);
            }
        }
    }
    const bool ok = gguf_write_to_file(g, path.c_str(), false);
    gguf_free(g);
    ggml_free(ctx);
    if (!ok) {
        *err = "cannot write " + path;
    }
    return ok;
}

std::string temp_path(const char * tag) {
    const char * dir = getenv("EDGEMOE_TEST_TMPDIR");
    if (!dir || !*dir) {
        dir = getenv("TMPDIR");
    }
    if (!dir || !*dir) {
        dir = "/tmp";
    }
    std::string path = std::string(dir) + "/edgemoe_" + tag + "_XXXXXX";
    std::vector<char> tmpl(path.begin(), path.end());
    tmpl.push_back('\0');
    const int fd = mkstemp(tmpl.data());
    if (fd < 0) {
        return "";
    }
    close(fd);
    return std::string(tmpl.data());
}

void remove_file(const std::string & path) {
    if (!path.empty()) {
        unlink(path.c_str());
    }
}

} // namespace tiny
