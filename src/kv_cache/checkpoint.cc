// KV-cache checkpoints: the file format (docs/checkpoint.md), an atomic
// streaming writer, and a loader that treats the file as untrusted input.
//
// The loader reads the whole file (an allocation the file system vouches for,
// never a size the file claims), then checks, in order: the directory (magic,
// version, kind, section offsets against the file's size), every section's
// CRC32, the header's dims, the tables' consistency and the data sections'
// sizes. Only then is a cache allocated (bounded by CheckpointLimits) or an
// existing one overwritten, by steps that cannot fail.
#include "lookback/checkpoint.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <span>
#include <utility>

#include "core/file_io.hpp"
#include "kv_cache/cache_common.hpp"
#include "kv_cache/impl.hpp"
#include "lookback/error.hpp"

namespace lookback {
namespace {

using Bytes = std::span<const std::byte>;

constexpr std::array<char, 8> kMagic = {'L', 'O', 'O', 'K', 'B', 'K', 'V', '\0'};
constexpr std::uint32_t kFormatVersion = 1;

// Byte sizes of the fixed parts; the tables in docs/checkpoint.md list their fields.
constexpr std::int64_t kPreambleBytes = 24;         // magic, version, kind, count, reserved
constexpr std::int64_t kEntryBytes = 32;            // tag, crc, offset, length, reserved
constexpr std::int64_t kDirectoryTrailerBytes = 8;  // directory crc, reserved
constexpr std::int64_t kContiguousHeaderBytes = 48;
constexpr std::int64_t kPagedHeaderBytes = 72;
constexpr std::int64_t kSequenceRecordBytes = 24;  // id, length, block count (then the blocks)

// Far above any model (the largest have tens), and low enough that kv_heads *
// padded head_dim * 4 bytes stays far from overflowing.
constexpr std::int64_t kMaxKvHeads = std::int64_t{1} << 24;
constexpr std::int64_t kMaxInt64 = std::numeric_limits<std::int64_t>::max();

// Writes and CRCs go through buffers of this size, so a save streams the
// cache instead of building the file in memory.
constexpr std::size_t kChunkBytes = std::size_t{1} << 20;

enum class SectionId { kHeader, kTables, kKeys, kValues };

struct SectionSpec {
  SectionId id;
  std::array<char, 4> tag;
  const char* name;
};

constexpr SectionSpec kHeaderSpec{SectionId::kHeader, {'H', 'E', 'A', 'D'}, "header"};
constexpr SectionSpec kTablesSpec{SectionId::kTables, {'T', 'A', 'B', 'L'}, "tables"};
constexpr SectionSpec kKeysSpec{SectionId::kKeys, {'K', 'D', 'A', 'T'}, "keys"};
constexpr SectionSpec kValuesSpec{SectionId::kValues, {'V', 'D', 'A', 'T'}, "values"};
constexpr std::array<SectionSpec, 3> kContiguousSections{kHeaderSpec, kKeysSpec, kValuesSpec};
constexpr std::array<SectionSpec, 4> kPagedSections{kHeaderSpec, kTablesSpec, kKeysSpec,
                                                    kValuesSpec};

std::span<const SectionSpec> sections_of(CheckpointKind kind) {
  if (kind == CheckpointKind::kContiguous) return kContiguousSections;
  return kPagedSections;
}

// Where each kind's sections sit in CheckpointInfo::sections / Directory.
std::size_t index_of(CheckpointKind kind, SectionId id) {
  const auto sections = sections_of(kind);
  for (std::size_t i = 0; i < sections.size(); ++i) {
    if (sections[i].id == id) return i;
  }
  return sections.size();
}

std::int64_t directory_bytes(CheckpointKind kind) {
  return kPreambleBytes + kEntryBytes * static_cast<std::int64_t>(sections_of(kind).size()) +
         kDirectoryTrailerBytes;
}
constexpr std::int64_t kLongestDirectoryBytes =
    kPreambleBytes + 4 * kEntryBytes + kDirectoryTrailerBytes;

std::int64_t header_bytes(CheckpointKind kind) {
  return kind == CheckpointKind::kContiguous ? kContiguousHeaderBytes : kPagedHeaderBytes;
}

std::uint32_t kind_code(CheckpointKind kind) { return kind == CheckpointKind::kContiguous ? 1 : 2; }

// Storage dtypes have their own codes in the file, so the enum's order in
// dtype.hpp can change without changing the format.
std::uint32_t dtype_code(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 0;
    case DType::kF16:
      return 1;
    case DType::kBF16:
      return 2;
    default:
      break;
  }
  throw Error(ErrorCode::kInternal,
              fmt::format("storage: {} cannot be checkpointed", dtype_name(dtype)));
}

constexpr std::uint32_t kRopeEnabled = 1;
constexpr std::uint32_t kRopeInterleaved = 2;

[[noreturn]] void damaged(const std::string& what) { throw Error(ErrorCode::kFormat, what); }

using detail::throw_io;

// Adds the path to an error raised while parsing (which does not know it).
template <typename Function>
auto with_path(const std::string& path, Function&& function) {
  try {
    return function();
  } catch (const Error& e) {
    throw Error(e.code(), path + ": " + e.what());
  }
}

std::uint32_t crc32_of(std::uint32_t crc, const void* data, std::size_t bytes) {
  // zlib takes 32-bit lengths: feed large buffers in pieces.
  const auto* p = static_cast<const Bytef*>(data);
  while (bytes > 0) {
    const std::size_t piece = std::min<std::size_t>(bytes, std::size_t{1} << 30);
    crc = static_cast<std::uint32_t>(::crc32(crc, p, static_cast<uInt>(piece)));
    p += piece;
    bytes -= piece;
  }
  return crc;
}
std::uint32_t crc32_of(Bytes bytes) {
  return crc32_of(static_cast<std::uint32_t>(::crc32(0L, Z_NULL, 0)), bytes.data(), bytes.size());
}

// ---- little-endian fields ---------------------------------------------------

void put_u32(std::vector<std::byte>& out, std::uint32_t value) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<std::byte>((value >> (8 * i)) & 0xffu));
}
void put_u64(std::vector<std::byte>& out, std::uint64_t value) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::byte>((value >> (8 * i)) & 0xffu));
}
void put_i64(std::vector<std::byte>& out, std::int64_t value) {
  put_u64(out, static_cast<std::uint64_t>(value));
}
std::uint32_t get_u32(const std::byte* p) {
  std::uint32_t value = 0;
  for (int i = 0; i < 4; ++i) value |= static_cast<std::uint32_t>(p[i]) << (8 * i);
  return value;
}
std::uint64_t get_u64(const std::byte* p) {
  std::uint64_t value = 0;
  for (int i = 0; i < 8; ++i) value |= static_cast<std::uint64_t>(p[i]) << (8 * i);
  return value;
}

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

