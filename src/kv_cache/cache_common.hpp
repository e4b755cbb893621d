// What the contiguous cache and the paged pool share: the stored row layout,
// conversion and RoPE on the way in, and validation. The decode driver is
// kv_cache/decode_driver.hpp.
#pragma once

#include <cstdint>
#include "kv_cache/decode_driver.hpp"
#include "lookback/kv_cache.hpp"

namespace lookback::detail {

// A stored token is (kv_heads, padded_dim) elements of the storage dtype,
// head_dim padded with zeros to kernels::kDimAlign so rows are whole vectors.
std::int64_t stored_padded_dim(const CacheConfig& config);
std::int64_t stored_token_bytes(const CacheConfig& config);

// Throws lookback::Error naming the argument for a bad config.
void validate_config(const CacheConfig& config);

// Checks k and v (tokens, kv_heads, head_dim) against the config; returns tokens.
std::int64_t validate_kv(const CacheConfig& config, const TensorView& k, const TensorView& v);

// Converts tokens [begin, end) of k or v into stored rows, head-major: token
// t of kv head h goes to destination + h * head_stride + (t - begin) *
// padded_dim elements. Rotates by RoPE at first_position + (t - begin) when
// `rotate` (keys only).
void store_tokens(const CacheConfig& config, const TensorView& source, std::int64_t begin,
                  std::int64_t end, std::int64_t first_position, bool rotate, void* destination,
                  std::int64_t head_stride);

}  // namespace lookback::detail
