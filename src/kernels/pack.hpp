// Packing K and V once per call into the layouts the micro-kernels stream:
// K transposed per key tile, V row-major, both f32 with head_dim padded,
// values rounded to the storage dtype on the way in.
#pragma once

#include <cstdint>

#include "kernels/prefill.hpp"
#include "kernels/tiles.hpp"

namespace lookback::kernels {

struct PackedKV {
  // (batch, kv_heads, key_tiles, padded_head_dim, kKeyTile): K transposed.
  float* k_transposed = nullptr;
  // (batch, kv_heads, key_tiles * kKeyTile, padded_head_dim): V.
  float* v = nullptr;
  std::int64_t key_tiles = 0;
  std::int64_t padded_dim = 0;

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
PackedKV pack_kv(const PrefillParams& params, Context& context);

// Rounds a float to the storage dtype and back (identity for f32).
float round_to_storage(float value, DType storage) noexcept;

}  // namespace lookback::kernels
