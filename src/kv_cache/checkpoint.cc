// KV-cache checkpoints: the orchestration of save, load and inspect. The
// layers below it: core/file_io (InputFile, OutputFile: descriptors, atomic
// replacement, the output-path rules) and kv_cache/checkpoint_format (the
// pure codec of docs/checkpoint.md, which checks untrusted bytes). What is
// left here: copying rows between the caches' padded memory and the file's
// order, and the checks that depend on the object loaded into.
//
// A load reads the whole file (an allocation the file system vouches for,
// never a size the file claims) and has the codec verify it all; only then is
// a cache allocated (bounded by CheckpointLimits) or an existing one
// overwritten, by steps that cannot fail.
#include "lookback/checkpoint.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <map>
#include <span>
#include <utility>

#include "core/file_io.hpp"
#include "kv_cache/cache_common.hpp"
#include "kv_cache/checkpoint_format.hpp"
#include "kv_cache/impl.hpp"
#include "lookback/error.hpp"

namespace lookback {
namespace {

using checkpoint_format::Bytes;
using checkpoint_format::ByteSink;
using checkpoint_format::Directory;
using checkpoint_format::element_bytes;
using checkpoint_format::Header;
using checkpoint_format::Parsed;
using checkpoint_format::SectionId;
using checkpoint_format::SectionWriter;
using checkpoint_format::Tables;

constexpr std::int64_t kMaxInt64 = std::numeric_limits<std::int64_t>::max();

// Adds the path to an error raised while parsing (which does not know it).
template <typename Function>
auto with_path(const std::string& path, Function&& function) {
  try {
    return function();
  } catch (const Error& e) {
    throw Error(e.code(), path + ": " + e.what());
  }
}

// Reads and verifies a whole checkpoint; `storage` keeps the bytes that the
// result's keys and values point into.
Parsed read_checkpoint(const std::string& path, std::vector<std::byte>& storage) {
  storage = detail::InputFile(path, "a checkpoint file").read_all();
  return with_path(path, [&] { return checkpoint_format::parse(storage); });
}

// A KvCache loads a contiguous or ring checkpoint, a PagedKvPool a paged one.
void require_kind(const std::string& path, const Header& header, bool pool) {
  const bool paged = header.kind == CheckpointKind::kPaged;
  if (paged != pool) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("{}: a {} checkpoint (expected a {} one: load it with {})", path,
                            checkpoint_kind_name(header.kind),
                            pool ? "paged" : "contiguous or ring",
                            paged ? "load_paged_pool" : "load_kv_cache"));
  }
}

// A ring checkpoint loads into a ring with the same sink tokens, a contiguous
// one into a cache without a ring (load_checkpoint's contract).
void require_same_ring(const std::string& path, const Header& header,
                       const std::optional<RingSpec>& ring) {
  const bool ring_file = header.kind == CheckpointKind::kRing;
  if (ring_file && !ring) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("{}: a ring checkpoint ({} sink tokens), the cache loaded into is not "
                            "a ring (expected a ring KvCache of the same capacity and sink tokens; "
                            "load_kv_cache makes a new one)",
                            path, header.sink_tokens));
  }
  if (!ring_file && ring) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("{}: a contiguous checkpoint, the cache loaded into is a ring ({} sink "
                            "tokens) (expected a KvCache without a ring; load_kv_cache makes a "
                            "new one)",
                            path, ring->sink_tokens));
  }
  if (ring_file && ring->sink_tokens != header.sink_tokens) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("{}: the checkpoint has ring sink_tokens {}, the ring loaded into has "
                            "{} (expected a ring with the same sink tokens; load_kv_cache makes a "
                            "new one)",
                            path, header.sink_tokens, ring->sink_tokens));
  }
}

