// The softmax's exponentials (kernels/softmax-inl.h) on every SIMD target
// this CPU runs, against std::exp2 in double: Exp2 to within about 2 ulp of
// f32, Exp2<kForBf16> (the bf16 paths' P) to within 1.1e-4 relative, a
// twentieth of bf16's half ulp; both exactly 1 at 0.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/exp2_test.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <cmath>
#include <cstddef>
#include <vector>

#include "kernels/softmax-inl.h"

HWY_BEFORE_NAMESPACE();
namespace lookback::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// out[i] = 2^in[i], to f32's precision (for_bf16 false) or bf16's.
void Exp2Many(const float* in, float* out, std::size_t count, bool for_bf16) {
  const hn::ScalableTag<float> d;
  const std::size_t lanes = hn::Lanes(d);
  for (std::size_t i = 0; i < count; i += lanes) {  // count is a multiple of 16
    const auto x = hn::LoadU(d, in + i);
    hn::StoreU(for_bf16 ? Exp2<true>(d, x) : Exp2<false>(d, x), d, out + i);
  }
}

}  // namespace lookback::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <gtest/gtest.h>

namespace lookback::kernels {
HWY_EXPORT(Exp2Many);

namespace {

TEST(Exp2, BothPrecisionsOnEveryTarget) {
  // The softmax's exponents lie in [-126, 0] (a rounding error may put one a
  // hair above 0): a dense grid of each unit interval's fractions, plus the
  // points where the polynomial's argument is +-1/2.
  std::vector<float> in;
  for (int n = -126; n <= 0; n += (n < -20 ? 7 : 1)) {
    for (int k = 0; k < 4096; ++k) in.push_back(static_cast<float>(n) - 0.5f + k / 4096.0f);
  }
  in.push_back(0.0f);
  in.push_back(1e-7f);
  in.push_back(-0.5f);
  in.push_back(-1.5f);
  while (in.size() % 16 != 0) in.push_back(-1.0f);
  std::vector<float> out(in.size());
  for (std::int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    for (bool for_bf16 : {false, true}) {
      SCOPED_TRACE(::testing::Message() << hwy::TargetName(target) << (for_bf16 ? ", bf16" : ", f32"));
      HWY_DYNAMIC_DISPATCH(Exp2Many)(in.data(), out.data(), in.size(), for_bf16);
      const double bound = for_bf16 ? 1.1e-4 : 2.5e-7;
      double worst = 0.0;
      for (std::size_t i = 0; i < in.size(); ++i) {
        const double exact = std::exp2(static_cast<double>(in[i]));
        if (exact < 0x1p-125) continue;  // the generic path clamps below 2^-126
        worst = std::max(worst, std::abs(out[i] - exact) / exact);
      }
      EXPECT_LE(worst, bound);
      EXPECT_GT(worst, for_bf16 ? 1e-6 : 0.0);  // the bf16 fit really is the short one
      float zero = 0.0f, minus_inf = -INFINITY, one_and_zero[32] = {};
      for (int i = 0; i < 16; ++i) one_and_zero[i] = i % 2 == 0 ? zero : minus_inf;
      HWY_DYNAMIC_DISPATCH(Exp2Many)(one_and_zero, one_and_zero + 16, 16, for_bf16);
      // -inf: 0 on AVX-512 (VSCALEFPS), 2^-126 where the exponent is clamped
      // (the softmax zeroes -inf scores itself).
      for (int i = 0; i < 16; ++i) {
        if (i % 2 == 0) {
          EXPECT_EQ(one_and_zero[16 + i], 1.0f);
        } else {
          EXPECT_LE(one_and_zero[16 + i], 0x1p-126f);
        }
      }
    }
  }
  hwy::SetSupportedTargetsForTest(0);
}

}  // namespace
}  // namespace lookback::kernels
#endif  // HWY_ONCE
