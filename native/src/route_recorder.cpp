// An eval callback that records the experts each MoE layer selected ("ffn_moe_topk-<il>"),
// independent of the cache, for traces and for checking the cache's counts.
#include "edgemoe.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <new>
#include <vector>

struct edgemoe_route_recorder {
    mutable std::mutex mu;
    int32_t k = 0;
    std::vector<int32_t> rows;             // (layer, token, k ids) flattened
    std::vector<int64_t> tokens_per_layer; // running token index per layer
    std::vector<uint8_t> scratch;
};

extern "C" {

edgemoe_route_recorder * edgemoe_route_recorder_new(void) {
    return new (std::nothrow) edgemoe_route_recorder();
}

void edgemoe_route_recorder_free(edgemoe_route_recorder * rec) {
    delete rec;
}

bool edgemoe_route_recorder_eval_cb(struct ggml_tensor * t, bool ask, void * user) {
    static const char prefix[] = "ffn_moe_topk-";
    const bool wanted = strncmp(t->name, prefix, sizeof(prefix) - 1) == 0 && t->type == GGML_TYPE_I32;
    if (ask) {
        return wanted;
    }
    if (!wanted || !user) {
        return true;
    }
    auto * rec = static_cast<edgemoe_route_recorder *>(user);
    int il = -1;
    if (sscanf(t->name + sizeof(prefix) - 1, "%d", &il) != 1 || il < 0) {
        return true;
    }
    const int64_t k = t->ne[0];
    const int64_t n_tokens = t->ne[1];
    // the top-k is often a strided view of the argsort: read the whole span, then pick rows
    const size_t span = (size_t) ((n_tokens - 1)*t->nb[1] + k*t->nb[0]);
    try {
        std::lock_guard<std::mutex> lock(rec->mu);
        const uint8_t * base;
        if (t->buffer && ggml_backend_buffer_is_host(t->buffer)) {
            base = (const uint8_t *) t->data;
        } else {
            rec->scratch.resize(span);
            ggml_backend_tensor_get(t, rec->scratch.data(), 0, span);
            base = rec->scratch.data();
        }
        if (rec->k == 0) {
            rec->k = (int32_t) k;
        }
        if (rec->k != k) {
            return true;
        }
        if ((int64_t) rec->tokens_per_layer.size() <= il) {
            rec->tokens_per_layer.resize(il + 1, 0);
        }
        for (int64_t i = 0; i < n_tokens; ++i) {
            rec->rows.push_back(il);
            rec->rows.push_back((int32_t) rec->tokens_per_layer[il]++);
            for (int64_t j = 0; j < k; ++j) {
                int32_t v;
                memcpy(&v, base + i*t->nb[1] + j*t->nb[0], sizeof(v));
                rec->rows.push_back(v);
            }
        }
    } catch (...) {
        // out of memory while recording: stop recording, never stop inference
    }
    return true;
}

void edgemoe_route_recorder_clear(edgemoe_route_recorder * rec) {
    if (!rec) {
        return;
    }
    std::lock_guard<std::mutex> lock(rec->mu);
    rec->rows.clear();
    rec->tokens_per_layer.clear();
    rec->k = 0;
}

int32_t edgemoe_route_recorder_k(const edgemoe_route_recorder * rec) {
    if (!rec) {
        return 0;
    }
    std::lock_guard<std::mutex> lock(rec->mu);
    return rec->k;
}

int64_t edgemoe_route_recorder_count(const edgemoe_route_recorder * rec) {
    if (!rec) {
        return 0;
    }
    std::lock_guard<std::mutex> lock(rec->mu);
    return rec->k == 0 ? 0 : (int64_t) rec->rows.size()/(2 + rec->k);
}

int64_t edgemoe_route_recorder_read(const edgemoe_route_recorder * rec, int32_t * out, int64_t cap_rows) {
    if (!rec || !out || cap_rows <= 0) {
        return 0;
    }
    std::lock_guard<std::mutex> lock(rec->mu);
    if (rec->k == 0) {
        return 0;
    }
    const int64_t width = 2 + rec->k;
    const int64_t n = std::min<int64_t>(cap_rows, (int64_t) rec->rows.size()/width);
    memcpy(out, rec->rows.data(), (size_t) (n*width)*sizeof(int32_t));
    return n;
}

} // extern "C"
