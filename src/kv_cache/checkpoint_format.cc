// The checkpoint format's codec (docs/checkpoint.md); see checkpoint_format.hpp.
#include "kv_cache/checkpoint_format.hpp"

#include <fmt/format.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "kv_cache/cache_common.hpp"
#include "kv_cache/checkpoint_fields.hpp"
#include "lookback/error.hpp"

namespace lookback::checkpoint_format {

Crc32::Crc32() : crc_(static_cast<std::uint32_t>(::crc32(0L, Z_NULL, 0))) {}

void Crc32::update(Bytes bytes) {
  // zlib takes 32-bit lengths: feed large buffers in pieces.
  const auto* p = reinterpret_cast<const Bytef*>(bytes.data());
  std::size_t left = bytes.size();
  while (left > 0) {
    const std::size_t piece = std::min<std::size_t>(left, std::size_t{1} << 30);
    crc_ = static_cast<std::uint32_t>(::crc32(crc_, p, static_cast<uInt>(piece)));
    p += piece;
    left -= piece;
  }
}

namespace {

constexpr std::array<char, 8> kMagic = {'L', 'O', 'O', 'K', 'B', 'K', 'V', '\0'};
constexpr std::uint32_t kFormatVersion = 1;

// Byte sizes of the fixed parts; the tables in docs/checkpoint.md list their fields.
constexpr std::int64_t kPreambleBytes = 24;         // magic, version, kind, count, reserved
constexpr std::int64_t kEntryBytes = 32;            // tag, crc, offset, length, reserved
constexpr std::int64_t kDirectoryTrailerBytes = 8;  // directory crc, reserved
constexpr std::int64_t kContiguousHeaderBytes = 48;
constexpr std::int64_t kPagedHeaderBytes = 72;
constexpr std::int64_t kRingHeaderBytes = 56;  // contiguous's fields, then sink_tokens

// Far above any model (the largest have tens), and low enough that kv_heads *
// padded head_dim * 4 bytes stays far from overflowing.
constexpr std::int64_t kMaxKvHeads = std::int64_t{1} << 24;

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

// A ring has a contiguous cache's sections (its header is longer).
std::span<const SectionSpec> sections_of(CheckpointKind kind) {
  if (kind == CheckpointKind::kPaged) return kPagedSections;
  return kContiguousSections;
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
static_assert(kLongestDirectoryBytes == kPreambleBytes + 4 * kEntryBytes + kDirectoryTrailerBytes);

std::int64_t header_bytes(CheckpointKind kind) {
  switch (kind) {
    case CheckpointKind::kContiguous:
      return kContiguousHeaderBytes;
    case CheckpointKind::kPaged:
      return kPagedHeaderBytes;
    case CheckpointKind::kRing:
      return kRingHeaderBytes;
  }
  return 0;
}

// The kind's code in the file (docs/checkpoint.md).
std::uint32_t kind_code(CheckpointKind kind) {
  switch (kind) {
    case CheckpointKind::kContiguous:
      return 1;
    case CheckpointKind::kPaged:
      return 2;
    case CheckpointKind::kRing:
      return 3;
  }
  return 0;
}

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
    case DType::kI8:
      return 3;
    case DType::kFP8E4M3:
      return 4;
    case DType::kFP8E5M2:
      return 5;
    default:
      break;
  }
  throw Error(ErrorCode::kInternal,
              fmt::format("storage: {} cannot be checkpointed", dtype_name(dtype)));
}

constexpr std::uint32_t kRopeEnabled = 1;
constexpr std::uint32_t kRopeInterleaved = 2;

std::uint32_t crc32_of(Bytes bytes) {
  Crc32 crc;
  crc.update(bytes);
  return crc.value();
}

// ---- the directory ------------------------------------------------------------

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

// The magic, version and kind, each checked before the next is read.
CheckpointKind parse_preamble(Bytes head, std::int64_t file_bytes) {
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
  for (CheckpointKind kind :
       {CheckpointKind::kContiguous, CheckpointKind::kPaged, CheckpointKind::kRing}) {
    if (kind_code(kind) == kind_value) return kind;
  }
  damaged(
      fmt::format("kind {} (expected 1 for a contiguous cache, 2 for a paged pool or 3 for a "
                  "ring cache; the directory is damaged)",
                  kind_value));
}

// The section entries of a directory whose CRC matched: tags in order, each
// section right after the previous one.
void parse_entries(Bytes head, Directory& directory) {
  const auto specs = sections_of(directory.kind);
  std::int64_t offset = directory_bytes(directory.kind);
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
  directory.end = offset;
}

// ---- the header -------------------------------------------------------------

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
  if (header.kind != CheckpointKind::kPaged) {
    put_i64(out, header.capacity);
    put_i64(out, header.length);
    if (header.kind == CheckpointKind::kRing) put_i64(out, header.sink_tokens);
  } else {
    put_i64(out, header.block_size);
    put_i64(out, header.num_blocks);
    put_i64(out, header.used_blocks);
    put_i64(out, header.sequence_count);
    put_i64(out, header.next_id);
  }
  return out;
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

// The storage dtype and RoPE fields.
void parse_storage_and_rope(FieldReader& in, CacheConfig& config) {
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
    case 3:
      config.storage = DType::kI8;
      break;
    case 4:
      config.storage = DType::kFP8E4M3;
      break;
    case 5:
      config.storage = DType::kFP8E5M2;
      break;
    default:
      damaged(fmt::format("header section: storage code {} (expected 0 f32, 1 f16, 2 bf16, "
                          "3 int8, 4 fp8e4m3 or 5 fp8e5m2)",
                          dtype));
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
}

}  // namespace

