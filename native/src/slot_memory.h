// Where the slot pools' bytes live (host memory, VRAM, or pinned host memory a GPU reads in
// place) and how a loaded expert reaches a VRAM slot. Only the ggml-backend API is used, so
// libedgemoe builds and runs the same with or without a GPU backend.
#pragma once

#include "ggml-backend.h"
#include "ggml.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace edgemoe {

enum class pool_kind { host = 0, gpu = 1, vram = 2, mapped = 3 };

const char * pool_name(pool_kind k);

// the first GPU ggml registered (discrete or integrated), or nullptr
ggml_backend_dev_t first_gpu(bool * integrated);

// One I/O thread's way into slots the CPU cannot write in place: a staging buffer that reads
// land in, then either a copy to VRAM on a backend of the thread's own (its own stream, so
// uploads overlap compute and each other; the staging is pinned) or, for a repacked host pool,
// ggml's repack of the slot from the staging (what stock llama.cpp does to its weights at load).
class uploader {
public:
    ~uploader();
    // dev: the GPU of VRAM pools, nullptr where only repacked host pools need staging
    static std::unique_ptr<uploader> create(ggml_backend_dev_t dev, size_t staging_bytes, std::string * err);

    uint8_t * staging() const { return staging_; }
    // staging()[src_offset, + bytes) into bytes [offset, + bytes) of slot `slot` of pool tensor
    // t: queued on the stream for VRAM; done at once for a repacked host pool (whole slots only)
    void upload(ggml_tensor * t, int32_t slot, size_t offset, size_t bytes, size_t src_offset);
    // src (host memory pinned for the device: slot_memory::pin) into the same bytes of a VRAM
    // slot, queued on the stream: the device's copy engine reads it, the CPU copies nothing
    void upload_pinned(ggml_tensor * t, int32_t slot, size_t offset, size_t bytes, const void * src);
    void wait(); // every queued upload is done

private:
    uploader() = default;
    ggml_backend_t backend_ = nullptr;
    ggml_backend_buffer_t staging_buf_ = nullptr; // pinned where the device has a host buffer type
    void * staging_own_ = nullptr;                // else aligned pageable memory
    uint8_t * staging_ = nullptr;
    ggml_context * views_ = nullptr;              // a slot's view, for the repack's set_tensor
};

class slot_memory {
public:
    ~slot_memory();

    // resolves gpu to vram or mapped; an error where the kind needs a GPU that is not there
    bool init(pool_kind kind, std::string * err);
    pool_kind kind() const { return kind_; }
    ggml_backend_dev_t device() const { return dev_; }
    std::string device_name() const;
    // whether the CPU can write slots directly (host and mapped): reads land in place
    bool host_visible() const { return kind_ != pool_kind::vram; }

    // zeroed, page-aligned memory for tensor t, which is placed in it; *host is its host
    // address, or nullptr where loads go through an uploader (VRAM, or a repacked host pool)
    bool alloc(ggml_tensor * t, uint8_t ** host, std::string * err);
    // host pools: repack quantized slots where ggml's CPU backend would repack the weight
    // (its extra buffer types, as llama.cpp's loader picks them), so cached experts run stock's
    // kernels; llama.cpp's --no-repack is repack = false
    void set_repack(bool on) { repack_ = on; }
    // registers [p, p + n) (read-only memory, such as a file's mapping) with the GPU so that
    // copies from it are DMA'd; held until this is destroyed. False with CUDA's reason in *err
    // where the device or build cannot (no patched CUDA backend, no read-only registration)
    bool pin(const void * p, size_t n, std::string * err);
    // the CPU extra buffer type that would run a mul_mat_id over t, or nullptr
    static ggml_backend_buffer_type_t repack_type_for(const ggml_tensor * t);

private:
    pool_kind kind_ = pool_kind::host;
    ggml_backend_dev_t dev_ = nullptr;
    ggml_backend_buffer_type_t buft_ = nullptr; // vram, mapped
    bool repack_ = true;
    std::vector<ggml_backend_buffer_t> buffers_;
    std::vector<std::pair<void *, size_t>> maps_; // anonymous mappings behind host pools
    void * pinned_ = nullptr;                     // pin()'s range, unpinned at destruction
    void (*unpin_)(void *) = nullptr;
};

} // namespace edgemoe
