// What the contiguous cache and the paged pool share: the stored row layout,
// conversion and RoPE on the way in, and validation. The decode driver is
// kv_cache/decode_driver.hpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "kv_cache/decode_driver.hpp"
#include "lookback/kv_cache.hpp"

namespace lookback::detail {

// A stored token is (kv_heads, padded_dim) elements of the storage dtype,
// head_dim padded with zeros to kernels::kDimAlign so rows are whole vectors;
// 8-bit storage adds one f32 scale per kv head (core/quant.hpp), kept after
// the codes of a whole buffer (KvCache) or block (PagedKvPool):
//   codes (kv_heads, slots, padded_dim), then scales (kv_heads, slots) f32.
std::int64_t stored_padded_dim(const CacheConfig& config);
std::int64_t stored_token_bytes(const CacheConfig& config);
// Where the scales of a buffer or block of `slots` tokens start, in bytes
// (0 when the storage has none).
std::int64_t scales_offset(const CacheConfig& config, std::int64_t slots);

// K and V of `slots` stored tokens in bytes, saturating at the int64 maximum.
std::int64_t cache_bytes(const CacheConfig& config, std::int64_t slots);

// This machine's physical memory in bytes (sysconf: pages * page size); the
// int64 maximum when unknown.
std::int64_t physical_memory();

// "562949953421312 bytes (512.0 TiB)"
std::string bytes_text(std::int64_t bytes);

// Refuses, before anything is allocated, a cache larger than this machine's
// physical memory: `count` units (tokens, blocks) of `kv_bytes` for K and as
// many for V, plus `table_bytes` of bookkeeping each. Throws lookback::Error
// (kCapacity) "<argument>: <count> <unit> need <bytes> for K and V, more than
// this machine's memory of <bytes> (expected at most <n> <unit>)".
void check_memory(const std::string& argument, std::int64_t count, const std::string& unit,
                  std::int64_t kv_bytes, std::int64_t table_bytes = 0);

// Storage for K or V that is allocated but never zeroed: std::vector would
// write every byte, so `cache save --capacity 4000000` zeroed 4 GB to save
// 100 KB. The caches write every byte before they read or save it: KvCache
// reads and saves only the rows below its length; PagedKvPool zeroes each
// block when it hands it out (PagedKvPool::Impl::take_block), and saves and
// copies only blocks in use.
class CacheStorage {
 public:
  CacheStorage() = default;
  // Throws lookback::Error (kCapacity) naming `argument` when the system has
  // no room (std::bad_alloc), never std::bad_alloc itself.
  CacheStorage(std::int64_t bytes, const std::string& argument);

  std::byte* data() noexcept { return data_.get(); }
  const std::byte* data() const noexcept { return data_.get(); }
  std::int64_t size() const noexcept { return size_; }

 private:
  std::unique_ptr<std::byte[]> data_;
  std::int64_t size_ = 0;
};

// Throws lookback::Error naming the argument for a bad config.
void validate_config(const CacheConfig& config);

// Checks k and v (tokens, kv_heads, head_dim) against the config; returns tokens.
std::int64_t validate_kv(const CacheConfig& config, const TensorView& k, const TensorView& v);

// Converts tokens [begin, end) of k or v into stored rows, head-major: token
// t of kv head h goes to destination + h * head_stride + (t - begin) *
// padded_dim elements. Rotates by RoPE at first_position + (t - begin) when
// `rotate` (keys only). 8-bit storage quantizes each row and writes its
// scale to maybe_scales + h * scale_head_stride + (t - begin).
void store_tokens(const CacheConfig& config, const TensorView& source, std::int64_t begin,
                  std::int64_t end, std::int64_t first_position, bool rotate, void* destination,
                  std::int64_t head_stride, float* maybe_scales = nullptr,
                  std::int64_t scale_head_stride = 0);

}  // namespace lookback::detail
