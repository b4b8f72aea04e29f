#include "model_layout.h"

#include "gguf.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <sys/stat.h>

namespace edgemoe {

const char * role_name(int r) {
    static const char * names[ROLE_COUNT] = { "up", "gate", "down", "gate_up" };
    return r >= 0 && r < ROLE_COUNT ? names[r] : "?";
}

uint64_t moe_block::expert_bytes() const {
    uint64_t n = 0;
    for (const auto & r : roles) {
        n += r.present ? r.slice_bytes : 0;
    }
    return n;
}

std::string moe_block::signature() const {
    std::string s;
    for (int i = 0; i < ROLE_COUNT; ++i) {
        const auto & r = roles[i];
        char buf[96];
        snprintf(buf, sizeof(buf), "%s:%s:%lld:%lld;", role_name(i), r.present ? ggml_type_name(r.type) : "-",
                 (long long) r.ne0, (long long) r.ne1);
        s += buf;
    }
    return s;
}

uint64_t model_layout::min_budget_bytes() const {
    uint64_t n = 0;
    for (const auto & p : pools) {
        n += (uint64_t) n_expert_used*p.slot_bytes;
    }
    return n;
}

bool model_layout::slices_aligned(uint64_t align) const {
    for (const auto & b : blocks) {
        for (const auto & r : b.roles) {
            if (r.present && (r.file_offset % align != 0 || r.slice_bytes % align != 0)) {
                return false;
            }
        }
    }
    return true;
}

static bool parse_block_name(const char * name, int * layer, int * role) {
    // blk.<il>.ffn_{up,gate,down,gate_up}_exps.weight
    int il = -1;
    int n  = 0;
    if (sscanf(name, "blk.%d.%n", &il, &n) != 1 || n == 0) {
        return false;
    }
    const char * rest = name + n;
    static const struct { const char * s; int r; } table[] = {
        { "ffn_up_exps.weight",      ROLE_UP },
        { "ffn_gate_exps.weight",    ROLE_GATE },
        { "ffn_down_exps.weight",    ROLE_DOWN },
        { "ffn_gate_up_exps.weight", ROLE_GATE_UP },
    };
    for (const auto & t : table) {
        if (strcmp(rest, t.s) == 0) {
            *layer = il;
            *role  = t.r;
            return true;
        }
    }
    return false;
}

// blk.<il>.{ffn_gate_inp.weight, ffn_norm.weight, exp_probs_b.bias}: 0, 1, 2
static bool parse_aux_name(const char * name, int * layer, int * which) {
    int il = -1;
    int n  = 0;
    if (sscanf(name, "blk.%d.%n", &il, &n) != 1 || n == 0) {
        return false;
    }
    static const char * table[] = { "ffn_gate_inp.weight", "ffn_norm.weight", "exp_probs_b.bias" };
    for (int i = 0; i < 3; ++i) {
        if (strcmp(name + n, table[i]) == 0) {
            *layer = il;
            *which = i;
            return true;
        }
    }
    return false;
}

static int64_t get_u32_key(const gguf_context * g, const std::string & key) {
    const int64_t id = gguf_find_key(g, key.c_str());
    if (id < 0) {
        return -1;
    }
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_UINT32: return gguf_get_val_u32(g, id);
        case GGUF_TYPE_INT32:  return gguf_get_val_i32(g, id);
        case GGUF_TYPE_UINT64: return (int64_t) gguf_get_val_u64(g, id);
        default:               return -1;
    }
}

