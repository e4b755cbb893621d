// The checkpoint codec (kv_cache/checkpoint_format.hpp) driven from memory,
// with no file and no cache: encode a checkpoint into a byte vector, parse it
// back, and check that every truncation and every flipped byte of those bytes
// is a format error. The file side (atomic saves, loads into caches, the
// documented layout on disk) is in checkpoint_test.cc.
#include "kv_cache/checkpoint_format.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

#include "lookback/error.hpp"

namespace lookback {
namespace {

namespace format = checkpoint_format;

// Deterministic stand-ins for K/V rows: `bytes` bytes that differ per seed.
std::vector<std::byte> pattern_bytes(std::int64_t bytes, int seed) {
  std::vector<std::byte> out(static_cast<std::size_t>(bytes));
  for (std::size_t i = 0; i < out.size(); ++i) {
    out[i] = static_cast<std::byte>((i * 31 + static_cast<std::size_t>(seed) * 7) & 0xff);
  }
  return out;
}

// Emits `data` in pieces of `row_bytes`, as the cache's rows would come.
format::SectionWriter rows_of(const std::vector<std::byte>& data, std::int64_t row_bytes) {
  return [&data, row_bytes](const format::ByteSink& sink) {
    for (std::size_t at = 0; at < data.size(); at += static_cast<std::size_t>(row_bytes)) {
      sink(format::Bytes(data).subspan(at, static_cast<std::size_t>(row_bytes)));
    }
  };
}

std::vector<std::byte> encode(const format::Header& header, const format::Tables& tables,
                              const std::vector<std::byte>& keys,
                              const std::vector<std::byte>& values) {
  std::vector<std::byte> file;
  format::encode(header, tables, rows_of(keys, header.row_bytes), rows_of(values, header.row_bytes),
                 [&](format::Bytes piece) { file.insert(file.end(), piece.begin(), piece.end()); });
  return file;
}

bool same_bytes(format::Bytes a, const std::vector<std::byte>& b) {
  // memcmp on an empty section would take null pointers.
  return a.size() == b.size() && (b.empty() || std::memcmp(a.data(), b.data(), b.size()) == 0);
}

// A paged pool's tables in a consistent state: block 1 shared by three
// sequences, blocks 3 and 0 free (taken from the back), an empty sequence.
format::Tables shared_block_tables() {
  format::Tables tables;
  tables.references = {0, 3, 1, 0, 1};
  tables.free_list = {3, 0};
  tables.sequences = {{.id = 0, .length = 7, .blocks = {1, 2}},
                      {.id = 2, .length = 4, .blocks = {1}},
                      {.id = 4, .length = 6, .blocks = {1, 4}},
                      {.id = 5, .length = 0, .blocks = {}}};
  return tables;
}

// The header that goes with shared_block_tables().
format::Header shared_block_header(const CacheConfig& config) {
  return format::paged_header(config, /*block_size=*/4, /*num_blocks=*/5, /*used_blocks=*/3,
                              /*sequence_count=*/4, /*next_id=*/6);
}

// Parses `bytes` expecting lookback::Error(kFormat); returns the message.
std::string format_error(format::Bytes bytes) {
  try {
    format::parse(bytes);
  } catch (const Error& e) {
    EXPECT_EQ(static_cast<int>(e.code()), static_cast<int>(ErrorCode::kFormat)) << e.what();
    return e.what();
  }
  return "";
}

const CacheConfig kConfig{.kv_heads = 2,
                          .head_dim = 6,
                          .storage = DType::kBF16,
                          .rope = RopeSpec{.theta = 500000.0f, .interleaved = false}};

TEST(CheckpointFormat, ContiguousRoundTripInMemory) {
  const format::Header header = format::contiguous_header(kConfig, /*capacity=*/32, /*length=*/5);
  EXPECT_EQ(header.row_bytes, 6 * 2);
  EXPECT_EQ(header.data_bytes, 2 * 5 * 6 * 2);
  const std::vector<std::byte> keys = pattern_bytes(header.data_bytes, 1);
  const std::vector<std::byte> values = pattern_bytes(header.data_bytes, 2);
  const std::vector<std::byte> file = encode(header, {}, keys, values);
  ASSERT_EQ(file.size(), 128u + 48u + 2u * static_cast<std::size_t>(header.data_bytes));
  EXPECT_EQ(std::memcmp(file.data(), "LOOKBKV\0", 8), 0);

  const format::Parsed parsed = format::parse(file);
  EXPECT_EQ(parsed.header.kind, CheckpointKind::kContiguous);
  EXPECT_EQ(parsed.header.config.kv_heads, 2);
  EXPECT_EQ(parsed.header.config.head_dim, 6);
  EXPECT_EQ(parsed.header.config.storage, DType::kBF16);
  ASSERT_TRUE(parsed.header.config.rope.has_value());
  EXPECT_EQ(parsed.header.config.rope->theta, 500000.0f);
  EXPECT_FALSE(parsed.header.config.rope->interleaved);
  EXPECT_EQ(parsed.header.capacity, 32);
  EXPECT_EQ(parsed.header.length, 5);
  EXPECT_TRUE(same_bytes(parsed.keys, keys));
  EXPECT_TRUE(same_bytes(parsed.values, values));
  // The spans point into the parsed bytes, in file order: keys, then values.
  EXPECT_EQ(parsed.values.data(), parsed.keys.data() + parsed.keys.size());
  EXPECT_EQ(parsed.values.data() + parsed.values.size(), file.data() + file.size());
}

TEST(CheckpointFormat, PagedRoundTripInMemoryReencodesIdentically) {
  const format::Tables tables = shared_block_tables();
  const format::Header header = shared_block_header(kConfig);
  const std::vector<std::byte> keys = pattern_bytes(header.data_bytes, 3);
  const std::vector<std::byte> values = pattern_bytes(header.data_bytes, 4);
  const std::vector<std::byte> file = encode(header, tables, keys, values);

  const format::Parsed parsed = format::parse(file);
  EXPECT_EQ(parsed.header.kind, CheckpointKind::kPaged);
  EXPECT_EQ(parsed.header.block_size, 4);
  EXPECT_EQ(parsed.header.num_blocks, 5);
  EXPECT_EQ(parsed.header.used_blocks, 3);
  EXPECT_EQ(parsed.header.next_id, 6);
  EXPECT_EQ(parsed.tables.references, tables.references);
  EXPECT_EQ(parsed.tables.free_list, tables.free_list);
  ASSERT_EQ(parsed.tables.sequences.size(), tables.sequences.size());
  for (std::size_t s = 0; s < tables.sequences.size(); ++s) {
    EXPECT_EQ(parsed.tables.sequences[s].id, tables.sequences[s].id);
    EXPECT_EQ(parsed.tables.sequences[s].length, tables.sequences[s].length);
    EXPECT_EQ(parsed.tables.sequences[s].blocks, tables.sequences[s].blocks);
  }
  EXPECT_TRUE(same_bytes(parsed.keys, keys));
  EXPECT_TRUE(same_bytes(parsed.values, values));

  // What was parsed encodes to the same bytes: no field is lost or altered.
  const std::vector<std::byte> again = encode(parsed.header, parsed.tables, keys, values);
  EXPECT_EQ(again, file);
}

// A ring's header (kind 3): a contiguous header plus sink_tokens; its data
// sections hold min(length, capacity) tokens, oldest position first.
TEST(CheckpointFormat, RingRoundTripInMemoryReencodesIdentically) {
  for (std::int64_t length : {21, 8, 5, 0}) {
    SCOPED_TRACE("length " + std::to_string(length));
    const format::Header header =
        format::ring_header(kConfig, /*capacity=*/8, length, /*sink_tokens=*/3);
    const std::int64_t stored = std::min<std::int64_t>(length, 8);
    EXPECT_EQ(format::stored_tokens(header), stored);
    EXPECT_EQ(header.data_bytes, 2 * stored * 6 * 2);
    const std::vector<std::byte> keys = pattern_bytes(header.data_bytes, 11);
    const std::vector<std::byte> values = pattern_bytes(header.data_bytes, 12);
    const std::vector<std::byte> file = encode(header, {}, keys, values);
    ASSERT_EQ(file.size(), 128u + 56u + 2u * static_cast<std::size_t>(header.data_bytes));

    const format::Parsed parsed = format::parse(file);
    EXPECT_EQ(parsed.header.kind, CheckpointKind::kRing);
    EXPECT_EQ(parsed.header.capacity, 8);
    EXPECT_EQ(parsed.header.length, length);
    EXPECT_EQ(parsed.header.sink_tokens, 3);
    EXPECT_TRUE(same_bytes(parsed.keys, keys));
    EXPECT_TRUE(same_bytes(parsed.values, values));
    EXPECT_EQ(encode(parsed.header, {}, keys, values), file);
  }
  // Row order: the sink tokens, then the newest tokens kept.
  const format::Header wrapped = format::ring_header(kConfig, 8, 21, 3);
  std::vector<std::int64_t> positions;
  for (std::int64_t row = 0; row < 8; ++row) {
    positions.push_back(format::stored_position(wrapped, row));
  }
  EXPECT_EQ(positions, (std::vector<std::int64_t>{0, 1, 2, 16, 17, 18, 19, 20}));
  const format::Header young = format::ring_header(kConfig, 8, 5, 3);
  positions.clear();
  for (std::int64_t row = 0; row < 5; ++row) {
    positions.push_back(format::stored_position(young, row));
  }
  EXPECT_EQ(positions, (std::vector<std::int64_t>{0, 1, 2, 3, 4}));
}

TEST(CheckpointFormat, RingHeadersOutOfRangeAreFormatErrors) {
  // The encoder writes what it is given, with valid CRCs.
  format::Header sinks = format::ring_header(kConfig, 8, 21, 3);
  sinks.sink_tokens = 8;
  EXPECT_NE(format_error(encode(sinks, {}, pattern_bytes(sinks.data_bytes, 1),
                                pattern_bytes(sinks.data_bytes, 2)))
                .find("header section: sink_tokens is 8 (expected 0 to 7)"),
            std::string::npos);
  format::Header shorter = format::ring_header(kConfig, 8, 21, 3);  // data for 8 tokens
  shorter.length = 5;
  EXPECT_NE(format_error(encode(shorter, {}, pattern_bytes(shorter.data_bytes, 3),
                                pattern_bytes(shorter.data_bytes, 4)))
                .find("keys section is 192 bytes (expected 120 = kv_heads 2 x min(length 5, "
                      "capacity 8) x head_dim 6"),
            std::string::npos);
  format::Header empty = format::ring_header(kConfig, 8, 0, 0);
  empty.capacity = 0;
  EXPECT_NE(format_error(encode(empty, {}, {}, {})).find("capacity is 0 (expected 1"),
            std::string::npos);
}

TEST(CheckpointFormat, EveryTruncationAndFlippedByteOfARingIsAFormatError) {
  const format::Header header = format::ring_header(kConfig, 6, 17, 2);
  const std::vector<std::byte> file =
      encode(header, {}, pattern_bytes(header.data_bytes, 5), pattern_bytes(header.data_bytes, 6));
  for (std::size_t size = 0; size < file.size(); ++size) {
    SCOPED_TRACE("truncated to " + std::to_string(size) + " bytes");
    EXPECT_FALSE(format_error(format::Bytes(file).first(size)).empty());
  }
  for (std::size_t at = 0; at < file.size(); ++at) {
    SCOPED_TRACE("byte " + std::to_string(at) + " flipped");
    std::vector<std::byte> damaged = file;
    damaged[at] ^= std::byte{0x10};
    EXPECT_FALSE(format_error(damaged).empty());
  }
}

TEST(CheckpointFormat, EveryTruncationAndFlippedByteIsAFormatError) {
  const format::Header header = shared_block_header(kConfig);
  const std::vector<std::byte> file =
      encode(header, shared_block_tables(), pattern_bytes(header.data_bytes, 5),
             pattern_bytes(header.data_bytes, 6));
  for (std::size_t size = 0; size < file.size(); ++size) {
    SCOPED_TRACE("truncated to " + std::to_string(size) + " bytes");
    EXPECT_FALSE(format_error(format::Bytes(file).first(size)).empty());
  }
  std::vector<std::byte> longer = file;
  longer.push_back(std::byte{0});
  EXPECT_NE(format_error(longer).find("1 unexpected bytes at the end"), std::string::npos);
  for (std::size_t at = 0; at < file.size(); ++at) {
    SCOPED_TRACE("byte " + std::to_string(at) + " flipped");
    std::vector<std::byte> damaged = file;
    damaged[at] ^= std::byte{0x10};
    EXPECT_FALSE(format_error(damaged).empty());
  }
}

TEST(CheckpointFormat, InconsistentTablesAreCaughtBehindMatchingChecksums) {
  // The encoder writes what it is given, with valid CRCs; the parser's
  // consistency checks must still refuse it.
  format::Tables tables = shared_block_tables();
  tables.references[2] = 2;  // one table holds block 2, not two
  const format::Header header = shared_block_header(kConfig);
  const std::vector<std::byte> file = encode(header, tables, pattern_bytes(header.data_bytes, 7),
                                             pattern_bytes(header.data_bytes, 8));
  EXPECT_NE(format_error(file).find("tables section: block 2 has reference count 2, but 1"),
            std::string::npos);
}

TEST(CheckpointFormat, ADataWriterOfTheWrongSizeIsAnInternalError) {
  const format::Header header = format::contiguous_header(kConfig, 8, 2);
  const std::vector<std::byte> short_keys = pattern_bytes(header.data_bytes - header.row_bytes, 9);
  const std::vector<std::byte> values = pattern_bytes(header.data_bytes, 10);
  try {
    encode(header, {}, short_keys, values);
    ADD_FAILURE() << "expected lookback::Error(kInternal)";
  } catch (const Error& e) {
    EXPECT_EQ(static_cast<int>(e.code()), static_cast<int>(ErrorCode::kInternal)) << e.what();
    EXPECT_NE(std::string(e.what()).find("keys section"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace lookback
