// KV-cache checkpoints: save a KvCache, or a whole PagedKvPool with its block
// tables, to a file and load it back in another process, so that a long
// prompt prefilled once can be resumed (as llama.cpp's prompt cache does).
//
// The file format, its checksums and what a crash during a save leaves behind
// are described in docs/checkpoint.md. In short:
//   - saving is atomic for a regular file: a temporary file next to the path,
//     fsync, rename, fsync of the folder; the path holds the old checkpoint or
//     the new one, whole. Symlinks, devices, FIFOs and "-" (stdout) follow
//     the output-path rules of lookback/output_file.hpp;
//   - loading trusts nothing: every size is checked against the file's size
//     before anything is allocated, every section's CRC32 is verified, and the
//     block tables, reference counts and free list must be consistent. A bad
//     file is a lookback::Error (kFormat) naming the path and what was
//     expected, and an object loaded into is left exactly as it was.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "lookback/kv_cache.hpp"

namespace lookback {

// Saves the cache's configuration, capacity and its `length` filled tokens
// (the unfilled capacity is not written). A ring (RingSpec) is saved as a
// "ring" checkpoint: its sink tokens and the min(length, capacity) tokens it
// still holds, oldest position first. Throws lookback::Error (kIo) when the
// file cannot be written; the path is then left as it was.
void save_checkpoint(const KvCache& cache, const std::string& path);
// Saves the whole pool: configuration, geometry, every sequence's id, length
// and block table, reference counts, the free list in order (so the restored
// pool hands out the same blocks next), and the data of the blocks in use.
// Free blocks' contents are not written: nothing reads them before they are
// handed out and overwritten.
void save_checkpoint(const PagedKvPool& pool, const std::string& path);

// The largest cache a fresh load may allocate. A checkpoint holds only the
// filled tokens (or used blocks), so the capacity it asks for is not bounded
// by the file's size; this bounds it instead.
struct CheckpointLimits {
  // K and V together, in bytes. 0: this machine's physical memory.
  std::int64_t max_cache_bytes = 0;
};

// Load a new object from a checkpoint of the matching kind. Throws
// lookback::Error: kIo (unreadable path), kFormat (damaged, truncated, wrong
// kind or version), kCapacity (the cache would exceed limits.max_cache_bytes).
KvCache load_kv_cache(const std::string& path, const CheckpointLimits& limits = {});
PagedKvPool load_paged_pool(const std::string& path, const CheckpointLimits& limits = {});

// Replace `into`'s state (tokens; for a pool also every sequence, block table
// and the free list) with the checkpoint's. The checkpoint must come from an
// object of the same configuration (kv_heads, head_dim, storage, RoPE) and
// geometry (capacity; block_size and num_blocks; a ring checkpoint needs a
// ring with the same sink tokens, a contiguous one a cache without a ring),
// else lookback::Error (kInvalidArgument). All or nothing: the file is read and verified in full
// before `into` changes, so on any error `into` is untouched.
void load_checkpoint(const std::string& path, KvCache& into);
void load_checkpoint(const std::string& path, PagedKvPool& into);

// kRing: a KvCache run as a ring (RingSpec); load_kv_cache returns a ring.
enum class CheckpointKind { kContiguous, kPaged, kRing };

struct CheckpointSection {
  std::string name;         // "header", "tables", "keys", "values"
  std::int64_t offset = 0;  // from the start of the file
  std::int64_t bytes = 0;
  std::uint32_t stored_crc = 0;    // CRC32 (zlib's) recorded in the directory
  std::uint32_t computed_crc = 0;  // of the bytes present in the file
  bool present = false;            // false when the file ends before the section does
  bool crc_ok() const noexcept { return present && stored_crc == computed_crc; }
};

struct CheckpointSequence {
  SequenceId id = 0;
  std::int64_t length = 0;           // tokens
  std::vector<std::int64_t> blocks;  // block table
};

// What inspect_checkpoint could read. Fields are filled as far as the file
// allows: `kind` and `sections` once the directory is intact, `config` and the
// geometry once the header section's checksum matches, `sequences` once the
// tables' checksum matches.
struct CheckpointInfo {
  std::string path;
  std::int64_t file_bytes = 0;
  std::uint32_t version = 0;  // 0 when the file is too short to hold one
  std::optional<CheckpointKind> kind;
  std::optional<CacheConfig> config;
  std::int64_t capacity = 0;                  // contiguous, ring: tokens (a ring's slots)
  std::int64_t length = 0;                    // contiguous, ring: tokens appended
  std::int64_t sink_tokens = 0;               // ring: RingSpec::sink_tokens
  std::int64_t block_size = 0;                // paged
  std::int64_t num_blocks = 0;                // paged
  std::int64_t used_blocks = 0;               // paged: blocks with a reference (saved)
  SequenceId next_id = 0;                     // paged: the id the next create/fork returns
  std::vector<CheckpointSequence> sequences;  // paged
  std::vector<CheckpointSection> sections;
  // Everything that would make loading fail, one sentence each; empty when
  // the file is intact.
  std::vector<std::string> problems;

  bool intact() const noexcept { return problems.empty(); }
};

// Reads the header and verifies every checksum and the internal consistency
// of a checkpoint, without loading its data into a cache (the data sections
// are streamed through the CRC). Damage is reported in `problems`, never
// thrown; a path that cannot be opened or read throws lookback::Error (kIo).
CheckpointInfo inspect_checkpoint(const std::string& path);

// "contiguous", "paged", "ring"
std::string_view checkpoint_kind_name(CheckpointKind kind) noexcept;

}  // namespace lookback
