#include "fault_injection.h"

#ifdef EDGEMOE_FAULT_INJECTION

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

namespace edgemoe::faults {

namespace {

struct rule {
    kind    k;
    int64_t arg;
    int64_t first;
    int64_t count; // INT64_MAX: for ever
};

std::mutex           g_mu;
std::vector<rule>    g_rules;
std::atomic<int64_t> g_reads{0};
std::atomic<bool>    g_any{false};

bool parse_int(const std::string & s, int64_t * out) {
    if (s.empty()) {
        return false;
    }
    char * end = nullptr;
    errno = 0;
    const long long v = strtoll(s.c_str(), &end, 10);
    if (errno != 0 || *end != '\0' || v < 0) {
        return false;
    }
    *out = v;
    return true;
}

bool parse_rule(const std::string & text, rule * r, std::string * err) {
    const size_t at = text.find('@');
    const std::string head = text.substr(0, at);
    const size_t eq = head.find('=');
    const std::string name = head.substr(0, eq);
    r->arg = 0;
    if (name == "eio") {
        r->k = kind::eio;
    } else if (name == "short") {
        r->k = kind::short_read;
    } else if (name == "eof") {
        r->k = kind::eof;
    } else if (name == "delay") {
        r->k = kind::delay;
        if (eq == std::string::npos || !parse_int(head.substr(eq + 1), &r->arg)) {
            *err = "fault rule '" + text + "': delay needs =MILLISECONDS";
            return false;
        }
    } else {
        *err = "fault rule '" + text + "': unknown kind '" + name + "' (eio, short, eof, delay=MS)";
        return false;
    }
    if (at == std::string::npos) {
        *err = "fault rule '" + text + "': missing @FIRST";
        return false;
    }
    const std::string range = text.substr(at + 1);
    const size_t plus = range.find('+');
    r->count = 1;
    if (!parse_int(range.substr(0, plus), &r->first)) {
        *err = "fault rule '" + text + "': FIRST must be a read number >= 0";
        return false;
    }
    if (plus != std::string::npos) {
        const std::string c = range.substr(plus + 1);
        if (c == "inf") {
            r->count = std::numeric_limits<int64_t>::max();
        } else if (!parse_int(c, &r->count) || r->count == 0) {
            *err = "fault rule '" + text + "': COUNT must be a number > 0 or inf";
            return false;
        }
    }
    return true;
}

} // namespace

bool available() { return true; }

bool set_plan(const char * plan, std::string * err) {
    std::vector<rule> rules;
    const std::string text = plan ? plan : "";
    size_t start = 0;
    while (start < text.size()) {
        size_t end = text.find(',', start);
        if (end == std::string::npos) {
            end = text.size();
        }
        rule r;
        if (!parse_rule(text.substr(start, end - start), &r, err)) {
            return false;
        }
        rules.push_back(r);
        start = end + 1;
    }
    std::lock_guard<std::mutex> lock(g_mu);
    g_rules = std::move(rules);
    g_reads = 0;
    g_any = !g_rules.empty();
    return true;
}

action next_read() {
    if (!g_any.load(std::memory_order_relaxed)) {
        return {};
    }
    const int64_t n = g_reads.fetch_add(1);
    std::lock_guard<std::mutex> lock(g_mu);
    for (const rule & r : g_rules) {
        if (n >= r.first && n - r.first < r.count) {
            return action{ r.k, r.arg };
        }
    }
    return {};
}

} // namespace edgemoe::faults

#else // release build: the hook is not there

namespace edgemoe::faults {

bool available() { return false; }

bool set_plan(const char * plan, std::string * err) {
    if (plan == nullptr || *plan == '\0') {
        return true;
    }
    *err = "this build of libedgemoe has no fault injection (build with EDGEMOE_FAULT_INJECTION=1)";
    return false;
}

action next_read() { return {}; }

} // namespace edgemoe::faults

#endif
