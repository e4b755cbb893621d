// The tables section of a paged checkpoint (docs/checkpoint.md): reference
// counts, the free list and every sequence's block table, encoded and
// checked for consistency. Part of the pure codec of checkpoint_format.hpp.
#include <fmt/format.h>

#include <limits>

#include "kv_cache/checkpoint_fields.hpp"
#include "kv_cache/checkpoint_format.hpp"

namespace lookback::checkpoint_format {
namespace {

constexpr std::int64_t kSequenceRecordBytes = 24;  // id, length, block count (then the blocks)

// Per block, while the tables are parsed: how many block tables hold it, and
// the last sequence that did (a table never holds a block twice); free-list
// entries mark it kFree.
struct BlockUse {
  static constexpr std::int64_t kFree = -2;
  std::vector<std::int64_t> held;
  std::vector<std::int64_t> last_holder;
  explicit BlockUse(std::int64_t num_blocks)
      : held(static_cast<std::size_t>(num_blocks), 0),
        last_holder(static_cast<std::size_t>(num_blocks), -1) {}
};

// Reference counts, as many blocks with one as the header says are used.
void parse_references(FieldReader& in, const Header& header, Tables& tables) {
  in.need(header.num_blocks, 4, "reference counts");
  tables.references.resize(static_cast<std::size_t>(header.num_blocks));
  std::int64_t used = 0;
  for (std::int64_t b = 0; b < header.num_blocks; ++b) {
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
}

void parse_free_list(FieldReader& in, const Header& header, Tables& tables, BlockUse& use) {
  const std::int64_t free_count = header.num_blocks - header.used_blocks;
  in.need(free_count, 8, "free-list entries");
  tables.free_list.resize(static_cast<std::size_t>(free_count));
  for (std::int64_t i = 0; i < free_count; ++i) {
    const std::int64_t block = in.number("free-list entry", 0, header.num_blocks - 1);
    auto& mark = use.last_holder[static_cast<std::size_t>(block)];
    if (tables.references[static_cast<std::size_t>(block)] != 0 || mark == BlockUse::kFree) {
      damaged(
          fmt::format("tables section: free-list entry {} is block {}, which is {} (expected "
                      "each unreferenced block once)",
                      i, block, mark == BlockUse::kFree ? "listed twice" : "in use"));
    }
    mark = BlockUse::kFree;
    tables.free_list[static_cast<std::size_t>(i)] = block;
  }
}

// Sequence `s` (ascending ids below next_id) and its block table.
void parse_sequence(FieldReader& in, const Header& header, std::int64_t s, Tables& tables,
                    BlockUse& use) {
  CheckpointSequence& sequence = tables.sequences[static_cast<std::size_t>(s)];
  const std::int64_t lowest = s == 0 ? 0 : tables.sequences[static_cast<std::size_t>(s - 1)].id + 1;
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
    block = in.number("block-table entry", 0, header.num_blocks - 1);
    auto& mark = use.last_holder[static_cast<std::size_t>(block)];
    if (mark == s) {
      damaged(
          fmt::format("tables section: sequence {} lists block {} twice (expected "
                      "distinct blocks)",
                      sequence.id, block));
    }
    mark = s;
    ++use.held[static_cast<std::size_t>(block)];
  }
}

}  // namespace

std::vector<std::byte> encode_tables(const Tables& tables) {
  std::vector<std::byte> out;
  for (std::int32_t count : tables.references) put_u32(out, static_cast<std::uint32_t>(count));
  for (std::int64_t block : tables.free_list) put_i64(out, block);
  for (const CheckpointSequence& sequence : tables.sequences) {
    put_i64(out, sequence.id);
    put_i64(out, sequence.length);
    put_i64(out, static_cast<std::int64_t>(sequence.blocks.size()));
    for (std::int64_t block : sequence.blocks) put_i64(out, block);
  }
  return out;
}

// Checks that the tables describe a state the pool could be in: block ids in
// range, each sequence's table as long as its length needs, reference counts
// equal to how many tables hold each block, and the free list exactly the
// unreferenced blocks, each once.
Tables parse_tables(Bytes bytes, const Header& header) {
  FieldReader in(bytes, "tables");
  Tables tables;
  parse_references(in, header, tables);  // checks num_blocks against the bytes first
  BlockUse use(header.num_blocks);
  parse_free_list(in, header, tables, use);
  in.need(header.sequence_count, kSequenceRecordBytes, "sequences");
  tables.sequences.resize(static_cast<std::size_t>(header.sequence_count));
  for (std::int64_t s = 0; s < header.sequence_count; ++s)
    parse_sequence(in, header, s, tables, use);
  if (in.remaining() != 0) {
    damaged(
        fmt::format("tables section: {} unexpected bytes after the last sequence", in.remaining()));
  }
  for (std::int64_t b = 0; b < header.num_blocks; ++b) {
    const auto index = static_cast<std::size_t>(b);
    if (use.held[index] != tables.references[index]) {
      damaged(
          fmt::format("tables section: block {} has reference count {}, but {} block tables "
                      "hold it (expected them equal)",
                      b, tables.references[index], use.held[index]));
    }
  }
  return tables;
}

}  // namespace lookback::checkpoint_format