void check_limit(const std::string& path, const Header& header, const CheckpointLimits& limits) {
  const std::int64_t limit =
      limits.max_cache_bytes > 0 ? limits.max_cache_bytes : detail::physical_memory();
  const bool contiguous = header.kind != CheckpointKind::kPaged;  // or a ring
  std::int64_t slots;
  if (contiguous) {
    slots = header.capacity;
  } else if (__builtin_mul_overflow(header.num_blocks, header.block_size, &slots)) {
    slots = kMaxInt64;
  }
  const std::int64_t bytes = detail::cache_bytes(header.config, slots);
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
  const bool contiguous = header.kind != CheckpointKind::kPaged;  // or a ring
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

// Copies one file row into a padded stored row, zeroing the padding, and an
// 8-bit row's scale (after its codes in the file) to `maybe_scale`. Rows are
// copied as raw bytes, by the byte-order policy of core/little_endian.hpp.
void restore_row(std::byte* destination, std::byte* maybe_scale, const std::byte* source,
                 const Header& header, std::int64_t padded_row_bytes) noexcept {
  const std::int64_t code_bytes = header.config.head_dim * element_bytes(header.config);
  std::memcpy(destination, source, static_cast<std::size_t>(code_bytes));
  std::memset(destination + code_bytes, 0, static_cast<std::size_t>(padded_row_bytes - code_bytes));
  if (maybe_scale != nullptr) std::memcpy(maybe_scale, source + code_bytes, sizeof(float));
}

// Writes one stored row to the file: its head_dim elements, and an 8-bit
// row's scale after them.
void save_row(const ByteSink& sink, const std::byte* row, const std::byte* maybe_scale,
              const Header& header) {
  const std::int64_t code_bytes = header.config.head_dim * element_bytes(header.config);
  sink(Bytes(row, static_cast<std::size_t>(code_bytes)));
  if (maybe_scale != nullptr) sink(Bytes(maybe_scale, sizeof(float)));
}

// Where the scales of a buffer or block of `slots` tokens start, or null.
std::byte* scales_at(const CacheConfig& config, const std::byte* base, std::int64_t slots) {
  if (!is_quantized(config.storage)) return nullptr;
  return const_cast<std::byte*>(base) + detail::scales_offset(config, slots);
}

std::int64_t padded_row_bytes(const CacheConfig& config) {
  return detail::stored_padded_dim(config) * element_bytes(config);
}

// Streams a checkpoint to `path` through an OutputFile (atomic for a regular
// file; see lookback/output_file.hpp).
void write_checkpoint(const std::string& path, const Header& header, const Tables& tables,
                      const SectionWriter& keys, const SectionWriter& values) {
  detail::OutputFile out(path);
  checkpoint_format::encode(header, tables, keys, values, [&](Bytes piece) { out.write(piece); });
  out.commit();
}

}  // namespace

// Reaches the caches' private state (declared a friend in kv_cache.hpp).
struct CacheState {
  static void save(const KvCache& cache, const std::string& path) {
    const KvCache::Impl& impl = *cache.impl_;
    const Header header =
        impl.ring ? checkpoint_format::ring_header(impl.config, impl.capacity, impl.length,
                                                   impl.ring->sink_tokens)
                  : checkpoint_format::contiguous_header(impl.config, impl.capacity, impl.length);
    const std::int64_t row_stride = padded_row_bytes(impl.config);
    const std::int64_t stored = checkpoint_format::stored_tokens(header);
    // (kv_heads, stored, head_dim): the tokens held, in position order (a
    // ring's from the slots they occupy), without the padding.
    const auto rows_of = [&](const detail::CacheStorage& data) -> SectionWriter {
      return [&impl, &header, base = data.data(), row_stride, stored](const ByteSink& sink) {
        const std::byte* scales = scales_at(impl.config, base, impl.capacity);
        for (std::int64_t h = 0; h < impl.config.kv_heads; ++h) {
          for (std::int64_t t = 0; t < stored; ++t) {
            const std::int64_t slot = impl.slot_of(checkpoint_format::stored_position(header, t));
            const std::int64_t row = h * impl.capacity + slot;
            save_row(sink, base + row * row_stride,
                     scales ? scales + row * static_cast<std::int64_t>(sizeof(float)) : nullptr,
                     header);
          }
        }
      };
    };
    write_checkpoint(path, header, {}, rows_of(impl.k), rows_of(impl.v));
  }

