// The online-softmax state of one query row (FlashAttention-2; FlashInfer's
// state.cuh): running max, running sum of exp(score - max), and the output
// accumulator that the caller keeps beside it. The empty state is
// (max = -inf, sum = 0, acc = 0); merging two empty states gives the empty
// state, never NaN. Prefill, decode and split-KV all go through it.
#pragma once

#include <cmath>
#include <cstddef>
#include <limits>

namespace lookback::kernels {

inline constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

struct OnlineSoftmaxState {
  float max = kMinusInf;  // largest score folded in so far
  float sum = 0.0f;       // sum of exp(score - max) over those scores

  bool empty() const noexcept { return sum == 0.0f; }

  // Raises the running max to cover a tile whose largest visible score is
  // tile_max, rescaling `sum`. Returns the factor alpha by which the caller
  // must scale its accumulator (1 when the max does not move, 0 when the state
  // was empty).
  float update_max(float tile_max) noexcept {
    if (!(tile_max > max)) return 1.0f;
    const float alpha = max == kMinusInf ? 0.0f : std::exp(max - tile_max);
    max = tile_max;
    sum *= alpha;
    return alpha;
  }

  // Adds sum_j exp(score_j - max) of a tile, after update_max.
  void update_sum(float tile_sum) noexcept { sum += tile_sum; }

  // Scale that turns the accumulator into the output row: 1 / sum, or 0 for
  // an empty row (its output is zeros, never NaN).
  float normalizer() const noexcept { return empty() ? 0.0f : 1.0f / sum; }

  // Natural-log sum-exp of every score folded in; -inf for an empty row.
  float lse() const noexcept { return empty() ? kMinusInf : max + std::log(sum); }

  // Merges another state into this one; acc and other_acc (length `dim`) are
  // the unnormalised accumulators that go with each state.
  void merge(const OnlineSoftmaxState& other, float* acc, const float* other_acc,
             std::size_t dim) noexcept {
    if (other.empty()) return;
    if (empty()) {
      *this = other;
      for (std::size_t e = 0; e < dim; ++e) acc[e] = other_acc[e];
      return;
    }
    const float new_max = max > other.max ? max : other.max;
    const float self_scale = std::exp(max - new_max);
    const float other_scale = std::exp(other.max - new_max);
    for (std::size_t e = 0; e < dim; ++e) {
      acc[e] = acc[e] * self_scale + other_acc[e] * other_scale;
    }
    sum = sum * self_scale + other.sum * other_scale;
    max = new_max;
  }
};

// The LSE of a row with a learned sink logit (gpt-oss) added to its
// denominator: log(e^lse + e^sink), exactly `sink` for an empty row (lse =
// -inf). A normalised output row is then scaled by exp(lse - result), which
// is 0 for an empty row. Added once per row, after every key part is merged.
inline float lse_with_sink(float lse, float sink) noexcept {
  if (lse == kMinusInf) return sink;
  const float high = lse > sink ? lse : sink;
  const float low = lse > sink ? sink : lse;
  return high + std::log1p(std::exp(low - high));
}

// Adds a sink logit to a normalised row (out, lse) of `dim` values.
inline void add_sink(float* out, float& lse, float sink, std::size_t dim) noexcept {
  const float merged = lse_with_sink(lse, sink);
  const float factor = std::exp(lse - merged);
  for (std::size_t e = 0; e < dim; ++e) out[e] *= factor;
  lse = merged;
}

// Merges a normalised partial result (other_out, other_lse) into (out, lse),
// both over `dim` values: the states (lse, sum 1, acc = out) merged exactly.
// An empty partial (lse = -inf) changes nothing.
inline void merge_normalized(float* out, float& lse, const float* other_out, float other_lse,
                             std::size_t dim) noexcept {
  OnlineSoftmaxState self{lse, lse == kMinusInf ? 0.0f : 1.0f};
  const OnlineSoftmaxState other{other_lse, other_lse == kMinusInf ? 0.0f : 1.0f};
  self.merge(other, out, other_out, dim);
  const float normalizer = self.normalizer();
  for (std::size_t e = 0; e < dim; ++e) out[e] *= normalizer;
  lse = self.lse();
}

}  // namespace lookback::kernels
