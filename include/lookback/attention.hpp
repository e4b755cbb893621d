// Causal attention in one call. Layout (FlashAttention's, DESIGN.md §1):
//   q   (batch, seqlen_q, heads,    head_dim)
//   k,v (batch, seqlen_k, kv_heads, head_dim)
//   out (batch, seqlen_q, heads,    head_dim)  float32
//   lse (batch, heads, seqlen_q)               float32, natural log
// Scores (DESIGN.md §3):
//   s_ij = scale * dot(q_i, k_j); softcap c > 0: s_ij = c * tanh(s_ij / c);
//   ALiBi slope m_h: s_ij += -m_h * |p(i) - j|; masked by lookback::Mask.
// Learned sink logits (gpt-oss), one per query head, join the softmax
// denominator only: o_i = sum_j e^s_ij v_j / (e^sink_h + sum_j e^s_ij),
// lse_i = log(e^sink_h + sum_j e^s_ij).
// A row with no visible key outputs zeros and lse = -inf (sink_h with a
// sink), never NaN.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "lookback/context.hpp"
#include "lookback/dtype.hpp"
#include "lookback/kernel_caps.hpp"
#include "lookback/mask.hpp"
#include "lookback/shape.hpp"
#include "lookback/tensor.hpp"

namespace lookback {

struct AttentionParams {
  TensorView q;  // (batch, seqlen_q, heads, head_dim); f32, f16, bf16 or f64
  TensorView k;  // (batch, seqlen_k, kv_heads, head_dim)
  TensorView v;  // (batch, seqlen_k, kv_heads, head_dim)
  MutableTensorView out;  // (batch, seqlen_q, heads, head_dim), f32

  MutableTensorView maybe_lse;           // (batch, heads, seqlen_q), f32; optional
  const float* maybe_alibi_slopes = nullptr;  // (heads,); optional
  const float* maybe_sink_logits = nullptr;   // (heads,), finite; optional

  std::optional<float> scale;  // default 1 / sqrt(head_dim)
  float softcap = 0.0f;        // 0 disables; must be >= 0
  MaskSpec mask;
  DType storage = DType::kF32;  // what the kernel holds Q/K/V in
};

// Checks every argument (ranks, shapes, dtypes, head counts, head_dim limits,
// softcap, window, slopes) and returns the shape. Throws lookback::Error whose
// message names the argument and the expected value.
AttentionShape validate(const AttentionParams& params);

// The checks of validate() that need no data, for inputs described before
// they are read (e.g. from .npy headers, lookback::read_npy_header), so that
// a bad shape fails before gigabytes are read: q, k and v may have null data;
// out and maybe_lse are not checked (they are usually allocated from the
// shape this returns); slopes are checked when given.
AttentionShape validate_shapes(const AttentionParams& params);

// Prefill: all of Q against all of K/V in one call, on the fastest SIMD path
// this CPU supports, spread over the context's threads. Output is bitwise
// identical for any thread count.
void attend(const AttentionParams& params, Context& context);

// The SIMD target the kernels dispatch to on this CPU, e.g. "AVX3".
std::string simd_target_name();

// One line naming the paths the kernels take on this CPU, e.g.
// "AVX3 (Highway target); bf16 prefill on AMX tiles".
std::string describe_kernels();

// The SIMD targets lookback was built for that this CPU can run, best first,
// e.g. {"AVX3", "AVX2", "SSE4", "EMU128"}.
std::vector<std::string> simd_targets();

// Restricts dispatch to one of simd_targets(), so that every path can be
// tested and compared on one machine; "" restores the best. Process-wide: call
// it while no attention call is running.
void force_simd_target(std::string_view name);

}  // namespace lookback
