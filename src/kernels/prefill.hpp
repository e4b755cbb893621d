// Causal prefill, FlashAttention-2 style: query tiles against streamed key
// tiles with an online softmax, never materialising the score matrix.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "lookback/attention.hpp"
#include "lookback/context.hpp"

namespace lookback::kernels {

// Everything a prefill kernel needs, already validated by lookback::validate;
// kernels trust it.
struct PrefillParams {
  TensorView q;  // (batch, seqlen_q, heads, head_dim)
  TensorView k;  // (batch, seqlen_k, kv_heads, head_dim)
  TensorView v;  // (batch, seqlen_k, kv_heads, head_dim)
  MutableTensorView out;        // (batch, seqlen_q, heads, head_dim), f32
  MutableTensorView maybe_lse;  // (batch, heads, seqlen_q), f32; optional
  const float* maybe_alibi_slopes = nullptr;  // (heads,); optional
  AttentionShape shape;
  float scale = 1.0f;
  float softcap = 0.0f;  // 0 disables
  MaskSpec mask;
  DType storage = DType::kF32;
  // Only keys in this range take part (split-KV: one part of the key range;
  // rows with no key in it get zeros and LSE -inf, to be merged).
  KeyRange keys{0, INT64_MAX};
  // Set by prefill(): bf16 storage on a CPU with AMX-BF16 (granted by the OS),
  // the AVX-512 target dispatched and head_dim padded to a multiple of 32:
  // Q K^T and P V run on the AMX tiles.
  bool amx_tiles = false;
};

void prefill(const PrefillParams& params, Context& context);

// Name of the Highway target HWY_DYNAMIC_DISPATCH picks on this CPU.
std::string dispatched_target_name();

// Whether this CPU has AMX-BF16, Linux granted the tile state, and
// LOOKBACK_DISABLE_AMX is not set in the environment.
bool amx_supported();

std::vector<std::string> available_targets();
// Applies LOOKBACK_SIMD (a cap on the dispatched target) once, before the
// first dispatch; throws lookback::Error for an unknown name.
void apply_simd_policy();
void force_target(std::string_view name);

}  // namespace lookback::kernels
