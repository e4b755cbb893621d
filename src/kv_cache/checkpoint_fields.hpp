// The field layer of the checkpoint codec (gemma.cpp's "fields"): fixed-width
// little-endian integers written and read one by one (core/little_endian.hpp),
// and a reader that never reads past the end of its section. Shared by
// checkpoint_format.cc and checkpoint_tables.cc only.
#pragma once

#include <fmt/format.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "core/little_endian.hpp"
#include "lookback/error.hpp"

namespace lookback::checkpoint_format {

using Bytes = std::span<const std::byte>;

// u64 fields hold values up to this (docs/checkpoint.md).
inline constexpr std::int64_t kMaxInt64 = std::numeric_limits<std::int64_t>::max();

// Damage found while parsing: lookback::Error (kFormat).
[[noreturn]] inline void damaged(const std::string& what) { throw Error(ErrorCode::kFormat, what); }

inline void put_u32(std::vector<std::byte>& out, std::uint32_t value) {
  detail::put_le(out, value, 4);
}
inline void put_u64(std::vector<std::byte>& out, std::uint64_t value) {
  detail::put_le(out, value, 8);
}
inline void put_i64(std::vector<std::byte>& out, std::int64_t value) {
  put_u64(out, static_cast<std::uint64_t>(value));
}
inline std::uint32_t get_u32(const std::byte* p) {
  return static_cast<std::uint32_t>(detail::get_le(p, 4));
}
inline std::uint64_t get_u64(const std::byte* p) { return detail::get_le(p, 8); }

// Reads fields of one section in order, never past its end.
class FieldReader {
 public:
  FieldReader(Bytes bytes, const char* section) : bytes_(bytes), section_(section) {}

  std::int64_t remaining() const noexcept {
    return static_cast<std::int64_t>(bytes_.size() - position_);
  }
  // Checks that `count` records of `record_bytes` fit in what is left, before
  // anything is allocated for them.
  void need(std::int64_t count, std::int64_t record_bytes, const std::string& what) const {
    if (count > remaining() / record_bytes) {
      damaged(
          fmt::format("{} section: {} {} need {} bytes each, only {} bytes are left (expected "
                      "a section that holds them)",
                      section_, count, what, record_bytes, remaining()));
    }
  }
  std::uint32_t u32(const char* field) {
    need(1, 4, field);
    const std::uint32_t value = get_u32(bytes_.data() + position_);
    position_ += 4;
    return value;
  }
  std::uint64_t u64(const char* field) {
    need(1, 8, field);
    const std::uint64_t value = get_u64(bytes_.data() + position_);
    position_ += 8;
    return value;
  }
  // A u64 that must lie in [min, max].
  std::int64_t number(const char* field, std::int64_t min, std::int64_t max) {
    const std::uint64_t value = u64(field);
    if (value > static_cast<std::uint64_t>(max) || static_cast<std::int64_t>(value) < min) {
      damaged(fmt::format("{} section: {} is {} (expected {} to {})", section_, field, value, min,
                          max));
    }
    return static_cast<std::int64_t>(value);
  }

 private:
  Bytes bytes_;
  std::size_t position_ = 0;
  const char* section_;
};

}  // namespace lookback::checkpoint_format
