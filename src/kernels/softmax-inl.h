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

#include <cmath>
#include <cstdint>
#include <limits>

#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "kernels/online_softmax.hpp"
#include "kernels/tiles.hpp"

HWY_BEFORE_NAMESPACE();
namespace lookback::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// AVX-512 targets: Exp2 on VREDUCEPS/VSCALEFPS, bf16 stores by
// VCVTNEPS2BF16.
#undef LOOKBACK_EXP2_AVX512
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
#define LOOKBACK_EXP2_AVX512 1
#else
#define LOOKBACK_EXP2_AVX512 0
#endif

// 2^f for |f| <= 1/2: the degree-6 Taylor polynomial of e^(f ln 2)
// (truncation error below 1.2e-7, about 1 ulp).
template <class D, class V = hn::Vec<D>>
HWY_INLINE V Exp2Fraction(D d, V f) {
  V p = hn::Set(d, 1.540353e-4f);
  p = hn::MulAdd(p, f, hn::Set(d, 1.3333558e-3f));
  p = hn::MulAdd(p, f, hn::Set(d, 9.6181291e-3f));
  p = hn::MulAdd(p, f, hn::Set(d, 5.55041087e-2f));
  p = hn::MulAdd(p, f, hn::Set(d, 0.240226507f));
  p = hn::MulAdd(p, f, hn::Set(d, 0.693147181f));
  return hn::MulAdd(p, f, hn::Set(d, 1.0f));
}

// 2^f for |f| <= 1/2 to about bf16's precision, for probabilities that are
// rounded to bf16 before they are used (the AMX and bf16-dot paths' P):
// a degree-3 fit with 2^0 = 1 exactly, relative error below 1.1e-4, a
// twentieth of bf16's half ulp (2^-9), three FMAs fewer than Exp2Fraction.
template <class D, class V = hn::Vec<D>>
HWY_INLINE V Exp2FractionForBf16(D d, V f) {
  V p = hn::Set(d, 0.0550089292f);
  p = hn::MulAdd(p, f, hn::Set(d, 0.242210954f));
  p = hn::MulAdd(p, f, hn::Set(d, 0.693282902f));
  return hn::MulAdd(p, f, hn::Set(d, 1.0f));
}

// 2^x, for the softmax's x = (score - max) * log2(e) <= 0 (a rounding
// error may make it slightly positive): x = n + f with n = round(x), 2^f by
// Exp2Fraction, times 2^n. On AVX-512, VREDUCEPS gives f and VSCALEFPS
// applies 2^n, underflowing to 0 (-inf gives 0, NaN stays NaN). Elsewhere
// 2^n goes into the exponent bits and x is first clamped to -126 (a
// probability under 1.2e-38).
// kForBf16: 2^f to bf16's precision (Exp2FractionForBf16).
template <bool kForBf16, class D, class V = hn::Vec<D>>
HWY_INLINE V Exp2FractionOf(D d, V f) {
  if constexpr (kForBf16) return Exp2FractionForBf16(d, f);
  return Exp2Fraction(d, f);
}

template <bool kForBf16 = false, class D, class V = hn::Vec<D>>
HWY_INLINE V Exp2(D d, V x) {
#if LOOKBACK_EXP2_AVX512
  if constexpr (hn::MaxLanes(d) == 16) {
    const V f{_mm512_reduce_ps(x.raw, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
    const V n = hn::Sub(x, f);  // exact
    return V{_mm512_scalef_ps(Exp2FractionOf<kForBf16>(d, f).raw, n.raw)};
  }
#endif
  const hn::RebindToSigned<D> di;
  x = hn::Max(x, hn::Set(d, -126.0f));
  // n = round(x) by the adder: x + 1.5 * 2^23 falls where the float ulp is
  // 1, so the sum is rounded to an integer as NearestInt rounds (to nearest
  // even), and its low mantissa bits are n in two's complement. Shifted
  // into the exponent they give 2^n (the shift drops the bits of 1.5 *
  // 2^23); the same bits as converting x to int and back, in two
  // additions instead of two conversions and an overflow fix.
  const V shifter = hn::Set(d, 12582912.0f);
  const V shifted = hn::Add(x, shifter);
  const V p = Exp2FractionOf<kForBf16>(d, hn::Sub(x, hn::Sub(shifted, shifter)));
  return hn::BitCast(d, hn::Add(hn::BitCast(di, p), hn::ShiftLeft<23>(hn::BitCast(di, shifted))));
}

// Stores p (finite, non-negative) as bf16, rounded to nearest even.
template <class D, class V = hn::Vec<D>>
HWY_INLINE void StoreBf16(D d, V p, std::uint16_t* HWY_RESTRICT out) {
  (void)d;
#if LOOKBACK_EXP2_AVX512
  if constexpr (hn::MaxLanes(d) == 16) {
    // VCVTNEPS2BF16 (AVX512-BF16; the only caller, the AMX path, runs on
    // CPUs that have it). Inline assembly: the kernels' AVX-512 target does
    // not enable the instruction set.
    __m256i packed;
    asm("vcvtneps2bf16 %1, %0" : "=v"(packed) : "v"(p.raw));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), packed);
    return;
  }
#endif
  const hn::RebindToUnsigned<D> du;
  const auto bits = hn::BitCast(du, p);
  const auto rounding =
      hn::Add(hn::And(hn::ShiftRight<16>(bits), hn::Set(du, 1u)), hn::Set(du, 0x7FFFu));
  const hn::Rebind<std::uint16_t, decltype(du)> d16;
  hn::StoreU(hn::TruncateTo(d16, hn::ShiftRight<16>(hn::Add(bits, rounding))), d16, out);
}