// Copies `count` elements of `element` bytes between memory and the file's
// little-endian order (the same operation both ways).
void copy_elements(std::byte* destination, const std::byte* source, std::int64_t count,
                   std::int64_t element) noexcept {
  const auto bytes = static_cast<std::size_t>(count * element);
  if constexpr (std::endian::native == std::endian::little) {
    std::memcpy(destination, source, bytes);
  } else {
    for (std::int64_t e = 0; e < count; ++e) {
      std::reverse_copy(source + e * element, source + (e + 1) * element,
                        destination + e * element);
    }
  }
}

// ---- the directory ------------------------------------------------------------

struct Directory {
  CheckpointKind kind = CheckpointKind::kContiguous;
  std::vector<CheckpointSection> sections;  // computed_crc and present unset
  std::int64_t end = 0;                     // where the last section ends
};

std::vector<std::byte> encode_directory(CheckpointKind kind,
                                        std::span<const CheckpointSection> sections) {
  std::vector<std::byte> out;
  for (char c : kMagic) out.push_back(static_cast<std::byte>(c));
  put_u32(out, kFormatVersion);
  put_u32(out, kind_code(kind));
  put_u32(out, static_cast<std::uint32_t>(sections.size()));
  put_u32(out, 0);
  const auto specs = sections_of(kind);
  for (std::size_t i = 0; i < sections.size(); ++i) {
    for (char c : specs[i].tag) out.push_back(static_cast<std::byte>(c));
    put_u32(out, sections[i].stored_crc);
    put_i64(out, sections[i].offset);
    put_i64(out, sections[i].bytes);
    put_u64(out, 0);
  }
  put_u32(out, crc32_of(out));
  put_u32(out, 0);
  return out;
}

// `head` holds the file's first bytes (at least the longest directory, when
// the file is that long). Checks everything the directory says, except that
// its sections end where the file ends (callers decide how to report that).
Directory parse_directory(Bytes head, std::int64_t file_bytes) {
  const auto size = static_cast<std::int64_t>(head.size());
  if (size == 0) damaged("the file is empty (expected a checkpoint)");
  if (size < 8 || std::memcmp(head.data(), kMagic.data(), kMagic.size()) != 0) {
    if (size < 8 && std::memcmp(head.data(), kMagic.data(), head.size()) == 0) {
      damaged(
          fmt::format("the file is {} bytes, too short for a checkpoint (expected at least "
                      "the {}-byte magic and directory; truncated?)",
                      file_bytes, directory_bytes(CheckpointKind::kContiguous)));
    }
    damaged("not a lookback KV-cache checkpoint (expected the magic \"LOOKBKV\\0\" at offset 0)");
  }
  if (size < 12) {
    damaged(
        fmt::format("the file is {} bytes, it ends inside the directory (truncated)", file_bytes));
  }
  const std::uint32_t version = get_u32(head.data() + 8);
  if (version > kFormatVersion) {
    damaged(
        fmt::format("format version {} is newer than this lookback reads (expected version "
                    "{}; load it with a newer lookback)",
                    version, kFormatVersion));
  }
  if (version != kFormatVersion) {
    damaged(fmt::format("format version {} (expected {})", version, kFormatVersion));
  }
  if (size < kPreambleBytes) {
    damaged(
        fmt::format("the file is {} bytes, it ends inside the directory (truncated)", file_bytes));
  }
  const std::uint32_t kind_value = get_u32(head.data() + 12);
  if (kind_value != 1 && kind_value != 2) {
    damaged(
        fmt::format("kind {} (expected 1 for a contiguous cache or 2 for a paged pool; the "
                    "directory is damaged)",
                    kind_value));
  }
  Directory directory;
  directory.kind = kind_value == 1 ? CheckpointKind::kContiguous : CheckpointKind::kPaged;
  const std::int64_t dir_bytes = directory_bytes(directory.kind);
  if (size < dir_bytes) {
    damaged(fmt::format("the file is {} bytes, shorter than its {}-byte directory (truncated)",
                        file_bytes, dir_bytes));
  }
  // Checked before any field it covers is believed.
  const std::int64_t crc_at = dir_bytes - kDirectoryTrailerBytes;
  const std::uint32_t stored = get_u32(head.data() + crc_at);
  const std::uint32_t computed = crc32_of(head.first(static_cast<std::size_t>(crc_at)));
  if (stored != computed) {
    damaged(
        fmt::format("directory (bytes 0..{}) checksum mismatch: stored crc32 {:#010x}, "
                    "computed {:#010x} (the file is damaged)",
                    crc_at, stored, computed));
  }
  const auto specs = sections_of(directory.kind);
  const std::uint32_t count = get_u32(head.data() + 16);
  if (count != specs.size() || get_u32(head.data() + 20) != 0 ||
      get_u32(head.data() + crc_at + 4) != 0) {
    damaged(
        fmt::format("directory: {} sections and reserved fields {}, {} (expected {} "
                    "sections and zeros for a {} checkpoint)",
                    count, get_u32(head.data() + 20), get_u32(head.data() + crc_at + 4),
                    specs.size(), checkpoint_kind_name(directory.kind)));
  }
  std::int64_t offset = dir_bytes;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const std::byte* entry =
        head.data() + kPreambleBytes + static_cast<std::int64_t>(i) * kEntryBytes;
    if (std::memcmp(entry, specs[i].tag.data(), 4) != 0) {
      damaged(fmt::format("directory entry {}: tag '{}' (expected '{}' for the {} section)", i,
                          std::string_view(reinterpret_cast<const char*>(entry), 4),
                          std::string_view(specs[i].tag.data(), 4), specs[i].name));
    }
    CheckpointSection section;
    section.name = specs[i].name;
    section.stored_crc = get_u32(entry + 4);
    const std::uint64_t at = get_u64(entry + 8);
    const std::uint64_t bytes = get_u64(entry + 16);
    if (at != static_cast<std::uint64_t>(offset) || get_u64(entry + 24) != 0 ||
        bytes > static_cast<std::uint64_t>(kMaxInt64 - offset)) {
      damaged(
          fmt::format("directory: the {} section is {} bytes at offset {} (expected it to "
                      "start at {}, right after the previous one)",
                      specs[i].name, bytes, at, offset));
    }
    section.offset = offset;
    section.bytes = static_cast<std::int64_t>(bytes);
    offset += section.bytes;
    directory.sections.push_back(std::move(section));
  }
  const std::int64_t expected_header = header_bytes(directory.kind);
  if (directory.sections[0].bytes != expected_header) {
    damaged(fmt::format(
        "directory: the header section is {} bytes (expected {} for a {} "
        "checkpoint)",
        directory.sections[0].bytes, expected_header, checkpoint_kind_name(directory.kind)));
  }
  directory.end = offset;
  return directory;
}

