// The three backing stores read the same bytes, aligned or not; errors are reported, not thrown.
#include "backing_store.h"
#include "check.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unistd.h>
#include <vector>

using namespace edgemoe;

namespace {

std::string write_pattern(const char * dir, size_t size) {
    std::string path = std::string(dir) + "/edgemoe_store_XXXXXX";
    std::vector<char> tmpl(path.begin(), path.end());
    tmpl.push_back('\0');
    const int fd = mkstemp(tmpl.data());
    if (fd < 0) {
        return "";
    }
    std::vector<uint8_t> buf(size);
    for (size_t i = 0; i < size; ++i) {
        buf[i] = (uint8_t) ((i*131 + (i >> 12)) & 0xff);
    }
    const bool ok = write(fd, buf.data(), size) == (ssize_t) size;
    close(fd);
    return ok ? std::string(tmpl.data()) : "";
}

uint8_t expected(uint64_t i) { return (uint8_t) ((i*131 + (i >> 12)) & 0xff); }

void check_reads(const std::string & path, io_kind kind, uint64_t file_size) {
    backing_store st;
    std::string err, notice;
    CHECK(st.open(path, kind, &err, &notice));
    const size_t bounce_size = backing_store::bounce_size_for(64*1024);
    void * bounce = nullptr;
    CHECK(posix_memalign(&bounce, DIRECT_ALIGN, bounce_size) == 0);
    void * aligned_dst = nullptr;
    CHECK(posix_memalign(&aligned_dst, DIRECT_ALIGN, 64*1024) == 0);
    std::vector<uint8_t> dst(64*1024 + 7);

    struct { uint64_t off; size_t size; } cases[] = {
        {0, 4096}, {4096, 8192}, {1, 100}, {4095, 4098}, {12345, 60000}, {file_size - 5000, 5000}, {file_size - 1, 1},
    };
    for (const auto & c : cases) {
        memset(dst.data(), 0xee, dst.size());
        CHECK(st.read(dst.data() + 3, c.off, c.size, bounce, bounce_size, &err));
        bool same = true;
        for (size_t i = 0; i < c.size; ++i) {
            same &= dst[3 + i] == expected(c.off + i);
        }
        CHECK(same);
        CHECK_EQ(dst[2], 0xee); // nothing written before dst
        CHECK_EQ(dst[3 + c.size], 0xee); // nor after it
    }
    // aligned destination, offset and size: the direct read lands in place
    CHECK(st.read(aligned_dst, 8192, 16384, bounce, bounce_size, &err));
    CHECK_EQ(((uint8_t *) aligned_dst)[100], expected(8192 + 100));

    // past the end is an error with a message
    err.clear();
    CHECK(!st.read(dst.data(), file_size - 10, 20, bounce, bounce_size, &err));
    CHECK(!err.empty());
    free(bounce);
    free(aligned_dst);
}

} // namespace

int main() {
    const uint64_t size = 3*65536 + 1234; // not a multiple of the block size
    const char * tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    const std::string path = write_pattern(tmp, size);
    CHECK(!path.empty());
    if (!path.empty()) {
        check_reads(path, io_kind::direct, size);
        check_reads(path, io_kind::buffered, size);
        check_reads(path, io_kind::mmap, size);
        unlink(path.c_str());
    }

    // a missing file fails at open with a message
    backing_store st;
    std::string err, notice;
    CHECK(!st.open("/nonexistent/edgemoe.gguf", io_kind::direct, &err, &notice));
    CHECK(err.find("cannot open") != std::string::npos);

    // tmpfs refuses O_DIRECT: the store falls back to buffered reads and says so
    if (access("/dev/shm", W_OK) == 0) {
        const std::string shm = write_pattern("/dev/shm", 10000);
        if (!shm.empty()) {
            backing_store s2;
            err.clear();
            notice.clear();
            CHECK(s2.open(shm, io_kind::direct, &err, &notice));
            if (s2.kind() == io_kind::buffered) {
                CHECK(!notice.empty());
            }
            char b[10];
            void * bounce = nullptr;
            CHECK(posix_memalign(&bounce, DIRECT_ALIGN, 3*DIRECT_ALIGN) == 0);
            CHECK(s2.read(b, 100, 10, bounce, 3*DIRECT_ALIGN, &err));
            free(bounce);
            CHECK_EQ((uint8_t) b[0], expected(100));
            unlink(shm.c_str());
        }
    }
    return finish("test_backing_store");
}
