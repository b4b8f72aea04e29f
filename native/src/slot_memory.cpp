#include "slot_memory.h"

#include "backing_store.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace edgemoe {

namespace {

// the patched ggml-cuda's buffer type of pinned host memory that its kernels read in place
// (native/patches/llama.cpp); asked by name so that libedgemoe does not link ggml-cuda
typedef ggml_backend_buffer_type_t (*mapped_buft_fn)(ggml_backend_dev_t);
constexpr const char * MAPPED_PROC = "ggml_backend_cuda_mapped_buffer_type";

} // namespace

const char * pool_name(pool_kind k) {
    switch (k) {
        case pool_kind::host:   return "host";
        case pool_kind::gpu:    return "gpu";
        case pool_kind::vram:   return "vram";
        case pool_kind::mapped: return "mapped";
    }
    return "?";
}

ggml_backend_dev_t first_gpu(bool * integrated) {
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t d = ggml_backend_dev_get(i);
        const auto t = ggml_backend_dev_type(d);
        if (t == GGML_BACKEND_DEVICE_TYPE_GPU || t == GGML_BACKEND_DEVICE_TYPE_IGPU) {
            if (integrated) {
                *integrated = t == GGML_BACKEND_DEVICE_TYPE_IGPU;
            }
            return d;
        }
    }
    return nullptr;
}

uploader::~uploader() {
    if (backend_) {
        ggml_backend_synchronize(backend_);
        ggml_backend_free(backend_);
    }
    if (staging_buf_) {
        ggml_backend_buffer_free(staging_buf_);
    }
    free(staging_own_);
}

std::unique_ptr<uploader> uploader::create(ggml_backend_dev_t dev, size_t staging_bytes, std::string * err) {
    std::unique_ptr<uploader> u(new uploader());
    u->backend_ = ggml_backend_dev_init(dev, nullptr);
    if (!u->backend_) {
        *err = std::string("cannot open an upload stream on ") + ggml_backend_dev_name(dev);
        return nullptr;
    }
    const size_t bytes = (staging_bytes + DIRECT_ALIGN - 1)/DIRECT_ALIGN*DIRECT_ALIGN;
    if (ggml_backend_buffer_type_t host = ggml_backend_dev_host_buffer_type(dev)) {
        u->staging_buf_ = ggml_backend_buft_alloc_buffer(host, bytes);
    }
    uint8_t * base = u->staging_buf_ ? (uint8_t *) ggml_backend_buffer_get_base(u->staging_buf_) : nullptr;
    if (!base || ((uintptr_t) base % DIRECT_ALIGN) != 0) {
        // no pinned memory (GGML_CUDA_NO_PINNED, or the backend has none): copies still work,
        // only synchronously
        if (u->staging_buf_) {
            ggml_backend_buffer_free(u->staging_buf_);
            u->staging_buf_ = nullptr;
        }
        if (posix_memalign(&u->staging_own_, DIRECT_ALIGN, bytes) != 0) {
            *err = "cannot allocate an upload staging buffer";
            return nullptr;
        }
        base = (uint8_t *) u->staging_own_;
    }
    u->staging_ = base;
    return u;
}

void uploader::upload(ggml_tensor * t, size_t dst_offset, size_t src_offset, size_t size) {
    ggml_backend_tensor_set_async(backend_, t, staging_ + src_offset, dst_offset, size);
}

void uploader::wait() {
    ggml_backend_synchronize(backend_);
}

slot_memory::~slot_memory() {
    for (auto * b : buffers_) {
        ggml_backend_buffer_free(b);
    }
    for (auto & m : maps_) {
        munmap(m.first, m.second);
    }
}

bool slot_memory::init(pool_kind kind, std::string * err) {
    kind_ = kind;
    if (kind == pool_kind::host) {
        return true;
    }
    bool integrated = false;
    dev_ = first_gpu(&integrated);
    if (!dev_) {
        *err = std::string("a ") + pool_name(kind) + " expert pool needs a GPU, and this build has none (build with EDGEMOE_CUDA=1)";
        return false;
    }
    if (kind_ == pool_kind::gpu) {
        kind_ = integrated ? pool_kind::mapped : pool_kind::vram;
    }
    if (kind_ == pool_kind::vram) {
        buft_ = ggml_backend_dev_buffer_type(dev_);
    } else {
        auto fn = (mapped_buft_fn) ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(dev_), MAPPED_PROC);
        buft_ = fn ? fn(dev_) : nullptr;
        if (!buft_) {
            *err = std::string("a mapped expert pool needs the patched CUDA backend; ") + ggml_backend_dev_name(dev_) + " has none";
            return false;
        }
    }
    return true;
}

std::string slot_memory::device_name() const {
    return dev_ ? ggml_backend_dev_name(dev_) : "CPU";
}

bool slot_memory::alloc(ggml_tensor * t, uint8_t ** host, std::string * err) {
    // a backend may want more than ggml_nbytes (CUDA pads quantized rows for its kernels)
    const size_t need = buft_ ? ggml_backend_buft_get_alloc_size(buft_, t) : ggml_nbytes(t);
    const size_t bytes = std::max<size_t>(need, DIRECT_ALIGN);
    ggml_backend_buffer_t buf = nullptr;
    void * base = nullptr;
    if (kind_ == pool_kind::host) {
        // anonymous pages: zero (so masked matmul lanes stay finite) and page aligned
        base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (base == MAP_FAILED) {
            *err = "cannot allocate " + std::to_string(bytes) + " bytes for the expert pool";
            return false;
        }
        maps_.emplace_back(base, bytes);
        buf = ggml_backend_cpu_buffer_from_ptr(base, bytes);
    } else {
        // pinned allocations may share pages (CUDA suballocates small ones): room to align
        const size_t slack = host_visible() ? DIRECT_ALIGN : 0;
        buf = ggml_backend_buft_alloc_buffer(buft_, bytes + slack);
        if (buf) {
            ggml_backend_buffer_clear(buf, 0); // zero: masked lanes over unused slots stay finite
            const uintptr_t b = (uintptr_t) ggml_backend_buffer_get_base(buf);
            base = (void *) (slack ? (b + slack - 1)/slack*slack : b);
        }
    }
    if (!buf) {
        *err = "cannot allocate " + std::to_string(bytes) + " bytes for the expert pool on " + device_name();
        return false;
    }
    buffers_.push_back(buf);
    // the matmuls on the slots go where the slots are (ggml's scheduler follows weights)
    ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    if (host_visible() && ((uintptr_t) base % DIRECT_ALIGN) != 0) {
        *err = "the expert pool on " + device_name() + " is not page aligned";
        return false;
    }
    if (ggml_backend_tensor_alloc(buf, t, base) != GGML_STATUS_SUCCESS) {
        *err = "cannot place the expert pool tensor on " + device_name();
        return false;
    }
    *host = host_visible() ? (uint8_t *) base : nullptr;
    return true;
}

} // namespace edgemoe
