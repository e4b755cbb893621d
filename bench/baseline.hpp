// The materialised baseline: what a user writes by hand with a BLAS. Per
// head: S = scale * Q K^T (cblas_sgemm), mask the future with -inf, softmax
// each full row, O = P V (cblas_sgemm). Heads are split across threads, one
// OpenBLAS thread each. Computes the whole n x n square.
#pragma once

#include <cstdint>
#include <vector>

namespace lookback::bench {

void materialised_attention(const std::vector<float>& q, const std::vector<float>& k,
                            const std::vector<float>& v, std::vector<float>& out, std::int64_t n,
                            std::int64_t heads, std::int64_t kv_heads, std::int64_t dim,
                            int threads, std::vector<std::vector<float>>& scores);

}  // namespace lookback::bench
