// Stress: 10^5 remap steps (argv[1], or EDGEMOE_STRESS_STEPS, to change) over phases of random
// configuration: model (one pool or two, page-aligned slices or not), budget from the
// minimum to 100 %, io kind, I/O and compute thread counts, policy, prefetch mode (off,
// lookahead, routes), ubatch sizes (waves), batches split and reordered into ubatches, output
// rows, queued routes, prefetch calls on the compute thread and from a racing thread.
//
// Checked after every step against a reference model of the cache:
//   - the driver's invariant (graph_sim.h): every pair's slot holds exactly its expert's bytes,
//     each pair is computed in exactly one wave, a token's pairs use distinct slots;
//   - what must be resident: the wave's experts; never more experts than a pool has slots;
//   - the route ops return the queued routes of the right batch rows (a reference queue);
//   - with LRU and nothing prefetching, the exact reference: the slot every expert goes to,
//     which experts are resident after each step, the wave partition, hits and misses;
//   - per phase: hits + misses = pairs, steps = remaps, bytes read = misses x expert bytes
//     where nothing prefetches (at most misses + prefetches otherwise).
// Some phases inject read faults (fault_injection.h): transient ones (EIO, short reads) that
// the retries absorb, so nothing may fail; or, without queued routes, reads that fail for good,
// which must fail their ubatch with EDGEMOE_ERR_IO and leave the cache serving right bytes.
#include "cache_test_util.h"
#include "fault_injection.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <numeric>

using namespace edgemoe;

namespace {

// The cache under LRU with no prefetch of any kind, slot for slot: a miss takes the first
// empty slot, else the least recently used slot not pinned by the step (the lowest index on a
// tie); a step uses (pins) its experts; a split ubatch takes its resident experts first.
struct lru_reference {
    struct pool {
        std::vector<int64_t>  key;  // block*n_expert + expert, or -1
        std::vector<uint64_t> last, pin;
    };
    std::vector<pool> pools;
    std::vector<int32_t> block_pool;
    int32_t n_expert = 0;
    uint64_t now = 0;
    uint64_t hits = 0, misses = 0;
    // the partition of the current split ubatch, per block
    std::map<int32_t, std::vector<int32_t>> order;
    std::map<int32_t, std::map<int32_t, int32_t>> uses_of;

    lru_reference(const tiny::model & m, const std::vector<int32_t> & n_slots_per_block) {
        n_expert = m.cfg.n_expert;
        block_pool = m.block_pool;
        pools.resize(m.n_pools);
        for (int32_t b = 0; b < m.n_blocks(); ++b) {
            pool & p = pools[m.block_pool[b]];
            p.key.assign(n_slots_per_block[b], -1);
            p.last.assign(n_slots_per_block[b], 0);
            p.pin.assign(n_slots_per_block[b], 0);
        }
    }

    int32_t find(int32_t b, int32_t e) const {
        const pool & p = pools[block_pool[b]];
        for (size_t s = 0; s < p.key.size(); ++s) {
            if (p.key[s] == (int64_t) b*n_expert + e) {
                return (int32_t) s;
            }
        }
        return -1;
    }

    // one wave of block b: experts in the order the cache takes them, with their uses;
    // returns each one's slot
    std::vector<int32_t> wave(int32_t b, const std::vector<int32_t> & experts, const std::vector<int32_t> & uses) {
        pool & p = pools[block_pool[b]];
        ++now;
        for (int32_t e : experts) {
            const int32_t s = find(b, e);
            if (s >= 0) {
                p.pin[s] = now;
            }
        }
        std::vector<int32_t> slots;
        for (size_t i = 0; i < experts.size(); ++i) {
            int32_t s = find(b, experts[i]);
            if (s >= 0) {
                hits += uses[i];
            } else {
                misses++;
                hits += uses[i] - 1;
                for (size_t x = 0; x < p.key.size() && s < 0; ++x) {
                    s = p.key[x] < 0 ? (int32_t) x : -1;
                }
                if (s < 0) {
                    for (size_t x = 0; x < p.key.size(); ++x) {
                        if (p.pin[x] < now && (s < 0 || p.last[x] < p.last[s])) {
                            s = (int32_t) x;
                        }
                    }
                }
                if (s < 0) {
                    slots.push_back(-1);
                    continue;
                }
                p.key[s] = (int64_t) b*n_expert + experts[i];
            }
            p.last[s] = now;
            p.pin[s] = now;
            slots.push_back(s);
        }
        return slots;
    }

