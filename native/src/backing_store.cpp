#include "backing_store.h"

#include "fault_injection.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <csetjmp>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <mutex>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <thread>
#include <unistd.h>

namespace edgemoe {

namespace {

// A read from a mapping whose page cannot be read (the file was truncated under it, or the
// device failed) raises SIGBUS. The thread copying from the mapping marks itself here and the
// handler jumps back into that copy; SIGBUS anywhere else keeps its previous meaning. The
// slot is initial-exec TLS so that the handler never has to allocate it.
__attribute__((tls_model("initial-exec"))) thread_local sigjmp_buf * t_bus_guard = nullptr;
struct sigaction g_old_bus;
std::once_flag   g_bus_once;

// Other mappings of a model file (llama.cpp's own, for the dense weights): a fault there comes
// from compute that cannot be resumed, so the process ends with one line instead of a core.
struct mapped_range { uintptr_t lo, hi; };
constexpr int      MAX_RANGES = 32;
mapped_range       g_ranges[MAX_RANGES];
std::atomic<int>   g_n_ranges{0};
std::mutex         g_ranges_mu;  // writers only; the handler reads the published prefix
char               g_bus_msg[1024];
size_t             g_bus_msg_len = 0;

void on_sigbus(int sig, siginfo_t * info, void * uctx) {
    if (sigjmp_buf * jb = t_bus_guard) {
        t_bus_guard = nullptr;
        siglongjmp(*jb, 1);
    }
    const uintptr_t a = (uintptr_t) info->si_addr;
    const int n = g_n_ranges.load(std::memory_order_acquire);
    for (int i = 0; i < n; ++i) {
        if (a >= g_ranges[i].lo && a < g_ranges[i].hi) {
            ssize_t w = ::write(2, g_bus_msg, g_bus_msg_len);
            (void) w;
            _exit(1);
        }
    }
    if (g_old_bus.sa_flags & SA_SIGINFO) {
        if (g_old_bus.sa_sigaction) {
            g_old_bus.sa_sigaction(sig, info, uctx);
            return;
        }
    } else if (g_old_bus.sa_handler == SIG_IGN) {
        return;
    } else if (g_old_bus.sa_handler != SIG_DFL) {
        g_old_bus.sa_handler(sig);
        return;
    }
    // the default action: returning re-runs the faulting access, which now kills the process
    signal(SIGBUS, SIG_DFL);
}

void install_sigbus_handler() {
    std::call_once(g_bus_once, [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = on_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGBUS, &sa, &g_old_bus);
    });
}

// copies from the mapping; false when a page faulted (SIGBUS)
bool guarded_copy(void * dst, const void * src, size_t n, bool inject) {
    sigjmp_buf jb;
    if (sigsetjmp(jb, 1) != 0) {
        return false;
    }
    t_bus_guard = &jb;
    if (inject) {
        raise(SIGBUS); // delivered to this thread before raise returns
    }
    memcpy(dst, src, n);
    t_bus_guard = nullptr;
    return true;
}

} // namespace

void backing_store::guard_file_mappings() const {
    install_sigbus_handler();
    FILE * f = fopen("/proc/self/maps", "r");
    if (!f) {
        return; // no procfs: such a fault keeps its default meaning
    }
    std::lock_guard<std::mutex> lock(g_ranges_mu);
    if (g_bus_msg_len == 0) {
        const int n = snprintf(g_bus_msg, sizeof(g_bus_msg), "edgemoe: error: model file %s was truncated or "
                               "failed to read under llama.cpp's mapping (SIGBUS)\n", path_.c_str());
        g_bus_msg_len = n > 0 ? std::min<size_t>((size_t) n, sizeof(g_bus_msg) - 1) : 0;
    }
    char line[4096];
    while (fgets(line, sizeof(line), f)) {
        unsigned long lo = 0, hi = 0, off = 0, inode = 0;
        unsigned int dmaj = 0, dmin = 0;
        char perms[8];
        if (sscanf(line, "%lx-%lx %7s %lx %x:%x %lu", &lo, &hi, perms, &off, &dmaj, &dmin, &inode) != 7) {
            continue;
        }
        if ((ino_t) inode != ino_ || dmaj != major(dev_) || dmin != minor(dev_)) {
            continue;
        }
        const int n = g_n_ranges.load(std::memory_order_relaxed);
        bool known = false;
        for (int i = 0; i < n; ++i) {
            known |= g_ranges[i].lo == lo && g_ranges[i].hi == hi;
        }
        if (!known && n < MAX_RANGES) {
            g_ranges[n] = { lo, hi };
            g_n_ranges.store(n + 1, std::memory_order_release);
        }
    }
    fclose(f);
}

namespace {

bool is_transient(int e) {
    return e == EIO || e == EAGAIN || e == EBUSY || e == ETIMEDOUT || e == ENOMEM;
}

} // namespace

const char * io_name(io_kind k) {
    switch (k) {
        case io_kind::direct:   return "direct";
        case io_kind::buffered: return "buffered";
        case io_kind::mmap:     return "mmap";
        case io_kind::pinned:   return "pinned";
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
    size_  = (uint64_t) st.st_size;
    dev_   = st.st_dev;
    ino_   = st.st_ino;
    mtime_ = st.st_mtim;

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
    } else if (kind == io_kind::mmap || kind == io_kind::pinned) {
        void * p = mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd_buffered_, 0);
        if (p == MAP_FAILED) {
            *err = "cannot map " + path + ": " + strerror(errno);
            return false;
        }
        map_ = (const uint8_t *) p;
        install_sigbus_handler();
    }
    return true;
}

