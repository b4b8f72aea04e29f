// libFuzzer target: read_model_layout() (native/src/model_layout.cpp) over arbitrary bytes,
// through ggml's GGUF parser (gguf.cpp), both built with ASan and UBSan.
//
// read_model_layout takes a path, so each input is written to one file per process, on a RAM
// file system where there is one (/dev/shm; EDGEMOE_FUZZ_TMPDIR overrides), and read from there:
// the entry point the library uses, stat and all, is the one fuzzed.
//
// Besides memory errors, the target aborts on a broken contract of the reader:
//   - a failure comes with a one-line message that names the file;
//   - an accepted layout is consistent: every expert tensor lies inside the file, the counts
//     are in range, every block belongs to a pool, the pools cover the blocks.
#include "model_layout.h"

#include "ggml.h"

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <string>
#include <sys/stat.h>
#include <unistd.h>

namespace {

std::string g_path;
bool        g_verbose = false; // EDGEMOE_FUZZ_VERBOSE=1: one line per input, what the reader said

void remove_input_file() {
    if (!g_path.empty()) {
        unlink(g_path.c_str());
    }
}

[[noreturn]] void fail(const char * what, const std::string & detail = std::string()) {
    fprintf(stderr, "fuzz_model_layout: contract broken: %s%s%s\n", what, detail.empty() ? "" : ": ", detail.c_str());
    abort();
}

void write_input(const uint8_t * data, size_t size) {
    const int fd = open(g_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        fprintf(stderr, "fuzz_model_layout: cannot write %s: %s\n", g_path.c_str(), strerror(errno));
        exit(2);
    }
    size_t done = 0;
    while (done < size) {
        const ssize_t n = write(fd, data + done, size - done);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            fprintf(stderr, "fuzz_model_layout: cannot write %s: %s\n", g_path.c_str(), strerror(errno));
            exit(2);
        }
        done += (size_t) n;
    }
    close(fd);
}

bool inside(uint64_t offset, uint64_t nbytes, uint64_t file_size) {
    return offset <= file_size && nbytes <= file_size - offset;
}

void check_layout(const edgemoe::model_layout & l, uint64_t size) {
    using namespace edgemoe;
    if (l.file_size != size) {
        fail("file_size", std::to_string(l.file_size) + " != " + std::to_string(size));
    }
    if (l.data_offset > size || l.alignment == 0) {
        fail("data section");
    }
    if (l.blocks.empty()) {
        if (!l.pools.empty() || l.expert_bytes != 0) {
            fail("pools or expert bytes without blocks");
        }
        return;
    }
    if (l.n_expert <= 0 || l.n_expert_used <= 0 || l.n_expert_used > l.n_expert) {
        fail("expert counts", std::to_string(l.n_expert) + "/" + std::to_string(l.n_expert_used));
    }
    std::vector<int32_t> blocks_in_pool(l.pools.size(), 0);
    int32_t prev_layer = -1;
    for (const moe_block & b : l.blocks) {
        if (b.layer <= prev_layer || (l.n_layer > 0 && b.layer >= l.n_layer)) {
            fail("block layer order or range", std::to_string(b.layer));
        }
        prev_layer = b.layer;
        if (b.pool < 0 || (size_t) b.pool >= l.pools.size()) {
            fail("block pool index", std::to_string(b.pool));
        }
        blocks_in_pool[b.pool]++;
        if (!b.roles[ROLE_DOWN].present || !(b.roles[ROLE_UP].present || b.roles[ROLE_GATE_UP].present)) {
            fail("accepted an incomplete block");
        }
        uint64_t expert_bytes = 0;
        for (int r = 0; r < ROLE_COUNT; ++r) {
            const role_tensor & t = b.roles[r];
            if (!t.present) {
                continue;
            }
            if (t.ne0 <= 0 || t.ne1 <= 0 || t.slice_bytes == 0 || t.type < 0 || t.type >= GGML_TYPE_COUNT) {
                fail("expert tensor shape", t.name);
            }
            // all n_expert slices inside the file, computed without overflow
            if (t.slice_bytes > size / (uint64_t) l.n_expert ||
                !inside(t.file_offset, t.slice_bytes * (uint64_t) l.n_expert, size)) {
                fail("expert tensor outside the file", t.name);
            }
            if (t.file_offset < l.data_offset) {
                fail("expert tensor before the data section", t.name);
            }
            expert_bytes += t.slice_bytes;
        }
        if (expert_bytes != b.expert_bytes()) {
            fail("expert_bytes");
        }
        const pool_layout & p = l.pools[b.pool];
        if (p.slot_bytes != expert_bytes || p.first_block < 0 || (size_t) p.first_block >= l.blocks.size() ||
            l.blocks[p.first_block].signature() != b.signature()) {
            fail("block and pool disagree", std::to_string(b.layer));
        }
        for (const aux_tensor * a : { &b.gate_inp, &b.ffn_norm, &b.probs_bias }) {
            if (a->present && !inside(a->file_offset, a->nbytes, size)) {
                fail("aux tensor outside the file");
            }
        }
    }
    for (size_t i = 0; i < l.pools.size(); ++i) {
        if (l.pools[i].n_blocks != blocks_in_pool[i] || blocks_in_pool[i] == 0) {
            fail("pool block count");
        }
    }
    (void) l.min_budget_bytes();
    (void) l.slices_aligned(4096);
    (void) l.slices_aligned(l.alignment);
}

} // namespace

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    setenv("GGML_NO_BACKTRACE", "1", 0);                            // an abort must not start gdb
    ggml_log_set([](enum ggml_log_level, const char *, void *) {}, nullptr); // gguf logs every refusal
    std::string dir;
    if (const char * d = getenv("EDGEMOE_FUZZ_TMPDIR")) {
        dir = d;
    } else {
        struct stat st;
        const char * t = getenv("TMPDIR");
        dir = stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode) && access("/dev/shm", W_OK) == 0 ? "/dev/shm"
              : t && *t                                                                       ? t
                                                                                              : "/tmp";
    }
    g_verbose = getenv("EDGEMOE_FUZZ_VERBOSE") && *getenv("EDGEMOE_FUZZ_VERBOSE") && strcmp(getenv("EDGEMOE_FUZZ_VERBOSE"), "0") != 0;
    g_path = dir + "/edgemoe-fuzz-model_layout-" + std::to_string((long) getpid()) + ".gguf";
    atexit(remove_input_file);
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    write_input(data, size);
    edgemoe::model_layout l;
    std::string err;
    const bool ok = edgemoe::read_model_layout(g_path, l, &err);
    unlink(g_path.c_str()); // none left behind when a later input crashes the process
    if (ok) {
        check_layout(l, size);
        if (g_verbose) {
            fprintf(stderr, "accepted: arch '%s', %zu MoE blocks, %zu pools, %d experts, %d used\n", l.arch.c_str(),
                    l.blocks.size(), l.pools.size(), l.n_expert, l.n_expert_used);
        }
    } else {
        if (g_verbose) {
            fprintf(stderr, "refused: %s\n", err.c_str());
        }
        if (err.empty() || err.find('\n') != std::string::npos || err.find('\r') != std::string::npos) {
            fail("error message is not one line", err);
        }
        if (err.find(g_path) == std::string::npos) {
            fail("error message does not name the file", err);
        }
        if (err.size() > 1024) {
            fail("error message is unbounded", std::to_string(err.size()) + " bytes");
        }
    }
    return 0;
}
