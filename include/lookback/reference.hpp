// The float64 oracle: naive, obviously right, no SIMD, no threads. Every fast
// path is tested against it.
#pragma once

#include <cstdint>
#include <vector>

#include "lookback/attention.hpp"

namespace lookback {

struct ReferenceResult {
  AttentionShape shape;
  std::vector<double> out;  // (batch, seqlen_q, heads, head_dim), contiguous
  std::vector<double> lse;  // (batch, heads, seqlen_q), contiguous; -inf for empty rows
};

// Computes DESIGN.md §3 in double precision from the inputs as given (their
// dtype converted to double; params.out, params.maybe_lse and params.storage
// are ignored). Validates like lookback::attend.
ReferenceResult reference_attention(const AttentionParams& params);

}  // namespace lookback
