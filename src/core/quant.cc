#include "core/quant.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace lookback {

namespace {

// An fp8 format: mantissa bits, exponent bias, largest finite value.
struct Fp8Format {
  int mantissa_bits;
  int bias;
  float max;
  std::uint8_t nan;  // a NaN code (positive)
};

constexpr Fp8Format fp8_format(DType dtype) noexcept {
  // e4m3fn: no infinities, S.1111.111 is the only NaN, so the exponent 15
  // holds 256 .. 448. e5m2: the top byte of an IEEE f16.
  return dtype == DType::kFP8E4M3 ? Fp8Format{3, 7, 448.0f, 0x7F} : Fp8Format{2, 15, 57344.0f, 0x7E};
}

std::uint8_t encode_fp8(float value, const Fp8Format& format) noexcept {
  const std::uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  if (std::isnan(value)) return sign | format.nan;
  float magnitude = std::fabs(value);
  const int min_exponent = 1 - format.bias;  // of the smallest normal
  if (magnitude >= format.max) {
    magnitude = format.max;  // saturate (also +-inf)
  } else {
    // The spacing of representable values at this magnitude: 2^(e - m) for
    // a normal of exponent e, 2^(min_exponent - m) below the normals.
    int exponent;
    std::frexp(magnitude, &exponent);  // magnitude = f * 2^exponent, f in [0.5, 1)
    const int quantum_exponent = std::max(exponent - 1, min_exponent) - format.mantissa_bits;
    // Exact: a power-of-two scaling of a float far from its range's ends.
    const float steps = std::ldexp(magnitude, -quantum_exponent);
    magnitude = std::ldexp(std::nearbyint(steps), quantum_exponent);  // ties to even
    magnitude = std::min(magnitude, format.max);
  }
  if (magnitude == 0.0f) return sign;
  int exponent;
  std::frexp(magnitude, &exponent);
  const int unbiased = exponent - 1;  // magnitude = 1.m * 2^unbiased
  if (unbiased < min_exponent) {
    const auto mantissa = static_cast<int>(std::ldexp(magnitude, format.mantissa_bits - min_exponent));
    return sign | static_cast<std::uint8_t>(mantissa);
  }
  const auto mantissa = static_cast<int>(
      std::ldexp(magnitude, format.mantissa_bits - unbiased) - std::ldexp(1.0f, format.mantissa_bits));
  return sign | static_cast<std::uint8_t>(((unbiased + format.bias) << format.mantissa_bits) | mantissa);
}

float decode_fp8(std::uint8_t code, const Fp8Format& format) noexcept {
  const float sign = (code & 0x80) != 0 ? -1.0f : 1.0f;
  const int field = (code & 0x7F) >> format.mantissa_bits;
  const int mantissa = code & ((1 << format.mantissa_bits) - 1);
  if (format.bias == 7 && (code & 0x7F) == 0x7F) return std::numeric_limits<float>::quiet_NaN();
  if (format.bias == 15 && field == 31) {
    return mantissa == 0 ? sign * std::numeric_limits<float>::infinity()
                         : std::numeric_limits<float>::quiet_NaN();
  }
  if (field == 0) return sign * std::ldexp(static_cast<float>(mantissa), 1 - format.bias - format.mantissa_bits);
  return sign * std::ldexp(static_cast<float>(mantissa + (1 << format.mantissa_bits)),
                           field - format.bias - format.mantissa_bits);
}

}  // namespace

float quant_range(DType dtype) noexcept {
  switch (dtype) {
    case DType::kI8: return 127.0f;
    case DType::kFP8E4M3: return 448.0f;
    case DType::kFP8E5M2: return 57344.0f;
    default: return 1.0f;
  }
}

std::uint8_t encode_code(float value, DType dtype) noexcept {
  if (dtype == DType::kI8) {
    if (std::isnan(value)) return 0;
    const float rounded = std::clamp(std::nearbyint(value), -127.0f, 127.0f);  // ties to even
    return static_cast<std::uint8_t>(static_cast<std::int8_t>(rounded));
  }
  return encode_fp8(value, fp8_format(dtype));
}

float decode_code(std::uint8_t code, DType dtype) noexcept {
  if (dtype == DType::kI8) return static_cast<float>(static_cast<std::int8_t>(code));
  return decode_fp8(code, fp8_format(dtype));
}

float quantize_row(const float* row, std::int64_t count, DType dtype, std::uint8_t* codes) noexcept {
  float max_abs = 0.0f;
  for (std::int64_t e = 0; e < count; ++e) {
    const float magnitude = std::fabs(row[e]);
    // NaN must win: it makes the scale, and so the whole row, NaN.
    if (!(magnitude <= max_abs)) max_abs = magnitude;
  }
  const float scale = max_abs / quant_range(dtype);
  for (std::int64_t e = 0; e < count; ++e) {
    codes[e] = scale == 0.0f ? std::uint8_t{0} : encode_code(row[e] / scale, dtype);
  }
  return scale;
}

void round_row_to_quantized(float* row, std::int64_t count, DType dtype) noexcept {
  constexpr std::int64_t kChunk = 64;
  std::uint8_t codes[kChunk];
  float max_abs = 0.0f;
  for (std::int64_t e = 0; e < count; ++e) {
    const float magnitude = std::fabs(row[e]);
    if (!(magnitude <= max_abs)) max_abs = magnitude;
  }
  const float scale = max_abs / quant_range(dtype);
  for (std::int64_t begin = 0; begin < count; begin += kChunk) {
    const std::int64_t n = std::min(kChunk, count - begin);
    for (std::int64_t e = 0; e < n; ++e) {
      codes[e] = scale == 0.0f ? std::uint8_t{0} : encode_code(row[begin + e] / scale, dtype);
    }
    for (std::int64_t e = 0; e < n; ++e) row[begin + e] = decode_code(codes[e], dtype) * scale;
  }
}

}  // namespace lookback
