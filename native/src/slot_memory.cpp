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
// the patch's read-only registration of host memory: nullptr, or CUDA's reason it failed
typedef const char * (*pin_fn)(void *, size_t);
typedef void (*unpin_fn)(void *);
constexpr const char * PIN_PROC   = "ggml_backend_cuda_pin_host_readonly";
constexpr const char * UNPIN_PROC = "ggml_backend_cuda_unpin_host";

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
    if (views_) {
        ggml_free(views_);
    }
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
    ggml_init_params ip = { /*.mem_size =*/ ggml_tensor_overhead()*2, /*.mem_buffer =*/ nullptr, /*.no_alloc =*/ true };
    u->views_ = ggml_init(ip);
    if (!u->views_) {
        *err = "cannot create an I/O thread's view context";
        return nullptr;
    }
    if (dev) {
        u->backend_ = ggml_backend_dev_init(dev, nullptr);
        if (!u->backend_) {
            *err = std::string("cannot open an upload stream on ") + ggml_backend_dev_name(dev);
            return nullptr;
        }
    }
    const size_t bytes = (staging_bytes + DIRECT_ALIGN - 1)/DIRECT_ALIGN*DIRECT_ALIGN;
    ggml_backend_buffer_type_t host = dev ? ggml_backend_dev_host_buffer_type(dev) : nullptr;
    if (host) {
        u->staging_buf_ = ggml_backend_buft_alloc_buffer(host, bytes);
    }
    uint8_t * base = u->staging_buf_ ? (uint8_t *) ggml_backend_buffer_get_base(u->staging_buf_) : nullptr;
    if (!base || ((uintptr_t) base % DIRECT_ALIGN) != 0) {
        // no pinned memory (GGML_CUDA_NO_PINNED, or no GPU): copies still work, only synchronously
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

void uploader::upload(ggml_tensor * t, int32_t slot, size_t offset, size_t bytes, size_t src_offset) {
    const size_t slice = t->nb[2];
    if (backend_) { // a VRAM pool (repacked pools exist only on the host, where there is no backend)
        ggml_backend_tensor_set_async(backend_, t, staging_ + src_offset, (size_t) slot*slice + offset, bytes);
        return;
    }
    GGML_ASSERT(offset == 0 && bytes == slice); // split_pieces keeps a repacked role whole
    // a repacked pool: its buffer converts a whole tensor on set, so set a view of the slot. The
    // repack interleaves rows in groups that never straddle two experts (ne1 is a multiple of
    // the group), so a slot's bytes equal that expert's part of stock's repacked tensor
    ggml_reset(views_);
    ggml_tensor * v = ggml_view_3d(views_, t, t->ne[0], t->ne[1], 1, t->nb[1], t->nb[2], (size_t) slot*slice);
    GGML_ASSERT(ggml_backend_view_init(v) == GGML_STATUS_SUCCESS);
    ggml_backend_tensor_set(v, staging_ + src_offset, 0, ggml_nbytes(v));
}

void uploader::upload_pinned(ggml_tensor * t, int32_t slot, size_t offset, size_t bytes, const void * src) {
    GGML_ASSERT(backend_); // VRAM pools only
    ggml_backend_tensor_set_async(backend_, t, src, (size_t) slot*t->nb[2] + offset, bytes);
}

void uploader::wait() {
    if (backend_) {
        ggml_backend_synchronize(backend_);
    }
}

ggml_backend_buffer_type_t slot_memory::repack_type_for(const ggml_tensor * t) {
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!cpu || !ggml_is_quantized(t->type) || t->ne[2] < 2) {
        return nullptr;
    }
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t)
        ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(cpu), "ggml_backend_dev_get_extra_bufts");
    if (!get_extra) {
        return nullptr;
    }
    ggml_backend_buffer_type_t found = nullptr;
    for (ggml_backend_buffer_type_t * b = get_extra(cpu); b && *b && !found; ++b) {
        // llama.cpp's loader asks the same (weight_buft_supported): would the CPU backend run a
        // mul_mat_id over this weight in a buffer of that type?
        ggml_init_params ip = { /*.mem_size =*/ ggml_tensor_overhead()*4, /*.mem_buffer =*/ nullptr, /*.no_alloc =*/ true };
        ggml_context * ctx = ggml_init(ip);
        if (!ctx) {
            return nullptr;
        }
        ggml_tensor * w   = ggml_new_tensor_3d(ctx, t->type, t->ne[0], t->ne[1], t->ne[2]);
        ggml_tensor * x   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, t->ne[0], 2, 1);
        ggml_tensor * ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 2, 1);
        ggml_tensor * op  = ggml_mul_mat_id(ctx, w, x, ids);
        ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(*b, 0);
        if (buf) {
            w->buffer = buf;
            if (ggml_backend_dev_supports_op(cpu, op)) {
                found = *b;
            }
            ggml_backend_buffer_free(buf);
        }
        ggml_free(ctx);
    }
    return found;
}

slot_memory::~slot_memory() {
    if (pinned_) {
        unpin_(pinned_);
    }
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

bool slot_memory::pin(const void * p, size_t n, std::string * err) {
    GGML_ASSERT(!pinned_);
    ggml_backend_reg_t reg = dev_ ? ggml_backend_dev_backend_reg(dev_) : nullptr;
    auto pin   = reg ? (pin_fn) ggml_backend_reg_get_proc_address(reg, PIN_PROC) : nullptr;
    auto unpin = reg ? (unpin_fn) ggml_backend_reg_get_proc_address(reg, UNPIN_PROC) : nullptr;
    if (!pin || !unpin) {
        *err = device_name() + " cannot pin host memory (not the patched CUDA backend)";
        return false;
    }
    if (const char * why = pin(const_cast<void *>(p), n)) {
        *err = why;
        return false;
    }
    pinned_ = const_cast<void *>(p);
    unpin_  = unpin;
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
    ggml_backend_buffer_type_t repack = kind_ == pool_kind::host && repack_ ? repack_type_for(t) : nullptr;
    if (repack) {
        buf = ggml_backend_buft_alloc_buffer(repack, ggml_backend_buft_get_alloc_size(repack, t));
        if (buf) {
            ggml_backend_buffer_clear(buf, 0); // zero scales: masked lanes over unused slots stay finite
            base = ggml_backend_buffer_get_base(buf);
        }
    } else if (kind_ == pool_kind::host) {
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
    if (!repack && host_visible() && ((uintptr_t) base % DIRECT_ALIGN) != 0) {
        *err = "the expert pool on " + device_name() + " is not page aligned";
        return false;
    }
    if (ggml_backend_tensor_alloc(buf, t, base) != GGML_STATUS_SUCCESS) {
        *err = "cannot place the expert pool tensor on " + device_name();
        return false;
    }
    *host = host_visible() && !repack ? (uint8_t *) base : nullptr;
    return true;
}

} // namespace edgemoe
