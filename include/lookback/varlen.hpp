// Variable-length packed batches (FlashAttention's varlen): sequences of
// different lengths packed end to end along one token axis, with offsets
// cu_seqlens_q and cu_seqlens_k of length batch + 1, ascending from 0 to the
// totals. Sequence b is q[cu_q[b] : cu_q[b+1]] against k, v[cu_k[b] :
// cu_k[b+1]], masked as a sequence of its own (bottom-right by default,
// window and all; docs/semantics.md §10).
//
//   q        (total_q, heads, head_dim)
//   k, v     (total_k, kv_heads, head_dim)
//   out      (total_q, heads, head_dim)  float32
//   lse      (heads, total_q)            float32, natural log
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "lookback/context.hpp"
#include "lookback/dtype.hpp"
#include "lookback/mask.hpp"
#include "lookback/shape.hpp"
#include "lookback/tensor.hpp"

namespace lookback {

struct VarlenParams {
  TensorView q;  // (total_q, heads, head_dim); f32, f16, bf16 or f64
  TensorView k;  // (total_k, kv_heads, head_dim)
  TensorView v;  // (total_k, kv_heads, head_dim)
  TensorView cu_seqlens_q;  // (batch + 1,), i32 or i64: 0, ..., total_q
  TensorView cu_seqlens_k;  // (batch + 1,), i32 or i64: 0, ..., total_k
  MutableTensorView out;        // (total_q, heads, head_dim), f32
  MutableTensorView maybe_lse;  // (heads, total_q), f32; optional

  const float* maybe_alibi_slopes = nullptr;  // (heads,); optional
  const float* maybe_sink_logits = nullptr;   // (heads,), finite; optional
  std::optional<float> scale;  // default 1 / sqrt(head_dim)
  float softcap = 0.0f;
  MaskSpec mask;  // applied to each sequence on its own
  DType storage = DType::kF32;
};

// The packed batch as validated: per-sequence offsets and the shared shape
// (batch = sequences; seqlen_q and seqlen_k are the totals).
struct VarlenShape {
  AttentionShape totals;
  std::vector<std::int64_t> cu_q;  // (batch + 1,)
  std::vector<std::int64_t> cu_k;  // (batch + 1,)
};

// Checks every argument, the offsets included (rank 1, i32 or i64, the same
// length >= 2 for q and k, starting at 0, never decreasing, ending at the
// totals; sequences may be empty). Throws lookback::Error naming the
// argument. The checks that need no data beyond the offsets:
// validate_varlen_shapes (q, k and v may have null data; out and lse are
// not checked).
VarlenShape validate_varlen(const VarlenParams& params);
VarlenShape validate_varlen_shapes(const VarlenParams& params);

// Attention over every sequence of the packed batch: equal, row for row, to
// running each sequence alone through lookback::attend. Bitwise identical for
// any thread count.
void attend_varlen(const VarlenParams& params, Context& context);

}  // namespace lookback