bool backing_store::check_identity(std::string * err) const {
    struct stat st;
    if (fd_buffered_ < 0) {
        *err = "internal: the model file is not open";
        return false;
    }
    if (fstat(fd_buffered_, &st) != 0) {
        *err = "cannot stat " + path_ + ": " + strerror(errno);
        return false;
    }
    if ((uint64_t) st.st_size != size_) {
        *err = "model file " + path_ + " changed size while in use (" + std::to_string(size_) + " -> " +
               std::to_string((uint64_t) st.st_size) + " bytes); reload it";
        return false;
    }
    if (st.st_mtim.tv_sec != mtime_.tv_sec || st.st_mtim.tv_nsec != mtime_.tv_nsec) {
        *err = "model file " + path_ + " was modified while in use; reload it";
        return false;
    }
    if (stat(path_.c_str(), &st) != 0) {
        *err = "model file " + path_ + " was removed while in use (" + strerror(errno) + ")";
        return false;
    }
    if (st.st_dev != dev_ || st.st_ino != ino_) {
        *err = "model file " + path_ + " was replaced while in use; reload it";
        return false;
    }
    return true;
}

bool backing_store::pread_full(int fd, void * dst, uint64_t offset, size_t size, std::string * err, bool * transient) {
    uint8_t * p = (uint8_t *) dst;
    size_t done = 0;
    faults::action fault = faults::next_read();
    if (fault.k == faults::kind::delay) {
        std::this_thread::sleep_for(std::chrono::milliseconds(fault.arg));
    }
    while (done < size) {
        ssize_t n;
        if (fault.k == faults::kind::eio) {
            n = -1;
            errno = EIO;
        } else if (fault.k == faults::kind::eof) {
            n = 0;
        } else if (fault.k == faults::kind::short_read) {
            // half of what was asked, aligned down for O_DIRECT: the loop must read on
            const size_t half = ((size - done)/2) & ~(size_t) (kind_ == io_kind::direct ? DIRECT_ALIGN - 1 : 0);
            n = half > 0 ? ::pread(fd, p + done, half, (off_t) (offset + done)) : ::pread(fd, p + done, size - done, (off_t) (offset + done));
        } else {
            n = ::pread(fd, p + done, size - done, (off_t) (offset + done));
        }
        fault = {};
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            const int e = errno;
            *err = "read of " + path_ + " at " + std::to_string(offset + done) + " failed: " + strerror(e);
            if (transient) {
                *transient = is_transient(e);
            }
            errno = e;
            return false;
        }
        if (n == 0) {
            // O_DIRECT reads of the file's last block come back short; that is the end
            if (done > 0 && kind_ == io_kind::direct && offset + done >= size_) {
                memset(p + done, 0, size - done);
                return true;
            }
            *err = "unexpected end of " + path_ + " at " + std::to_string(offset + done) + " (truncated?)";
            errno = 0;
            return false;
        }
        done += (size_t) n;
    }
    return true;
}

bool backing_store::read_mapped(void * dst, uint64_t offset, size_t size, std::string * err, bool * transient) {
    const faults::action fault = faults::next_read();
    if (fault.k == faults::kind::delay) {
        std::this_thread::sleep_for(std::chrono::milliseconds(fault.arg));
    }
    if (fault.k == faults::kind::eof) {
        *err = "unexpected end of " + path_ + " at " + std::to_string(offset) + " (truncated?)";
        return false;
    }
    if (!guarded_copy(dst, map_ + offset, size, fault.k == faults::kind::eio)) {
        // a page of the mapping could not be read: the file shrank under it or the device failed
        struct stat st;
        const bool shrank = fstat(fd_buffered_, &st) == 0 && (uint64_t) st.st_size < offset + size;
        *err = "read of " + path_ + " at " + std::to_string(offset) + " through the mapping failed (SIGBUS): " +
               (shrank ? "the file was truncated" : "Input/output error");
        if (transient) {
            *transient = !shrank;
        }
        return false;
    }
    return true;
}

bool backing_store::read(void * dst, uint64_t offset, size_t size, void * bounce, size_t bounce_size, std::string * err,
                         bool * transient) {
    if (transient) {
        *transient = false;
    }
    if (offset + size > size_) {
        *err = "read past the end of " + path_;
        return false;
    }
    switch (kind_) {
        case io_kind::mmap:
        case io_kind::pinned: // not reached by the cache (the GPU copies VRAM pieces itself): as mmap
            return read_mapped(dst, offset, size, err, transient);
        case io_kind::buffered:
            return pread_full(fd_buffered_, dst, offset, size, err, transient);
        case io_kind::direct:
            break;
    }

    const bool aligned = ((uintptr_t) dst % DIRECT_ALIGN) == 0 && offset % DIRECT_ALIGN == 0 && size % DIRECT_ALIGN == 0;
    if (aligned) {
        if (pread_full(fd_, dst, offset, size, err, transient)) {
            return true;
        }
    } else {
        const uint64_t start = offset - offset % DIRECT_ALIGN;
        const uint64_t end   = ((offset + size + DIRECT_ALIGN - 1)/DIRECT_ALIGN)*DIRECT_ALIGN;
        const size_t   span  = (size_t) (end - start);
        if (span <= bounce_size && ((uintptr_t) bounce % DIRECT_ALIGN) == 0) {
            if (pread_full(fd_, bounce, start, span, err, transient)) {
                memcpy(dst, (const uint8_t *) bounce + (offset - start), size);
                return true;
            }
        } else {
            *err = "internal: bounce buffer too small or misaligned";
            errno = 0;
        }
    }
    // EINVAL here means this file system takes O_DIRECT at open but not at read
    if (errno == EINVAL) {
        err->clear();
        return pread_full(fd_buffered_, dst, offset, size, err, transient);
    }
    return false;
}

} // namespace edgemoe