std::string size_mismatch(const Directory& directory, std::int64_t file_bytes) {
  if (file_bytes < directory.end) {
    return fmt::format("the file is {} bytes, its directory says {} (truncated)", file_bytes,
                       directory.end);
  }
  return fmt::format("the file is {} bytes, its directory says {} ({} unexpected bytes at the end)",
                     file_bytes, directory.end, file_bytes - directory.end);
}

std::string crc_mismatch(const CheckpointSection& section) {
  return fmt::format(
      "{} section (bytes {}..{}) checksum mismatch: stored crc32 {:#010x}, "
      "computed {:#010x} (the file is damaged)",
      section.name, section.offset, section.offset + section.bytes, section.stored_crc,
      section.computed_crc);
}

// ---- the header -------------------------------------------------------------

struct Header {
  CheckpointKind kind = CheckpointKind::kContiguous;
  CacheConfig config;
  std::int64_t capacity = 0;        // contiguous
  std::int64_t length = 0;          // contiguous
  std::int64_t block_size = 0;      // paged
  std::int64_t num_blocks = 0;      // paged
  std::int64_t used_blocks = 0;     // paged
  std::int64_t sequence_count = 0;  // paged
  SequenceId next_id = 0;           // paged
  // One head's row in the file: head_dim elements, no padding.
  std::int64_t row_bytes = 0;
  // Expected size of each data section.
  std::int64_t data_bytes = 0;
};

std::vector<std::byte> encode_header(const Header& header) {
  std::vector<std::byte> out;
  const CacheConfig& config = header.config;
  put_i64(out, config.kv_heads);
  put_i64(out, config.head_dim);
  put_u32(out, dtype_code(config.storage));
  std::uint32_t rope_flags = 0;
  std::uint32_t theta_bits = 0;
  if (config.rope) {
    rope_flags = kRopeEnabled | (config.rope->interleaved ? kRopeInterleaved : 0);
    theta_bits = std::bit_cast<std::uint32_t>(config.rope->theta);
  }
  put_u32(out, rope_flags);
  put_u32(out, theta_bits);
  put_u32(out, 0);
  if (header.kind == CheckpointKind::kContiguous) {
    put_i64(out, header.capacity);
    put_i64(out, header.length);
  } else {
    put_i64(out, header.block_size);
    put_i64(out, header.num_blocks);
    put_i64(out, header.used_blocks);
    put_i64(out, header.sequence_count);
    put_i64(out, header.next_id);
  }
  return out;
}

std::int64_t element_bytes(const CacheConfig& config) {
  return static_cast<std::int64_t>(dtype_size(config.storage));
}

// a * b * ..., or a format error naming `what` when it overflows.
std::int64_t checked_product(std::initializer_list<std::int64_t> factors, const char* what) {
  std::int64_t product = 1;
  for (std::int64_t factor : factors) {
    if (__builtin_mul_overflow(product, factor, &product)) {
      damaged(
          fmt::format("header: the {} overflow a byte count (expected sizes that fit in a "
                      "file)",
                      what));
    }
  }
  return product;
}

Header parse_header(Bytes bytes, CheckpointKind kind) {
  FieldReader in(bytes, "header");
  Header header;
  header.kind = kind;
  CacheConfig& config = header.config;
  config.kv_heads = in.number("kv_heads", 1, kMaxKvHeads);
  config.head_dim = in.number("head_dim", 1, kMaxHeadDim);
  const std::uint32_t dtype = in.u32("storage");
  switch (dtype) {
    case 0:
      config.storage = DType::kF32;
      break;
    case 1:
      config.storage = DType::kF16;
      break;
    case 2:
      config.storage = DType::kBF16;
      break;
    default:
      damaged(
          fmt::format("header section: storage code {} (expected 0 f32, 1 f16 or 2 bf16)", dtype));
  }
  const std::uint32_t rope_flags = in.u32("rope flags");
  const std::uint32_t theta_bits = in.u32("rope theta");
  const std::uint32_t reserved = in.u32("reserved");
  if ((rope_flags & ~(kRopeEnabled | kRopeInterleaved)) != 0 ||
      (!(rope_flags & kRopeEnabled) && (rope_flags != 0 || theta_bits != 0)) || reserved != 0) {
    damaged(
        fmt::format("header section: RoPE flags {:#x}, theta bits {:#x}, reserved {} "
                    "(expected flags 0 with theta 0, or 1 / 3 with a theta; reserved 0)",
                    rope_flags, theta_bits, reserved));
  }
  if (rope_flags & kRopeEnabled) {
    const float theta = std::bit_cast<float>(theta_bits);
    if (!(theta > 0.0f) || !std::isfinite(theta)) {
      damaged(fmt::format("header section: RoPE theta {} (expected a finite number > 0)", theta));
    }
    config.rope = RopeSpec{.theta = theta, .interleaved = (rope_flags & kRopeInterleaved) != 0};
  }
  const std::int64_t token_bytes = detail::stored_token_bytes(config);  // in memory, padded
  header.row_bytes = config.head_dim * element_bytes(config);
  if (kind == CheckpointKind::kContiguous) {
    header.capacity = in.number("capacity", 0, kMaxInt64);
    header.length = in.number("length", 0, header.capacity);
    checked_product({header.capacity, token_bytes}, "capacity's tokens");
    header.data_bytes =
        checked_product({config.kv_heads, header.length, header.row_bytes}, "length's tokens");
  } else {
    header.block_size = in.number("block_size", 1, kMaxInt64);
    header.num_blocks = in.number("num_blocks", 0, kMaxInt64);
    header.used_blocks = in.number("used_blocks", 0, header.num_blocks);
    header.sequence_count = in.number("sequence count", 0, kMaxInt64);
    header.next_id = in.number("next_id", 0, kMaxInt64 - 1);
    if (header.sequence_count > header.next_id) {
      damaged(
          fmt::format("header section: {} sequences but next_id {} (expected at most next_id "
                      "sequences: ids are distinct and below it)",
                      header.sequence_count, header.next_id));
    }
    checked_product({header.num_blocks, header.block_size, token_bytes}, "pool's blocks");
    header.data_bytes = checked_product(
        {header.used_blocks, config.kv_heads, header.block_size, header.row_bytes}, "used blocks");
  }
  if (in.remaining() != 0) damaged("header section: unexpected bytes after the last field");
  detail::validate_config(config);  // the cache's own rules, should the two ever differ
  return header;
}

