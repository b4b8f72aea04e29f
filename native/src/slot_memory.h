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

// One I/O thread's way to a VRAM slot: a pinned staging buffer that reads land in, and a
// backend of its own (its own stream), so uploads overlap compute and each other.
class uploader {
public:
    ~uploader();
    static std::unique_ptr<uploader> create(ggml_backend_dev_t dev, size_t staging_bytes, std::string * err);

    uint8_t * staging() const { return staging_; }
    // queues a copy of staging()[src_offset, +size) into t at dst_offset
    void upload(ggml_tensor * t, size_t dst_offset, size_t src_offset, size_t size);
    void wait(); // every queued upload is done

private:
    uploader() = default;
    ggml_backend_t backend_ = nullptr;
    ggml_backend_buffer_t staging_buf_ = nullptr; // pinned where the device has a host buffer type
    void * staging_own_ = nullptr;                // else aligned pageable memory
    uint8_t * staging_ = nullptr;
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
    // address, or nullptr for VRAM
    bool alloc(ggml_tensor * t, uint8_t ** host, std::string * err);

private:
    pool_kind kind_ = pool_kind::host;
    ggml_backend_dev_t dev_ = nullptr;
    ggml_backend_buffer_type_t buft_ = nullptr; // vram, mapped
    std::vector<ggml_backend_buffer_t> buffers_;
    std::vector<std::pair<void *, size_t>> maps_; // anonymous mappings behind host pools
};

} // namespace edgemoe