    std::vector<uint8_t> resident(int32_t n_blocks) const {
        std::vector<uint8_t> r((size_t) n_blocks*n_expert, 0);
        for (const pool & p : pools) {
            for (int64_t k : p.key) {
                if (k >= 0) {
                    r[(size_t) k] = 1;
                }
            }
        }
        return r;
    }
};

struct phase_config {
    int model = 0;
    io_kind io = io_kind::direct;
    int n_io = 1, n_compute = 1;
    policy_kind pol = policy_kind::freq_aged;
    prefetch_kind pf = prefetch_kind::off;
    uint64_t budget = 0;
    bool ext_prefetch = false, racer = false, routes = false;
    int faults = 0; // 0 none, 1 transient (retried), 2 permanent (fail the ubatch)
    bool exact() const { return pol == policy_kind::lru && pf == prefetch_kind::off && !ext_prefetch && !racer && faults == 0; }
};

const char * io_str(io_kind k) { return k == io_kind::direct ? "direct" : k == io_kind::buffered ? "buffered" : "mmap"; }
const char * pol_str(policy_kind p) {
    switch (p) {
        case policy_kind::lru: return "lru";
        case policy_kind::lfu: return "lfu";
        case policy_kind::belady: return "belady";
        default: return "default";
    }
}
const char * pf_str(prefetch_kind p) { return p == prefetch_kind::off ? "off" : p == prefetch_kind::routes ? "routes" : "lookahead"; }

struct totals {
    int64_t steps = 0, ubatches = 0, phases = 0, exact_steps = 0, waves_multi = 0, min_budget_phases = 0;
    int64_t faults = 0, fault_phases = 0;
    int64_t failures = 0;
};

// one phase; returns its remap steps. repacked: the slots' bytes where the pool repacks (else null)
int64_t run_phase(const tiny::model & m, const util::repacked_experts * repacked, const phase_config & pc, int64_t steps,
                  sim::route_gen & rng, totals & tot) {
    util::rig r;
    cache_options o = util::options(pc.budget, pc.io, pc.pol, pc.n_io);
    o.prefetch = pc.pf;
    o.lookahead = 1 + rng.uniform(2);
    o.repack = repacked != nullptr;
    if (!r.open(m, o, pc.n_compute)) {
        fprintf(stderr, "phase: create failed (%d): %s\n", r.status, r.err.c_str());
        g_failures++;
        return 0;
    }
    if (repacked) {
        r.g->set_expected([repacked](int32_t b, int32_t e, int role) { return repacked->at(b, e, role); });
        if (r.cache->n_repacked() == 0) {
            fprintf(stderr, "phase: the Q4_0 pool is not repacked\n");
            g_failures++;
        }
    }
    const int32_t nb = m.n_blocks(), k = m.cfg.n_expert_used, X = m.cfg.n_expert;
    std::vector<int32_t> n_slots(nb);
    std::map<int32_t, int32_t> pool_slots;
    for (int32_t b = 0; b < nb; ++b) {
        n_slots[b] = r.g->n_slots(b);
        pool_slots[m.block_pool[b]] = n_slots[b];
    }
    lru_reference ref(m, n_slots);
    const bool exact = pc.exact();
    const int64_t failures_before = r.g->failures();

    std::atomic<bool> stop{ false };
    std::thread racer;
    if (pc.racer) {
        const uint64_t seed = rng.next(); // drawn here: rng is the compute thread's
        racer = std::thread([&, seed] {
            sim::route_gen rr(seed);
            std::string err;
            while (!stop.load()) {
                int32_t ex[8];
                const int32_t n = 1 + rr.uniform(std::min(X, 6));
                rr.token(X, n, ex, 1.0);
                if (r.cache->prefetch(m.block_layer[rr.uniform(nb)], ex, n, &err) != EDGEMOE_OK) {
                    fprintf(stderr, "racing prefetch failed: %s\n", err.c_str());
                    g_failures++;
                }
                std::this_thread::sleep_for(std::chrono::microseconds(20 + rr.uniform(300)));
            }
        });
    }

    std::deque<std::vector<int32_t>> queue; // reference route queue: per token [nb][k]
    std::string err;
    if (pc.faults) {
        // sparse faults over the phase's reads, numbered from here. Reads are numbered across
        // the I/O threads, so while one thread sleeps before a retry (2 + 8 + 32 ms) the others
        // move the count on: transient faults lie far apart, or a retry could land in the next
        // fault's range and a fault meant to heal would outlast the retries (seen once in CI).
        // Measured: 3,000-25,000 reads a phase, at most about 15 a millisecond, so about 600
        // in a retry's sleeps; transient faults lie 1,000-2,000 reads apart
        std::string plan;
        int64_t at = 0;
        const bool transient = pc.faults == 1;
        for (int i = 0; i < 200; ++i) {
            at += transient ? 1000 + rng.uniform(1000) : 20 + rng.uniform(400);
            if (!plan.empty()) {
                plan += ",";
            }
            if (pc.faults == 1) {
                plan += (rng.unit() < 0.5 ? "eio@" : "short@") + std::to_string(at) + "+" + std::to_string(1 + rng.uniform(3));
            } else {
                plan += "eof@" + std::to_string(at);
            }
        }
        if (!faults::set_plan(plan.c_str(), &err)) {
            fprintf(stderr, "fault plan: %s\n", err.c_str());
            g_failures++;
        }
    }
    std::vector<int32_t> routed;
    int64_t done = 0;
    while (done < steps && g_failures.load() < 50) {
        // a batch of n rows
        const double u = rng.unit();
        const int32_t n = u < 0.6 ? 1 : u < 0.9 ? 2 + rng.uniform(4) : 6 + rng.uniform(7);
        if (pc.routes) {
            const size_t want = (size_t) n + (size_t) rng.uniform(6);
            if (queue.size() < want) {
                const int32_t add = (int32_t) (want - queue.size()) + rng.uniform(4);
                std::vector<int32_t> ids((size_t) add*nb*k);
                for (size_t i = 0; i < ids.size(); i += k) {
                    rng.token(X, k, ids.data() + i, 1.5);
                }
                if (r.cache->set_routes_all(ids.data(), add, nb, k, &err) != EDGEMOE_OK) {
                    fprintf(stderr, "set_routes_all: %s\n", err.c_str());
                    g_failures++;
                }
                for (int32_t t = 0; t < add; ++t) {
                    queue.emplace_back(ids.begin() + (ptrdiff_t) t*nb*k, ids.begin() + (ptrdiff_t) (t + 1)*nb*k);
                }
            }
        }
        // its ubatches: in order, or split in two and reordered (a split by sequence)
        std::vector<int32_t> rows(n);
        std::iota(rows.begin(), rows.end(), 0);
        std::vector<std::pair<int32_t, int32_t>> parts; // (first, count) over rows
        if (n >= 2 && rng.unit() < 0.25) {
            for (int32_t i = n - 1; i > 0; --i) {
                std::swap(rows[i], rows[rng.uniform(i + 1)]);
            }
            const int32_t cut = 1 + rng.uniform(n - 1);
            parts = { { 0, cut }, { cut, n - cut } };
        } else {
            parts = { { 0, n } };
        }
        for (size_t pi = 0; pi < parts.size(); ++pi) {
            const int32_t first = parts[pi].first, cnt = parts[pi].second;
            sim::ubatch ub = r.random(rng, cnt, 1.5);
            ub.first_row = first;
            if (parts.size() > 1) {
                ub.batch_idx.assign(rows.begin() + first, rows.begin() + first + cnt);
            }
            // output rows of the last layer: all, or the batch's last row when it is in here
            if (rng.unit() < 0.4) {
                for (int32_t t = 0; t < cnt; ++t) {
                    if (rows[first + t] == n - 1) {
                        ub.out_ids = { t };
                    }
                }
                if (ub.out_ids.empty()) {
                    // no output row in this ubatch: the last layer computes nothing here. With
                    // queued routes that loses the last layer's rows (a known bug, tested in
                    // test_expert_cache), so only without them
                    ub.no_outputs = !pc.routes && cnt > 0;
                    if (pc.routes) {
                        ub.out_ids = { cnt - 1 };
                    }
                }
            }
            if (pc.pf == prefetch_kind::lookahead && cnt <= 8) {
                ub.hidden.resize((size_t) nb*cnt*m.cfg.n_embd);
                for (float & x : ub.hidden) {
                    x = (float) rng.unit() - 0.5f;
                }
            }
            // the ids the route ops must return
            std::vector<int32_t> expect;
            if (pc.routes) {
                for (int32_t b = 0; b < nb; ++b) {
                    const bool last = b == nb - 1;
                    if (last && ub.no_outputs) {
                        break;
                    }
                    const int32_t nrows = last && !ub.out_ids.empty() ? (int32_t) ub.out_ids.size() : cnt;
                    for (int32_t t = 0; t < nrows; ++t) {
                        const int32_t ut = last && !ub.out_ids.empty() ? ub.out_ids[t] : t;
                        const std::vector<int32_t> & tok = queue[(size_t) rows[first + ut]];
                        expect.insert(expect.end(), tok.begin() + (ptrdiff_t) b*k, tok.begin() + (ptrdiff_t) (b + 1)*k);
                    }
                }
            }
            const auto on_wave = [&](const sim::wave_view & v) {
                const std::vector<uint8_t> res = r.resident();
                // must be resident: this wave's experts
                std::vector<int32_t> own_first, own_uses;
                std::map<int32_t, int32_t> own_index;
                for (int64_t i = 0; i < v.n_tokens*v.k; ++i) {
                    if (v.mask && v.mask[i] != 1.0f) {
                        continue;
                    }
                    const int32_t e = v.ids[i];
                    if (!res[(size_t) v.block*X + e]) {
                        fprintf(stderr, "step %lld: layer %d expert %d computed but not resident\n", (long long) (tot.steps + done),
                                m.block_layer[v.block], e);
                        g_failures++;
                    }
                    if (!own_index.count(e)) {
                        own_index[e] = (int32_t) own_first.size();
                        own_first.push_back(e);
                        own_uses.push_back(0);
                    }
                }
                if ((int32_t) own_first.size() > v.n_slots) {
                    fprintf(stderr, "a wave of %zu experts over %d slots\n", own_first.size(), v.n_slots);
                    g_failures++;
                }
                // never more resident than slots
                std::map<int32_t, int32_t> per_pool;
                for (int32_t b = 0; b < nb; ++b) {
                    for (int32_t e = 0; e < X; ++e) {
                        per_pool[m.block_pool[b]] += res[(size_t) b*X + e];
                    }
                }
                for (const auto & pp : per_pool) {
                    if (pp.second > pool_slots[pp.first]) {
                        fprintf(stderr, "pool %d: %d experts resident in %d slots\n", pp.first, pp.second, pool_slots[pp.first]);
                        g_failures++;
                    }
                }
                if (v.count > 1 && v.index == 0) {
                    tot.waves_multi++;
                }
                if (!exact) {
                    return;
                }
                // the exact reference: the cache's order of the wave's experts
                std::vector<int32_t> order;
                std::map<int32_t, int32_t> uses;
                for (int64_t i = 0; i < v.n_tokens*v.k; ++i) {
                    if (!uses.count(v.ids[i])) {
                        order.push_back(v.ids[i]);
                    }
                    uses[v.ids[i]]++;
                }
                if (v.count > 1) {
                    if (v.index == 0) {
                        std::vector<std::pair<int, int32_t>> by;
                        for (int32_t e : order) {
                            by.emplace_back(ref.find(v.block, e) >= 0 ? 0 : 1, e);
                        }
                        std::sort(by.begin(), by.end());
                        ref.order[v.block].clear();
                        for (const auto & x : by) {
                            ref.order[v.block].push_back(x.second);
                        }
                        ref.uses_of[v.block] = uses;
                    }
                    const auto & all = ref.order[v.block];
                    const size_t lo = std::min(all.size(), (size_t) v.index*v.n_slots);
                    const size_t hi = std::min(all.size(), lo + (size_t) v.n_slots);
                    order.assign(all.begin() + (ptrdiff_t) lo, all.begin() + (ptrdiff_t) hi);
                }
                std::vector<int32_t> wave_uses;
                for (int32_t e : order) {
                    wave_uses.push_back(uses[e]);
                }
                std::vector<int32_t> own_sorted = own_first, ref_sorted = order;
                std::sort(own_sorted.begin(), own_sorted.end());
                std::sort(ref_sorted.begin(), ref_sorted.end());
                if (own_sorted != ref_sorted) {
                    fprintf(stderr, "step %lld: layer %d wave %d/%d computes other experts than the reference's\n",
                            (long long) (tot.steps + done), m.block_layer[v.block], v.index, v.count);
                    g_failures++;
                }
                const std::vector<int32_t> slots = ref.wave(v.block, order, wave_uses);
                std::map<int32_t, int32_t> ref_slot;
                for (size_t i = 0; i < order.size(); ++i) {
                    ref_slot[order[i]] = slots[i];
                }
                for (int64_t i = 0; i < v.n_tokens*v.k; ++i) {
                    if ((!v.mask || v.mask[i] == 1.0f) && ref_slot.count(v.ids[i]) && ref_slot[v.ids[i]] != v.slots[i]) {
                        fprintf(stderr, "step %lld: layer %d expert %d in slot %d, the reference's %d\n", (long long) (tot.steps + done),
                                m.block_layer[v.block], v.ids[i], v.slots[i], ref_slot[v.ids[i]]);
                        g_failures++;
                        break;
                    }
                }
                if (res != ref.resident(nb)) {
                    fprintf(stderr, "step %lld: resident experts differ from the reference's\n", (long long) (tot.steps + done));
                    g_failures++;
                }
                tot.exact_steps++;
            };
            const int64_t before = r.g->remaps();
            r.g->run(ub, on_wave, &routed);
            done += r.g->remaps() - before;
            tot.ubatches++;
            if (r.g->aborted()) {
                std::string msg;
                const int st = r.cache->take_fault(&msg);
                if (pc.faults == 2 && st == EDGEMOE_ERR_IO) {
                    tot.faults++;
                    continue; // the ubatch failed; the next one must work
                }
                fprintf(stderr, "unexpected fault (%d): %s\n", st, msg.c_str());
                g_failures++;
            } else if (r.cache->faulted()) {
                fprintf(stderr, "a fault that did not stop the graph\n");
                g_failures++;
            }
            if (pc.routes && routed != expect) {
                fprintf(stderr, "step %lld: the route ops returned other ids than the queued routes\n", (long long) (tot.steps + done));
                g_failures++;
            }
        }
        if (pc.routes) {
            queue.erase(queue.begin(), queue.begin() + n);
        }
        if (pc.ext_prefetch && rng.unit() < 0.3) {
            int32_t ex[8];
            const int32_t cnt = 1 + rng.uniform(std::min(X, 6));
            rng.token(X, cnt, ex, 1.0);
            if (r.cache->prefetch(m.block_layer[rng.uniform(nb)], ex, cnt, &err) != EDGEMOE_OK) {
                fprintf(stderr, "prefetch: %s\n", err.c_str());
                g_failures++;
            }
        }
    }
    stop = true;
    if (racer.joinable()) {
        racer.join();
    }
    if (pc.faults) {
        faults::set_plan(nullptr, &err);
    }

    // the phase's stats
    const layer_stats t = r.total();
    const bool prefetching = pc.pf != prefetch_kind::off || pc.ext_prefetch || pc.racer;
    // (a failed ubatch's remaps count what they did before the fault, not what the driver checked)
    bool ok = pc.faults == 2 || (t.hits + t.misses == (uint64_t) r.g->pairs() && t.steps == (uint64_t) r.g->remaps());
    ok &= t.prefetch_hits <= t.prefetch_issued && t.prefetch_wasted <= t.prefetch_issued;
    for (int32_t b = 0; b < nb; ++b) {
        const layer_stats s = r.cache->stats(m.block_layer[b]);
        const uint64_t eb = util::expert_bytes(m, b);
        ok &= prefetching || pc.faults == 2 ? s.bytes_read <= (s.misses + s.prefetch_issued)*eb : s.bytes_read == s.misses*eb;
    }
    if (exact) {
        ok &= t.hits == ref.hits && t.misses == ref.misses;
    }
    if (!ok) {
        fprintf(stderr, "phase stats: hits %llu misses %llu (reference %llu %llu) pairs %lld steps %llu remaps %lld issued %llu\n",
                (unsigned long long) t.hits, (unsigned long long) t.misses, (unsigned long long) ref.hits,
                (unsigned long long) ref.misses, (long long) r.g->pairs(), (unsigned long long) t.steps,
                (long long) r.g->remaps(), (unsigned long long) t.prefetch_issued);
        g_failures++;
    }
    tot.failures += r.g->failures() - failures_before;
    return done;
}

} // namespace

