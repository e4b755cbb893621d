// The float64 oracle for DESIGN.md §3: one query row at a time, every key
// checked against the mask, a two-pass softmax. No tiling, no SIMD, no
// threads: slow and obviously right.
#include "lookback/reference.hpp"

#include <cmath>
#include <limits>

#include "lookback/mask.hpp"

namespace lookback {

ReferenceResult reference_attention(const AttentionParams& params) {
  const AttentionShape shape = validate(params);
  const std::int64_t batch = shape.batch, seqlen_q = shape.seqlen_q,
                     seqlen_k = shape.seqlen_k, heads = shape.heads,
                     head_dim = shape.head_dim;
  const std::int64_t group = heads / shape.kv_heads;  // query heads per kv head
  const double scale = params.scale ? static_cast<double>(*params.scale)
                                    : 1.0 / std::sqrt(static_cast<double>(head_dim));
  const double softcap = params.softcap;
  const Mask mask(seqlen_q, seqlen_k, params.mask);
  const double minus_inf = -std::numeric_limits<double>::infinity();

  ReferenceResult result;
  result.shape = shape;
  result.out.assign(static_cast<std::size_t>(batch * seqlen_q * heads * head_dim), 0.0);
  result.lse.assign(static_cast<std::size_t>(batch * heads * seqlen_q), minus_inf);

  auto q_at = [&](std::int64_t b, std::int64_t i, std::int64_t h, std::int64_t e) {
    return load_as_double(params.q.data, params.q.dtype, params.q.offset(b, i, h, e));
  };
  auto k_at = [&](std::int64_t b, std::int64_t j, std::int64_t h, std::int64_t e) {
    return load_as_double(params.k.data, params.k.dtype, params.k.offset(b, j, h, e));
  };
  auto v_at = [&](std::int64_t b, std::int64_t j, std::int64_t h, std::int64_t e) {
    return load_as_double(params.v.data, params.v.dtype, params.v.offset(b, j, h, e));
  };

  std::vector<double> scores(static_cast<std::size_t>(seqlen_k));
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t h = 0; h < heads; ++h) {
      const std::int64_t kv_head = h / group;
      const double slope =
          params.maybe_alibi_slopes != nullptr ? params.maybe_alibi_slopes[h] : 0.0;
      for (std::int64_t i = 0; i < seqlen_q; ++i) {
        double row_max = minus_inf;
        bool nan_seen = false;
        for (std::int64_t j = 0; j < seqlen_k; ++j) {
          if (!mask.visible(i, j)) continue;
          double dot = 0.0;
          for (std::int64_t e = 0; e < head_dim; ++e) dot += q_at(b, i, h, e) * k_at(b, j, kv_head, e);
          double score = scale * dot;
          if (softcap > 0.0) score = softcap * std::tanh(score / softcap);
          score -= slope * std::fabs(static_cast<double>(mask.position(i) - j));
          scores[static_cast<std::size_t>(j)] = score;
          nan_seen = nan_seen || std::isnan(score);
          row_max = std::fmax(row_max, score);
        }
        double* out = &result.out[static_cast<std::size_t>(((b * seqlen_q + i) * heads + h) * head_dim)];
        double& lse = result.lse[static_cast<std::size_t>((b * heads + h) * seqlen_q + i)];
        if (nan_seen) {  // a NaN score poisons its row, never vanishes
          for (std::int64_t e = 0; e < head_dim; ++e) out[e] = std::nan("");
          lse = std::nan("");
          continue;
        }
        // A learned sink logit joins the denominator only (no value).
        const bool has_sink = params.maybe_sink_logits != nullptr;
        const double sink = has_sink ? params.maybe_sink_logits[h] : minus_inf;
        if (row_max == minus_inf) {  // no visible key: zeros, lse = -inf (or the sink)
          if (has_sink) lse = sink;
          continue;
        }
        const double shift = std::fmax(row_max, sink);
        double sum = has_sink ? std::exp(sink - shift) : 0.0;
        for (std::int64_t j = 0; j < seqlen_k; ++j) {
          if (mask.visible(i, j)) sum += std::exp(scores[static_cast<std::size_t>(j)] - shift);
        }
        for (std::int64_t j = 0; j < seqlen_k; ++j) {
          if (!mask.visible(i, j)) continue;
          const double weight = std::exp(scores[static_cast<std::size_t>(j)] - shift) / sum;
          for (std::int64_t e = 0; e < head_dim; ++e) out[e] += weight * v_at(b, j, kv_head, e);
        }
        lse = shift + std::log(sum);
      }
    }
  }
  return result;
}

}  // namespace lookback
