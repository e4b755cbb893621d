// The per-row online-softmax step shared by the prefill and decode kernels:
// scores of one row of a key tile -> probabilities, in place.
//
// Per-target: included from kernel .cc files after hwy/highway.h, inside their
// foreach_target loop.

#if defined(LOOKBACK_KERNELS_SOFTMAX_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOOKBACK_KERNELS_SOFTMAX_INL_H_
#undef LOOKBACK_KERNELS_SOFTMAX_INL_H_
#else
#define LOOKBACK_KERNELS_SOFTMAX_INL_H_
#endif

#include <cstdint>
#include <limits>

#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "kernels/online_softmax.hpp"
#include "kernels/tiles.hpp"

HWY_BEFORE_NAMESPACE();
namespace lookback::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// The visible keys of one row inside the current key tile, in tile-local
// columns [begin, end).
struct LocalRange {
  std::int64_t begin = 0;
  std::int64_t end = 0;
  bool empty() const { return end <= begin; }
};

// Scores of one row -> probabilities. Multiplies the scores by score_scale,
// applies softcap and ALiBi, hides columns outside `range` (only when
// kMasked), updates the row state. The probabilities replace the scores, or
// go to p_bf16 rounded to bf16 (nearest even) when it is given. Returns
// alpha, the factor for the row's accumulator.
template <bool kMasked>
HWY_INLINE float SoftmaxRow(float* HWY_RESTRICT scores, LocalRange range, float softcap,
                            float alibi_slope, float position, float first_key,
                            OnlineSoftmaxState& state, float score_scale = 1.0f,
                            std::uint16_t* HWY_RESTRICT p_bf16 = nullptr) {
  const hn::ScalableTag<float> d;
  using V = hn::Vec<decltype(d)>;
  const std::int64_t lanes = static_cast<std::int64_t>(hn::Lanes(d));
  const V minus_inf = hn::Set(d, kMinusInf);
  const V lane_index = hn::Iota(d, 0.0f);
  // Full tiles cover whole vectors [range.begin, range.end) = [0, width) with
  // width a multiple of the vector; masked ones test every column.
  const std::int64_t begin = kMasked ? 0 : range.begin;
  const std::int64_t end = kMasked ? kKeyTile : range.end;
  const V range_begin = hn::Set(d, static_cast<float>(range.begin));
  const V range_end = hn::Set(d, static_cast<float>(range.end));

  // Plain scores are read again as they are; any change is written back.
  const bool rewrite = kMasked || softcap > 0.0f || alibi_slope != 0.0f || score_scale != 1.0f;
  V running_max = minus_inf;
  auto nan_seen = hn::IsNaN(running_max);  // all false
  for (std::int64_t col = begin; col < end; col += lanes) {
    V s = hn::Load(d, scores + col);
    if (score_scale != 1.0f) s = hn::Mul(s, hn::Set(d, score_scale));
    if (softcap > 0.0f) {
      s = hn::Mul(hn::Set(d, softcap), hn::Tanh(d, hn::Mul(s, hn::Set(d, 1.0f / softcap))));
    }
    const V column = hn::Add(lane_index, hn::Set(d, static_cast<float>(col)));
    if (alibi_slope != 0.0f) {
      const V distance =
          hn::Abs(hn::Sub(hn::Set(d, position), hn::Add(column, hn::Set(d, first_key))));
      s = hn::NegMulAdd(hn::Set(d, alibi_slope), distance, s);
    }
    if constexpr (kMasked) {
      s = hn::IfThenElse(hn::And(hn::Ge(column, range_begin), hn::Lt(column, range_end)), s,
                         minus_inf);
    }
    if (rewrite) hn::Store(s, d, scores + col);
    running_max = hn::Max(running_max, s);
    nan_seen = hn::Or(nan_seen, hn::IsNaN(s));
  }
  if (!hn::AllFalse(d, nan_seen)) {
    // A NaN score (NaN or Inf - Inf in a visible input) poisons the row: its
    // output and LSE become NaN, never a silently finite value. (Max and Exp
    // would otherwise drop it.)
    state.max = std::numeric_limits<float>::quiet_NaN();
    state.sum = std::numeric_limits<float>::quiet_NaN();
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float tile_max = hn::GetLane(hn::MaxOfLanes(d, running_max));
  const float alpha = state.update_max(tile_max);
  const V row_max = hn::Set(d, state.max);
  V sum = hn::Zero(d);
  for (std::int64_t col = begin; col < end; col += lanes) {
    const V s = hn::Load(d, scores + col);
    V p = hn::Exp(d, hn::Sub(s, row_max));
    // exp(-inf) must be exactly 0 whatever Exp does outside its domain.
    p = hn::IfThenElseZero(hn::Ne(s, minus_inf), p);
    sum = hn::Add(sum, p);
    if (p_bf16 != nullptr) {
      // p is finite and non-negative here (a NaN row returned above).
      const hn::RebindToUnsigned<decltype(d)> du;
      const auto bits = hn::BitCast(du, p);
      const auto rounding = hn::Add(hn::And(hn::ShiftRight<16>(bits), hn::Set(du, 1u)), hn::Set(du, 0x7FFFu));
      const hn::Rebind<std::uint16_t, decltype(du)> d16;
      hn::StoreU(hn::TruncateTo(d16, hn::ShiftRight<16>(hn::Add(bits, rounding))), d16, p_bf16 + col);
    } else {
      hn::Store(p, d, scores + col);
    }
  }
  state.update_sum(hn::GetLane(hn::SumOfLanes(d, sum)));
  return alpha;
}

}  // namespace lookback::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // LOOKBACK_KERNELS_SOFTMAX_INL_H_
