// Reads expert slices from the model file: O_DIRECT into aligned buffers (default), buffered
// pread, or memcpy from a read-only mapping (guarded: a page that fails, as in a file truncated
// under the mapping, is an error, not SIGBUS).
#pragma once

#include <cstddef>
#include <cstdint>
#include <ctime>
#include <string>
#include <sys/types.h>

namespace edgemoe {

enum class io_kind { direct = 0, buffered = 1, mmap = 2, pinned = 3 }; // pinned: mmap that a GPU DMAs from

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
    // pinned, but the GPU refused the pin: the reads are mmap's, and kind() says so
    void pin_refused() { if (kind_ == io_kind::pinned) kind_ = io_kind::mmap; }
    // the read-only mapping of the whole file (mmap, pinned), else nullptr
    const uint8_t * mapping() const { return map_; }
    uint64_t size() const { return size_; }

    // Reads size bytes at offset into dst. bounce: DIRECT_ALIGN-aligned scratch of at least
    // bounce_size bytes, used when dst, offset or size is not aligned for O_DIRECT. On failure
    // *transient (if given) tells whether a retry may succeed (EIO and the like).
    bool read(void * dst, uint64_t offset, size_t size, void * bounce, size_t bounce_size, std::string * err,
              bool * transient = nullptr);

    // The file at the path is still the one opened, unmodified (device, inode, size, mtime):
    // the cache must read the bytes llama.cpp loaded, never a replaced or rewritten file's.
    bool check_identity(std::string * err) const;

    // Other mappings of this file in the process (llama.cpp's, for the dense weights), found in
    // /proc/self/maps: a SIGBUS there (the file truncated under them) ends the process with a
    // one-line error and exit status 1 rather than a core dump; compute cannot resume there.
    void guard_file_mappings() const;

    // bounce bytes a read of size bytes may need
    static size_t bounce_size_for(size_t size) { return size + 2*DIRECT_ALIGN; }

private:
    bool pread_full(int fd, void * dst, uint64_t offset, size_t size, std::string * err, bool * transient);
    bool read_mapped(void * dst, uint64_t offset, size_t size, std::string * err, bool * transient);

    io_kind     kind_ = io_kind::direct;
    std::string path_;
    int         fd_   = -1;
    int         fd_buffered_ = -1; // for a direct read that the kernel refuses at run time
    const uint8_t * map_ = nullptr;
    uint64_t    size_ = 0;
    // identity at open
    dev_t       dev_ = 0;
    ino_t       ino_ = 0;
    timespec    mtime_ {};
};

} // namespace edgemoe
