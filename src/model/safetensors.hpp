// The safetensors format (Hugging Face): an 8-byte little-endian header
// length N, N bytes of JSON, then the data. The JSON maps each tensor name to
// {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, offsets in
// bytes relative to the start of the data; "__metadata__" maps strings to
// strings.
//
// A pure codec over bytes (no files), so it can be fuzzed from memory
// (fuzz/fuzz_safetensors.cc). The bytes are untrusted: every malformed header
// is a lookback::Error (kFormat) naming the file and what was expected, never
// a crash and never an allocation larger than the header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace lookback::model {

// The dtype names of the format. Only kF32, kF16 and kBF16 can be model
// weights; the others are recognised (so that their sizes and offsets are
// checked and the error names them) but refused where a weight is loaded.
enum class SafeDType : std::uint8_t {
  kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU64, kU32, kU16, kU8, kBool,
  kF8E4M3, kF8E5M2,
};
std::string_view safe_dtype_name(SafeDType dtype) noexcept;  // "F32", "BF16", ...
std::size_t safe_dtype_size(SafeDType dtype) noexcept;        // bytes per element

struct SafetensorsEntry {
  std::string name;
  SafeDType dtype = SafeDType::kF32;
  std::vector<std::int64_t> shape;  // may be empty (a scalar)
  std::uint64_t begin = 0;          // bytes from the start of the data
  std::uint64_t end = 0;            // begin + numel * dtype size
};

struct SafetensorsHeader {
  std::uint64_t data_offset = 0;  // 8 + N: where the data starts in the file
  std::uint64_t data_bytes = 0;   // file size - data_offset
  std::vector<SafetensorsEntry> tensors;  // sorted by begin

  // The entry named `name`, or nullptr.
  const SafetensorsEntry* find(std::string_view name) const noexcept;
};

// Headers larger than this are refused before they are parsed (the format's
// own reference implementation uses the same limit).
inline constexpr std::uint64_t kMaxSafetensorsHeader = 100'000'000;

// Parses and checks the header of a whole file held in (or mapped into)
// memory: the header length fits the file, the JSON is an object of entries,
// every dtype is a known name, shapes are non-negative integers whose byte
// count does not overflow and equals end - begin, offsets lie inside the data
// and no two tensors overlap. `name` prefixes every message.
SafetensorsHeader parse_safetensors(std::span<const std::byte> file, std::string_view name);

// Writes a file in the format (for tests and tools): tensors are given as
// (entry, bytes) with begin/end filled in by the writer, in the order given.
std::vector<std::byte> serialize_safetensors(
    const std::vector<std::pair<SafetensorsEntry, std::span<const std::byte>>>& tensors);

}  // namespace lookback::model
