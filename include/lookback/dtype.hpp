// Element types: what inputs may be (f32, f16, bf16, f64) and what the kernels
// and caches store (f32, f16, bf16). Accumulation is always float32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace lookback {

enum class DType : std::uint8_t { kF32, kF16, kBF16, kF64 };

std::size_t dtype_size(DType dtype) noexcept;
std::string_view dtype_name(DType dtype) noexcept;  // "f32", "f16", "bf16", "f64"
// Parses "f32"/"float32", "f16"/"float16", "bf16"/"bfloat16", "f64"/"float64";
// throws lookback::Error naming `argument` otherwise.
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
float f16_to_f32(std::uint16_t bits) noexcept;
std::uint16_t f32_to_f16(float value) noexcept;

// Reads element `index` (in elements, not bytes) of an array of `dtype` as double.
double load_as_double(const void* data, DType dtype, std::int64_t index) noexcept;
// Reads element `index` as float (f64 is rounded).
float load_as_float(const void* data, DType dtype, std::int64_t index) noexcept;

}  // namespace lookback
