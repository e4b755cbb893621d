#include "lookback/dtype.hpp"

#include <bit>
#include <cmath>
#include <string>

#include "lookback/error.hpp"

namespace lookback {

std::size_t dtype_size(DType dtype) noexcept {
  switch (dtype) {
    case DType::kF32: return 4;
    case DType::kF16: return 2;
    case DType::kBF16: return 2;
    case DType::kF64: return 8;
  }
  return 0;
}

std::string_view dtype_name(DType dtype) noexcept {
  switch (dtype) {
    case DType::kF32: return "f32";
    case DType::kF16: return "f16";
    case DType::kBF16: return "bf16";
    case DType::kF64: return "f64";
  }
  return "?";
}

DType parse_dtype(std::string_view text, std::string_view argument) {
  if (text == "f32" || text == "float32") return DType::kF32;
  if (text == "f16" || text == "float16") return DType::kF16;
  if (text == "bf16" || text == "bfloat16") return DType::kBF16;
  if (text == "f64" || text == "float64") return DType::kF64;
  throw Error(std::string(argument) + ": unknown dtype '" + std::string(text) +
              "' (expected f32, f16, bf16 or f64)");
}

float f16_to_f32(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1Fu;
  std::uint32_t mantissa = h & 0x3FFu;
  std::uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;  // signed zero
    } else {
      // Subnormal: normalise into a float32 normal.
      int shift = 0;
      while ((mantissa & 0x400u) == 0) {
        mantissa <<= 1;
        ++shift;
      }
      mantissa &= 0x3FFu;
      bits = sign | static_cast<std::uint32_t>(127 - 15 - shift + 1) << 23 | (mantissa << 13);
    }
  } else if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);  // Inf or NaN
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  return std::bit_cast<float>(bits);
}

std::uint16_t f32_to_f16(float value) noexcept {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  const std::uint16_t sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::uint32_t abs_bits = bits & 0x7FFFFFFFu;
  if (abs_bits >= 0x7F800000u) {  // Inf or NaN
    return sign | (abs_bits > 0x7F800000u ? 0x7E00u : 0x7C00u);
  }
  if (abs_bits >= 0x477FF000u) {  // rounds to >= 65520: overflow to Inf
    return sign | 0x7C00u;
  }
  if (abs_bits < 0x38800000u) {  // below the smallest f16 normal (2^-14)
    // Subnormal or zero: value * 2^24 rounded to nearest even, as an integer.
    const float magnitude = std::bit_cast<float>(abs_bits);
    const float scaled = magnitude * 16777216.0f;  // exact (power of two)
    const float rounded = std::nearbyint(scaled);  // default mode: nearest even
    return sign | static_cast<std::uint16_t>(rounded);
  }
  // Normal: rebias the exponent, round the 13 dropped mantissa bits to even.
  const std::uint32_t rebased = abs_bits - ((127u - 15u) << 23);
  const std::uint32_t rounding = 0xFFFu + ((rebased >> 13) & 1u);
  return sign | static_cast<std::uint16_t>((rebased + rounding) >> 13);
}

double load_as_double(const void* data, DType dtype, std::int64_t index) noexcept {
  switch (dtype) {
    case DType::kF32: return static_cast<const float*>(data)[index];
    case DType::kF64: return static_cast<const double*>(data)[index];
    case DType::kF16: return f16_to_f32(static_cast<const std::uint16_t*>(data)[index]);
    case DType::kBF16: return bf16_to_f32(static_cast<const std::uint16_t*>(data)[index]);
  }
  return 0.0;
}

float load_as_float(const void* data, DType dtype, std::int64_t index) noexcept {
  return static_cast<float>(load_as_double(data, dtype, index));
}

}  // namespace lookback