void check_data_sizes(const Header& header, const Directory& directory) {
  for (SectionId id : {SectionId::kKeys, SectionId::kValues}) {
    const CheckpointSection& section = directory.sections[index_of(header.kind, id)];
    if (section.bytes != header.data_bytes) {
      const std::string shape =
          header.kind == CheckpointKind::kContiguous
              ? fmt::format("kv_heads {} x length {} x head_dim {}", header.config.kv_heads,
                            header.length, header.config.head_dim)
              : fmt::format("used_blocks {} x kv_heads {} x block_size {} x head_dim {}",
                            header.used_blocks, header.config.kv_heads, header.block_size,
                            header.config.head_dim);
      damaged(fmt::format("{} section is {} bytes (expected {} = {} x {} bytes of {})",
                          section.name, section.bytes, header.data_bytes, shape,
                          element_bytes(header.config), dtype_name(header.config.storage)));
    }
  }
}

// ---- the tables (paged) -------------------------------------------------------

struct Tables {
  std::vector<std::int32_t> references;       // (num_blocks,)
  std::vector<std::int64_t> free_list;        // (num_blocks - used_blocks,), taken from the back
  std::vector<CheckpointSequence> sequences;  // ascending ids
};

std::vector<std::byte> encode_tables(const PagedKvPool& pool,
                                     std::span<const std::int32_t> references,
                                     std::span<const std::int64_t> free_list) {
  std::vector<std::byte> out;
  for (std::int32_t count : references) put_u32(out, static_cast<std::uint32_t>(count));
  for (std::int64_t block : free_list) put_i64(out, block);
  for (SequenceId id : pool.sequences()) {  // ascending
    const std::vector<std::int64_t> blocks = pool.block_table(id);
    put_i64(out, id);
    put_i64(out, pool.length(id));
    put_i64(out, static_cast<std::int64_t>(blocks.size()));
    for (std::int64_t block : blocks) put_i64(out, block);
  }
  return out;
}

// Parses and checks that the tables describe a state the pool could be in:
// block ids in range, each sequence's table as long as its length needs,
// reference counts equal to how many tables hold each block, and the free
// list exactly the unreferenced blocks, each once.
Tables parse_tables(Bytes bytes, const Header& header) {
  FieldReader in(bytes, "tables");
  Tables tables;
  const std::int64_t num_blocks = header.num_blocks;
  in.need(num_blocks, 4, "reference counts");
  tables.references.resize(static_cast<std::size_t>(num_blocks));
  std::int64_t used = 0;
  for (std::int64_t b = 0; b < num_blocks; ++b) {
    const std::uint32_t count = in.u32("reference count");
    if (count > static_cast<std::uint32_t>(std::numeric_limits<std::int32_t>::max())) {
      damaged(fmt::format("tables section: block {} has {} references (expected at most {})", b,
                          count, std::numeric_limits<std::int32_t>::max()));
    }
    tables.references[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(count);
    used += count > 0;
  }
  if (used != header.used_blocks) {
    damaged(fmt::format("tables section: {} blocks have references, the header says {} are used",
                        used, header.used_blocks));
  }
  const std::int64_t free_count = num_blocks - used;
  in.need(free_count, 8, "free-list entries");
  tables.free_list.resize(static_cast<std::size_t>(free_count));
  // Per block: how many tables hold it; and the last sequence that did (a
  // table never holds a block twice). Free-list entries mark it with -2.
  std::vector<std::int64_t> held(static_cast<std::size_t>(num_blocks), 0);
  std::vector<std::int64_t> last_holder(static_cast<std::size_t>(num_blocks), -1);
  for (std::int64_t i = 0; i < free_count; ++i) {
    const std::int64_t block = in.number("free-list entry", 0, num_blocks - 1);
    auto& mark = last_holder[static_cast<std::size_t>(block)];
    if (tables.references[static_cast<std::size_t>(block)] != 0 || mark == -2) {
      damaged(
          fmt::format("tables section: free-list entry {} is block {}, which is {} (expected "
                      "each unreferenced block once)",
                      i, block, mark == -2 ? "listed twice" : "in use"));
    }
    mark = -2;
    tables.free_list[static_cast<std::size_t>(i)] = block;
  }
  in.need(header.sequence_count, kSequenceRecordBytes, "sequences");
  tables.sequences.resize(static_cast<std::size_t>(header.sequence_count));
  for (std::int64_t s = 0; s < header.sequence_count; ++s) {
    CheckpointSequence& sequence = tables.sequences[static_cast<std::size_t>(s)];
    const std::int64_t lowest =
        s == 0 ? 0 : tables.sequences[static_cast<std::size_t>(s - 1)].id + 1;
    sequence.id = in.number("sequence id", lowest, header.next_id - 1);
    sequence.length = in.number("sequence length", 0, kMaxInt64);
    const std::int64_t needed =
        sequence.length / header.block_size + (sequence.length % header.block_size != 0 ? 1 : 0);
    const std::int64_t count = in.number("block count", 0, kMaxInt64);
    if (count != needed) {
      damaged(
          fmt::format("tables section: sequence {} of length {} has {} blocks (expected {} "
                      "blocks of {} tokens)",
                      sequence.id, sequence.length, count, needed, header.block_size));
    }
    in.need(count, 8, "block-table entries");
    sequence.blocks.resize(static_cast<std::size_t>(count));
    for (std::int64_t& block : sequence.blocks) {
      block = in.number("block-table entry", 0, num_blocks - 1);
      auto& mark = last_holder[static_cast<std::size_t>(block)];
      if (mark == s) {
        damaged(
            fmt::format("tables section: sequence {} lists block {} twice (expected "
                        "distinct blocks)",
                        sequence.id, block));
      }
      mark = s;
      ++held[static_cast<std::size_t>(block)];
    }
  }
  if (in.remaining() != 0) {
    damaged(
        fmt::format("tables section: {} unexpected bytes after the last sequence", in.remaining()));
  }
  for (std::int64_t b = 0; b < num_blocks; ++b) {
    const auto index = static_cast<std::size_t>(b);
    if (held[index] != tables.references[index]) {
      damaged(
          fmt::format("tables section: block {} has reference count {}, but {} block tables "
                      "hold it (expected them equal)",
                      b, tables.references[index], held[index]));
    }
  }
  return tables;
}

// ---- reading and writing files ------------------------------------------------

class InputFile {
 public:
  explicit InputFile(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw_io(path, "cannot open for reading", errno);
    struct stat info;
    if (::fstat(fd_, &info) != 0) {
      const int err = errno;
      ::close(fd_);
      throw_io(path, "cannot stat", err);
    }
    if (!S_ISREG(info.st_mode)) {
      ::close(fd_);
      throw_io(path, "not a regular file (expected a checkpoint file)", 0);
    }
    size_ = static_cast<std::int64_t>(info.st_size);
  }
  ~InputFile() { ::close(fd_); }
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;

  std::int64_t size() const noexcept { return size_; }

  // Up to `bytes` from `offset`; fewer if the file shrank meanwhile. Callers
  // pass ranges inside size(), so the allocation is one the file holds.
  std::vector<std::byte> read(std::int64_t offset, std::int64_t bytes) const {
    std::vector<std::byte> out(static_cast<std::size_t>(bytes));
    std::size_t filled = 0;
    while (filled < out.size()) {
      const ssize_t got = ::pread(fd_, out.data() + filled, out.size() - filled,
                                  static_cast<off_t>(offset + static_cast<std::int64_t>(filled)));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) throw_io(path_, "read failed", errno);
      if (got == 0) break;
      filled += static_cast<std::size_t>(got);
    }
    out.resize(filled);
    return out;
  }

  // CRC32 of [offset, offset + bytes), streamed; nullopt if the file is shorter.
  std::optional<std::uint32_t> crc(std::int64_t offset, std::int64_t bytes) const {
    std::uint32_t crc = crc32_of(Bytes{});
    std::vector<std::byte> chunk(
        std::min<std::size_t>(kChunkBytes, static_cast<std::size_t>(bytes)));
    while (bytes > 0) {
      const auto want = std::min<std::int64_t>(bytes, static_cast<std::int64_t>(chunk.size()));
      const ssize_t got =
          ::pread(fd_, chunk.data(), static_cast<std::size_t>(want), static_cast<off_t>(offset));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) throw_io(path_, "read failed", errno);
      if (got == 0) return std::nullopt;
      crc = crc32_of(crc, chunk.data(), static_cast<std::size_t>(got));
      offset += got;
      bytes -= got;
    }
    return crc;
  }

 private:
  std::string path_;
  int fd_ = -1;
  std::int64_t size_ = 0;
};

