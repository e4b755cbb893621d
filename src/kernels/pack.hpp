// K and V packed once per call into the layouts the micro-kernels stream
// (PackedLayout in prefill.hpp; the packing itself is per target, in
// pack-inl.h), and the row helpers packing and the caches share.
#pragma once

#include <cstdint>

#include "kernels/prefill.hpp"
#include "kernels/tiles.hpp"
#include "lookback/dtype.hpp"
#include "lookback/tensor.hpp"

namespace lookback::kernels {

// The packed K and V of one call, carved from the shared scratch by a
// PackedLayout (shapes there); pointers a path does not use are null.
struct PackedKV {
  float* k_transposed;
  float* v;
  std::uint32_t* k_pairs;
  std::uint32_t* v_pairs;
  std::int64_t key_tiles;
  std::int64_t padded_dim;

  // One kv head's K/V only (a head task's own buffer): every (b, kv_head)
  // maps to it.
  bool one_head;

  PackedKV(const PackedLayout& layout, void* base, std::int64_t tiles, std::int64_t padded,
           bool single_head = false)
      : k_transposed(layout.k_transposed.count != 0 ? layout.k_transposed.in(base) : nullptr),
        v(layout.v.count != 0 ? layout.v.in(base) : nullptr),
        k_pairs(layout.k_pairs.count != 0 ? layout.k_pairs.in(base) : nullptr),
        v_pairs(layout.v_pairs.count != 0 ? layout.v_pairs.in(base) : nullptr),
        key_tiles(tiles),
        padded_dim(padded),
        one_head(single_head) {}

  std::int64_t slot(std::int64_t b, std::int64_t kv_head, std::int64_t kv_heads) const noexcept {
    return one_head ? 0 : b * kv_heads + kv_head;
  }

  std::uint32_t* k_pair_tile(std::int64_t b, std::int64_t kv_head, std::int64_t kv_heads,
                                   std::int64_t tile) const noexcept {
    return k_pairs + ((slot(b, kv_head, kv_heads) * key_tiles + tile) * padded_dim / 2) * kKeyTile;
  }
  std::uint32_t* v_pair_tile(std::int64_t b, std::int64_t kv_head, std::int64_t kv_heads,
                                   std::int64_t tile) const noexcept {
    return v_pairs + ((slot(b, kv_head, kv_heads) * key_tiles + tile) * kKeyTile / 2) * padded_dim;
  }

  float* k_tile(std::int64_t b, std::int64_t kv_head, std::int64_t kv_heads,
                      std::int64_t tile) const noexcept {
    return k_transposed +
           ((slot(b, kv_head, kv_heads) * key_tiles + tile) * padded_dim) * kKeyTile;
  }
  float* v_rows(std::int64_t b, std::int64_t kv_head, std::int64_t kv_heads,
                      std::int64_t key) const noexcept {
    return v + (slot(b, kv_head, kv_heads) * key_tiles * kKeyTile + key) * padded_dim;
  }
};

// Rows of one head are heads * head_dim elements apart (16 KiB at 32 heads
// of 128 floats): every row is on a new page, where the hardware
// prefetchers stop. Loops that read such rows one by one prefetch the row
// this many ahead.
inline constexpr std::int64_t kRowPrefetchDistance = 4;

// Prefetches row (b, token, head) of a (batch, tokens, heads, head_dim)
// view, when it exists and its elements are contiguous.
inline void prefetch_row(const TensorView& view, std::int64_t b, std::int64_t token,
                         std::int64_t head) noexcept {
  if (token >= view.shape[1] || view.strides[3] != 1) return;
  const std::size_t size = dtype_size(view.dtype);
  const char* row = static_cast<const char*>(view.data) +
                    static_cast<std::size_t>(view.offset(b, token, head, 0)) * size;
  const std::size_t bytes = static_cast<std::size_t>(view.shape[3]) * size;
  for (std::size_t line = 0; line < bytes; line += 64) __builtin_prefetch(row + line);
}

// Rounds a float to the storage dtype and back (identity for f32).
inline float round_to_storage(float value, DType storage) noexcept {
  switch (storage) {
    case DType::kBF16: return bf16_to_f32(f32_to_bf16(value));
    case DType::kF16: return f16_to_f32(f32_to_f16(value));
    default: return value;
  }
}

}  // namespace lookback::kernels
