// 8-bit K/V storage (int8, fp8 e4m3, fp8 e5m2): the scalar rule, stated once
// (docs/semantics.md, "8-bit K/V storage"). One f32 scale per stored row (one
// token of one kv head, K and V separately):
//
//   scale = max|x| / R        R = 127 (int8), 448 (fp8 e4m3, OCP "e4m3fn"),
//                             57344 (fp8 e5m2); a row of zeros has scale 0
//   code  = int8: clamp(round_half_even(x / scale), -127, 127)
//           fp8:  x / scale rounded to the nearest fp8 value, ties to even,
//                 saturating at +-R
//   value = decode(code) * scale, in f32 (x / scale is an f32 division)
//
// The caches store codes and scales and the decode kernel reads them (its
// vector decoder is in kernels/quant-inl.h); prefill dequantizes on packing.
#pragma once

#include <cstdint>

#include "lookback/dtype.hpp"

namespace lookback {

// R: the largest code magnitude, as a value.
float quant_range(DType dtype) noexcept;

// The code nearest to `value` (already divided by the scale), by the rule
// above. NaN gives a NaN code for fp8 and 0 for int8 (the NaN scale of such
// a row makes every value NaN anyway).
std::uint8_t encode_code(float value, DType dtype) noexcept;

// decode(code), unscaled.
float decode_code(std::uint8_t code, DType dtype) noexcept;

// Quantizes `count` values: writes `count` codes and returns the row's scale.
float quantize_row(const float* row, std::int64_t count, DType dtype, std::uint8_t* codes) noexcept;

// Replaces `count` values by what an 8-bit row of them attends to:
// decode(code) * scale (prefill packs these).
void round_row_to_quantized(float* row, std::int64_t count, DType dtype) noexcept;

}  // namespace lookback