mode_t current_umask() {
  // umask() can only be read by setting it, which races with other threads.
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("Umask:", 0) == 0) {
      return static_cast<mode_t>(std::strtoul(line.c_str() + 6, nullptr, 8));
    }
  }
  return 022;
}

// Writes a new file next to `path` and renames it over `path` on commit(),
// so that the path holds the old file or the whole new one, never a part.
// Destroyed without commit() (an error, an exception), it deletes the
// temporary. A process killed mid-save leaves its temporary behind
// (PATH.tmp.XXXXXX): loading never reads it (docs/checkpoint.md).
class AtomicWriter {
 public:
  explicit AtomicWriter(const std::string& path) : path_(path), temp_(path + ".tmp.XXXXXX") {
    fd_ = ::mkstemp(temp_.data());
    if (fd_ < 0) throw_io(path_, "cannot create a temporary file next to it", errno);
    // mkstemp makes the file 0600; give it the mode a plain open() would, or
    // keep the mode of the checkpoint it replaces.
    struct stat existing;
    const mode_t mode = ::stat(path_.c_str(), &existing) == 0 ? (existing.st_mode & 07777)
                                                              : (0666 & ~current_umask());
    if (::fchmod(fd_, mode) != 0) {
      // No destructor runs for a constructor that throws: clean up here.
      const int err = errno;
      ::close(std::exchange(fd_, -1));
      ::unlink(temp_.c_str());
      throw_io(path_, "cannot set the permissions of the temporary file", err);
    }
    buffer_.reserve(kChunkBytes);
    reset_crc();
  }
  ~AtomicWriter() {
    if (fd_ >= 0) {
      ::close(fd_);
      ::unlink(temp_.c_str());
    }
  }
  AtomicWriter(const AtomicWriter&) = delete;
  AtomicWriter& operator=(const AtomicWriter&) = delete;

  void write(const void* data, std::size_t bytes) {
    crc_ = crc32_of(crc_, data, bytes);
    const auto* p = static_cast<const std::byte*>(data);
    if (buffer_.size() + bytes > kChunkBytes) flush();
    if (bytes >= kChunkBytes) {
      write_all(p, bytes, written_);
      written_ += static_cast<std::int64_t>(bytes);
    } else {
      buffer_.insert(buffer_.end(), p, p + bytes);
    }
  }
  void write(Bytes bytes) { write(bytes.data(), bytes.size()); }

  std::int64_t position() const noexcept {
    return written_ + static_cast<std::int64_t>(buffer_.size());
  }
  // The CRC32 of what was written since the last call.
  std::uint32_t take_crc() {
    const std::uint32_t crc = crc_;
    reset_crc();
    return crc;
  }

  // Writes `head` over the start of the file, then makes it durable and
  // renames it over the path.
  void commit(Bytes head) {
    flush();
    write_all(head.data(), head.size(), 0);
    detail::commit_temporary(std::exchange(fd_, -1), temp_, path_);
  }

 private:
  void reset_crc() { crc_ = crc32_of(Bytes{}); }
  void flush() {
    write_all(buffer_.data(), buffer_.size(), written_);
    written_ += static_cast<std::int64_t>(buffer_.size());
    buffer_.clear();
  }
  void write_all(const std::byte* data, std::size_t bytes, std::int64_t offset) {
    std::size_t done = 0;
    while (done < bytes) {
      const ssize_t put = ::pwrite(fd_, data + done, bytes - done,
                                   static_cast<off_t>(offset + static_cast<std::int64_t>(done)));
      if (put < 0 && errno == EINTR) continue;
      if (put < 0) fail("write failed", errno);
      done += static_cast<std::size_t>(put);
    }
  }
  [[noreturn]] void fail(const char* what, int err) { throw_io(path_, what, err); }

