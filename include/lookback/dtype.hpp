// Element types: what inputs may be (f32, f16, bf16, f64) and what the kernels
// and caches store (f32, f16, bf16, and for K/V the 8-bit int8, fp8e4m3 and
// fp8e5m2 with one f32 scale per row; docs/semantics.md). Accumulation is
// always float32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <bit>
#include <cmath>
#include <cstring>
#include <string>
#include <string_view>

namespace lookback {

enum class DType : std::uint8_t {
  kF32,
  kF16,
  kBF16,
  kF64,
  // 8-bit K/V storage only (never an input): codes beside one f32 scale per
  // (token, kv head) row.
  kI8,
  kFP8E4M3,  // OCP fp8 "e4m3fn": 4 exponent bits, 3 mantissa bits, no infinities
  kFP8E5M2,  // OCP fp8 e5m2: the top byte of an IEEE f16
  // Integer offsets (varlen's cu_seqlens; .npy '<i4', '<i8'), never attention data.
  kI32,
  kI64,
};

std::size_t dtype_size(DType dtype) noexcept;
// True for the 8-bit K/V storage dtypes (int8, fp8e4m3, fp8e5m2), whose rows
// carry one f32 scale each beside their codes.
constexpr bool is_quantized(DType dtype) noexcept {
  return dtype == DType::kI8 || dtype == DType::kFP8E4M3 || dtype == DType::kFP8E5M2;
}
// "f32", "f16", "bf16", "f64", "int8", "fp8e4m3", "fp8e5m2", "i32", "i64"
std::string_view dtype_name(DType dtype) noexcept;
// Parses "f32"/"float32", "f16"/"float16", "bf16"/"bfloat16", "f64"/"float64",
// "int8", "fp8e4m3"/"fp8_e4m3fn", "fp8e5m2"/"fp8_e5m2"; throws lookback::Error
// naming `argument` otherwise.
DType parse_dtype(std::string_view text, std::string_view argument = "dtype");

// Scalar conversions, round-to-nearest-even, NaN preserved.
inline float bf16_to_f32(std::uint16_t bits) noexcept {
  std::uint32_t word = static_cast<std::uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}
// Inline: the KV packing converts every element through it.
inline std::uint16_t f32_to_bf16(float value) noexcept {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
    // NaN: keep the sign, force a quiet NaN (truncation could produce Inf).
    return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);
  }
  // Round to nearest even on the 16 bits dropped.
  const std::uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>((bits + rounding) >> 16);
}
// Inline for the same reason as f32_to_bf16.
inline float f16_to_f32(std::uint16_t h) noexcept {
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

inline std::uint16_t f32_to_f16(float value) noexcept {
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


// Reads element `index` (in elements, not bytes) of an array of `dtype` as double
// (f32, f16, bf16, f64, i32, i64; 8-bit codes have no value without their
// scale: 0).
double load_as_double(const void* data, DType dtype, std::int64_t index) noexcept;
// Reads element `index` as float (f64 is rounded).
float load_as_float(const void* data, DType dtype, std::int64_t index) noexcept;
// Reads `count` elements as float into `out`: elements index, index + stride,
// ... (in elements). One dispatch on the dtype for the whole run, and a plain
// copy for contiguous f32: the way to read a row of a view.
void load_as_floats(const void* data, DType dtype, std::int64_t index, std::int64_t stride,
                    std::int64_t count, float* out) noexcept;

}  // namespace lookback