// ---- the public codec -----------------------------------------------------------

const CheckpointSection& Directory::section(SectionId id) const {
  return sections[index_of(kind, id)];
}

std::optional<std::uint32_t> peek_version(Bytes head) {
  if (head.size() < 12) return std::nullopt;
  return get_u32(head.data() + 8);
}

Directory parse_directory(Bytes head, std::int64_t file_bytes) {
  Directory directory;
  directory.kind = parse_preamble(head, file_bytes);
  const std::int64_t dir_bytes = directory_bytes(directory.kind);
  if (static_cast<std::int64_t>(head.size()) < dir_bytes) {
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
  const std::size_t sections = sections_of(directory.kind).size();
  const std::uint32_t count = get_u32(head.data() + 16);
  const std::uint32_t reserved_a = get_u32(head.data() + 20);
  const std::uint32_t reserved_b = get_u32(head.data() + crc_at + 4);
  if (count != sections || reserved_a != 0 || reserved_b != 0) {
    damaged(
        fmt::format("directory: {} sections and reserved fields {}, {} (expected {} "
                    "sections and zeros for a {} checkpoint)",
                    count, reserved_a, reserved_b, sections, checkpoint_kind_name(directory.kind)));
  }
  parse_entries(head, directory);
  const std::int64_t expected_header = header_bytes(directory.kind);
  if (directory.sections[0].bytes != expected_header) {
    damaged(fmt::format(
        "directory: the header section is {} bytes (expected {} for a {} "
        "checkpoint)",
        directory.sections[0].bytes, expected_header, checkpoint_kind_name(directory.kind)));
  }
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

std::int64_t element_bytes(const CacheConfig& config) {
  return static_cast<std::int64_t>(dtype_size(config.storage));
}

std::int64_t file_row_bytes(const CacheConfig& config) {
  return config.head_dim * element_bytes(config) +
         (is_quantized(config.storage) ? static_cast<std::int64_t>(sizeof(float)) : 0);
}

Header contiguous_header(const CacheConfig& config, std::int64_t capacity, std::int64_t length) {
  Header header;
  header.kind = CheckpointKind::kContiguous;
  header.config = config;
  header.capacity = capacity;
  header.length = length;
  header.row_bytes = file_row_bytes(config);
  header.data_bytes = config.kv_heads * length * header.row_bytes;
  return header;
}

Header ring_header(const CacheConfig& config, std::int64_t capacity, std::int64_t length,
                   std::int64_t sink_tokens) {
  Header header;
  header.kind = CheckpointKind::kRing;
  header.config = config;
  header.capacity = capacity;
  header.length = length;
  header.sink_tokens = sink_tokens;
  header.row_bytes = file_row_bytes(config);
  header.data_bytes = config.kv_heads * stored_tokens(header) * header.row_bytes;
  return header;
}

std::int64_t stored_tokens(const Header& header) {
  return header.kind == CheckpointKind::kRing ? std::min(header.length, header.capacity)
                                              : header.length;
}

std::int64_t stored_position(const Header& header, std::int64_t row) {
  // Rows past the sinks are the newest stored_tokens() - sink_tokens tokens
  // (every token, for a ring that has not wrapped or a contiguous cache).
  if (row < header.sink_tokens) return row;
  return header.length - stored_tokens(header) + row;
}

Header paged_header(const CacheConfig& config, std::int64_t block_size, std::int64_t num_blocks,
                    std::int64_t used_blocks, std::int64_t sequence_count, SequenceId next_id) {
  Header header;
  header.kind = CheckpointKind::kPaged;
  header.config = config;
  header.block_size = block_size;
  header.num_blocks = num_blocks;
  header.used_blocks = used_blocks;
  header.sequence_count = sequence_count;
  header.next_id = next_id;
  header.row_bytes = file_row_bytes(config);
  header.data_bytes = used_blocks * config.kv_heads * block_size * header.row_bytes;
  return header;
}

Header parse_header(Bytes bytes, CheckpointKind kind) {
  FieldReader in(bytes, "header");
  Header header;
  header.kind = kind;
  CacheConfig& config = header.config;
  config.kv_heads = in.number("kv_heads", 1, kMaxKvHeads);
  config.head_dim = in.number("head_dim", 1, kMaxHeadDim);
  parse_storage_and_rope(in, config);
  const std::int64_t token_bytes = detail::stored_token_bytes(config);  // in memory, padded
  header.row_bytes = file_row_bytes(config);
  if (kind == CheckpointKind::kContiguous) {
    header.capacity = in.number("capacity", 0, kMaxInt64);
    header.length = in.number("length", 0, header.capacity);
    checked_product({header.capacity, token_bytes}, "capacity's tokens");
    header.data_bytes =
        checked_product({config.kv_heads, header.length, header.row_bytes}, "length's tokens");
  } else if (kind == CheckpointKind::kRing) {
    // A ring needs a slot beside its sink tokens (RingSpec), and counts every
    // token appended: its length may exceed its capacity.
    header.capacity = in.number("capacity", 1, kMaxInt64);
    header.length = in.number("length", 0, kMaxInt64);
    header.sink_tokens = in.number("sink_tokens", 0, header.capacity - 1);
    checked_product({header.capacity, token_bytes}, "capacity's tokens");
    header.data_bytes = checked_product(
        {config.kv_heads, stored_tokens(header), header.row_bytes}, "stored tokens");
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
    const CheckpointSection& section = directory.section(id);
    if (section.bytes != header.data_bytes) {
      std::string shape;
      if (header.kind == CheckpointKind::kContiguous) {
        shape = fmt::format("kv_heads {} x length {} x head_dim {}", header.config.kv_heads,
                            header.length, header.config.head_dim);
      } else if (header.kind == CheckpointKind::kRing) {
        shape = fmt::format("kv_heads {} x min(length {}, capacity {}) x head_dim {}",
                            header.config.kv_heads, header.length, header.capacity,
                            header.config.head_dim);
      } else {
        shape = fmt::format("used_blocks {} x kv_heads {} x block_size {} x head_dim {}",
                            header.used_blocks, header.config.kv_heads, header.block_size,
                            header.config.head_dim);
      }
      damaged(fmt::format("{} section is {} bytes (expected {} = {} x {} bytes of {}{})",
                          section.name, section.bytes, header.data_bytes, shape,
                          element_bytes(header.config), dtype_name(header.config.storage),
                          is_quantized(header.config.storage)
                              ? ", plus a 4-byte scale per kv_heads x head_dim row"
                              : ""));
    }
  }
}

Parsed parse(Bytes file) {
  const auto file_bytes = static_cast<std::int64_t>(file.size());
  Directory directory = parse_directory(
      file.first(static_cast<std::size_t>(std::min(file_bytes, kLongestDirectoryBytes))),
      file_bytes);
  if (directory.end != file_bytes) damaged(size_mismatch(directory, file_bytes));
  auto section_bytes = [&](SectionId id) {
    const CheckpointSection& section = directory.section(id);
    return file.subspan(static_cast<std::size_t>(section.offset),
                        static_cast<std::size_t>(section.bytes));
  };
  for (CheckpointSection& section : directory.sections) {
    section.present = true;
    section.computed_crc = crc32_of(file.subspan(static_cast<std::size_t>(section.offset),
                                                 static_cast<std::size_t>(section.bytes)));
    if (!section.crc_ok()) damaged(crc_mismatch(section));
  }
  Parsed parsed;
  parsed.header = parse_header(section_bytes(SectionId::kHeader), directory.kind);
  if (directory.kind == CheckpointKind::kPaged) {
    parsed.tables = parse_tables(section_bytes(SectionId::kTables), parsed.header);
  }
  check_data_sizes(parsed.header, directory);
  parsed.keys = section_bytes(SectionId::kKeys);
  parsed.values = section_bytes(SectionId::kValues);
  return parsed;
}

void encode(const Header& header, const Tables& tables, const SectionWriter& keys,
            const SectionWriter& values, const ByteSink& out) {
  const std::vector<std::byte> header_section = encode_header(header);
  const std::vector<std::byte> tables_section =
      header.kind == CheckpointKind::kPaged ? encode_tables(tables) : std::vector<std::byte>{};
  const auto write_section = [&](SectionId id, const ByteSink& sink) {
    switch (id) {
      case SectionId::kHeader:
        return sink(header_section);
      case SectionId::kTables:
        return sink(tables_section);
      case SectionId::kKeys:
        return keys(sink);
      case SectionId::kValues:
        return values(sink);
    }
  };
  // The directory comes first and holds every section's CRC, so the
  // sections are produced twice: checksummed, then written. That keeps the
  // output a plain stream (a pipe or a device takes it as well as a file).
  std::vector<CheckpointSection> sections;
  std::int64_t offset = directory_bytes(header.kind);
  for (const SectionSpec& spec : sections_of(header.kind)) {
    Crc32 crc;
    std::int64_t bytes = 0;
    write_section(spec.id, [&](Bytes piece) {
      crc.update(piece);
      bytes += static_cast<std::int64_t>(piece.size());
    });
    const bool data = spec.id == SectionId::kKeys || spec.id == SectionId::kValues;
    if (data && bytes != header.data_bytes) {
      throw Error(ErrorCode::kInternal,
                  fmt::format("checkpoint: the {} section came out {} bytes (expected {}); "
                              "please report this bug",
                              spec.name, bytes, header.data_bytes));
    }
    sections.push_back(
        {.name = spec.name, .offset = offset, .bytes = bytes, .stored_crc = crc.value()});
    offset += bytes;
  }
  out(encode_directory(header.kind, sections));
  for (const SectionSpec& spec : sections_of(header.kind)) write_section(spec.id, out);
}

}  // namespace lookback::checkpoint_format