  std::string path_;
  std::string temp_;
  int fd_ = -1;
  std::vector<std::byte> buffer_;
  std::int64_t written_ = 0;  // bytes flushed to the file
  std::uint32_t crc_ = 0;
};

// Writes one stored row (head_dim elements of a padded row) in file order.
void write_row(AtomicWriter& out, const std::byte* row, const Header& header,
               std::vector<std::byte>& scratch) {
  if constexpr (std::endian::native == std::endian::little) {
    out.write(row, static_cast<std::size_t>(header.row_bytes));
  } else {
    scratch.resize(static_cast<std::size_t>(header.row_bytes));
    copy_elements(scratch.data(), row, header.config.head_dim, element_bytes(header.config));
    out.write(scratch);
  }
}

// ---- a whole checkpoint ---------------------------------------------------------

// Everything a verified checkpoint holds; `keys` and `values` point into the
// file's bytes, in file order (docs/checkpoint.md).
struct Parsed {
  Header header;
  Tables tables;  // paged only
  Bytes keys;
  Bytes values;
};

// Verifies a whole checkpoint held in memory; errors do not name the path.
Parsed parse_checkpoint(Bytes file) {
  const auto file_bytes = static_cast<std::int64_t>(file.size());
  Directory directory = parse_directory(
      file.first(static_cast<std::size_t>(std::min(file_bytes, kLongestDirectoryBytes))),
      file_bytes);
  if (directory.end != file_bytes) damaged(size_mismatch(directory, file_bytes));
  auto section_bytes = [&](const CheckpointSection& section) {
    return file.subspan(static_cast<std::size_t>(section.offset),
                        static_cast<std::size_t>(section.bytes));
  };
  for (CheckpointSection& section : directory.sections) {
    section.present = true;
    section.computed_crc = crc32_of(section_bytes(section));
    if (!section.crc_ok()) damaged(crc_mismatch(section));
  }
  const CheckpointKind kind = directory.kind;
  Parsed parsed;
  parsed.header = parse_header(section_bytes(directory.sections[0]), kind);
  if (kind == CheckpointKind::kPaged) {
    parsed.tables = parse_tables(
        section_bytes(directory.sections[index_of(kind, SectionId::kTables)]), parsed.header);
  }
  check_data_sizes(parsed.header, directory);
  parsed.keys = section_bytes(directory.sections[index_of(kind, SectionId::kKeys)]);
  parsed.values = section_bytes(directory.sections[index_of(kind, SectionId::kValues)]);
  return parsed;
}

Parsed read_checkpoint(const std::string& path, std::vector<std::byte>& storage) {
  const InputFile file(path);
  storage = file.read(0, file.size());
  return with_path(path, [&] { return parse_checkpoint(storage); });
}

void require_kind(const std::string& path, const Header& header, CheckpointKind expected) {
  if (header.kind != expected) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("{}: a {} checkpoint (expected a {} one: load it with {})", path,
                            checkpoint_kind_name(header.kind), checkpoint_kind_name(expected),
                            header.kind == CheckpointKind::kContiguous ? "load_kv_cache"
                                                                       : "load_paged_pool"));
  }
}

std::int64_t physical_memory() {
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page = ::sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page <= 0) return kMaxInt64;
  std::int64_t bytes;
  if (__builtin_mul_overflow(static_cast<std::int64_t>(pages), static_cast<std::int64_t>(page),
                             &bytes)) {
    return kMaxInt64;
  }
  return bytes;
}

// K and V of `slots` stored tokens, saturating at the int64 maximum.
std::int64_t cache_bytes(const CacheConfig& config, std::int64_t slots) {
  std::int64_t bytes;
  if (__builtin_mul_overflow(slots, detail::stored_token_bytes(config), &bytes) ||
      __builtin_mul_overflow(bytes, std::int64_t{2}, &bytes)) {
    return kMaxInt64;
  }
  return bytes;
}

void check_limit(const std::string& path, const Header& header, const CheckpointLimits& limits) {
  const std::int64_t limit =
      limits.max_cache_bytes > 0 ? limits.max_cache_bytes : physical_memory();
  const bool contiguous = header.kind == CheckpointKind::kContiguous;
  std::int64_t slots;
  if (contiguous) {
    slots = header.capacity;
  } else if (__builtin_mul_overflow(header.num_blocks, header.block_size, &slots)) {
    slots = kMaxInt64;
  }
  const std::int64_t bytes = cache_bytes(header.config, slots);
  if (bytes > limit) {
    throw Error(ErrorCode::kCapacity,
                fmt::format("{}: the checkpoint's cache ({}) needs {} bytes for K and V, more than "
                            "the limit of {} bytes (expected at most CheckpointLimits::"
                            "max_cache_bytes, by default this machine's memory)",
                            path,
                            contiguous ? fmt::format("capacity {} tokens", header.capacity)
                                       : fmt::format("{} blocks of {} tokens", header.num_blocks,
                                                     header.block_size),
                            bytes, limit));
  }
}

std::string describe_rope(const std::optional<RopeSpec>& rope) {
  if (!rope) return "off";
  return fmt::format("theta {} {}", rope->theta, rope->interleaved ? "interleaved" : "half");
}

// The checkpoint must fit `into` exactly (load_checkpoint's contract).
void require_same_shape(const std::string& path, const Header& header, const CacheConfig& config,
                        std::int64_t size_a, std::int64_t size_b) {
  struct Field {
    const char* name;
    std::string file, object;
  };
  const bool contiguous = header.kind == CheckpointKind::kContiguous;
  const Field fields[] = {
      {"kv_heads", std::to_string(header.config.kv_heads), std::to_string(config.kv_heads)},
      {"head_dim", std::to_string(header.config.head_dim), std::to_string(config.head_dim)},
      {"storage", std::string(dtype_name(header.config.storage)),
       std::string(dtype_name(config.storage))},
      {"RoPE", describe_rope(header.config.rope), describe_rope(config.rope)},
      {contiguous ? "capacity" : "block_size",
       std::to_string(contiguous ? header.capacity : header.block_size), std::to_string(size_a)},
      {"num_blocks", contiguous ? "" : std::to_string(header.num_blocks),
       contiguous ? "" : std::to_string(size_b)},
  };
  for (const Field& field : fields) {
    if (field.file != field.object) {
      throw Error(ErrorCode::kInvalidArgument,
                  fmt::format("{}: the checkpoint has {} {}, the {} loaded into has {} (expected "
                              "a checkpoint of a {} with the same configuration and size; {} "
                              "makes a new one)",
                              path, field.name, field.file, contiguous ? "cache" : "pool",
                              field.object, contiguous ? "cache" : "pool",
                              contiguous ? "load_kv_cache" : "load_paged_pool"));
    }
  }
}

