// Packing K and V once per call into the layouts the micro-kernels stream:
// K transposed per key tile, V row-major, both f32 with head_dim padded,
// values rounded to the storage dtype on the way in.
#pragma once

#include <cstdint>

#include "kernels/prefill.hpp"
#include "kernels/tiles.hpp"

namespace lookback::kernels {

struct PackedKV {
  // (batch, kv_heads, key_tiles, padded_head_dim, kKeyTile): K transposed
  // (not with AMX tiles).
  float* k_transposed = nullptr;
  // (batch, kv_heads, key_tiles * kKeyTile, padded_head_dim): V (not with
  // AMX tiles).
  float* v = nullptr;
  // AMX pair layouts (only when params.amx_tiles), two bf16 per u32:
  // (batch, kv_heads, key_tiles, padded_dim / 2, kKeyTile): dims (2r, 2r+1) of a key;
  std::uint32_t* k_pairs = nullptr;
  // (batch, kv_heads, key_tiles, kKeyTile / 2, padded_dim): keys (2s, 2s+1) of a dim.
  std::uint32_t* v_pairs = nullptr;
  std::int64_t key_tiles = 0;
  std::int64_t padded_dim = 0;

  const std::uint32_t* k_pair_tile(std::int64_t b, std::int64_t kv_head, std::int64_t kv_heads,
                                   std::int64_t tile) const noexcept {
    return k_pairs + (((b * kv_heads + kv_head) * key_tiles + tile) * padded_dim / 2) * kKeyTile;
  }
  const std::uint32_t* v_pair_tile(std::int64_t b, std::int64_t kv_head, std::int64_t kv_heads,
                                   std::int64_t tile) const noexcept {
    return v_pairs + (((b * kv_heads + kv_head) * key_tiles + tile) * kKeyTile / 2) * padded_dim;
  }

  const float* k_tile(std::int64_t b, std::int64_t kv_head, std::int64_t kv_heads,
                      std::int64_t tile) const noexcept {
    return k_transposed +
           (((b * kv_heads + kv_head) * key_tiles + tile) * padded_dim) * kKeyTile;
  }
  const float* v_rows(std::int64_t b, std::int64_t kv_head, std::int64_t kv_heads,
                      std::int64_t key) const noexcept {
    return v + ((b * kv_heads + kv_head) * key_tiles * kKeyTile + key) * padded_dim;
  }
};

// Packs params.k and params.v into the context's shared scratch, in parallel.
// With params.amx_tiles: only the pair layouts (scores always run on the
// tiles; the masked tiles' f32 V rows are unpacked from the pairs when
// needed).
PackedKV pack_kv(const PrefillParams& params, Context& context);

// out[e * kKeyTile + c] = rows[c][e] for keys c < count and dims e < dim
// (on the target prefill dispatches to).
void transpose_key_tile(const float* const* rows, std::int64_t count, std::int64_t dim, float* out);

// The AMX layouts of one key tile (on the target prefill dispatches to).
void pack_amx_tile(const PrefillParams& params, const PackedKV& packed, std::int64_t b,
                   std::int64_t kv_head, std::int64_t tile);

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