  static void save(const PagedKvPool& pool, const std::string& path) {
    const PagedKvPool::Impl& impl = *pool.impl_;
    Tables tables{.references = impl.references, .free_list = impl.free_list, .sequences = {}};
    for (const auto& [id, sequence] : impl.sequences) {  // ascending ids
      tables.sequences.push_back({.id = id, .length = sequence.length, .blocks = sequence.blocks});
    }
    const std::int64_t used_blocks =
        impl.num_blocks - static_cast<std::int64_t>(impl.free_list.size());
    const Header header = checkpoint_format::paged_header(
        impl.config, impl.block_size, impl.num_blocks, used_blocks,
        static_cast<std::int64_t>(impl.sequences.size()), impl.next_id);
    const std::int64_t row_stride = padded_row_bytes(impl.config);
    // (used_blocks, kv_heads, block_size, head_dim): the blocks in use, in
    // ascending id order (the loader finds them from the reference counts);
    // the free ones are not written.
    const auto rows_of = [&](const detail::CacheStorage& data) -> SectionWriter {
      return [&impl, &header, base = data.data(), row_stride](const ByteSink& sink) {
        for (std::int64_t b = 0; b < impl.num_blocks; ++b) {
          if (impl.references[static_cast<std::size_t>(b)] == 0) continue;
          const std::byte* block = base + b * impl.block_bytes;
          const std::byte* scales = scales_at(impl.config, block, impl.block_size);
          for (std::int64_t h = 0; h < impl.config.kv_heads; ++h) {
            for (std::int64_t slot = 0; slot < impl.block_size; ++slot) {
              const std::int64_t row = h * impl.block_size + slot;
              save_row(sink, block + row * row_stride,
                       scales ? scales + row * static_cast<std::int64_t>(sizeof(float)) : nullptr,
                       header);
            }
          }
        }
      };
    };
    write_checkpoint(path, header, tables, rows_of(impl.k), rows_of(impl.v));
  }

