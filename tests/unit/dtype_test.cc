#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "lookback/dtype.hpp"
#include "lookback/error.hpp"

namespace lookback {
namespace {

TEST(DType, Bf16RoundTripAndRounding) {
  // Values with at most 8 significant bits are exact in bf16.
  for (float value : {0.0f, 1.0f, -2.5f, 3.140625f, 65536.0f, 0x1.fep-120f}) {
    EXPECT_EQ(bf16_to_f32(f32_to_bf16(value)), value) << value;
  }
  // 1 + 2^-8 is halfway between two bf16 values: ties to even (1.0).
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 3.0f / 256)), 1.0f + 4.0f / 256);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::nanf("")))));
  EXPECT_TRUE(std::isinf(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::infinity()))));
}

TEST(DType, F16RoundTripEveryValue) {
  // Every finite f16 value converts to f32 and back unchanged.
  for (std::uint32_t bits = 0; bits < 0x10000; ++bits) {
    const auto h = static_cast<std::uint16_t>(bits);
    const float value = f16_to_f32(h);
    if (std::isnan(value)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(value))));
      continue;
    }
    ASSERT_EQ(f32_to_f16(value), h) << std::hex << bits;
  }
  EXPECT_EQ(f16_to_f32(0x3C00), 1.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(f32_to_f16(1e6f), 0x7C00);                     // overflow to +inf
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7BFF);                 // rounds down to 65504
  EXPECT_EQ(f32_to_f16(1.0f + 1.0f / 2048), 0x3C00);       // tie to even
}

TEST(DType, ParseAndNames) {
  EXPECT_EQ(parse_dtype("bf16"), DType::kBF16);
  EXPECT_EQ(parse_dtype("float16"), DType::kF16);
  EXPECT_EQ(dtype_name(DType::kF64), "f64");
  EXPECT_EQ(dtype_size(DType::kBF16), 2u);
  EXPECT_THROW(parse_dtype("int4", "--dtype"), Error);
}

}  // namespace
}  // namespace lookback
