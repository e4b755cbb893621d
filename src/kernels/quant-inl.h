// 8-bit K/V storage in the kernels (the rule: core/quant.hpp):
//   PackQuantizedTile: prefill packs a key tile of K and V as the f32 values
//                      their 8-bit rows attend to, decode(code) * scale, into
//                      the ordinary f32 tiles (pack-inl.h);
//   LoadCodes:         decode's vector decoder: stored codes to f32 in
//                      registers (unscaled; the caller applies the row's
//                      scale), so a cache is never copied at full precision.
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

// Element types of the stored 8-bit codes, one byte each (a row pointer of
// one of them steps by codes).
struct Int8Code { std::uint8_t bits; };
struct E4M3Code { std::uint8_t bits; };
struct E5M2Code { std::uint8_t bits; };
template <typename T>
inline constexpr bool kIsCode = std::is_same_v<T, Int8Code> || std::is_same_v<T, E4M3Code> ||
                                std::is_same_v<T, E5M2Code>;

// Lanes(d) codes at row + offset as f32, unscaled: decode(code).
//   int8:  sign-extended and converted;
//   fp8:   the code's exponent and mantissa placed at the top of an f32
//          exponent and mantissa field (sign apart), which reads as the fp8
//          value times 2^(bias_f32 - bias_fp8), subnormal codes included
//          (as f32 subnormals, exact unless the CPU flushes them), then
//          rescaled by that power of two. Codes of infinity or NaN are never
//          stored (the rule saturates; a NaN row has a NaN scale).
template <typename T, class D>
HWY_INLINE hn::Vec<D> LoadCodes(D d, const T* HWY_RESTRICT row, std::size_t offset) {
  const auto* bytes = reinterpret_cast<const std::uint8_t*>(row) + offset;
  if constexpr (std::is_same_v<T, Int8Code>) {
    const hn::Rebind<std::int8_t, D> d8;
    const hn::Rebind<std::int32_t, D> d32;
    return hn::ConvertTo(d, hn::PromoteTo(d32, hn::LoadU(d8, reinterpret_cast<const std::int8_t*>(bytes))));
  } else {
    constexpr int kMantissaBits = std::is_same_v<T, E4M3Code> ? 3 : 2;
    constexpr int kBias = std::is_same_v<T, E4M3Code> ? 7 : 15;
    const hn::Rebind<std::uint8_t, D> d8;
    const hn::Rebind<std::uint32_t, D> du;
    const auto codes = hn::PromoteTo(du, hn::LoadU(d8, bytes));
    const auto sign = hn::ShiftLeft<24>(hn::And(codes, hn::Set(du, 0x80u)));
    const auto magnitude = hn::ShiftLeft<23 - kMantissaBits>(hn::And(codes, hn::Set(du, 0x7Fu)));
    const auto value = hn::BitCast(d, hn::Or(sign, magnitude));
    // 2^(127 - bias) as an f32 (exact, a normal number for both formats).
    const float rescale = static_cast<float>(1ull << 60) * static_cast<float>(1ull << (127 - kBias - 60));
    return hn::Mul(value, hn::Set(d, rescale));
  }
}

}  // namespace lookback::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // LOOKBACK_KERNELS_QUANT_INL_H_