bool read_model_layout(const std::string & path, model_layout & out, std::string * err) {
    out = model_layout();
    out.path = path;

    struct stat st;
    if (stat(path.c_str(), &st) != 0) {
        *err = "cannot open " + path + ": " + strerror(errno);
        return false;
    }
    if (!S_ISREG(st.st_mode)) {
        *err = path + " is not a regular file";
        return false;
    }
    out.file_size = (uint64_t) st.st_size;

    // check the magic ourselves: gguf_init would log its own multi-line complaint
    {
        FILE * f = fopen(path.c_str(), "rb");
        if (!f) {
            *err = "cannot open " + path + ": " + strerror(errno);
            return false;
        }
        char magic[4] = { 0 };
        const size_t n = fread(magic, 1, 4, f);
        fclose(f);
        if (n != 4 || memcmp(magic, "GGUF", 4) != 0) {
            *err = path + " is not a GGUF file";
            return false;
        }
    }

    ggml_context * meta = nullptr;
    gguf_init_params params = { /*.no_alloc =*/ true, /*.ctx =*/ &meta };
    gguf_context * g = gguf_init_from_file(path.c_str(), params);
    if (!g) {
        *err = path + ": invalid or truncated GGUF header";
        return false;
    }

    bool ok = true;
    out.data_offset = gguf_get_data_offset(g);
    out.alignment   = gguf_get_alignment(g);

    const int64_t arch_id = gguf_find_key(g, "general.architecture");
    if (arch_id >= 0 && gguf_get_kv_type(g, arch_id) == GGUF_TYPE_STRING) {
        out.arch = gguf_get_val_str(g, arch_id);
    }
    out.n_layer       = (int32_t) get_u32_key(g, out.arch + ".block_count");
    const int64_t n_expert      = get_u32_key(g, out.arch + ".expert_count");
    const int64_t n_expert_used = get_u32_key(g, out.arch + ".expert_used_count");

    std::map<int, moe_block> blocks;
    std::map<int, std::array<aux_tensor, 3>> aux; // per layer: gate_inp, ffn_norm, probs_bias
    uint64_t data_end = out.data_offset;
    const int64_t n_tensors = gguf_get_n_tensors(g);
    for (int64_t i = 0; i < n_tensors && ok; ++i) {
        const char * name = gguf_get_tensor_name(g, i);
        const ggml_tensor * t = ggml_get_tensor(meta, name);
        const uint64_t offs   = out.data_offset + gguf_get_tensor_offset(g, i);
        const uint64_t nbytes = gguf_get_tensor_size(g, i);
        data_end = std::max<uint64_t>(data_end, offs + nbytes);

        int il = -1, role = -1;
        if (!t || !parse_block_name(name, &il, &role) || ggml_n_dims(t) != 3) {
            out.non_expert_bytes += nbytes;
            int which = -1;
            if (t && parse_aux_name(name, &il, &which) && il >= 0 && il < (1 << 20)) {
                aux_tensor & a = aux[il][which];
                a.present     = true;
                a.type        = t->type;
                a.ne0         = t->ne[0];
                a.ne1         = t->ne[1];
                a.nbytes      = nbytes;
                a.file_offset = offs;
            }
            continue;
        }
        if (il < 0 || (out.n_layer > 0 && il >= out.n_layer) || il > (1 << 20)) {
            *err = path + ": tensor " + name + " names a layer outside the model";
            ok = false;
            break;
        }
        moe_block & b = blocks[il];
        b.layer = il;
        role_tensor & r = b.roles[role];
        r.present     = true;
        r.type        = t->type;
        r.ne0         = t->ne[0];
        r.ne1         = t->ne[1];
        r.slice_bytes = t->nb[2];
        r.file_offset = offs;
        r.name        = name;
        if (out.n_expert == 0) {
            out.n_expert = (int32_t) t->ne[2];
        } else if (out.n_expert != t->ne[2]) {
            *err = path + ": tensor " + name + " has a different expert count";
            ok = false;
        }
        out.expert_bytes += nbytes;
    }

    if (ok && data_end > out.file_size) {
        *err = path + ": truncated GGUF (tensor data ends at " + std::to_string(data_end) +
               " bytes, file has " + std::to_string(out.file_size) + ")";
        ok = false;
    }

    if (ok) {
        std::map<std::string, int32_t> pool_of;
        for (auto & kv : blocks) {
            moe_block & b = kv.second;
            if (!b.roles[ROLE_DOWN].present || !(b.roles[ROLE_GATE_UP].present || b.roles[ROLE_UP].present)) {
                *err = path + ": layer " + std::to_string(b.layer) + " has incomplete expert tensors";
                ok = false;
                break;
            }
            const auto it = pool_of.emplace(b.signature(), (int32_t) out.pools.size()).first;
            if (it->second == (int32_t) out.pools.size()) {
                out.pools.push_back(pool_layout{ (int32_t) out.blocks.size(), 0, b.expert_bytes() });
            }
            b.pool = it->second;
            out.pools[b.pool].n_blocks++;
            const auto a = aux.find(b.layer);
            if (a != aux.end()) {
                b.gate_inp   = a->second[0];
                b.ffn_norm   = a->second[1];
                b.probs_bias = a->second[2];
            }
            out.blocks.push_back(b);
        }
    }
    if (ok && n_expert > 0 && !out.blocks.empty() && n_expert != out.n_expert) {
        *err = path + ": " + out.arch + ".expert_count disagrees with the expert tensors";
        ok = false;
    }
    out.n_expert_used = (int32_t) (n_expert_used > 0 ? n_expert_used : 0);
    if (ok && !out.blocks.empty() && (out.n_expert_used <= 0 || out.n_expert_used > out.n_expert)) {
        *err = path + ": missing or invalid " + out.arch + ".expert_used_count";
        ok = false;
    }

    gguf_free(g);
    ggml_free(meta);
    return ok;
}

} // namespace edgemoe
