#include "model_layout.h"

#include "gguf.h"

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <vector>
#include <sys/stat.h>
#include <sys/types.h>

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

uint64_t model_layout::min_budget_bytes(bool gpu) const {
    // a GPU pool holds a whole layer's experts (no waves there), a host pool one token's top-k
    const int32_t k = gpu ? n_expert : n_expert_used;
    uint64_t n = 0;
    for (const auto & p : pools) {
        n += (uint64_t) k*p.slot_bytes;
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

// "blk.<il>." at the start of a tensor name: the layer (at most 7 decimal digits, so no
// overflow) and what follows it; nullptr for any other name
static const char * parse_layer_prefix(const char * name, int * layer) {
    if (strncmp(name, "blk.", 4) != 0) {
        return nullptr;
    }
    const char * p = name + 4;
    int il = 0, n_digits = 0;
    for (; *p >= '0' && *p <= '9'; ++p) {
        if (++n_digits > 7) {
            return nullptr;
        }
        il = il*10 + (*p - '0');
    }
    if (n_digits == 0 || *p != '.') {
        return nullptr;
    }
    *layer = il;
    return p + 1;
}

static bool parse_block_name(const char * name, int * layer, int * role) {
    // blk.<il>.ffn_{up,gate,down,gate_up}_exps.weight
    int il = -1;
    const char * rest = parse_layer_prefix(name, &il);
    if (!rest) {
        return false;
    }
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
    const char * rest = parse_layer_prefix(name, &il);
    if (!rest) {
        return false;
    }
    static const char * table[] = { "ffn_gate_inp.weight", "ffn_norm.weight", "exp_probs_b.bias" };
    for (int i = 0; i < 3; ++i) {
        if (strcmp(rest, table[i]) == 0) {
            *layer = il;
            *which = i;
            return true;
        }
    }
    return false;
}

// a string from the file, fit for a one-line message: control bytes as '?', at most 64 bytes
static std::string shown(const std::string & s) {
    std::string out = s.substr(0, 64);
    for (char & c : out) {
        if ((unsigned char) c < 0x20 || c == 0x7f) {
            c = '?';
        }
    }
    return s.size() > 64 ? out + "..." : out;
}

// Walks the GGUF header (f just past the magic) before gguf_init_from_file sees it, and refuses
// what ggml's parser must not be given (found by native/fuzz): gguf.cpp loads the type tag of
// every key and tensor straight into its enums (gguf_type, ggml_type), and a tag outside the
// enum is undefined behaviour there, before its own range checks run; and some tensor shapes
// that gguf accepts make ggml_new_tensor abort the process. Counts and lengths are checked
// against the file size on the way, so the walk ends within the file whatever they say.
namespace {
// reads the header through its own buffer: a tokenizer is 10^5 short strings, and a stdio call
// for each of them costs more than gguf_init itself
struct header_walk {
    FILE *   f;
    uint64_t pos;  // bytes consumed from the start of the file
    uint64_t size; // the file's size
    std::vector<char> buf = std::vector<char>((size_t) std::min<uint64_t>(size, 1 << 16));
    size_t   head = 0, tail = 0; // unread bytes: buf[head, tail)

    bool read(void * dst, uint64_t n) {
        if (n > size - pos) {
            return false;
        }
        char * out = (char *) dst;
        while (n > 0) {
            if (head == tail) {
                head = 0;
                tail = fread(buf.data(), 1, buf.size(), f);
                if (tail == 0) {
                    return false;
                }
            }
            const size_t k = (size_t) std::min<uint64_t>(n, tail - head);
            memcpy(out, buf.data() + head, k);
            out  += k;
            head += k;
            pos  += k;
            n    -= k;
        }
        return true;
    }
    template <typename T> bool get(T & v) { return read(&v, sizeof(v)); }
    bool skip(uint64_t n) {
        if (n > size - pos) {
            return false;
        }
        if (n <= tail - head) {
            head += n;
            pos  += n;
            return true;
        }
        // past the buffer: seek from the file position, which is at pos + (tail - head)
        const uint64_t ahead = n - (tail - head);
        if (ahead > (uint64_t) std::numeric_limits<off_t>::max() || fseeko(f, (off_t) ahead, SEEK_CUR) != 0) {
            return false;
        }
        head = tail = 0;
        pos += n;
        return true;
    }
    bool skip_string() {
        uint64_t len = 0;
        return get(len) && skip(len);
    }
};
} // namespace

static bool check_gguf_header(const std::string & path, FILE * f, uint64_t size, std::string * err) {
    // value sizes of the gguf_type tags, 0 for a string (GGUF_TYPE_COUNT tags, ARRAY at 9)
    static const uint8_t value_size[GGUF_TYPE_COUNT] = { 1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8 };
    static_assert(GGUF_TYPE_COUNT == 13 && GGUF_TYPE_ARRAY == 9 && GGUF_TYPE_STRING == 8, "gguf_type changed");

    header_walk w = { f, 4, size };
    const std::string truncated = path + ": invalid or truncated GGUF header";
    uint32_t version = 0;
    int64_t  n_tensors = 0, n_kv = 0;
    if (!w.get(version) || !w.get(n_tensors) || !w.get(n_kv)) {
        *err = truncated;
        return false;
    }
    if (version < 2 || version > GGUF_VERSION) {
        *err = path + ": GGUF version " + std::to_string(version) + " is not supported";
        return false;
    }
    if (n_tensors < 0 || n_kv < 0) {
        *err = truncated;
        return false;
    }
    for (int64_t i = 0; i < n_kv; ++i) { // each pass consumes at least 12 bytes, or fails
        uint32_t type = 0, elem = 0;
        uint64_t n = 1;
        if (!w.skip_string() || !w.get(type)) {
            *err = truncated;
            return false;
        }
        elem = type;
        if (type == GGUF_TYPE_ARRAY && (!w.get(elem) || !w.get(n))) {
            *err = truncated;
            return false;
        }
        if (elem >= GGUF_TYPE_COUNT || elem == GGUF_TYPE_ARRAY || type >= GGUF_TYPE_COUNT) {
            *err = path + ": GGUF key " + std::to_string(i) + " has an invalid value type " +
                   std::to_string(type == GGUF_TYPE_ARRAY ? elem : type);
            return false;
        }
        if (elem == GGUF_TYPE_STRING) {
            for (uint64_t j = 0; j < n; ++j) { // at least 8 bytes each
                if (!w.skip_string()) {
                    *err = truncated;
                    return false;
                }
            }
        } else if (n > (size - w.pos)/value_size[elem] || !w.skip(n*value_size[elem])) {
            *err = truncated;
            return false;
        }
    }
    for (int64_t i = 0; i < n_tensors; ++i) { // at least 24 bytes each
        uint32_t n_dims = 0;
        int32_t  type   = -1;
        if (!w.skip_string() || !w.get(n_dims)) {
            *err = truncated;
            return false;
        }
        if (n_dims > GGML_MAX_DIMS) {
            *err = path + ": GGUF tensor " + std::to_string(i) + " has " + std::to_string(n_dims) + " dimensions";
            return false;
        }
        int64_t ne[GGML_MAX_DIMS] = { 1, 1, 1, 1 };
        for (uint32_t j = 0; j < n_dims; ++j) {
            if (!w.get(ne[j])) {
                *err = truncated;
                return false;
            }
        }
        // gguf_init creates every tensor with ggml_new_tensor, which aborts unless the element
        // count passes its own int64 test: a stricter one than gguf's, as it leaves out the
        // dimensions of 0 and 1 and wants INT64_MAX/ne > count. gguf accepts {2^62, 0, 4}, say
        // (no elements at all), and ggml aborts on it: refuse such shapes here. Stricter still,
        // a leading 0 counts as 1 here, so that no product of dimensions (ggml_nrows, say, on
        // {0, 2^62, 2^62}, which ggml lets pass) can overflow int64 later either.
        int64_t count = ne[0] > 1 ? ne[0] : 1;
        bool shape_ok = ne[0] >= 0;
        for (int j = 1; j < GGML_MAX_DIMS && shape_ok; ++j) {
            if (ne[j] < 0) {
                shape_ok = false;
            } else if (ne[j] > 1) {
                shape_ok = INT64_MAX/ne[j] > count;
                count *= shape_ok ? ne[j] : 1;
            }
        }
        if (!shape_ok) {
            *err = path + ": GGUF tensor " + std::to_string(i) + " has an invalid shape";
            return false;
        }
        if (!w.get(type)) {
            *err = truncated;
            return false;
        }
        if (type < 0 || type >= GGML_TYPE_COUNT) {
            *err = path + ": GGUF tensor " + std::to_string(i) + " has an invalid type " + std::to_string(type);
            return false;
        }
        if (!w.skip(8)) {
            *err = truncated;
            return false;
        }
    }
    return true;
}

static int64_t get_u32_key(const gguf_context * g, const std::string & key) {
    const int64_t id = gguf_find_key(g, key.c_str());
    if (id < 0) {
        return -1;
    }
    // a count: -1 when of another type or beyond int32 (the fields it goes to)
    int64_t v = -1;
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_UINT32: v = gguf_get_val_u32(g, id); break;
        case GGUF_TYPE_INT32:  v = gguf_get_val_i32(g, id); break;
        case GGUF_TYPE_UINT64: v = (int64_t) std::min<uint64_t>(gguf_get_val_u64(g, id), INT32_MAX + 1ull); break;
        default:               break;
    }
    return v >= 0 && v <= INT32_MAX ? v : -1;
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

    // check the magic and walk the header ourselves: gguf_init would log its own multi-line
    // complaint, and is not safe with every header (see check_gguf_header)
    {
        FILE * f = fopen(path.c_str(), "rb");
        if (!f) {
            *err = "cannot open " + path + ": " + strerror(errno);
            return false;
        }
        char magic[4] = { 0 };
        const size_t n = fread(magic, 1, 4, f);
        if (n != 4 || memcmp(magic, "GGUF", 4) != 0) {
            fclose(f);
            *err = path + " is not a GGUF file";
            return false;
        }
        const bool header_ok = check_gguf_header(path, f, out.file_size, err);
        fclose(f);
        if (!header_ok) {
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
        const uint64_t nbytes = gguf_get_tensor_size(g, i);
        uint64_t offs = 0, end = 0;
        if (__builtin_add_overflow(out.data_offset, (uint64_t) gguf_get_tensor_offset(g, i), &offs) ||
            __builtin_add_overflow(offs, nbytes, &end)) {
            // the end wraps around 2^64, and would pass the truncation check below
            *err = path + ": tensor " + shown(name) + " ends beyond 2^64 bytes";
            ok = false;
            break;
        }
        data_end = std::max<uint64_t>(data_end, end);

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
            *err = path + ": tensor " + shown(name) + " names a layer outside the model";
            ok = false;
            break;
        }
        // n_dims 3 means ne[2] >= 2 and ne[3] == 1; an empty row or matrix is no expert
        if (t->ne[0] <= 0 || t->ne[1] <= 0 || t->ne[2] > INT32_MAX) {
            *err = path + ": tensor " + shown(name) + " has an invalid shape";
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
            *err = path + ": tensor " + shown(name) + " has a different expert count";
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
        *err = path + ": " + shown(out.arch) + ".expert_count disagrees with the expert tensors";
        ok = false;
    }
    out.n_expert_used = (int32_t) (n_expert_used > 0 ? n_expert_used : 0);
    if (ok && !out.blocks.empty() && (out.n_expert_used <= 0 || out.n_expert_used > out.n_expert)) {
        *err = path + ": missing or invalid " + shown(out.arch) + ".expert_used_count";
        ok = false;
    }

    gguf_free(g);
    ggml_free(meta);
    return ok;
}

} // namespace edgemoe
