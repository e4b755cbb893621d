// 8-bit K/V storage in the kernels (the rule: core/quant.hpp):
//   PackQuantizedTile: prefill packs a key tile of K and V as the f32 values
//                      their 8-bit rows attend to, decode(code) * scale, into
//                      the ordinary f32 tiles (pack-inl.h);
//   LoadCodes:         decode's vector decoder: stored codes to f32 in
//                      registers (unscaled; the caller applies the row's
//                      scale times kCodeFactor), so a cache is never copied
//                      at full precision.
//
// Per-target: included from prefill.cc and decode.cc inside their
// foreach_target loops.

#if defined(LOOKBACK_KERNELS_QUANT_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOOKBACK_KERNELS_QUANT_INL_H_
#undef LOOKBACK_KERNELS_QUANT_INL_H_
#else
#define LOOKBACK_KERNELS_QUANT_INL_H_
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/quant.hpp"
#include "hwy/highway.h"
#include "kernels/pack.hpp"
#include "kernels/prefill.hpp"
#include "kernels/tiles.hpp"
#include "lookback/shape.hpp"

HWY_BEFORE_NAMESPACE();
namespace lookback::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// One key tile of (b, kv_head) for 8-bit storage: each K and V row (one
// token of one kv head) quantized by the rule and packed as decode(code) *
// scale, K transposed, V row-major, like PackF32Tile. Padded dims and keys
// past seqlen_k read as 0.
HWY_INLINE void PackQuantizedTile(const PrefillParams& params, const PackedKV& packed,
                                  std::int64_t b, std::int64_t kv_head, std::int64_t tile) {
  const AttentionShape& shape = params.shape;
  const std::int64_t dim = shape.head_dim, padded = packed.padded_dim;
  float* k_out = packed.k_tile(b, kv_head, shape.kv_heads, tile);
  float* v_out = packed.v_rows(b, kv_head, shape.kv_heads, tile * kKeyTile);
  const std::int64_t key_begin = tile * kKeyTile;
  const std::int64_t key_end = std::min(shape.seqlen_k, key_begin + kKeyTile);
  std::memset(k_out, 0, sizeof(float) * static_cast<std::size_t>(padded * kKeyTile));
  std::memset(v_out, 0, sizeof(float) * static_cast<std::size_t>(padded * kKeyTile));
  float row[kMaxHeadDim];  // (head_dim): one token of one kv head
  for (std::int64_t key = key_begin; key < key_end; ++key) {
    const std::int64_t column = key - key_begin;
    const std::int64_t k_base = params.k.offset(b, key, kv_head, 0);
    for (std::int64_t e = 0; e < dim; ++e) {
      row[e] = load_as_float(params.k.data, params.k.dtype, k_base + e * params.k.strides[3]);
    }
    round_row_to_quantized(row, dim, params.storage);
    for (std::int64_t e = 0; e < dim; ++e) k_out[e * kKeyTile + column] = row[e];
    const std::int64_t v_base = params.v.offset(b, key, kv_head, 0);
    for (std::int64_t e = 0; e < dim; ++e) {
      row[e] = load_as_float(params.v.data, params.v.dtype, v_base + e * params.v.strides[3]);
    }
    round_row_to_quantized(row, dim, params.storage);
    std::memcpy(v_out + column * padded, row, sizeof(float) * static_cast<std::size_t>(dim));
  }
}

// Whether this target converts between f32 and f16 in hardware (F16C on x86
// from AVX2 on, NEON/SVE on Arm): exact both ways, infinities included, and
// round-to-nearest-even. Highway's emulation elsewhere (SSE4, scalar) reads
// an f16 infinity as 65536, so f16 rows are converted one element at a time
// there. Finite fp8 values read through f16 are exact on every target.
#if (HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2) || (HWY_ARCH_ARM && HWY_TARGET <= HWY_NEON)
inline constexpr bool kVectorF16 = true;
#else
inline constexpr bool kVectorF16 = false;
#endif

// Element types of the stored 8-bit codes, one byte each (a row pointer of
// one of them steps by codes).
struct Int8Code { std::uint8_t bits; };
struct E4M3Code { std::uint8_t bits; };
struct E5M2Code { std::uint8_t bits; };
template <typename T>
inline constexpr bool kIsCode = std::is_same_v<T, Int8Code> || std::is_same_v<T, E4M3Code> ||
                                std::is_same_v<T, E5M2Code>;

// What LoadCodes leaves out of a code's value: decode(code) =
// LoadCodes(...) * kCodeFactor<T>, a power of two that the caller folds into
// the row's scale (exact: the scale times 2^8 stays finite, since a scale
// is at most FLT_MAX / 448).
template <typename T>
inline constexpr float kCodeFactor = std::is_same_v<T, E4M3Code> ? 256.0f : 1.0f;

// Lanes(d) codes at row + offset as f32, unscaled: decode(code) / kCodeFactor.
//   int8:  sign-extended and converted;
//   fp8:   read through f16, which holds every fp8 value exactly. An e5m2
//          code is the top byte of the f16 of the same value. An e4m3
//          code's sign goes to the f16 sign and its exponent and mantissa
//          to the top of the f16's (the exponent's top bit stays 0), which
//          reads as the value times 2^(7 - 15) = 1 / kCodeFactor, subnormal
//          codes included. The f16 -> f32 conversion is exact. Codes of
//          infinity or NaN are never stored (the rule saturates; a NaN row
//          has a NaN scale).
template <typename T, class D>
HWY_INLINE hn::Vec<D> LoadCodes(D d, const T* HWY_RESTRICT row, std::size_t offset) {
  const auto* bytes = reinterpret_cast<const std::int8_t*>(row) + offset;
  const hn::Rebind<std::int8_t, D> d8;
  if constexpr (std::is_same_v<T, Int8Code>) {
    const hn::Rebind<std::int32_t, D> d32;
    return hn::ConvertTo(d, hn::PromoteTo(d32, hn::LoadU(d8, bytes)));
  } else {
    const hn::Rebind<std::int16_t, D> d16;
    const hn::Rebind<hwy::float16_t, D> dh;
    // Sign-extended: the code in the low byte, its sign bit copied above.
    const auto wide = hn::PromoteTo(d16, hn::LoadU(d8, bytes));
    if constexpr (std::is_same_v<T, E5M2Code>) {
      return hn::PromoteTo(d, hn::BitCast(dh, hn::ShiftLeft<8>(wide)));
    } else {
      // Shifted by 7: the sign lands on bit 15 (a copy of it on bit 14,
      // cleared), exponent and mantissa on bits 13..7.
      const auto bits = hn::And(hn::ShiftLeft<7>(wide), hn::Set(d16, static_cast<std::int16_t>(0xBF80)));
      return hn::PromoteTo(d, hn::BitCast(dh, bits));
    }
  }
}

}  // namespace lookback::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // LOOKBACK_KERNELS_QUANT_INL_H_
