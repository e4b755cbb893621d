// The baselines: what a user writes by hand, the figures lookback is
// compared with in `lookback bench` and prefill_bench.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace lookback::bench {

// Prefill, materialised, with a BLAS: per head, S = scale * Q K^T
// (cblas_sgemm), mask the future with -inf, softmax each full row, O = P V
// (cblas_sgemm). Heads are split across threads, one OpenBLAS thread each
// (OpenBLAS is loaded on first use: openblas.hpp). Computes the whole n x n
// square. `scores` holds one n x n buffer per thread.
void materialised_attention(std::span<const float> q,  // (n, heads, head_dim)
                            std::span<const float> k,  // (n, kv_heads, head_dim)
                            std::span<const float> v,  // (n, kv_heads, head_dim)
                            std::span<float> out,      // (n, heads, head_dim)
                            std::int64_t n, std::int64_t heads, std::int64_t kv_heads,
                            std::int64_t dim, int threads,
                            std::vector<std::vector<float>>& scores);  // (threads, n * n)

// Decode of one token, the loop a user writes by hand (llama2.c's shape):
// the cache is token-major, (context, kv_heads, head_dim) f32; per query
// head, a dot product with every cached key, a softmax, a weighted sum of the
// values. Heads are split across threads. Plain C++ compiled with the
// project's flags: no intrinsics, no Highway, no -ffast-math.
void plain_decode(std::span<const float> q,  // (heads, head_dim)
                  std::span<const float> k,  // (>= context, kv_heads, head_dim)
                  std::span<const float> v,  // (>= context, kv_heads, head_dim)
                  std::span<float> out,      // (heads, head_dim)
                  std::int64_t context, std::int64_t heads, std::int64_t kv_heads,
                  std::int64_t dim, int threads,
                  std::vector<std::vector<float>>& scores);  // (threads, context)

}  // namespace lookback::bench