// Copies one file row into a padded stored row, zeroing the padding.
void restore_row(std::byte* destination, const std::byte* source, const Header& header,
                 std::int64_t padded_row_bytes) noexcept {
  copy_elements(destination, source, header.config.head_dim, element_bytes(header.config));
  std::memset(destination + header.row_bytes, 0,
              static_cast<std::size_t>(padded_row_bytes - header.row_bytes));
}

}  // namespace

// Reaches the caches' private state (declared a friend in kv_cache.hpp).
struct CacheState {
  static void save(const KvCache& cache, const std::string& path) {
    const KvCache::Impl& impl = *cache.impl_;
    Header header;
    header.kind = CheckpointKind::kContiguous;
    header.config = impl.config;
    header.capacity = impl.capacity;
    header.length = impl.length;
    header.row_bytes = impl.config.head_dim * element_bytes(impl.config);
    header.data_bytes = impl.config.kv_heads * impl.length * header.row_bytes;
    const std::int64_t padded_row_bytes =
        detail::stored_padded_dim(impl.config) * element_bytes(impl.config);
    write(
        path, header, {},
        [&](AtomicWriter& out, const std::vector<std::byte>& data) {
          std::vector<std::byte> scratch;
          for (std::int64_t h = 0; h < impl.config.kv_heads; ++h) {
            for (std::int64_t t = 0; t < impl.length; ++t) {
              write_row(out, data.data() + (h * impl.capacity + t) * padded_row_bytes, header,
                        scratch);
            }
          }
        },
        impl.k, impl.v);
  }

  static void save(const PagedKvPool& pool, const std::string& path) {
    const PagedKvPool::Impl& impl = *pool.impl_;
    Header header;
    header.kind = CheckpointKind::kPaged;
    header.config = impl.config;
    header.block_size = impl.block_size;
    header.num_blocks = impl.num_blocks;
    header.used_blocks = impl.num_blocks - static_cast<std::int64_t>(impl.free_list.size());
    header.sequence_count = static_cast<std::int64_t>(impl.sequences.size());
    header.next_id = impl.next_id;
    header.row_bytes = impl.config.head_dim * element_bytes(impl.config);
    header.data_bytes =
        header.used_blocks * impl.config.kv_heads * impl.block_size * header.row_bytes;
    const std::int64_t padded_row_bytes =
        detail::stored_padded_dim(impl.config) * element_bytes(impl.config);
    const std::vector<std::byte> tables = encode_tables(pool, impl.references, impl.free_list);
    write(
        path, header, tables,
        [&](AtomicWriter& out, const std::vector<std::byte>& data) {
          // The blocks in use, in ascending id order (the loader finds them from
          // the reference counts); the free ones are not written.
          std::vector<std::byte> scratch;
          for (std::int64_t b = 0; b < impl.num_blocks; ++b) {
            if (impl.references[static_cast<std::size_t>(b)] == 0) continue;
            for (std::int64_t h = 0; h < impl.config.kv_heads; ++h) {
              for (std::int64_t slot = 0; slot < impl.block_size; ++slot) {
                write_row(out,
                          data.data() + b * impl.block_bytes +
                              (h * impl.block_size + slot) * padded_row_bytes,
                          header, scratch);
              }
            }
          }
        },
        impl.k, impl.v);
  }

  // Overwrites the cache with a verified checkpoint of its shape; nothing here
  // allocates or fails.
  static void restore(KvCache& cache, const Parsed& parsed) noexcept {
    KvCache::Impl& impl = *cache.impl_;
    const Header& header = parsed.header;
    const std::int64_t padded_row_bytes =
        detail::stored_padded_dim(impl.config) * element_bytes(impl.config);
    const std::pair<std::vector<std::byte>*, Bytes> parts[] = {{&impl.k, parsed.keys},
                                                               {&impl.v, parsed.values}};
    for (const auto& [data, file] : parts) {
      for (std::int64_t h = 0; h < header.config.kv_heads; ++h) {
        for (std::int64_t t = 0; t < header.length; ++t) {
          restore_row(data->data() + (h * impl.capacity + t) * padded_row_bytes,
                      file.data() + (h * header.length + t) * header.row_bytes, header,
                      padded_row_bytes);
        }
      }
    }
    impl.length = header.length;
  }

  // Same for a pool. The sequence map is built first (it allocates); then the
  // block data is copied and the bookkeeping swapped in, which cannot fail.
  static void restore(PagedKvPool& pool, Parsed& parsed) {
    PagedKvPool::Impl& impl = *pool.impl_;
    const Header& header = parsed.header;
    std::map<SequenceId, PagedKvPool::Impl::Sequence> sequences;
    for (CheckpointSequence& sequence : parsed.tables.sequences) {
      sequences.emplace_hint(sequences.end(), sequence.id,
                             PagedKvPool::Impl::Sequence{.blocks = std::move(sequence.blocks),
                                                         .length = sequence.length});
    }
    const std::int64_t padded_row_bytes =
        detail::stored_padded_dim(impl.config) * element_bytes(impl.config);
    const std::int64_t file_block_bytes =
        header.config.kv_heads * header.block_size * header.row_bytes;
    const std::pair<std::vector<std::byte>*, Bytes> parts[] = {{&impl.k, parsed.keys},
                                                               {&impl.v, parsed.values}};
    for (const auto& [data, file] : parts) {
      std::int64_t saved = 0;  // index of the block among the saved ones
      for (std::int64_t b = 0; b < header.num_blocks; ++b) {
        if (parsed.tables.references[static_cast<std::size_t>(b)] == 0) continue;
        for (std::int64_t h = 0; h < header.config.kv_heads; ++h) {
          for (std::int64_t slot = 0; slot < header.block_size; ++slot) {
            restore_row(data->data() + b * impl.block_bytes +
                            (h * impl.block_size + slot) * padded_row_bytes,
                        file.data() + saved * file_block_bytes +
                            (h * header.block_size + slot) * header.row_bytes,
                        header, padded_row_bytes);
          }
        }
        ++saved;
      }
    }
    impl.references.swap(parsed.tables.references);
    impl.free_list.swap(parsed.tables.free_list);
    impl.sequences.swap(sequences);
    impl.next_id = header.next_id;
  }

