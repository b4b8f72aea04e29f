#include "fake_llama_context.h"

#include <cstdlib>

namespace fake {

namespace {

constexpr int N = 8;
char g_storage[N];          // the contexts' addresses
context_state g_state[N];

int index_of(const llama_context * ctx) {
    const char * p = reinterpret_cast<const char *>(ctx);
    if (p < g_storage || p >= g_storage + N) {
        abort(); // a real context reached the stand-in: the test is wrong
    }
    return (int) (p - g_storage);
}

} // namespace

llama_context * context(int i) { return reinterpret_cast<llama_context *>(g_storage + i); }
context_state & state(llama_context * ctx) { return g_state[index_of(ctx)]; }
void reset() {
    for (auto & s : g_state) {
        s = context_state();
    }
}

} // namespace fake

extern "C" {

bool llama_set_expert_provider(llama_context * ctx, const llama_expert_provider * provider) {
    fake::context_state & s = fake::state(ctx);
    s.n_provider_calls++;
    if (provider && s.refuse) {
        return false;
    }
    s.provider = provider;
    return true;
}

void llama_set_abort_callback(llama_context * ctx, ggml_abort_callback cb, void * data) {
    fake::context_state & s = fake::state(ctx);
    s.n_abort_calls++;
    s.abort_cb = cb;
    s.abort_data = data;
}

} // extern "C"
