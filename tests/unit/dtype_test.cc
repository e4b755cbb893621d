#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

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

TEST(DType, LoadAsFloatsAgreesWithLoadAsFloatForEveryDtypeAndStride) {
  // A run read at once equals the same elements read one by one: contiguous
  // (f32's plain copy), strided, and starting past the first element.
  std::vector<float> f32(40);
  std::vector<double> f64(40);
  std::vector<std::uint16_t> f16(40), bf16(40);
  std::vector<std::int32_t> i32(40);
  for (std::size_t i = 0; i < 40; ++i) {
    const float value = 0.37f * static_cast<float>(i) - 5.5f;
    f32[i] = value;
    f64[i] = 1.0 / 3.0 + static_cast<double>(i);
    f16[i] = f32_to_f16(value);
    bf16[i] = f32_to_bf16(value);
    i32[i] = static_cast<std::int32_t>(i) - 20;
  }
  const std::pair<const void*, DType> arrays[] = {
      {f32.data(), DType::kF32}, {f64.data(), DType::kF64}, {f16.data(), DType::kF16},
      {bf16.data(), DType::kBF16}, {i32.data(), DType::kI32}};
  for (const auto& [data, dtype] : arrays) {
    for (const std::int64_t stride : {1, 3}) {
      const std::int64_t index = 2, count = 12;
      std::vector<float> run(static_cast<std::size_t>(count), -1.0f);
      load_as_floats(data, dtype, index, stride, count, run.data());
      for (std::int64_t i = 0; i < count; ++i) {
        EXPECT_EQ(run[static_cast<std::size_t>(i)], load_as_float(data, dtype, index + i * stride))
            << dtype_name(dtype) << " stride " << stride << " element " << i;
      }
    }
  }
  float untouched = 7.0f;
  load_as_floats(f32.data(), DType::kF32, 0, 1, 0, &untouched);  // an empty run writes nothing
  EXPECT_EQ(untouched, 7.0f);
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
