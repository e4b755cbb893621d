// Packing K and V once per call into the layouts the path streams
// (PackedLayout, prefill.hpp), on the target the prefill call dispatched to:
// f32 paths get K transposed per key tile and V row-major, rounded to the
// storage dtype; the AMX and bf16-dot paths get the bf16 pair layouts
// (amx-inl.h).
//
// Per-target: included from prefill.cc inside its foreach_target loop.

#if defined(LOOKBACK_KERNELS_PACK_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOOKBACK_KERNELS_PACK_INL_H_
#undef LOOKBACK_KERNELS_PACK_INL_H_
#else
#define LOOKBACK_KERNELS_PACK_INL_H_
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "hwy/highway.h"
#include "kernels/amx-inl.h"
#include "kernels/pack.hpp"
#include "kernels/prefill.hpp"
#include "kernels/quant-inl.h"
#include "kernels/tiles.hpp"
#include "kernels/transpose-inl.h"
#include "lookback/context.hpp"

HWY_BEFORE_NAMESPACE();
namespace lookback::kernels::HWY_NAMESPACE {

// Reads element `offset` of a view as float rounded to the storage dtype.
HWY_INLINE float LoadRounded(const TensorView& view, std::int64_t offset, DType storage) noexcept {
  const float value = view.dtype == DType::kF32
                          ? static_cast<const float*>(view.data)[offset]
                          : load_as_float(view.data, view.dtype, offset);
  return storage == DType::kF32 ? value : round_to_storage(value, storage);
}

namespace hn = hwy::HWY_NAMESPACE;

// round_to_storage on a vector: bf16 by round-to-nearest-even on the 16
// bits dropped (NaN kept as a quiet NaN of the same sign, as f32_to_bf16),
// f16 by the hardware conversion there and back.
template <class D>
HWY_INLINE hn::Vec<D> RoundToStorage(D d, hn::Vec<D> x, DType storage) {
  if (storage == DType::kBF16) {
    const hn::RebindToUnsigned<D> du;
    const auto bits = hn::BitCast(du, x);
    const auto lowest_kept = hn::And(hn::ShiftRight<16>(bits), hn::Set(du, 1u));
    const auto rounding = hn::Add(hn::Set(du, 0x7FFFu), lowest_kept);
    const auto high = hn::Set(du, 0xFFFF0000u);
    const auto rounded = hn::BitCast(d, hn::And(hn::Add(bits, rounding), high));
    const auto quiet_nan = hn::BitCast(d, hn::Or(hn::And(bits, high), hn::Set(du, 0x00400000u)));
    return hn::IfThenElse(hn::IsNaN(x), quiet_nan, rounded);
  }
  if constexpr (kVectorF16) {
    if (storage == DType::kF16) {
      const hn::Rebind<hwy::float16_t, D> dh;
      return hn::PromoteTo(d, hn::DemoteTo(dh, x));
    }
  }
  return x;
}

// Elements base .. base + dim - 1 of a view's last axis as f32 rounded to
// the storage dtype (LoadRounded), into out: whole vectors when the row is
// contiguous f32, bf16 or f16 and the rounding has a vector form.
HWY_INLINE void LoadRoundedRow(const TensorView& view, std::int64_t base, std::int64_t dim,
                               DType storage, float* HWY_RESTRICT out) {
  const hn::ScalableTag<float> d;
  const auto lanes = static_cast<std::int64_t>(hn::Lanes(d));
  const bool vector_input = view.dtype == DType::kF32 || view.dtype == DType::kBF16 ||
                            (view.dtype == DType::kF16 && kVectorF16);
  const bool vector_rounding = storage != DType::kF16 || kVectorF16;
  // Input already in the storage dtype (bf16 or f16 kept as bf16 or f16)
  // widens exactly: nothing to round.
  const DType rounding = view.dtype == storage ? DType::kF32 : storage;
  std::int64_t e = 0;
  if (view.strides[3] == 1 && vector_input && vector_rounding && !is_quantized(storage)) {
    for (; e + lanes <= dim; e += lanes) {
      hn::Vec<decltype(d)> x;
      if (view.dtype == DType::kF32) {
        x = hn::LoadU(d, static_cast<const float*>(view.data) + base + e);
      } else if (view.dtype == DType::kBF16) {
        const hn::Rebind<hwy::bfloat16_t, decltype(d)> db;
        const auto* row = static_cast<const hwy::bfloat16_t*>(view.data) + base;
        x = hn::PromoteTo(d, hn::LoadU(db, row + e));
      } else {
        const hn::Rebind<hwy::float16_t, decltype(d)> dh;
        const auto* row = static_cast<const hwy::float16_t*>(view.data) + base;
        x = hn::PromoteTo(d, hn::LoadU(dh, row + e));
      }
      hn::StoreU(RoundToStorage(d, x, rounding), d, out + e);
    }
  }
  for (; e < dim; ++e) out[e] = LoadRounded(view, base + e * view.strides[3], storage);
}

// out[e * kKeyTile + c] = rows[c][e] for c < count, e < dim, in square
// blocks of kSide rows (in registers where the target has a transpose):
// the rows of a head sit a whole token apart (often a multiple of 4 KiB),
// so reading one dim of 64 rows at a time would put all 64 lines in one
// set of the L1 cache; a block touches only kSide rows at a time.
HWY_INLINE void TransposeKeys(const float* const* rows, std::int64_t count, std::int64_t dim, float* out) {
#if LOOKBACK_TRANSPOSE_16X16
  constexpr std::int64_t kSide = 16;
#else
  constexpr std::int64_t kSide = 8;
#endif
  std::int64_t c0 = 0;
  for (; c0 + kSide <= count; c0 += kSide) {
    std::int64_t e0 = 0;
    for (; e0 + kSide <= dim; e0 += kSide) {
      const float* block[kSide];
      for (std::int64_t i = 0; i < kSide; ++i) block[i] = rows[c0 + i] + e0;
#if LOOKBACK_TRANSPOSE_16X16
      Transpose16x16(block, out + e0 * kKeyTile + c0, kKeyTile);
#elif LOOKBACK_TRANSPOSE_8X8
      Transpose8x8(block, out + e0 * kKeyTile + c0, kKeyTile);
#else
      for (std::int64_t e = 0; e < kSide; ++e) {
        for (std::int64_t i = 0; i < kSide; ++i) out[(e0 + e) * kKeyTile + c0 + i] = block[i][e];
      }
#endif
    }
    for (; e0 < dim; ++e0) {
      for (std::int64_t c = c0; c < c0 + kSide; ++c) out[e0 * kKeyTile + c] = rows[c][e0];
    }
  }
  for (std::int64_t e = 0; e < dim; ++e) {
    for (std::int64_t c = c0; c < count; ++c) out[e * kKeyTile + c] = rows[c][e];
  }
}

// One key tile of (b, kv_head) as f32: K transposed, V row-major. Padded
// dims and keys past seqlen_k read as 0.
HWY_INLINE void PackF32Tile(const PrefillParams& params, const PackedKV& packed, std::int64_t b,
                            std::int64_t kv_head, std::int64_t tile) {
  const AttentionShape& shape = params.shape;
  const std::int64_t dim = shape.head_dim, padded = packed.padded_dim;
  float* k_out = packed.k_tile(b, kv_head, shape.kv_heads, tile);
  float* v_out = packed.v_rows(b, kv_head, shape.kv_heads, tile * kKeyTile);
  const std::int64_t key_begin = tile * kKeyTile;
  const std::int64_t key_end = std::min(shape.seqlen_k, key_begin + kKeyTile);
  const std::int64_t count = key_end - key_begin;
  // Padded dims and keys past seqlen_k must read as 0, never as stale
  // memory (they are multiplied, though never by a visible weight).
  if (count < kKeyTile || dim < padded) {
    std::memset(k_out, 0, sizeof(float) * static_cast<std::size_t>(padded * kKeyTile));
    std::memset(v_out, 0, sizeof(float) * static_cast<std::size_t>(padded * kKeyTile));
  }
  const bool plain = params.storage == DType::kF32 && params.k.dtype == DType::kF32 &&
                     params.v.dtype == DType::kF32 && params.k.strides[3] == 1 &&
                     params.v.strides[3] == 1;
  if (plain) {
    // The common case: f32 rows with unit stride. V rows are copied whole,
    // K is transposed in register blocks.
    const float* k_rows[kKeyTile];
    for (std::int64_t c = 0; c < count; ++c) {
      prefetch_row(params.k, b, key_begin + c + kRowPrefetchDistance, kv_head);
      prefetch_row(params.v, b, key_begin + c + kRowPrefetchDistance, kv_head);
      k_rows[c] = static_cast<const float*>(params.k.data) + params.k.offset(b, key_begin + c, kv_head, 0);
      const float* v_row =
          static_cast<const float*>(params.v.data) + params.v.offset(b, key_begin + c, kv_head, 0);
      std::memcpy(v_out + c * padded, v_row, sizeof(float) * static_cast<std::size_t>(dim));
    }
    TransposeKeys(k_rows, count, dim, k_out);
  } else if (params.k.strides[3] == 1 && params.v.strides[3] == 1) {
    // Contiguous rows of another dtype or storage: each row converted and
    // rounded in vectors, V into place, K into rows transposed as above.
    alignas(64) float k_converted[kKeyTile * kMaxHeadDim];
    const float* k_rows[kKeyTile];
    for (std::int64_t c = 0; c < count; ++c) {
      prefetch_row(params.k, b, key_begin + c + kRowPrefetchDistance, kv_head);
      prefetch_row(params.v, b, key_begin + c + kRowPrefetchDistance, kv_head);
      float* k_row = k_converted + c * dim;
      const std::int64_t key = key_begin + c;
      LoadRoundedRow(params.k, params.k.offset(b, key, kv_head, 0), dim, params.storage, k_row);
      LoadRoundedRow(params.v, params.v.offset(b, key, kv_head, 0), dim, params.storage,
                     v_out + c * padded);
      k_rows[c] = k_row;
    }
    TransposeKeys(k_rows, count, dim, k_out);
  } else {
    for (std::int64_t key = key_begin; key < key_end; ++key) {
      prefetch_row(params.k, b, key + kRowPrefetchDistance, kv_head);
      prefetch_row(params.v, b, key + kRowPrefetchDistance, kv_head);
      const std::int64_t column = key - key_begin;
      const std::int64_t k_base = params.k.offset(b, key, kv_head, 0);
      const std::int64_t v_base = params.v.offset(b, key, kv_head, 0);
      for (std::int64_t e = 0; e < dim; ++e) {
        k_out[e * kKeyTile + column] = LoadRounded(params.k, k_base + e * params.k.strides[3], params.storage);
        v_out[column * padded + e] = LoadRounded(params.v, v_base + e * params.v.strides[3], params.storage);
      }
    }
  }
}

// One key tile of (b, kv_head) in the plan's layout.
inline void PackTile(const PrefillParams& params, [[maybe_unused]] const PrefillPlan& plan, const PackedKV& packed,
                     std::int64_t b, std::int64_t kv_head, std::int64_t tile) {
#if LOOKBACK_X86_AVX512
  if (plan.path != PrefillPath::kF32) {  // AMX and bf16 dots: the pair layouts
    PackAmxTile(params, packed, b, kv_head, tile);
    return;
  }
#endif
  if (is_quantized(params.storage)) {
    PackQuantizedTile(params, packed, b, kv_head, tile);
    return;
  }
  PackF32Tile(params, packed, b, kv_head, tile);
}

// Packs params.k and params.v for the plan's path, one task per key tile.
inline void PackKV(const PrefillParams& params, const PrefillPlan& plan, const PackedKV& packed,
                   Context& context) {
  const AttentionShape& shape = params.shape;
  context.parallel_for(shape.batch * shape.kv_heads * plan.key_tiles, [&](std::int64_t task, int) {
    const std::int64_t tile = task % plan.key_tiles;
    const std::int64_t kv_head = (task / plan.key_tiles) % shape.kv_heads;
    const std::int64_t b = task / (plan.key_tiles * shape.kv_heads);
    PackTile(params, plan, packed, b, kv_head, tile);
  });
}

}  // namespace lookback::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // LOOKBACK_KERNELS_PACK_INL_H_
