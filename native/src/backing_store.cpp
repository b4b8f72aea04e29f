#include "backing_store.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace edgemoe {

const char * io_name(io_kind k) {
    switch (k) {
        case io_kind::direct:   return "direct";
        case io_kind::buffered: return "buffered";
        case io_kind::mmap:     return "mmap";
    }
    return "?";
}

backing_store::~backing_store() { close(); }

void backing_store::close() {
    if (map_) {
        munmap((void *) map_, size_);
        map_ = nullptr;
    }
    if (fd_ >= 0) {
        ::close(fd_);
        fd_ = -1;
    }
    if (fd_buffered_ >= 0) {
        ::close(fd_buffered_);
        fd_buffered_ = -1;
    }
}

bool backing_store::open(const std::string & path, io_kind kind, std::string * err, std::string * notice) {
    close();
    path_ = path;
    kind_ = kind;

    fd_buffered_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_buffered_ < 0) {
        *err = "cannot open " + path + ": " + strerror(errno);
        return false;
    }
    struct stat st;
    if (fstat(fd_buffered_, &st) != 0) {
        *err = "cannot stat " + path + ": " + strerror(errno);
        return false;
    }
    size_ = (uint64_t) st.st_size;

    if (kind == io_kind::direct) {
#ifdef O_DIRECT
        fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
        if (fd_ < 0) {
            *notice = std::string("O_DIRECT refused for ") + path + " (" + strerror(errno) + "); using buffered reads";
            kind_ = io_kind::buffered;
        }
#else
        *notice = "O_DIRECT is not available on this platform; using buffered reads";
        kind_ = io_kind::buffered;
#endif
    } else if (kind == io_kind::mmap) {
        void * p = mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd_buffered_, 0);
        if (p == MAP_FAILED) {
            *err = "cannot map " + path + ": " + strerror(errno);
            return false;
        }
        map_ = (const uint8_t *) p;
    }
    return true;
}

bool backing_store::pread_full(int fd, void * dst, uint64_t offset, size_t size, std::string * err) {
    uint8_t * p = (uint8_t *) dst;
    size_t done = 0;
    while (done < size) {
        const ssize_t n = ::pread(fd, p + done, size - done, (off_t) (offset + done));
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            *err = "read of " + path_ + " at " + std::to_string(offset + done) + " failed: " + strerror(errno);
            return false;
        }
        if (n == 0) {
            // O_DIRECT reads of the file's last block come back short; that is the end
            if (done > 0 && kind_ == io_kind::direct && offset + done >= size_) {
                memset(p + done, 0, size - done);
                return true;
            }
            *err = "unexpected end of " + path_ + " at " + std::to_string(offset + done);
            return false;
        }
        done += (size_t) n;
    }
    return true;
}

bool backing_store::read(void * dst, uint64_t offset, size_t size, void * bounce, size_t bounce_size, std::string * err) {
    if (offset + size > size_) {
        *err = "read past the end of " + path_;
        return false;
    }
    switch (kind_) {
        case io_kind::mmap:
            memcpy(dst, map_ + offset, size);
            return true;
        case io_kind::buffered:
            return pread_full(fd_buffered_, dst, offset, size, err);
        case io_kind::direct:
            break;
    }

    const bool aligned = ((uintptr_t) dst % DIRECT_ALIGN) == 0 && offset % DIRECT_ALIGN == 0 && size % DIRECT_ALIGN == 0;
    if (aligned) {
        if (pread_full(fd_, dst, offset, size, err)) {
            return true;
        }
    } else {
        const uint64_t start = offset - offset % DIRECT_ALIGN;
        const uint64_t end   = ((offset + size + DIRECT_ALIGN - 1)/DIRECT_ALIGN)*DIRECT_ALIGN;
        const size_t   span  = (size_t) (end - start);
        if (span <= bounce_size && ((uintptr_t) bounce % DIRECT_ALIGN) == 0) {
            if (pread_full(fd_, bounce, start, span, err)) {
                memcpy(dst, (const uint8_t *) bounce + (offset - start), size);
                return true;
            }
        } else {
            *err = "internal: bounce buffer too small or misaligned";
        }
    }
    // EINVAL here means this file system takes O_DIRECT at open but not at read
    if (errno == EINVAL) {
        err->clear();
        return pread_full(fd_buffered_, dst, offset, size, err);
    }
    return false;
}

} // namespace edgemoe
