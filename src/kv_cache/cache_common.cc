#include "kv_cache/cache_common.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>

#include "core/quant.hpp"
#include "kernels/pack.hpp"
#include "kernels/tiles.hpp"
#include "lookback/error.hpp"

namespace lookback::detail {

std::int64_t stored_padded_dim(const CacheConfig& config) {
  return kernels::padded_head_dim(config.head_dim);
}

std::int64_t stored_token_bytes(const CacheConfig& config) {
  const std::int64_t scale_bytes = is_quantized(config.storage) ? sizeof(float) : 0;
  return config.kv_heads * (stored_padded_dim(config) *
                                static_cast<std::int64_t>(dtype_size(config.storage)) +
                            scale_bytes);
}

std::int64_t scales_offset(const CacheConfig& config, std::int64_t slots) {
  if (!is_quantized(config.storage)) return 0;
  return config.kv_heads * slots * stored_padded_dim(config);  // one byte per code
}

std::int64_t cache_bytes(const CacheConfig& config, std::int64_t slots) {
  std::int64_t bytes;
  if (__builtin_mul_overflow(slots, stored_token_bytes(config), &bytes) ||
      __builtin_mul_overflow(bytes, std::int64_t{2}, &bytes)) {
    return std::numeric_limits<std::int64_t>::max();
  }
  return bytes;
}

std::int64_t physical_memory() {
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page = ::sysconf(_SC_PAGESIZE);
  std::int64_t bytes;
  if (pages <= 0 || page <= 0 ||
      __builtin_mul_overflow(static_cast<std::int64_t>(pages), static_cast<std::int64_t>(page),
                             &bytes)) {
    return std::numeric_limits<std::int64_t>::max();
  }
  return bytes;
}

std::string bytes_text(std::int64_t bytes) {
  constexpr const char* kUnits[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return fmt::format("{} bytes", bytes);
  double scaled = static_cast<double>(bytes) / 1024;
  int unit = 0;
  while (scaled >= 1024 && unit + 1 < static_cast<int>(std::size(kUnits))) {
    scaled /= 1024;
    ++unit;
  }
  return fmt::format("{} bytes ({:.1f} {})", bytes, scaled, kUnits[unit]);
}

void check_memory(const std::string& argument, std::int64_t count, const std::string& unit,
                  std::int64_t kv_bytes, std::int64_t table_bytes) {
  // 128-bit: 2 * count * kv_bytes may pass the int64 range, and is then too much anyway.
  const __int128 per_unit = 2 * static_cast<__int128>(kv_bytes) + table_bytes;
  const __int128 needed = per_unit * count;
  const std::int64_t memory = physical_memory();
  if (needed <= memory) return;
  const __int128 saturated = std::min<__int128>(needed, std::numeric_limits<std::int64_t>::max());
  throw Error(ErrorCode::kCapacity,
              fmt::format("{}: {} {} need {} for K and V{}, more than this machine's memory of {} "
                          "(expected at most {} {})",
                          argument, count, unit, bytes_text(static_cast<std::int64_t>(saturated)),
                          table_bytes > 0 ? " and their tables" : "", bytes_text(memory),
                          static_cast<std::int64_t>(memory / per_unit), unit));
}

CacheStorage::CacheStorage(std::int64_t bytes, const std::string& argument) : size_(bytes) {
  try {
    data_ = std::make_unique_for_overwrite<std::byte[]>(static_cast<std::size_t>(bytes));
  } catch (const std::bad_alloc&) {
    throw Error(ErrorCode::kCapacity,
                fmt::format("{}: out of memory allocating {} (expected a size this process "
                            "can allocate)",
                            argument, bytes_text(bytes)));
  }
}

void validate_config(const CacheConfig& config) {
  if (config.kv_heads < 1) throw Error(fmt::format("kv_heads: {} (expected >= 1)", config.kv_heads));
  if (config.head_dim < 1 || config.head_dim > kMaxHeadDim) {
    throw Error(fmt::format("head_dim: {} (expected 1 to {})", config.head_dim, kMaxHeadDim));
  }
  if (config.storage != DType::kF32 && config.storage != DType::kF16 &&
      config.storage != DType::kBF16 && !is_quantized(config.storage)) {
    throw Error(fmt::format("storage: {} (expected f32, f16, bf16, int8, fp8e4m3 or fp8e5m2)",
                            dtype_name(config.storage)));
  }
  if (config.rope && !(config.rope->theta > 0.0f && std::isfinite(config.rope->theta))) {
    throw Error(fmt::format("rope theta: {} (expected a finite number > 0)", config.rope->theta));
  }
}

std::int64_t validate_kv(const CacheConfig& config, const TensorView& k, const TensorView& v) {
  validate_view(k, 3, "k");
  validate_view(v, 3, "v");
  const std::int64_t tokens = k.shape[0];
  if (k.shape[1] != config.kv_heads || k.shape[2] != config.head_dim) {
    throw Error(fmt::format("k: shape {} (expected (tokens, {}, {}) = (tokens, kv_heads, head_dim))",
                            shape_string(k), config.kv_heads, config.head_dim));
  }
  if (v.shape != k.shape) {
    throw Error(fmt::format("v: shape {} (expected {}, the shape of k)", shape_string(v),
                            shape_string(k)));
  }
  return tokens;
}

namespace {

void store_row(DType storage, const float* row, std::int64_t count, void* destination) {
  switch (storage) {
    case DType::kF32:
      std::memcpy(destination, row, static_cast<std::size_t>(count) * sizeof(float));
      return;
    case DType::kBF16: {
      auto* out = static_cast<std::uint16_t*>(destination);
      for (std::int64_t e = 0; e < count; ++e) out[e] = f32_to_bf16(row[e]);
      return;
    }
    case DType::kF16: {
      auto* out = static_cast<std::uint16_t*>(destination);
      for (std::int64_t e = 0; e < count; ++e) out[e] = f32_to_f16(row[e]);
      return;
    }
    default: return;
  }
}

}  // namespace

void store_tokens(const CacheConfig& config, const TensorView& source, std::int64_t begin,
                  std::int64_t end, std::int64_t first_position, bool rotate, void* destination,
                  std::int64_t head_stride, float* maybe_scales, std::int64_t scale_head_stride) {
  const std::int64_t padded = stored_padded_dim(config);
  const std::int64_t row_floats = config.kv_heads * padded;
  std::vector<float> row(static_cast<std::size_t>(row_floats), 0.0f);  // zero padding
  auto* out = static_cast<std::byte*>(destination);
  const auto element = static_cast<std::int64_t>(dtype_size(config.storage));
  for (std::int64_t t = begin; t < end; ++t) {
    for (std::int64_t h = 0; h < config.kv_heads; ++h) {
      load_as_floats(source.data, source.dtype, source.offset(t, h, 0), source.strides[2],
                     config.head_dim, row.data() + h * padded);
    }
    if (rotate && config.rope) {
      // One token, kv_heads heads; padded layout: rotate each head's first head_dim.
      for (std::int64_t h = 0; h < config.kv_heads; ++h) {
        apply_rope(row.data() + h * padded, 1, 1, config.head_dim, first_position + (t - begin),
                   *config.rope);
      }
    }
    for (std::int64_t h = 0; h < config.kv_heads; ++h) {
      std::byte* stored = out + (h * head_stride + (t - begin) * padded) * element;
      if (is_quantized(config.storage)) {
        // The scale comes from the head_dim values; the padding's codes are 0.
        maybe_scales[h * scale_head_stride + (t - begin)] = quantize_row(
            row.data() + h * padded, config.head_dim, config.storage,
            reinterpret_cast<std::uint8_t*>(stored));
        std::memset(stored + config.head_dim, 0, static_cast<std::size_t>(padded - config.head_dim));
        continue;
      }
      store_row(config.storage, row.data() + h * padded, padded, stored);
    }
  }
}

}  // namespace lookback::detail