  // Overwrites the cache with a verified checkpoint of its shape; nothing here
  // allocates or fails.
  static void restore(KvCache& cache, const Parsed& parsed) noexcept {
    KvCache::Impl& impl = *cache.impl_;
    const Header& header = parsed.header;
    const std::int64_t row_stride = padded_row_bytes(impl.config);
    const std::int64_t stored = checkpoint_format::stored_tokens(header);
    const std::pair<detail::CacheStorage*, Bytes> parts[] = {{&impl.k, parsed.keys},
                                                               {&impl.v, parsed.values}};
    for (const auto& [data, file] : parts) {
      std::byte* scales = scales_at(impl.config, data->data(), impl.capacity);
      for (std::int64_t h = 0; h < header.config.kv_heads; ++h) {
        for (std::int64_t t = 0; t < stored; ++t) {
          // A ring's row goes back to the slot its position maps to (the
          // same ring geometry was checked), so it goes on as it would have.
          const std::int64_t slot = impl.slot_of(checkpoint_format::stored_position(header, t));
          const std::int64_t row = h * impl.capacity + slot;
          restore_row(data->data() + row * row_stride,
                      scales ? scales + row * static_cast<std::int64_t>(sizeof(float)) : nullptr,
                      file.data() + (h * stored + t) * header.row_bytes, header, row_stride);
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
    const std::int64_t row_stride = padded_row_bytes(impl.config);
    const std::int64_t file_block_bytes =
        header.config.kv_heads * header.block_size * header.row_bytes;
    const std::pair<detail::CacheStorage*, Bytes> parts[] = {{&impl.k, parsed.keys},
                                                               {&impl.v, parsed.values}};
    for (const auto& [data, file] : parts) {
      std::int64_t saved = 0;  // index of the block among the saved ones
      for (std::int64_t b = 0; b < header.num_blocks; ++b) {
        if (parsed.tables.references[static_cast<std::size_t>(b)] == 0) continue;
        std::byte* block = data->data() + b * impl.block_bytes;
        std::byte* scales = scales_at(impl.config, block, impl.block_size);
        for (std::int64_t h = 0; h < header.config.kv_heads; ++h) {
          for (std::int64_t slot = 0; slot < header.block_size; ++slot) {
            const std::int64_t row = h * impl.block_size + slot;
            restore_row(block + row * row_stride,
                        scales ? scales + row * static_cast<std::int64_t>(sizeof(float)) : nullptr,
                        file.data() + saved * file_block_bytes +
                            (h * header.block_size + slot) * header.row_bytes,
                        header, row_stride);
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
  require_kind(path, parsed.header, /*pool=*/false);
  check_limit(path, parsed.header, limits);
  KvCache cache = parsed.header.kind == CheckpointKind::kRing
                      ? KvCache(parsed.header.config, parsed.header.capacity,
                                RingSpec{.sink_tokens = parsed.header.sink_tokens})
                      : KvCache(parsed.header.config, parsed.header.capacity);
  CacheState::restore(cache, parsed);
  return cache;
}

PagedKvPool load_paged_pool(const std::string& path, const CheckpointLimits& limits) {
  std::vector<std::byte> storage;
  Parsed parsed = read_checkpoint(path, storage);
  require_kind(path, parsed.header, /*pool=*/true);
  check_limit(path, parsed.header, limits);
  PagedKvPool pool(parsed.header.config, parsed.header.block_size, parsed.header.num_blocks);
  CacheState::restore(pool, parsed);
  return pool;
}

void load_checkpoint(const std::string& path, KvCache& into) {
  std::vector<std::byte> storage;
  const Parsed parsed = read_checkpoint(path, storage);
  require_kind(path, parsed.header, /*pool=*/false);
  require_same_ring(path, parsed.header, into.ring());
  require_same_shape(path, parsed.header, into.config(), into.capacity(), 0);
  CacheState::restore(into, parsed);
}

void load_checkpoint(const std::string& path, PagedKvPool& into) {
  std::vector<std::byte> storage;
  Parsed parsed = read_checkpoint(path, storage);
  require_kind(path, parsed.header, /*pool=*/true);
  require_same_shape(path, parsed.header, into.config(), into.block_size(), into.num_blocks());
  CacheState::restore(into, parsed);
}

namespace {

// Streams each section that the file holds whole through the CRC.
void checksum_sections(const detail::InputFile& file, Directory& directory) {
  for (CheckpointSection& section : directory.sections) {
    if (section.offset + section.bytes > file.size()) continue;
    checkpoint_format::Crc32 crc;
    section.present =
        file.stream(section.offset, section.bytes, [&](Bytes piece) { crc.update(piece); });
    section.computed_crc = crc.value();
  }
}

// One sentence per section that is cut off or fails its checksum.
void report_sections(const Directory& directory, std::int64_t file_bytes,
                     std::vector<std::string>& problems) {
  if (directory.end != file_bytes)
    problems.push_back(checkpoint_format::size_mismatch(directory, file_bytes));
  for (const CheckpointSection& section : directory.sections) {
    if (!section.present) {
      problems.push_back(
          fmt::format("{} section (bytes {}..{}) is cut off: the file ends at "
                      "byte {} (truncated)",
                      section.name, section.offset, section.offset + section.bytes, file_bytes));
    } else if (!section.crc_ok()) {
      problems.push_back(checkpoint_format::crc_mismatch(section));
    }
  }
}

// The fields of the sections whose checksum matches; damage goes to
// info.problems.
void inspect_fields(const detail::InputFile& file, const Directory& directory,
                    CheckpointInfo& info) {
  const auto read_section = [&](SectionId id) {
    const CheckpointSection& section = directory.section(id);
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
  const CheckpointKind kind = directory.kind;
  if (!directory.section(SectionId::kHeader).crc_ok()) return;
  Header header;
  if (!try_step([&] {
        header = checkpoint_format::parse_header(read_section(SectionId::kHeader), kind);
      })) {
    return;
  }
  info.config = header.config;
  info.capacity = header.capacity;
  info.length = header.length;
  info.sink_tokens = header.sink_tokens;
  info.block_size = header.block_size;
  info.num_blocks = header.num_blocks;
  info.used_blocks = header.used_blocks;
  info.next_id = header.next_id;
  if (kind == CheckpointKind::kPaged && directory.section(SectionId::kTables).crc_ok()) {
    try_step([&] {
      info.sequences =
          checkpoint_format::parse_tables(read_section(SectionId::kTables), header).sequences;
    });
  }
  try_step([&] { checkpoint_format::check_data_sizes(header, directory); });
}

}  // namespace

CheckpointInfo inspect_checkpoint(const std::string& path) {
  const detail::InputFile file(path, "a checkpoint file");
  CheckpointInfo info;
  info.path = path;
  info.file_bytes = file.size();
  const std::vector<std::byte> head =
      file.read(0, std::min(file.size(), checkpoint_format::kLongestDirectoryBytes));
  info.version = checkpoint_format::peek_version(head).value_or(0);
  Directory directory;
  try {
    directory = checkpoint_format::parse_directory(head, file.size());
  } catch (const Error& e) {
    info.problems.push_back(e.what());
    return info;
  }
  info.kind = directory.kind;
  checksum_sections(file, directory);
  info.sections = directory.sections;
  report_sections(directory, file.size(), info.problems);
  inspect_fields(file, directory, info);
  return info;
}

std::string_view checkpoint_kind_name(CheckpointKind kind) noexcept {
  switch (kind) {
    case CheckpointKind::kContiguous:
      return "contiguous";
    case CheckpointKind::kPaged:
      return "paged";
    case CheckpointKind::kRing:
      return "ring";
  }
  return "unknown";
}

}  // namespace lookback
