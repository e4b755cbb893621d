// The shape of one attention problem and the head_dim limit: the core
// vocabulary that the public API, the kernels and the caches share.
#pragma once

#include <cstdint>

namespace lookback {

// The largest head_dim any path accepts.
inline constexpr std::int64_t kMaxHeadDim = 256;

// Shapes read off validated attention inputs (DESIGN.md §1).
struct AttentionShape {
  std::int64_t batch = 0;
  std::int64_t seqlen_q = 0;
  std::int64_t seqlen_k = 0;
  std::int64_t heads = 0;
  std::int64_t kv_heads = 0;
  std::int64_t head_dim = 0;
};

}  // namespace lookback
