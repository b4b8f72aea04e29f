#include "predictor.h"

#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <unistd.h>

namespace edgemoe {

namespace {

// a small tensor of the model file as f32
bool read_f32(int fd, const aux_tensor & t, std::vector<float> & out, std::string * err) {
    std::vector<uint8_t> raw(t.nbytes);
    size_t done = 0;
    while (done < raw.size()) {
        const ssize_t n = pread(fd, raw.data() + done, raw.size() - done, (off_t) (t.file_offset + done));
        if (n <= 0) {
            *err = "cannot read a router tensor of the model";
            return false;
        }
        done += (size_t) n;
    }
    const int64_t n = t.ne0*std::max<int64_t>(1, t.ne1);
    out.resize((size_t) n);
    if (t.type == GGML_TYPE_F32) {
        memcpy(out.data(), raw.data(), (size_t) n*sizeof(float));
        return true;
    }
    const ggml_type_traits * tr = ggml_get_type_traits(t.type);
    if (!tr || !tr->to_float) {
        *err = std::string("router tensors of type ") + ggml_type_name(t.type) + " cannot be read";
        return false;
    }
    tr->to_float(raw.data(), out.data(), n);
    return true;
}

} // namespace

bool lookahead_predictor::load(const model_layout & layout, int32_t depth, std::string * err) {
    depth_    = std::max<int32_t>(1, depth);
    n_expert_ = layout.n_expert;
    k_        = layout.n_expert_used;
    const int32_t n_blocks = (int32_t) layout.blocks.size();
    targets_.assign(n_blocks, target());
    ratio_.assign((size_t) n_blocks*depth_, std::vector<float>());

    const int fd = open(layout.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        *err = "cannot open " + layout.path;
        return false;
    }
    std::vector<std::vector<float>> norms(n_blocks);
    bool ok = true;
    int32_t n_gates = 0;
    for (int32_t b = 0; b < n_blocks && ok; ++b) {
        const moe_block & mb = layout.blocks[b];
        if (mb.gate_inp.present && mb.gate_inp.ne1 == n_expert_ && (n_embd_ == 0 || mb.gate_inp.ne0 == n_embd_)) {
            n_embd_ = mb.gate_inp.ne0;
            ok = read_f32(fd, mb.gate_inp, targets_[b].gate, err);
            n_gates += ok ? 1 : 0;
            if (ok && mb.probs_bias.present && mb.probs_bias.ne0 == n_expert_) {
                ok = read_f32(fd, mb.probs_bias, targets_[b].bias, err);
            }
        }
        if (ok && mb.ffn_norm.present && mb.ffn_norm.ne0 == n_embd_ && mb.ffn_norm.type == GGML_TYPE_F32) {
            ok = read_f32(fd, mb.ffn_norm, norms[b], err);
        }
    }
    close(fd);
    if (!ok) {
        return false;
    }
    if (n_gates < 2) {
        *err = "the model has no per-layer routers (ffn_gate_inp) to predict from";
        return false;
    }
    // the input of block b rescaled to block b+d's norm; a zero weight in b's norm leaves that
    // component at zero rather than infinite
    for (int32_t b = 0; b < n_blocks; ++b) {
        for (int32_t d = 1; d <= depth_ && b + d < n_blocks; ++d) {
            const auto & from = norms[b];
            const auto & to   = norms[b + d];
            if (from.empty() || to.empty()) {
                continue;
            }
            auto & r = ratio_[(size_t) b*depth_ + d - 1];
            r.resize((size_t) n_embd_);
            for (int64_t i = 0; i < n_embd_; ++i) {
                r[i] = std::fabs(from[i]) > 1e-12f ? to[i]/from[i] : 0.0f;
            }
        }
    }
    x_.resize((size_t) n_embd_);
    logits_.resize((size_t) n_expert_);
    order_.resize((size_t) n_expert_);
    ranked_.resize((size_t) MAX_ROWS*k_);
    seen_.assign((size_t) n_expert_, 0);
    return true;
}

bool lookahead_predictor::can_predict(int32_t b, int32_t d) const {
    return d >= 1 && d <= depth_ && b >= 0 && b + d < (int32_t) targets_.size() && !targets_[b + d].gate.empty();
}

void lookahead_predictor::predict(int32_t b, int32_t d, const float * rows, int64_t n_rows, size_t row_stride,
                                  std::vector<int32_t> & out) {
    if (!can_predict(b, d)) {
        return;
    }
    const target & t = targets_[b + d];
    const std::vector<float> & ratio = ratio_[(size_t) b*depth_ + d - 1];
    const size_t first_out = out.size();
    n_rows = std::min<int64_t>(n_rows, MAX_ROWS);
    for (int64_t r = 0; r < n_rows; ++r) {
        const float * h = (const float *) ((const char *) rows + (size_t) r*row_stride);
        const float * x = h;
        if (!ratio.empty()) {
            for (int64_t i = 0; i < n_embd_; ++i) {
                x_[i] = h[i]*ratio[i];
            }
            x = x_.data();
        }
        for (int32_t e = 0; e < n_expert_; ++e) {
            // eight partial sums let the compiler vectorise the dot product
            const float * w = t.gate.data() + (size_t) e*n_embd_;
            float acc[8] = { 0, 0, 0, 0, 0, 0, 0, 0 };
            int64_t i = 0;
            for (; i + 8 <= n_embd_; i += 8) {
                for (int j = 0; j < 8; ++j) {
                    acc[j] += w[i + j]*x[i + j];
                }
            }
            float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
            for (; i < n_embd_; ++i) {
                s += w[i]*x[i];
            }
            // softmax and plain gates rank by logit; a selection bias is added to sigmoid scores
            logits_[e] = t.bias.empty() ? s : 1.0f/(1.0f + std::exp(-s)) + t.bias[e];
        }
        for (int32_t e = 0; e < n_expert_; ++e) {
            order_[e] = e;
        }
        std::partial_sort(order_.begin(), order_.begin() + k_, order_.end(),
                          [&](int32_t a, int32_t c) { return logits_[a] > logits_[c] || (logits_[a] == logits_[c] && a < c); });
        std::copy(order_.begin(), order_.begin() + k_, ranked_.begin() + (size_t) r*k_);
    }
    for (int32_t j = 0; j < k_; ++j) {
        for (int64_t r = 0; r < n_rows; ++r) {
            const int32_t e = ranked_[(size_t) r*k_ + j];
            if (!seen_[e]) {
                seen_[e] = 1;
                out.push_back(e);
            }
        }
    }
    for (size_t i = first_out; i < out.size(); ++i) {
        seen_[out[i]] = 0;
    }
}

} // namespace edgemoe