int main(int argc, char ** argv) {
    util::quiet_ggml();
    int64_t target = argc > 1 ? atoll(argv[1]) : 100000;
    if (const char * s = getenv("EDGEMOE_STRESS_STEPS")) {
        target = atoll(s);
    }
    const auto t0 = std::chrono::steady_clock::now();
    tiny::config four = util::moe_only_config(4, 16, 4);
    four.n_embd = 16;
    four.routers = true;
    const tiny::model models[] = {
        util::write_model(util::basic_config(3, 8, 2), "stress_basic"),
        util::write_model(util::aligned_config(), "stress_aligned"),
        util::write_model(util::mixed_config(), "stress_mixed"),
        util::write_model(four, "stress_k4"),
        util::write_model(util::q4_config(), "stress_q4"), // a repacked pool, where the CPU repacks Q4_0
    };
    const util::repacked_experts repacked = util::repack_experts(models[4]);
    // without a repack buffer type the Q4_0 model is served plain, like the others
    const int n_models = (int) (sizeof(models)/sizeof(models[0]));
    sim::route_gen rng(20240601);
    totals tot;
    std::map<std::string, int64_t> by_kind;
    while (tot.steps < target && g_failures.load() < 50) {
        phase_config pc;
        pc.model = rng.uniform(n_models);
        const tiny::model & m = models[pc.model];
        pc.io = (io_kind) ((tot.phases/4 + tot.phases) % 3); // each kind a third of the phases, exact ones too
        pc.n_io = 1 + rng.uniform(4);
        pc.n_compute = 1 + rng.uniform(3);
        pc.pol = (policy_kind) rng.uniform(4);
        const double pu = rng.unit();
        pc.pf = pu < 0.5 ? prefetch_kind::off : pu < 0.75 ? prefetch_kind::routes : prefetch_kind::lookahead;
        pc.routes = pc.pf == prefetch_kind::routes || (pc.pf == prefetch_kind::off && rng.unit() < 0.3);
        pc.ext_prefetch = rng.unit() < 0.3;
        pc.racer = rng.unit() < 0.25;
        if (faults::available()) {
            const double fu = rng.unit();
            pc.faults = fu < 0.15 ? 1 : fu < 0.3 && !pc.routes ? 2 : 0;
        }
        if (tot.phases % 4 == 0) {
            // every fourth phase under the exact reference
            pc.pol = policy_kind::lru;
            pc.pf = prefetch_kind::off;
            pc.ext_prefetch = pc.racer = false;
            pc.routes = rng.unit() < 0.3;
            pc.faults = 0;
        }
        tot.fault_phases += pc.faults != 0;
        const uint64_t min = util::slots_bytes(m, m.cfg.n_expert_used);
        const uint64_t all = util::all_expert_bytes(m);
        const double bu = rng.unit();
        pc.budget = bu < 0.3 ? min : bu > 0.9 ? all : min + (uint64_t) (rng.unit()*rng.unit()*(double) (all - min));
        tot.min_budget_phases += pc.budget == min;
        // O_DIRECT reads reach the disk (about a millisecond a miss on a small VM): shorter phases
        const int64_t span = pc.io == io_kind::direct ? 1000 + rng.uniform(1200) : 1500 + rng.uniform(2500);
        const int64_t steps = std::min<int64_t>(target - tot.steps, span);
        const auto tp = std::chrono::steady_clock::now();
        const util::repacked_experts * rp = pc.model == 4 && !repacked.empty() ? &repacked : nullptr;
        const int64_t done = run_phase(m, rp, pc, steps, rng, tot);
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - tp).count();
        printf("phase %3lld: model %d io %-8s io threads %d compute threads %d policy %-7s prefetch %-9s routes %d "
               "ext %d racer %d faults %d budget %5.1f%%%s: %5lld steps, %6.0f ms\n",
               (long long) tot.phases, pc.model, io_str(pc.io), pc.n_io, pc.n_compute, pol_str(pc.pol), pf_str(pc.pf),
               pc.routes, pc.ext_prefetch, pc.racer, pc.faults, 100.0*(double) pc.budget/(double) all, pc.budget == min ? " (min)" : "",
               (long long) done, ms);
        fflush(stdout);
        by_kind[std::string(io_str(pc.io)) + "/" + pf_str(pc.pf)] += done;
        tot.steps += done;
        tot.phases++;
        if (done == 0) {
            break;
        }
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("stress: %lld remap steps in %lld ubatches over %lld phases (%lld at the minimum budget), %lld block "
           "ubatches in waves, %lld steps checked against the exact LRU reference, %lld phases with "
           "injected read faults (%lld failed ubatches), %lld slot check failures, %.1f s\n",
           (long long) tot.steps, (long long) tot.ubatches, (long long) tot.phases, (long long) tot.min_budget_phases,
           (long long) tot.waves_multi, (long long) tot.exact_steps, (long long) tot.fault_phases, (long long) tot.faults,
           (long long) tot.failures, s);
    for (const auto & kv : by_kind) {
        printf("  %-20s %lld steps\n", kv.first.c_str(), (long long) kv.second);
    }
    CHECK(tot.steps >= target);
    CHECK_EQ(tot.failures, 0);
    util::remove_models();
    return finish("test_cache_stress");
}
