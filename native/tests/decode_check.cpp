// decode_check MODEL [--expect-repacked]: decodes a real GGUF with the cache off and on, the
// way edgemoe's Engine does (lazy experts, cache attached before the first decode), and requires
// bit-identical logits at 100 %, 50 % and the minimum budget, with repacking on and off.
//
// It needs no Python, so the aarch64 CI job runs it under qemu-user (native/cross/aarch64.sh),
// where ggml repacks Q8_0 and Q4_0 experts for its NEON dot-product kernels. --expect-repacked
// also requires that the cached runs hold repacked pools and, as a negative control, that stock
// with and without repacking differ (else the equalities would compare plain kernels only).
#include "edgemoe.h"
#include "llama.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

const int32_t N_PROMPT = 24;
const int32_t N_GEN    = 6;
const int32_t N_THREADS = 2;

struct run_result {
    std::vector<float> logits; // every prompt row, then one row per generated token
    int32_t n_repacked = -1;   // -1: no cache
    uint64_t misses = 0;
    std::string error;
};

bool decode(llama_context * ctx, llama_batch & b, const std::vector<llama_token> & toks, int32_t pos, bool all_logits) {
    b.n_tokens = (int32_t) toks.size();
    for (size_t i = 0; i < toks.size(); ++i) {
        b.token[i] = toks[i];
        b.pos[i] = pos + (int32_t) i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = 0;
        b.logits[i] = all_logits || i + 1 == toks.size();
    }
    return llama_decode(ctx, b) == 0;
}

void quiet_log(ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

// budget_fraction < 0: cache off; budget_bytes > 0 wins over the fraction
run_result run(const char * path, bool repack, double budget_fraction, int64_t budget_bytes) {
    run_result r;
    edgemoe_cache * cache = nullptr;
    if (budget_fraction >= 0 || budget_bytes > 0) {
        edgemoe_options o = edgemoe_default_options();
        o.quiet = true;
        o.repack = repack;
        o.budget_fraction = budget_fraction > 0 ? budget_fraction : 1.0;
        o.budget_bytes = budget_bytes;
        if (edgemoe_cache_create(path, &o, &cache) != EDGEMOE_OK) {
            r.error = std::string("cache: ") + edgemoe_last_error();
            return r;
        }
    }
    llama_model_params mp = llama_model_default_params();
    mp.use_extra_bufts = repack;
    mp.load_mode = LLAMA_LOAD_MODE_MMAP; // the cache reads the experts' offsets from the mapping
    llama_model_kv_override kv[2] = {};
    if (cache) {
        kv[0].tag = LLAMA_KV_OVERRIDE_TYPE_BOOL;
        snprintf(kv[0].key, sizeof(kv[0].key), "%s", "edgemoe.cache.lazy_experts");
        kv[0].val_bool = true;
        mp.kv_overrides = kv;
    }
    llama_model * model = llama_model_load_from_file(path, mp);
    if (!model) {
        r.error = "cannot load the model";
        edgemoe_cache_free(cache);
        return r;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 128;
    cp.n_batch = cp.n_ubatch = 64;
    cp.n_threads = cp.n_threads_batch = N_THREADS;
    cp.no_perf = true;
    cp.op_offload = false;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx || (cache && edgemoe_cache_attach(cache, ctx) != EDGEMOE_OK)) {
        r.error = ctx ? std::string("attach: ") + edgemoe_last_error() : "cannot create a context";
        edgemoe_cache_free(cache);
        llama_free(ctx);
        llama_model_free(model);
        return r;
    }
    const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_batch b = llama_batch_init(64, 0, 1);
    std::vector<llama_token> prompt;
    for (int32_t i = 0; i < N_PROMPT; ++i) {
        prompt.push_back((100 + 37*i) % n_vocab); // any ids: the check needs no tokenizer
    }
    bool ok = decode(ctx, b, prompt, 0, true);
    for (int32_t i = 0; ok && i < N_PROMPT; ++i) {
        const float * row = llama_get_logits_ith(ctx, i);
        r.logits.insert(r.logits.end(), row, row + n_vocab);
    }
    for (int32_t g = 0; ok && g < N_GEN; ++g) {
        const float * last = r.logits.data() + r.logits.size() - n_vocab;
        llama_token next = 0;
        for (int32_t v = 1; v < n_vocab; ++v) {
            next = last[v] > last[next] ? v : next;
        }
        ok = decode(ctx, b, {next}, N_PROMPT + g, false);
        if (ok) {
            const float * row = llama_get_logits_ith(ctx, -1);
            r.logits.insert(r.logits.end(), row, row + n_vocab);
        }
    }
    if (!ok) {
        r.error = cache ? std::string("decode failed: ") + edgemoe_last_error() : "decode failed";
    }
    if (cache) {
        edgemoe_cache_info info;
        edgemoe_stats st;
        if (edgemoe_cache_info_get(cache, &info) == EDGEMOE_OK) {
            r.n_repacked = info.n_repacked;
        }
        if (edgemoe_cache_stats(cache, -1, &st) == EDGEMOE_OK) {
            r.misses = st.misses;
        }
    }
    llama_batch_free(b);
    edgemoe_cache_free(cache); // before its context (it detaches)
    llama_free(ctx);
    llama_model_free(model);
    return r;
}

float max_abs_diff(const std::vector<float> & a, const std::vector<float> & b) {
    float m = 0;
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
        m = std::fmax(m, std::fabs(a[i] - b[i]));
    }
    return m;
}