inline constexpr float kLog2e = 1.44269504088896341f;
// How far (natural log) a tile's max may exceed the running max before the
// one-pass softmax step rescales: 8 ln 2, probabilities up to 256.
inline constexpr float kLazyMargin = 5.54517744f;

// v as computed, kept from being fused into the operation that consumes it:
// GCC contracts a product feeding a subtraction into one FMA (its default
// -ffp-contract=fast), which would skip the product's rounding. An empty
// asm that claims to change v costs no instruction.
template <class V>
HWY_INLINE V RoundedHere(V v) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
  asm("" : "+v"(v.raw));
#elif HWY_ARCH_X86 && (HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_SSE4)
  asm("" : "+x"(v.raw));
#else
  asm("" : "+m"(v));
#endif
  return v;
}

// The exponent, base 2, of a score's probability: (k s - max) log2(e), where
// max is the largest k s so far. k s is rounded once, before the max is
// subtracted, exactly as the max was formed from it: the row maximum's own
// exponent is then exactly 0 whatever the scores' magnitude (folding k and
// max into one FMA, k log2(e) s - max log2(e), rounds the two products
// apart, an error of a few ulps of |s log2(e)|: 2^16 for scores near 1e8).
template <class D, class V = hn::Vec<D>>
HWY_INLINE V ExponentOf(D d, V s, float k, V max) {
  if (k != 1.0f) s = RoundedHere(hn::Mul(s, hn::Set(d, k)));
  return hn::Mul(hn::Sub(s, max), hn::Set(d, kLog2e));
}

// Makes a row's state NaN (its output and LSE become NaN); returns the NaN
// alpha that poisons its accumulator.
inline float Poison(OnlineSoftmaxState& state) {
  state.max = std::numeric_limits<float>::quiet_NaN();
  state.sum = std::numeric_limits<float>::quiet_NaN();
  return std::numeric_limits<float>::quiet_NaN();
}

// Stores a vector of probabilities where the caller wants P: as bf16 when
// p_bf16 is given, else to p_out when it is given, else over the scores.
template <class D, class V = hn::Vec<D>>
HWY_INLINE void StoreP(D d, V p, std::int64_t col, float* HWY_RESTRICT scores,
                       std::uint16_t* HWY_RESTRICT p_bf16, float* HWY_RESTRICT p_out) {
  if (p_bf16 != nullptr) {
    StoreBf16(d, p, p_bf16 + col);
  } else if (p_out != nullptr) {
    hn::Store(p, d, p_out + col);
  } else {
    hn::Store(p, d, scores + col);
  }
}

// The one-pass step for plain rows of a full tile whose P goes elsewhere
// (the scores stay for a second try), once the row has a max: P against the
// running max. While the tile's max stays within kLazyMargin of it,
// probabilities may exceed 1 (by at most 2^8) and the max is not raised
// (FlashAttention-4's conditional rescaling: the same softmax, alpha 1).
// Returns false, the tile to be redone by the two passes, when the max would
// move further, or on a NaN or infinite score. P rounded to bf16 takes the
// exponential to bf16's precision.
template <bool kBf16P, class D>
HWY_INLINE bool OnePassAgainstRunningMax(D d, const float* HWY_RESTRICT scores, LocalRange range,
                                         float score_scale, OnlineSoftmaxState& state,
                                         std::uint16_t* HWY_RESTRICT p_bf16,
                                         float* HWY_RESTRICT p_out) {
  using V = hn::Vec<D>;
  const std::int64_t lanes = static_cast<std::int64_t>(hn::Lanes(d));
  const V max = hn::Set(d, state.max);
  V running_max = hn::Set(d, kMinusInf);
  V sum = hn::Zero(d);
  for (std::int64_t col = range.begin; col < range.end; col += lanes) {
    const V s = hn::Load(d, scores + col);
    running_max = hn::Max(running_max, s);
    const V p = Exp2<kBf16P>(d, ExponentOf(d, s, score_scale, max));
    sum = hn::Add(sum, p);
    StoreP(d, p, col, nullptr, kBf16P ? p_bf16 : nullptr, p_out);
  }
  const float tile_max = hn::GetLane(hn::MaxOfLanes(d, running_max)) * score_scale;
  const float tile_sum = hn::GetLane(hn::SumOfLanes(d, sum));
  if (!(tile_max <= state.max + kLazyMargin) || !std::isfinite(tile_sum)) return false;
  state.update_sum(tile_sum);
  return true;
}

