// The materialised prefill baseline (baseline.hpp). Compiled with -O3
// -ffast-math and cloned for AVX-512 / AVX2 so that the softmax loop
// vectorises (glibc's vector expf), as a competent user's would; a scalar
// softmax would flatter lookback.
#include "baseline.hpp"

#include <cmath>

#include "harness.hpp"
#include "openblas.hpp"

namespace lookback::bench {

namespace {

__attribute__((target_clones("avx512f", "avx2", "default"))) void causal_softmax_rows(
    float* scores, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) {
    float* row = scores + i * n;
    for (std::int64_t j = i + 1; j < n; ++j) row[j] = -INFINITY;
    float max = -INFINITY;
    for (std::int64_t j = 0; j < n; ++j) max = row[j] > max ? row[j] : max;
    float sum = 0;
    for (std::int64_t j = 0; j < n; ++j) {
      row[j] = expf(row[j] - max);
      sum += row[j];
    }
    const float inv = 1.0f / sum;
    for (std::int64_t j = 0; j < n; ++j) row[j] *= inv;
  }
}

}  // namespace

void materialised_attention(std::span<const float> q, std::span<const float> k,
                            std::span<const float> v, std::span<float> out, std::int64_t n,
                            std::int64_t heads, std::int64_t kv_heads, std::int64_t dim,
                            int threads, std::vector<std::vector<float>>& scores) {
  const auto sgemm = openblas().sgemm;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  const std::int64_t group = heads / kv_heads;
  auto run_heads = [&](int worker) {
    std::vector<float>& s = scores[static_cast<std::size_t>(worker)];
    for (std::int64_t h = worker; h < heads; h += threads) {
      const float* qh = q.data() + h * dim;
      const float* kh = k.data() + (h / group) * dim;
      const float* vh = v.data() + (h / group) * dim;
      sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(n), static_cast<int>(n),
            static_cast<int>(dim), scale, qh, static_cast<int>(heads * dim), kh,
            static_cast<int>(kv_heads * dim), 0.0f, s.data(), static_cast<int>(n));
      causal_softmax_rows(s.data(), n);
      sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(n), static_cast<int>(dim),
            static_cast<int>(n), 1.0f, s.data(), static_cast<int>(n), vh,
            static_cast<int>(kv_heads * dim), 0.0f, out.data() + h * dim,
            static_cast<int>(heads * dim));
    }
  };
  on_threads(threads, run_heads);
}

}  // namespace lookback::bench