bool same(const run_result & a, const run_result & b) {
    return a.logits.size() == b.logits.size() && memcmp(a.logits.data(), b.logits.data(), a.logits.size()*sizeof(float)) == 0;
}

} // namespace

int main(int argc, char ** argv) {
    if (argc < 2 || argc > 3 || (argc == 3 && strcmp(argv[2], "--expect-repacked") != 0)) {
        fprintf(stderr, "usage: %s MODEL.gguf [--expect-repacked]\n", argv[0]);
        return 2;
    }
    const char * path = argv[1];
    const bool expect_repacked = argc == 3;
    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    edgemoe_model_info mi;
    if (edgemoe_model_inspect(path, &mi) != EDGEMOE_OK) {
        fprintf(stderr, "decode_check: %s: %s\n", path, edgemoe_last_error());
        return 1;
    }
    int failures = 0;
    for (bool repack : {true, false}) {
        const run_result ref = run(path, repack, -1, 0);
        if (!ref.error.empty()) {
            fprintf(stderr, "decode_check: cache off, repack %d: %s\n", repack, ref.error.c_str());
            return 1;
        }
        struct { const char * name; double fraction; int64_t bytes; } budgets[] = {
            {"100%", 1.0, 0}, {"50%", 0.5, 0}, {"minimum", 0, mi.min_budget_bytes},
        };
        for (const auto & bu : budgets) {
            const run_result got = run(path, repack, bu.fraction, bu.bytes);
            bool ok = got.error.empty() && same(ref, got);
            if (ok && repack && expect_repacked && got.n_repacked <= 0) {
                ok = false;
            }
            if (!repack && got.n_repacked != 0) {
                ok = false; // repack off must hold plain slots
            }
            printf("%s repack %-3s budget %-7s: %s (pool tensors repacked %d, misses %llu)%s%s\n",
                   ok ? "ok  " : "FAIL", repack ? "on" : "off", bu.name,
                   got.error.empty() ? (same(ref, got) ? "bit-identical" : "logits differ") : "error",
                   got.n_repacked, (unsigned long long) got.misses,
                   got.error.empty() ? "" : ": ", got.error.c_str());
            if (got.error.empty() && !same(ref, got)) {
                printf("     max |cache on - cache off| = %g over %zu logits\n", max_abs_diff(ref.logits, got.logits), ref.logits.size());
            }
            failures += !ok;
        }
    }
    if (expect_repacked) {
        // the negative control: repacked and plain stock are different computations here
        const bool differ = !same(run(path, true, -1, 0), run(path, false, -1, 0));
        printf("%s stock with and without repacking %s\n", differ ? "ok  " : "FAIL", differ ? "differ" : "are identical: nothing was repacked");
        failures += !differ;
    }
    llama_backend_free();
    printf("decode_check: %s\n", failures ? "FAILED" : "passed");
    return failures ? 1 : 0;
}
