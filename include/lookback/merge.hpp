// Exact merging of partial attention results computed over disjoint key
// ranges (split-KV, cascade prefixes, and later ring attention across
// machines). A partial result of a row is its normalised output o and its
// natural-log LSE l; the empty result is (0, -inf). Merging (o1, l1) and
// (o2, l2) gives l = log(exp l1 + exp l2) and o = exp(l1 - l) o1 + exp(l2 - l) o2,
// computed without overflow; merging with an empty result changes nothing,
// and two empty results merge to the empty result (never NaN).
#pragma once

#include <cstdint>

namespace lookback {

// Merges `other` into `acc` row by row: acc_out, other_out are (rows, dim)
// contiguous; acc_lse, other_lse are (rows,).
void merge_attention(float* acc_out, float* acc_lse, const float* other_out,
                     const float* other_lse, std::int64_t rows, std::int64_t dim);

}  // namespace lookback
