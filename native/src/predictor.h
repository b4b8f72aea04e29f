// The lookahead predictor for layer-wise MoE models: the experts of block b+d predicted from
// block b's MoE input, by applying block b+d's own router to it (the approach of
// mixtral-offloading, ProMoE and colibri's lookahead). The residual stream changes little from
// one layer to the next, so the later router ranks experts nearly as it will; the input is
// rescaled from block b's FFN norm weights to block b+d's, which is exact where the residual
// stream is unchanged.
#pragma once

#include "model_layout.h"

#include <cstdint>
#include <string>
#include <vector>

namespace edgemoe {

class lookahead_predictor {
public:
    static constexpr int64_t MAX_ROWS = 8; // rows predicted per call; later rows are ignored

    // Reads every MoE block's router (and norm weights) from the model file. False with a
    // one-line reason when the model lacks what prediction needs.
    bool load(const model_layout & layout, int32_t depth, std::string * err);

    int32_t depth() const { return depth_; }
    int64_t n_embd() const { return n_embd_; }
    // block b can predict block b + d
    bool can_predict(int32_t b, int32_t d) const;

    // Appends to out the experts block b + d is predicted to use for n_rows input rows of block
    // b (f32 [n_embd], row_stride bytes apart): each row's top-k, without repeats, rank by rank
    // (every row's most likely expert first).
    void predict(int32_t b, int32_t d, const float * rows, int64_t n_rows, size_t row_stride,
                 std::vector<int32_t> & out);

private:
    struct target {
        std::vector<float> gate;  // [n_expert][n_embd]; empty: this block cannot be predicted
        std::vector<float> bias;  // [n_expert] selection bias (sigmoid routers), or empty
    };

    int32_t depth_    = 0;
    int64_t n_embd_   = 0;
    int32_t n_expert_ = 0;
    int32_t k_        = 0;
    std::vector<target> targets_;              // per block
    std::vector<std::vector<float>> ratio_;    // [b*depth + d-1]: norm_{b+d} / norm_b, empty: 1
    // scratch, sized once
    std::vector<float>   x_, logits_;
    std::vector<int32_t> order_;
    std::vector<int32_t> ranked_;   // [row][k] for up to MAX_ROWS rows
    std::vector<uint8_t> seen_;
};

} // namespace edgemoe
