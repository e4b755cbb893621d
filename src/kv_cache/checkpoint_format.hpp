// The KV-cache checkpoint format (docs/checkpoint.md) as a pure codec: bytes
// in, fields out, and fields in, bytes out through a callback. No file
// descriptors and no caches: a fuzzer or a unit test drives it from memory.
// The file side is core/file_io; kv_cache/checkpoint.cc joins the two and
// copies rows to and from the caches.
//
// Byte order: little-endian on disk, by the one policy of
// core/little_endian.hpp (integer fields encoded byte by byte, K/V rows
// copied as raw bytes on a little-endian host).
//
// Every parse function treats its bytes as untrusted: each count is checked
// against the bytes present before anything is sized by it, and damage is
// lookback::Error (kFormat) saying what was expected. Messages do not name a
// path; the caller prefixes it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "lookback/checkpoint.hpp"

namespace lookback::checkpoint_format {

using Bytes = std::span<const std::byte>;
// Receives encoded bytes, piece by piece, in file order.
using ByteSink = std::function<void(Bytes)>;
// Produces one data section (keys or values) into a sink, row by row. It is
// called twice by encode(): once to checksum, once to write.
using SectionWriter = std::function<void(const ByteSink&)>;

// The CRC-32 the format uses (zlib's crc32, the standard one).
class Crc32 {
 public:
  Crc32();
  void update(Bytes bytes);
  std::uint32_t value() const noexcept { return crc_; }

 private:
  std::uint32_t crc_;
};

// The directory's length for the longest kind: enough of a file's head for
// parse_directory().
inline constexpr std::int64_t kLongestDirectoryBytes = 160;  // a paged checkpoint's

enum class SectionId { kHeader, kTables, kKeys, kValues };

struct Directory {
  CheckpointKind kind = CheckpointKind::kContiguous;
  std::vector<CheckpointSection> sections;  // in file order; computed_crc and present unset
  std::int64_t end = 0;                     // where the last section ends

  const CheckpointSection& section(SectionId id) const;
};

// The header section's fields, plus sizes derived from them.
struct Header {
  CheckpointKind kind = CheckpointKind::kContiguous;
  CacheConfig config;
  std::int64_t capacity = 0;        // contiguous, ring
  std::int64_t length = 0;          // contiguous, ring (a ring's may exceed its capacity)
  std::int64_t sink_tokens = 0;     // ring
  std::int64_t block_size = 0;      // paged
  std::int64_t num_blocks = 0;      // paged
  std::int64_t used_blocks = 0;     // paged
  std::int64_t sequence_count = 0;  // paged
  SequenceId next_id = 0;           // paged
  // One head's row in the file: head_dim elements, no padding; 8-bit
  // storage: head_dim codes, then the row's f32 scale (file_row_bytes).
  std::int64_t row_bytes = 0;
  // Expected size of each data section.
  std::int64_t data_bytes = 0;
};

// The tables section (paged pools only).
struct Tables {
  std::vector<std::int32_t> references;       // (num_blocks,)
  std::vector<std::int64_t> free_list;        // (num_blocks - used_blocks,), taken from the back
  std::vector<CheckpointSequence> sequences;  // ascending ids
};

// Everything a verified checkpoint holds; `keys` and `values` point into the
// bytes parsed, in file order: (kv_heads, length, head_dim) contiguous,
// (kv_heads, stored_tokens(header), head_dim) ring,
// (used_blocks, kv_heads, block_size, head_dim) paged.
struct Parsed {
  Header header;
  Tables tables;  // paged only
  Bytes keys;
  Bytes values;
};

// Headers for saving, with row_bytes and data_bytes filled in.
Header contiguous_header(const CacheConfig& config, std::int64_t capacity, std::int64_t length);
Header ring_header(const CacheConfig& config, std::int64_t capacity, std::int64_t length,
                   std::int64_t sink_tokens);
Header paged_header(const CacheConfig& config, std::int64_t block_size, std::int64_t num_blocks,
                    std::int64_t used_blocks, std::int64_t sequence_count, SequenceId next_id);

// Tokens a contiguous or ring checkpoint stores per kv head: length, or a
// ring's min(length, capacity).
std::int64_t stored_tokens(const Header& header);
// The position of the `row`-th stored token (0 <= row < stored_tokens): rows
// run in position order, a ring's sink tokens first, then the newest tokens
// it keeps (docs/checkpoint.md).
std::int64_t stored_position(const Header& header, std::int64_t row);

// Bytes of one stored element.
std::int64_t element_bytes(const CacheConfig& config);
// Bytes of one head's row in the file (Header::row_bytes).
std::int64_t file_row_bytes(const CacheConfig& config);

// The tables section's bytes (checkpoint_tables.cc).
std::vector<std::byte> encode_tables(const Tables& tables);

// Emits a whole checkpoint to `out` in file order, directory first. `tables`
// is read for paged headers only. The data writers must produce exactly
// header.data_bytes each (else kInternal).
void encode(const Header& header, const Tables& tables, const SectionWriter& keys,
            const SectionWriter& values, const ByteSink& out);

// Verifies a whole checkpoint held in memory: directory, sizes, every CRC,
// header, tables, data sizes (docs/checkpoint.md, "What loading checks").
Parsed parse(Bytes file);

// The pieces of parse(), for inspecting a file a section at a time.
//
// The version field, when `head` is long enough to hold it.
std::optional<std::uint32_t> peek_version(Bytes head);
// `head` holds the file's first bytes (at least kLongestDirectoryBytes when
// the file is that long). Checks everything the directory says, except that
// its sections end where the file ends (see size_mismatch).
Directory parse_directory(Bytes head, std::int64_t file_bytes);
Header parse_header(Bytes section, CheckpointKind kind);
Tables parse_tables(Bytes section, const Header& header);  // checkpoint_tables.cc
void check_data_sizes(const Header& header, const Directory& directory);
// One sentence each, for the directory's end against the file's size and for
// a section whose checksum differs.
std::string size_mismatch(const Directory& directory, std::int64_t file_bytes);
std::string crc_mismatch(const CheckpointSection& section);

}  // namespace lookback::checkpoint_format
