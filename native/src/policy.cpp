#include "policy.h"

#include <cmath>
#include <limits>

namespace edgemoe {

namespace {

class lru_policy : public policy {
public:
    explicit lru_policy(int32_t n_slots) : last_(n_slots, 0) {}

    void on_use(int32_t slot, expert_key, uint64_t now, uint32_t) override { last_[slot] = now; }
    void on_fill(int32_t slot, expert_key, uint64_t now) override { last_[slot] = now; }
    void on_evict(int32_t) override {}

    int32_t victim(const std::vector<int32_t> & cand, uint64_t, const next_use_fn &) override {
        int32_t best = cand[0];
        for (int32_t s : cand) {
            if (last_[s] < last_[best]) {
                best = s;
            }
        }
        return best;
    }

    const char * name() const override { return "lru"; }

private:
    std::vector<uint64_t> last_;
};

// LFU over the whole history: a key's use count survives its eviction (an in-cache count would
// restart at 1 on every fill and degrade to LRU when the working set exceeds the pool). Ties go
// to the least recently used.
class lfu_policy : public policy {
public:
    lfu_policy(int32_t n_slots, int32_t n_blocks, int32_t n_expert) :
        key_(n_slots, 0), last_(n_slots, 0), count_((size_t) n_blocks*n_expert, 0), n_expert_(n_expert) {}

    void on_use(int32_t slot, expert_key key, uint64_t now, uint32_t uses) override {
        count_[index(key)] += uses;
        last_[slot] = now;
    }
    void on_fill(int32_t slot, expert_key key, uint64_t now) override { key_[slot] = key; last_[slot] = now; }
    void on_evict(int32_t) override {}

    int32_t victim(const std::vector<int32_t> & cand, uint64_t, const next_use_fn &) override {
        int32_t best = cand[0];
        for (int32_t s : cand) {
            const uint64_t cs = count_[index(key_[s])];
            const uint64_t cb = count_[index(key_[best])];
            if (cs < cb || (cs == cb && last_[s] < last_[best])) {
                best = s;
            }
        }
        return best;
    }

    const char * name() const override { return "lfu"; }

private:
    size_t index(expert_key k) const { return (size_t) key_block(k)*n_expert_ + key_expert(k); }

    std::vector<expert_key> key_;
    std::vector<uint64_t>   last_;
    std::vector<uint64_t>   count_;
    int32_t n_expert_;
};

// Frequency with exponential aging, remembered across evictions: a key's score halves every
// half_life steps and gains 1 per use (per token: a prompt counts each of its tokens). Frequent
// experts survive a working set larger than the pool (where LRU evicts everything before its
// reuse), and aging lets a shifted working set take over. Ties go to the least recently used.
class freq_aged_policy : public policy {
public:
    freq_aged_policy(int32_t n_slots, int32_t n_blocks, int32_t n_expert, double half_life) :
        key_(n_slots, 0), last_(n_slots, 0), hist_((size_t) n_blocks*n_expert, entry{0.0, 0}),
        n_expert_(n_expert), lambda_(std::log(2.0)/std::max(1.0, half_life)) {}

    void on_use(int32_t slot, expert_key key, uint64_t now, uint32_t uses) override {
        entry & e = hist_[index(key)];
        e.score = decayed(e, now) + (double) uses;
        e.at    = now;
        last_[slot] = now;
    }
    void on_fill(int32_t slot, expert_key key, uint64_t now) override {
        key_[slot]  = key;
        last_[slot] = now;
    }
    void on_evict(int32_t) override {}

    int32_t victim(const std::vector<int32_t> & cand, uint64_t now, const next_use_fn &) override {
        int32_t best = cand[0];
        double best_score = score_of(best, now);
        for (int32_t s : cand) {
            const double sc = score_of(s, now);
            if (sc < best_score || (sc == best_score && last_[s] < last_[best])) {
                best = s;
                best_score = sc;
            }
        }
        return best;
    }

    const char * name() const override { return "default"; }

private:
    struct entry { double score; uint64_t at; };

    double decayed(const entry & e, uint64_t now) const {
        return e.score*std::exp(-lambda_*(double) (now - e.at));
    }
    double score_of(int32_t slot, uint64_t now) const {
        return decayed(hist_[index(key_[slot])], now);
    }
    size_t index(expert_key k) const {
        return (size_t) key_block(k)*n_expert_ + key_expert(k);
    }

    std::vector<expert_key> key_;
    std::vector<uint64_t>   last_;
    std::vector<entry>      hist_; // per (block, expert), kept across evictions
    int32_t n_expert_;
    double lambda_;
};

// Belady's MIN: evict the key used farthest in the future; without a known future it falls
// back to frequency with aging.
class belady_policy : public policy {
public:
    belady_policy(int32_t n_slots, int32_t n_blocks, int32_t n_expert, double half_life) :
        key_(n_slots, 0), fallback_(n_slots, n_blocks, n_expert, half_life) {}

    void on_use(int32_t slot, expert_key key, uint64_t now, uint32_t uses) override {
        fallback_.on_use(slot, key, now, uses);
    }
    void on_fill(int32_t slot, expert_key key, uint64_t now) override { key_[slot] = key; fallback_.on_fill(slot, key, now); }
    void on_evict(int32_t slot) override { fallback_.on_evict(slot); }

    int32_t victim(const std::vector<int32_t> & cand, uint64_t now, const next_use_fn & next_use) override {
        if (!next_use) {
            return fallback_.victim(cand, now, next_use);
        }
        int32_t best = -1;
        int64_t best_d = -1;
        auto & never = never_;
        never.clear();
        for (int32_t s : cand) {
            const int64_t d = next_use(key_[s]);
            if (d == std::numeric_limits<int64_t>::max()) {
                never.push_back(s);
            } else if (d > best_d) {
                best_d = d;
                best = s;
            }
        }
        // among keys never used again within the known future, the fallback decides
        if (!never.empty()) {
            return fallback_.victim(never, now, next_use_fn());
        }
        return best;
    }

    const char * name() const override { return "belady"; }

private:
    std::vector<expert_key> key_;
    freq_aged_policy fallback_;
    std::vector<int32_t> never_; // scratch
};

} // namespace

std::unique_ptr<policy> make_policy(policy_kind kind, int32_t n_slots, int32_t n_blocks, int32_t n_expert, double half_life_steps) {
    switch (kind) {
        case policy_kind::lru:    return std::make_unique<lru_policy>(n_slots);
        case policy_kind::lfu:    return std::make_unique<lfu_policy>(n_slots, n_blocks, n_expert);
        case policy_kind::belady: return std::make_unique<belady_policy>(n_slots, n_blocks, n_expert, half_life_steps);
        case policy_kind::freq_aged:
        default:                  return std::make_unique<freq_aged_policy>(n_slots, n_blocks, n_expert, half_life_steps);
    }
}

} // namespace edgemoe
