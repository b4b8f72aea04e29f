// Reads expert slices from the model file: O_DIRECT into aligned buffers (default), buffered
// pread, or memcpy from a read-only mapping.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace edgemoe {

enum class io_kind { direct = 0, buffered = 1, mmap = 2 };

const char * io_name(io_kind k);

constexpr size_t DIRECT_ALIGN = 4096;

class backing_store {
public:
    backing_store() = default;
    ~backing_store();
    backing_store(const backing_store &) = delete;
    backing_store & operator=(const backing_store &) = delete;

    // Opens path; a refused O_DIRECT falls back to buffered and sets *notice.
    bool open(const std::string & path, io_kind kind, std::string * err, std::string * notice);
    void close();

    io_kind kind() const { return kind_; }

    // Reads size bytes at offset into dst. bounce: DIRECT_ALIGN-aligned scratch of at least
    // bounce_size bytes, used when dst, offset or size is not aligned for O_DIRECT.
    bool read(void * dst, uint64_t offset, size_t size, void * bounce, size_t bounce_size, std::string * err);

    // bounce bytes a read of size bytes may need
    static size_t bounce_size_for(size_t size) { return size + 2*DIRECT_ALIGN; }

private:
    bool pread_full(int fd, void * dst, uint64_t offset, size_t size, std::string * err);

    io_kind     kind_ = io_kind::direct;
    std::string path_;
    int         fd_   = -1;
    int         fd_buffered_ = -1; // for a direct read that the kernel refuses at run time
    const uint8_t * map_ = nullptr;
    uint64_t    size_ = 0;
};

} // namespace edgemoe
