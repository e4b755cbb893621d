#include "lookback/merge.hpp"

#include "kernels/online_softmax.hpp"

namespace lookback {

void merge_attention(float* acc_out, float* acc_lse, const float* other_out,
                     const float* other_lse, std::int64_t rows, std::int64_t dim) {
  for (std::int64_t row = 0; row < rows; ++row) {
    kernels::merge_normalized(acc_out + row * dim, acc_lse[row], other_out + row * dim,
                              other_lse[row], static_cast<std::size_t>(dim));
  }
}

}  // namespace lookback
