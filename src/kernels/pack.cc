#include "kernels/pack.hpp"

#include <cstring>

namespace lookback::kernels {

namespace {

// Reads element `offset` of a view as float rounded to the storage dtype.
inline float load(const TensorView& view, std::int64_t offset, DType storage) noexcept {
  const float value = view.dtype == DType::kF32
                          ? static_cast<const float*>(view.data)[offset]
                          : load_as_float(view.data, view.dtype, offset);
  return storage == DType::kF32 ? value : round_to_storage(value, storage);
}

}  // namespace

PackedKV pack_kv(const PrefillParams& params, Context& context) {
  const AttentionShape& shape = params.shape;
  PackedKV packed;
  packed.key_tiles = tiles_for(shape.seqlen_k, kKeyTile);
  packed.padded_dim = padded_head_dim(shape.head_dim);
  const std::int64_t per_head = packed.key_tiles * kKeyTile * packed.padded_dim;
  const std::int64_t floats = shape.batch * shape.kv_heads * per_head;
  const std::int64_t tasks = shape.batch * shape.kv_heads * packed.key_tiles;
  if (params.amx_tiles) {
    // The two pair layouts (half a float per element each).
    auto* base = static_cast<std::uint32_t*>(
        context.shared_scratch(static_cast<std::size_t>(floats) * sizeof(std::uint32_t)));
    packed.k_pairs = base;
    packed.v_pairs = packed.k_pairs + floats / 2;
    context.parallel_for(tasks, [&](std::int64_t task, int) {
      const std::int64_t tile = task % packed.key_tiles;
      const std::int64_t kv_head = (task / packed.key_tiles) % shape.kv_heads;
      pack_amx_tile(params, packed, task / (packed.key_tiles * shape.kv_heads), kv_head, tile);
    });
    return packed;
  }
  // f32 K^T and V.
  auto* base = static_cast<float*>(
      context.shared_scratch(static_cast<std::size_t>(2 * floats) * sizeof(float)));
  packed.k_transposed = base;
  packed.v = base + floats;

  const std::int64_t dim = shape.head_dim, padded = packed.padded_dim;
  context.parallel_for(tasks, [&](std::int64_t task, int) {
    const std::int64_t tile = task % packed.key_tiles;
    const std::int64_t kv_head = (task / packed.key_tiles) % shape.kv_heads;
    const std::int64_t b = task / (packed.key_tiles * shape.kv_heads);
    float* k_out = const_cast<float*>(packed.k_tile(b, kv_head, shape.kv_heads, tile));
    float* v_out = const_cast<float*>(packed.v_rows(b, kv_head, shape.kv_heads, tile * kKeyTile));
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
      transpose_key_tile(k_rows, count, dim, k_out);
    } else {
      for (std::int64_t key = key_begin; key < key_end; ++key) {
        prefetch_row(params.k, b, key + kRowPrefetchDistance, kv_head);
        prefetch_row(params.v, b, key + kRowPrefetchDistance, kv_head);
        const std::int64_t column = key - key_begin;
        const std::int64_t k_base = params.k.offset(b, key, kv_head, 0);
        const std::int64_t v_base = params.v.offset(b, key, kv_head, 0);
        for (std::int64_t e = 0; e < dim; ++e) {
          k_out[e * kKeyTile + column] = load(params.k, k_base + e * params.k.strides[3], params.storage);
          v_out[column * padded + e] = load(params.v, v_base + e * params.v.strides[3], params.storage);
        }
      }
    }
  });
  return packed;
}

}  // namespace lookback::kernels
