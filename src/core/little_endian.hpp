// lookback's one endianness policy, for every file it reads or writes
// (.npy arrays, KV-cache checkpoints):
//
//   - On disk everything is little-endian.
//   - Integer fields (lengths, counts, offsets, CRCs) are encoded and decoded
//     byte by byte with shifts (put_le / get_le below), so they are right
//     on any host and never depend on struct layout or alignment.
//   - Bulk element data (array payloads, K/V rows) is copied as raw bytes,
//     which is right only on a little-endian host. x86-64 and ARM64 are; a
//     big-endian port would byte-swap elements where they are copied, and
//     this assertion marks the one place that assumption is made.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace lookback::detail {

static_assert(std::endian::native == std::endian::little,
              "lookback copies little-endian file data as raw bytes: a big-endian host "
              "must byte-swap elements (src/core/little_endian.hpp)");

// Appends the low `width` bytes of `value`, least significant first.
inline void put_le(std::vector<std::byte>& out, std::uint64_t value, int width) {
  for (int i = 0; i < width; ++i) out.push_back(static_cast<std::byte>((value >> (8 * i)) & 0xffu));
}

// Reads `width` bytes at `p`, least significant first.
inline std::uint64_t get_le(const std::byte* p, int width) {
  std::uint64_t value = 0;
  for (int i = width - 1; i >= 0; --i) value = (value << 8) | std::to_integer<std::uint64_t>(p[i]);
  return value;
}

}  // namespace lookback::detail
