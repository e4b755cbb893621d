// The plain decode baseline (baseline.hpp), compiled with the project's
// flags only, as a user's loop would be.
#include <algorithm>
#include <cmath>

#include "baseline.hpp"
#include "harness.hpp"

namespace lookback::bench {

void plain_decode(std::span<const float> q, std::span<const float> k,
                  std::span<const float> v, std::span<float> out, std::int64_t context,
                  std::int64_t heads, std::int64_t kv_heads, std::int64_t dim, int threads,
                  std::vector<std::vector<float>>& scores) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  const std::int64_t group = heads / kv_heads;
  const std::int64_t row = kv_heads * dim;  // floats between two tokens of one head
  auto run_heads = [&](int worker) {
    float* att = scores[static_cast<std::size_t>(worker)].data();
    for (std::int64_t h = worker; h < heads; h += threads) {
      const float* qh = q.data() + h * dim;
      const std::int64_t offset = (h / group) * dim;
      float max = -INFINITY;
      for (std::int64_t t = 0; t < context; ++t) {
        const float* kt = k.data() + t * row + offset;
        float dot = 0;
        for (std::int64_t d = 0; d < dim; ++d) dot += qh[d] * kt[d];
        att[t] = dot * scale;
        max = std::max(max, att[t]);
      }
      float sum = 0;
      for (std::int64_t t = 0; t < context; ++t) {
        att[t] = std::exp(att[t] - max);
        sum += att[t];
      }
      float* oh = out.data() + h * dim;
      std::fill(oh, oh + dim, 0.0f);
      for (std::int64_t t = 0; t < context; ++t) {
        const float* vt = v.data() + t * row + offset;
        const float p = att[t] / sum;
        for (std::int64_t d = 0; d < dim; ++d) oh[d] += p * vt[d];
      }
    }
  };
  on_threads(threads, run_heads);
}

}  // namespace lookback::bench