 private:
  // Lays the file out (directory, header, tables, keys, values), streams the
  // sections through the CRC and commits atomically.
  template <typename WriteData>
  static void write(const std::string& path, const Header& header, Bytes tables,
                    const WriteData& write_data, const std::vector<std::byte>& k,
                    const std::vector<std::byte>& v) {
    const CheckpointKind kind = header.kind;
    const std::vector<std::byte> header_section = encode_header(header);
    std::vector<CheckpointSection> sections;
    std::int64_t offset = directory_bytes(kind);
    for (const SectionSpec& spec : sections_of(kind)) {
      CheckpointSection section;
      section.name = spec.name;
      section.offset = offset;
      section.bytes = spec.id == SectionId::kHeader
                          ? static_cast<std::int64_t>(header_section.size())
                      : spec.id == SectionId::kTables ? static_cast<std::int64_t>(tables.size())
                                                      : header.data_bytes;
      offset += section.bytes;
      sections.push_back(std::move(section));
    }
    AtomicWriter out(path);
    const std::vector<std::byte> placeholder(static_cast<std::size_t>(directory_bytes(kind)));
    out.write(placeholder);
    for (std::size_t i = 0; i < sections.size(); ++i) {
      out.take_crc();
      switch (sections_of(kind)[i].id) {
        case SectionId::kHeader:
          out.write(header_section);
          break;
        case SectionId::kTables:
          out.write(tables);
          break;
        case SectionId::kKeys:
          write_data(out, k);
          break;
        case SectionId::kValues:
          write_data(out, v);
          break;
      }
      sections[i].stored_crc = out.take_crc();
      if (out.position() != sections[i].offset + sections[i].bytes) {
        throw Error(ErrorCode::kInternal,
                    fmt::format("{}: the {} section came out {} bytes (expected {}); please "
                                "report this bug",
                                path, sections[i].name, out.position() - sections[i].offset,
                                sections[i].bytes));
      }
    }
    out.commit(encode_directory(kind, sections));
  }
};

void save_checkpoint(const KvCache& cache, const std::string& path) {
  CacheState::save(cache, path);
}
void save_checkpoint(const PagedKvPool& pool, const std::string& path) {
  CacheState::save(pool, path);
}

KvCache load_kv_cache(const std::string& path, const CheckpointLimits& limits) {
  std::vector<std::byte> storage;
  const Parsed parsed = read_checkpoint(path, storage);
  require_kind(path, parsed.header, CheckpointKind::kContiguous);
  check_limit(path, parsed.header, limits);
  KvCache cache(parsed.header.config, parsed.header.capacity);
  CacheState::restore(cache, parsed);
  return cache;
}

PagedKvPool load_paged_pool(const std::string& path, const CheckpointLimits& limits) {
  std::vector<std::byte> storage;
  Parsed parsed = read_checkpoint(path, storage);
  require_kind(path, parsed.header, CheckpointKind::kPaged);
  check_limit(path, parsed.header, limits);
  PagedKvPool pool(parsed.header.config, parsed.header.block_size, parsed.header.num_blocks);
  CacheState::restore(pool, parsed);
  return pool;
}

void load_checkpoint(const std::string& path, KvCache& into) {
  std::vector<std::byte> storage;
  const Parsed parsed = read_checkpoint(path, storage);
  require_kind(path, parsed.header, CheckpointKind::kContiguous);
  require_same_shape(path, parsed.header, into.config(), into.capacity(), 0);
  CacheState::restore(into, parsed);
}

void load_checkpoint(const std::string& path, PagedKvPool& into) {
  std::vector<std::byte> storage;
  Parsed parsed = read_checkpoint(path, storage);
  require_kind(path, parsed.header, CheckpointKind::kPaged);
  require_same_shape(path, parsed.header, into.config(), into.block_size(), into.num_blocks());
  CacheState::restore(into, parsed);
}

CheckpointInfo inspect_checkpoint(const std::string& path) {
  const InputFile file(path);
  CheckpointInfo info;
  info.path = path;
  info.file_bytes = file.size();
  const std::vector<std::byte> head = file.read(0, std::min(file.size(), kLongestDirectoryBytes));
  if (head.size() >= 12) info.version = get_u32(head.data() + 8);
  Directory directory;
  try {
    directory = parse_directory(head, file.size());
  } catch (const Error& e) {
    info.problems.push_back(e.what());
    return info;
  }
  const CheckpointKind kind = directory.kind;
  info.kind = kind;
  for (CheckpointSection& section : directory.sections) {
    if (section.offset + section.bytes > file.size()) continue;
    const std::optional<std::uint32_t> crc = file.crc(section.offset, section.bytes);
    section.present = crc.has_value();
    section.computed_crc = crc.value_or(0);
  }
  info.sections = directory.sections;
  if (directory.end != file.size()) info.problems.push_back(size_mismatch(directory, file.size()));
  for (const CheckpointSection& section : directory.sections) {
    if (!section.present) {
      info.problems.push_back(
          fmt::format("{} section (bytes {}..{}) is cut off: the file ends at "
                      "byte {} (truncated)",
                      section.name, section.offset, section.offset + section.bytes, file.size()));
    } else if (!section.crc_ok()) {
      info.problems.push_back(crc_mismatch(section));
    }
  }
  // Fields are believed only from sections whose checksum matches.
  const auto read_section = [&](SectionId id) {
    const CheckpointSection& section = directory.sections[index_of(kind, id)];
    return file.read(section.offset, section.bytes);
  };
  const auto try_step = [&](auto&& step) {
    try {
      step();
      return true;
    } catch (const Error& e) {
      if (e.code() == ErrorCode::kIo) throw;
      info.problems.push_back(e.what());
      return false;
    }
  };
  if (!directory.sections[0].crc_ok()) return info;
  Header header;
  if (!try_step([&] { header = parse_header(read_section(SectionId::kHeader), kind); })) {
    return info;
  }
  info.config = header.config;
  info.capacity = header.capacity;
  info.length = header.length;
  info.block_size = header.block_size;
  info.num_blocks = header.num_blocks;
  info.used_blocks = header.used_blocks;
  info.next_id = header.next_id;
  if (kind == CheckpointKind::kPaged &&
      directory.sections[index_of(kind, SectionId::kTables)].crc_ok()) {
    try_step(
        [&] { info.sequences = parse_tables(read_section(SectionId::kTables), header).sequences; });
  }
  try_step([&] { check_data_sizes(header, directory); });
  return info;
}

std::string_view checkpoint_kind_name(CheckpointKind kind) noexcept {
  return kind == CheckpointKind::kContiguous ? "contiguous" : "paged";
}

}  // namespace lookback