// The first pass over columns [begin, end): unless `plain`, multiplies the
// scores by score_scale, applies softcap and ALiBi, hides columns outside
// `range` (only when kMasked) and writes them back. Returns the largest
// score, NaN when any score is NaN.
template <bool kMasked, class D>
HWY_INLINE float TransformAndMax(D d, float* HWY_RESTRICT scores, std::int64_t begin,
                                 std::int64_t end, LocalRange range, bool plain, float softcap,
                                 float alibi_slope, float position, float first_key,
                                 float score_scale) {
  using V = hn::Vec<D>;
  const std::int64_t lanes = static_cast<std::int64_t>(hn::Lanes(d));
  const V minus_inf = hn::Set(d, kMinusInf);
  const V lane_index = hn::Iota(d, 0.0f);
  const V range_begin = hn::Set(d, static_cast<float>(range.begin));
  const V range_end = hn::Set(d, static_cast<float>(range.end));
  V running_max = minus_inf;
  auto nan_seen = hn::IsNaN(running_max);  // all false
  for (std::int64_t col = begin; col < end; col += lanes) {
    V s = hn::Load(d, scores + col);
    if (!plain) {
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
      hn::Store(s, d, scores + col);
    }
    running_max = hn::Max(running_max, s);
    nan_seen = hn::Or(nan_seen, hn::IsNaN(s));
  }
  if (!hn::AllFalse(d, nan_seen)) return std::numeric_limits<float>::quiet_NaN();
  return hn::GetLane(hn::MaxOfLanes(d, running_max));
}

// Scores of one row -> probabilities. Multiplies the scores by score_scale,
// applies softcap and ALiBi, hides columns outside `range` (only when
// kMasked), updates the row state. The probabilities go to p_bf16 rounded to
// bf16 (nearest even) when it is given, else to p_out when it is given, else
// replace the scores. Returns alpha, the factor for the row's accumulator.
template <bool kMasked>
HWY_INLINE float SoftmaxRow(float* HWY_RESTRICT scores, LocalRange range, float softcap,
                            float alibi_slope, float position, float first_key,
                            OnlineSoftmaxState& state, float score_scale = 1.0f,
                            std::uint16_t* HWY_RESTRICT p_bf16 = nullptr,
                            float* HWY_RESTRICT p_out = nullptr) {
  const hn::ScalableTag<float> d;
  using V = hn::Vec<decltype(d)>;
  const std::int64_t lanes = static_cast<std::int64_t>(hn::Lanes(d));
  // Full tiles cover whole vectors [range.begin, range.end) = [0, width) with
  // width a multiple of the vector; masked ones test every column.
  const std::int64_t begin = kMasked ? 0 : range.begin;
  const std::int64_t end = kMasked ? kKeyTile : range.end;

  // Plain rows (a full tile, no softcap or ALiBi, a positive scale) are only
  // read here: max(k s) = k max(s) for k > 0, and k is folded into the
  // exponent below. Other rows are transformed and written back.
  const bool plain = !kMasked && softcap == 0.0f && alibi_slope == 0.0f && score_scale > 0.0f;
#if LOOKBACK_EXP2_AVX512
  if constexpr (!kMasked && hn::MaxLanes(d) == 16) {
    if (plain && (p_bf16 != nullptr || p_out != nullptr) && std::isfinite(state.max) &&
        (p_bf16 != nullptr
             ? OnePassAgainstRunningMax<true>(d, scores, range, score_scale, state, p_bf16, nullptr)
             : OnePassAgainstRunningMax<false>(d, scores, range, score_scale, state, nullptr,
                                               p_out))) {
      return 1.0f;
    }
  }
#endif
  const float k = plain ? score_scale : 1.0f;  // the scale still to apply
  const float tile_max = TransformAndMax<kMasked>(d, scores, begin, end, range, plain, softcap,
                                                  alibi_slope, position, first_key, score_scale) *
                         k;
  if (std::isnan(tile_max) || tile_max == -kMinusInf) {
    // A NaN score, or an infinite one (whose probability is Inf - Inf),
    // from a visible input poisons the row: its output and LSE become NaN,
    // never a silently finite value (Max and Exp2 would drop the NaN).
    return Poison(state);
  }
  const float alpha = state.update_max(tile_max);
  const V max = hn::Set(d, state.max);
  const V minus_inf = hn::Set(d, kMinusInf);
  V sum = hn::Zero(d);
  for (std::int64_t col = begin; col < end; col += lanes) {
    const V s = hn::Load(d, scores + col);
    // Scores of -inf (hidden, or -inf inputs) get exactly 0, also when the
    // max is -inf too.
    const V p = hn::IfThenElseZero(hn::Ne(s, minus_inf), Exp2(d, ExponentOf(d, s, k, max)));
    sum = hn::Add(sum, p);
    StoreP(d, p, col, scores, p_bf16, p_out);
  }
  state.update_sum(hn::GetLane(hn::SumOfLanes(d, sum)));
  return alpha;
}

}  // namespace lookback::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // LOOKBACK_KERNELS_SOFTMAX_INL_H_
