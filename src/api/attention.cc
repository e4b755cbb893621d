// The public attention entry point: validate once, then hand a trusted params
// struct to the kernels.
#include "lookback/attention.hpp"

#include <fmt/format.h>

#include <cmath>

#include "core/quant.hpp"
#include "kernels/dispatch.hpp"
#include "kernels/prefill.hpp"
#include "lookback/error.hpp"
#include "lookback/modes.hpp"

namespace lookback {

namespace {

bool is_input_dtype(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16 ||
         dtype == DType::kF64;
}

void validate_outputs(const AttentionParams& params, const AttentionShape& shape);
void validate_scores(const AttentionParams& params, const AttentionShape& shape);

}  // namespace

AttentionShape validate_shapes(const AttentionParams& params) {
  validate_view_layout(params.q, 4, "q");
  validate_view_layout(params.k, 4, "k");
  validate_view_layout(params.v, 4, "v");
  for (const auto& [view, name] : {std::pair{&params.q, "q"}, std::pair{&params.k, "k"},
                                   std::pair{&params.v, "v"}}) {
    if (!is_input_dtype(view->dtype)) {
      throw Error(fmt::format("{}: dtype {} (expected f32, f16, bf16 or f64)", name,
                              dtype_name(view->dtype)));
    }
  }
  AttentionShape shape;
  shape.batch = params.q.shape[0];
  shape.seqlen_q = params.q.shape[1];
  shape.heads = params.q.shape[2];
  shape.head_dim = params.q.shape[3];
  shape.seqlen_k = params.k.shape[1];
  shape.kv_heads = params.k.shape[2];

  if (shape.head_dim < 1 || shape.head_dim > kMaxHeadDim) {
    throw Error(fmt::format("q: head_dim {} (expected 1 to {})", shape.head_dim, kMaxHeadDim));
  }
  if (params.k.shape[0] != shape.batch) {
    throw Error(fmt::format("k: batch {} (expected {}, the batch of q)", params.k.shape[0],
                            shape.batch));
  }
  if (params.k.shape[3] != shape.head_dim) {
    throw Error(fmt::format("k: head_dim {} (expected {}, the head_dim of q)", params.k.shape[3],
                            shape.head_dim));
  }
  if (params.v.shape != params.k.shape) {
    throw Error(fmt::format("v: shape {} (expected {}, the shape of k)", shape_string(params.v),
                            shape_string(params.k)));
  }
  if (shape.heads < 1) throw Error(fmt::format("q: heads {} (expected >= 1)", shape.heads));
  if (shape.kv_heads < 1) throw Error(fmt::format("k: kv_heads {} (expected >= 1)", shape.kv_heads));
  if (shape.heads % shape.kv_heads != 0) {
    throw Error(fmt::format("k: kv_heads {} does not divide heads {} (expected a divisor of heads)",
                            shape.kv_heads, shape.heads));
  }

  validate_scores(params, shape);
  Mask(shape.seqlen_q, shape.seqlen_k, params.mask);  // validates the window
  return shape;
}

AttentionShape validate(const AttentionParams& params) {
  validate_view(params.q, 4, "q");
  validate_view(params.k, 4, "k");
  validate_view(params.v, 4, "v");
  const AttentionShape shape = validate_shapes(params);
  validate_outputs(params, shape);
  return shape;
}

namespace {

void validate_outputs(const AttentionParams& params, const AttentionShape& shape) {
  validate_view(params.out, 4, "out");
  if (params.out.dtype != DType::kF32) {
    throw Error(fmt::format("out: dtype {} (expected f32)", dtype_name(params.out.dtype)));
  }
  if (params.out.shape != params.q.shape) {
    throw Error(fmt::format("out: shape {} (expected {}, the shape of q)",
                            shape_string(params.out), shape_string(params.q)));
  }
  if (!params.maybe_lse.empty()) {
    validate_view(params.maybe_lse, 3, "lse");
    if (params.maybe_lse.dtype != DType::kF32) {
      throw Error(fmt::format("lse: dtype {} (expected f32)", dtype_name(params.maybe_lse.dtype)));
    }
    const std::array<std::int64_t, kMaxRank> expected{shape.batch, shape.heads, shape.seqlen_q, 0};
    if (params.maybe_lse.shape != expected) {
      throw Error(fmt::format("lse: shape {} (expected ({}, {}, {}) = (batch, heads, seqlen_q))",
                              shape_string(params.maybe_lse), shape.batch, shape.heads,
                              shape.seqlen_q));
    }
  }
}

void validate_scores(const AttentionParams& params, const AttentionShape& shape) {
  if (params.scale && !std::isfinite(*params.scale)) {
    throw Error(fmt::format("scale: {} (expected a finite number)", *params.scale));
  }
  if (!(params.softcap >= 0.0f) || !std::isfinite(params.softcap)) {
    throw Error(fmt::format("softcap: {} (expected a finite number >= 0; 0 disables it)",
                            params.softcap));
  }
  if (params.maybe_alibi_slopes != nullptr) {
    for (std::int64_t h = 0; h < shape.heads; ++h) {
      if (!std::isfinite(params.maybe_alibi_slopes[h])) {
        throw Error(fmt::format("alibi_slopes: slope {} of head {} (expected finite)",
                                params.maybe_alibi_slopes[h], h));
      }
    }
  }
  if (params.maybe_sink_logits != nullptr) {
    for (std::int64_t h = 0; h < shape.heads; ++h) {
      if (!std::isfinite(params.maybe_sink_logits[h])) {
        throw Error(fmt::format("sink_logits: logit {} of head {} (expected finite)",
                                params.maybe_sink_logits[h], h));
      }
    }
  }
  if (params.storage != DType::kF32 && params.storage != DType::kF16 &&
      params.storage != DType::kBF16 && !is_quantized(params.storage)) {
    throw Error(fmt::format("storage: {} (expected f32, f16, bf16, int8, fp8e4m3 or fp8e5m2)",
                            dtype_name(params.storage)));
  }
}

}  // namespace

void attend(const AttentionParams& params, Context& context) {
  const AttentionShape shape = validate(params);
  // Sink tokens make a row's keys two ranges; the kernels see one. The split
  // path runs them as two key parts merged exactly through their LSEs.
  if (Mask(shape.seqlen_q, shape.seqlen_k, params.mask).effective_sink_tokens() > 0) {
    attend_with_mode(params, {.mode = Mode::kSplit, .splits = 1}, context);
    return;
  }
  MaskSpec mask = params.mask;
  mask.sink_tokens = 0;  // none that matter (effective_sink_tokens() is 0)
  kernels::PrefillParams prefill{
      .q = params.q,
      .k = params.k,
      .v = params.v,
      .out = params.out,
      .maybe_lse = params.maybe_lse,
      .maybe_alibi_slopes = params.maybe_alibi_slopes,
      .maybe_sink_logits = params.maybe_sink_logits,
      .shape = shape,
      .scale = params.scale.value_or(1.0f / std::sqrt(static_cast<float>(shape.head_dim))),
      .softcap = params.softcap,
      .mask = mask,
      .storage = params.storage,
  };
  kernels::prefill(prefill, context);
}

std::string simd_target_name() { return kernel_caps().target; }

std::vector<std::string> simd_targets() { return kernel_caps().targets; }

std::string describe_kernels() {
  const KernelCaps caps = kernel_caps();
  return caps.target + " (Highway target; LOOKBACK_SIMD caps it); bf16 prefill " +
         (caps.amx_prefill        ? "on AMX tiles (LOOKBACK_DISABLE_AMX turns them off)"
          : caps.bf16_dot_prefill ? "by AVX512-BF16 dot products"
                                  : "as f32 FMA on bf16-rounded values") +
         "; bf16 decode " + (caps.bf16_decode_dots ? "by AVX512-BF16 dot products" : "as f32 FMA");
}

void force_simd_target(std::string_view name) { kernels::force_target(name); }

}  // namespace lookback
