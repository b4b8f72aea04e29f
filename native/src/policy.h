// Eviction policies over the slots of one pool. The cache tells a policy which key a slot
// holds and when it is used; the policy picks a victim among the slots the cache allows.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace edgemoe {

// (block index, expert) packed; a slot pool serves several blocks
using expert_key = uint64_t;

inline expert_key make_key(int32_t block, int32_t expert) {
    return ((uint64_t) (uint32_t) block << 32) | (uint32_t) expert;
}
inline int32_t key_block(expert_key k)  { return (int32_t) (k >> 32); }
inline int32_t key_expert(expert_key k) { return (int32_t) (k & 0xffffffffu); }

// Distance to the next use of a key in the known future; INT64_MAX when never used again.
using next_use_fn = std::function<int64_t(expert_key)>;

class policy {
public:
    virtual ~policy() = default;

    // uses of the key in slot by one step (hits, or the uses after a fill): one per token of
    // the ubatch that selected it; now increases per step
    virtual void on_use(int32_t slot, expert_key key, uint64_t now, uint32_t uses) = 0;
    // the slot now holds key (it may not be used yet: prefetch)
    virtual void on_fill(int32_t slot, expert_key key, uint64_t now) = 0;
    virtual void on_evict(int32_t slot) = 0;

    // the slot to evict among candidates (non-empty); next_use is set when the future is known
    virtual int32_t victim(const std::vector<int32_t> & candidates, uint64_t now, const next_use_fn & next_use) = 0;

    virtual const char * name() const = 0;
};

enum class policy_kind { freq_aged = 0, lru = 1, lfu = 2, belady = 3 };

// n_slots: slots of the pool; keys are (block < n_blocks, expert < n_expert); half_life_steps:
// aging of the frequency policies, in cache steps (one step per MoE block and ubatch)
std::unique_ptr<policy> make_policy(policy_kind kind, int32_t n_slots, int32_t n_blocks, int32_t n_expert, double half_life_steps);

} // namespace edgemoe
