// test_cache_api attaches caches to stand-in llama contexts: this executable defines the two
// llama.cpp functions edgemoe_cache_attach calls (llama_set_expert_provider and
// llama_set_abort_callback), and its own definitions take precedence over libllama's, so the
// test can record what the C API hands to llama.cpp and drive that provider as the graph would.
// The contexts are opaque addresses that nothing dereferences.
#pragma once

#include "llama.h"

namespace fake {

struct context_state {
    const llama_expert_provider * provider = nullptr;
    ggml_abort_callback abort_cb = nullptr;
    void * abort_data = nullptr;
    int  n_provider_calls = 0;
    int  n_abort_calls = 0;
    bool refuse = false; // llama_set_expert_provider returns false (a context that could run nodes out of order)
};

llama_context * context(int i);            // i in [0, 8)
context_state & state(llama_context * ctx);
void reset();

} // namespace fake
