// KV-cache checkpoints: round trips that attend bit-identically afterwards
// (contiguous caches in every storage dtype, with RoPE; paged pools with
// forks, copy-on-write, released and shuffled blocks), the documented byte
// layout, every kind of damage (each truncation length, each flipped byte,
// magic, version, absurd sizes, inconsistent tables) leaving the object
// loaded into untouched, and a writer process killed mid-save.
#include "lookback/checkpoint.hpp"

#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <optional>
#include <ostream>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "lookback/error.hpp"
#include "lookback/kv_cache.hpp"

namespace lookback {
namespace {

namespace fs = std::filesystem;

// ---- helpers -------------------------------------------------------------------

std::vector<float> random_floats(std::size_t count, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> values(count);
  for (float& x : values) x = normal(rng);
  return values;
}

// Query heads per kv head in every test (GQA).
constexpr std::int64_t kGroup = 2;

CacheConfig small_config(DType storage = DType::kF32, std::optional<RopeSpec> rope = {}) {
  return {.kv_heads = 2, .head_dim = 24, .storage = storage, .rope = rope};
}

// Random K and V rows, (tokens, kv_heads, head_dim) each.
struct KvRows {
  std::vector<float> k, v;
  TensorView k_view, v_view;
  KvRows(const CacheConfig& config, std::int64_t tokens, std::uint64_t seed)
      : k(random_floats(static_cast<std::size_t>(tokens * config.kv_heads * config.head_dim),
                        seed)),
        v(random_floats(k.size(), seed + 1)),
        k_view(make_view(k.data(), DType::kF32, {tokens, config.kv_heads, config.head_dim}, "k")),
        v_view(make_view(v.data(), DType::kF32, {tokens, config.kv_heads, config.head_dim}, "v")) {}
};

void append_random(KvCache& cache, std::int64_t tokens, std::uint64_t seed) {
  const KvRows rows(cache.config(), tokens, seed);
  cache.append(rows.k_view, rows.v_view);
}
void append_random(PagedKvPool& pool, SequenceId id, std::int64_t tokens, std::uint64_t seed) {
  const KvRows rows(pool.config(), tokens, seed);
  pool.append(id, rows.k_view, rows.v_view);
}

// Everything observable through the public API, as one float vector: the
// length, then the output and LSE of the newest (up to 3) tokens' queries.
// Compared bit for bit.
template <typename Attend>
void observe_attention(const CacheConfig& config, std::int64_t length, Attend&& attend,
                       std::vector<float>& seen) {
  seen.push_back(static_cast<float>(length));
  const std::int64_t count = std::min<std::int64_t>(length, 3);
  if (count == 0) return;
  const std::int64_t heads = config.kv_heads * kGroup;
  const std::vector<float> q =
      random_floats(static_cast<std::size_t>(count * heads * config.head_dim), 99);
  std::vector<float> out(q.size()), lse(static_cast<std::size_t>(heads * count));
  attend(DecodeStep{
      .q = make_view(q.data(), DType::kF32, {count, heads, config.head_dim}, "q"),
      .out = make_mutable_view(out.data(), DType::kF32, {count, heads, config.head_dim}, "out"),
      .maybe_lse = make_mutable_view(lse.data(), DType::kF32, {heads, count}, "lse")});
  seen.insert(seen.end(), out.begin(), out.end());
  seen.insert(seen.end(), lse.begin(), lse.end());
}

// One context for every observation (creating threads per call would
// dominate the damage sweeps).
Context& shared_context() {
  static Context context(2);
  return context;
}

std::vector<float> observe(const KvCache& cache) {
  Context& context = shared_context();
  std::vector<float> seen{static_cast<float>(cache.capacity())};
  observe_attention(
      cache.config(), cache.length(),
      [&](const DecodeStep& step) { cache.attend(step, {}, context); }, seen);
  return seen;
}

std::vector<float> observe(const PagedKvPool& pool) {
  Context& context = shared_context();
  std::vector<float> seen{static_cast<float>(pool.free_blocks())};
  for (SequenceId id : pool.sequences()) {
    seen.push_back(static_cast<float>(id));
    for (std::int64_t block : pool.block_table(id)) seen.push_back(static_cast<float>(block));
    observe_attention(
        pool.config(), pool.length(id),
        [&](const DecodeStep& step) { pool.attend(id, step, {}, context); }, seen);
  }
  return seen;
}

::testing::AssertionResult bit_identical(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) {
    return ::testing::AssertionFailure() << "sizes differ: " << a.size() << " vs " << b.size();
  }
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) {
      return ::testing::AssertionFailure() << "element " << i << ": " << a[i] << " vs " << b[i];
    }
  }
  return ::testing::AssertionSuccess();
}

// CRC-32 (the reflected 0xEDB88320 polynomial zlib uses), written here
// independently so the tests can reseal files they tamper with and check
// that the stored checksums are the standard ones.
std::uint32_t crc32(const std::uint8_t* data, std::size_t bytes) {
  std::uint32_t crc = 0xffffffffu;
  for (std::size_t i = 0; i < bytes; ++i) {
    crc ^= data[i];
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

// A checkpoint's bytes, read and patched through the layout that
// docs/checkpoint.md documents.
struct FileBytes {
  std::vector<std::uint8_t> bytes;

  static FileBytes read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::vector<std::uint8_t>(std::istreambuf_iterator<char>(in), {})};
  }
  void write(const std::string& path) const {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
  }
  std::uint64_t u64(std::size_t at) const {
    std::uint64_t value = 0;
    for (int i = 0; i < 8; ++i) value |= static_cast<std::uint64_t>(bytes[at + i]) << (8 * i);
    return value;
  }
  std::uint32_t u32(std::size_t at) const {
    std::uint32_t value = 0;
    for (int i = 0; i < 4; ++i) value |= static_cast<std::uint32_t>(bytes[at + i]) << (8 * i);
    return value;
  }
  void set_u32(std::size_t at, std::uint32_t value) {
    for (int i = 0; i < 4; ++i) bytes[at + i] = static_cast<std::uint8_t>(value >> (8 * i));
  }
  void set_u64(std::size_t at, std::uint64_t value) {
    for (int i = 0; i < 8; ++i) bytes[at + i] = static_cast<std::uint8_t>(value >> (8 * i));
  }
  std::size_t sections() const { return u32(16); }
  std::size_t directory_bytes() const { return 24 + 32 * sections() + 8; }
  std::string tag(std::size_t section) const {
    return std::string(reinterpret_cast<const char*>(&bytes[24 + 32 * section]), 4);
  }
  std::size_t offset(std::size_t section) const { return u64(24 + 32 * section + 8); }
  std::size_t length(std::size_t section) const { return u64(24 + 32 * section + 16); }
  // Recomputes every section's CRC and the directory's, as a writer would, so
  // that only the checks behind the checksums see a tampered field.
  void reseal() {
    for (std::size_t s = 0; s < sections(); ++s) {
      set_u32(24 + 32 * s + 4, crc32(&bytes[offset(s)], length(s)));
    }
    reseal_directory();
  }
  // Only the directory's CRC (after tampering with the directory itself,
  // whose sizes may no longer fit the file).
  void reseal_directory() {
    set_u32(24 + 32 * sections(), crc32(bytes.data(), 24 + 32 * sections()));
  }
};

class Checkpoint : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::path(::testing::TempDir()) / "lookback-checkpoint-XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr) << pattern;
    folder_ = pattern;
  }
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(folder_, ignored);
  }
  std::string path(const std::string& name) const { return (fs::path(folder_) / name).string(); }

  std::string folder_;
};

// Expects `load` to throw lookback::Error with `code`, a message naming the
// path (and `mentions` when given); returns the message.
std::string expect_error(const std::function<void()>& load, ErrorCode code, const std::string& path,
                         const std::string& mentions = "") {
  try {
    load();
  } catch (const Error& e) {
    EXPECT_EQ(static_cast<int>(e.code()), static_cast<int>(code)) << e.what();
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    if (!mentions.empty())
      EXPECT_NE(std::string(e.what()).find(mentions), std::string::npos) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "expected a lookback::Error for " << path;
  return "";
}

// A pool in a state no identity mapping could fake: forks sharing a prefix,
// a copy-on-write of a shared partial block, a released sequence (a hole in
// the free list) and shuffled block ids.
PagedKvPool interesting_pool(const CacheConfig& config) {
  PagedKvPool pool(config, /*block_size=*/5, /*num_blocks=*/24);
  const SequenceId prompt = pool.create();
  append_random(pool, prompt, 23, 1);  // 4 full blocks and 3 tokens of a fifth
  const SequenceId branch = pool.fork(prompt);
  append_random(pool, branch, 4, 2);  // copies the shared partial block
  const SequenceId scratch = pool.create();
  append_random(pool, scratch, 12, 3);
  const SequenceId twin = pool.fork(prompt);  // shares every block of prompt
  pool.release(scratch);
  pool.shuffle_blocks(7);
  append_random(pool, twin, 9, 4);
  pool.create();  // an empty sequence
  return pool;
}

// ---- round trips -----------------------------------------------------------------

struct ContiguousCase {
  const char* name;
  CacheConfig config;
};
void PrintTo(const ContiguousCase& c, std::ostream* os) { *os << c.name; }

class ContiguousRoundTrip : public Checkpoint,
                            public ::testing::WithParamInterface<ContiguousCase> {};

TEST_P(ContiguousRoundTrip, AttendsBitIdenticallyAfterLoading) {
  const CacheConfig config = GetParam().config;
  KvCache cache(config, 80);
  append_random(cache, 30, 1);
  append_random(cache, 7, 2);
  const std::string file = path("cache.lbkv");
  save_checkpoint(cache, file);

  KvCache loaded = load_kv_cache(file);
  EXPECT_EQ(loaded.config().kv_heads, config.kv_heads);
  EXPECT_EQ(loaded.config().head_dim, config.head_dim);
  EXPECT_EQ(loaded.config().storage, config.storage);
  ASSERT_EQ(loaded.config().rope.has_value(), config.rope.has_value());
  if (config.rope) {
    EXPECT_EQ(loaded.config().rope->theta, config.rope->theta);
    EXPECT_EQ(loaded.config().rope->interleaved, config.rope->interleaved);
  }
  EXPECT_TRUE(bit_identical(observe(loaded), observe(cache)));

  // Into an existing cache holding something else.
  KvCache into(config, 80);
  append_random(into, 50, 9);
  load_checkpoint(file, into);
  EXPECT_TRUE(bit_identical(observe(into), observe(cache)));

  // Resuming: the same new tokens give the same results (positions and RoPE
  // continue from the restored length).
  for (KvCache* c : {&cache, &loaded, &into}) append_random(*c, 11, 3);
  EXPECT_TRUE(bit_identical(observe(loaded), observe(cache)));
  EXPECT_TRUE(bit_identical(observe(into), observe(cache)));
}

TEST_P(ContiguousRoundTrip, EmptyAndFullCaches) {
  const CacheConfig config = GetParam().config;
  KvCache empty(config, 16);
  save_checkpoint(empty, path("empty.lbkv"));
  KvCache loaded = load_kv_cache(path("empty.lbkv"));
  EXPECT_EQ(loaded.length(), 0);
  EXPECT_EQ(loaded.capacity(), 16);

  KvCache full(config, 16);
  append_random(full, 16, 5);
  save_checkpoint(full, path("full.lbkv"));
  EXPECT_TRUE(bit_identical(observe(load_kv_cache(path("full.lbkv"))), observe(full)));

  KvCache none(config, 0);
  save_checkpoint(none, path("none.lbkv"));
  EXPECT_EQ(load_kv_cache(path("none.lbkv")).capacity(), 0);
}

INSTANTIATE_TEST_SUITE_P(
    Checkpoint, ContiguousRoundTrip,
    ::testing::Values(
        ContiguousCase{"F32", small_config(DType::kF32)},
        ContiguousCase{"Bf16Rope", small_config(DType::kBF16, RopeSpec{.theta = 10000.0f})},
        ContiguousCase{
            "F16InterleavedRope",
            small_config(DType::kF16, RopeSpec{.theta = 500000.0f, .interleaved = true})},
        ContiguousCase{"OddDimF32",
                       {.kv_heads = 3, .head_dim = 7, .storage = DType::kF32, .rope = {}}}),
    [](const auto& info) { return std::string(info.param.name); });

TEST_F(Checkpoint, PagedPoolWithForksSharedAndShuffledBlocksRoundTrips) {
  for (const CacheConfig& config :
       {small_config(DType::kF32), small_config(DType::kBF16, RopeSpec{.theta = 10000.0f})}) {
    PagedKvPool pool = interesting_pool(config);
    const std::string file = path("pool.lbkv");
    save_checkpoint(pool, file);

    PagedKvPool loaded = load_paged_pool(file);
    EXPECT_EQ(loaded.block_size(), pool.block_size());
    EXPECT_EQ(loaded.num_blocks(), pool.num_blocks());
    EXPECT_EQ(loaded.sequences(), pool.sequences());
    EXPECT_TRUE(bit_identical(observe(loaded), observe(pool)));

    PagedKvPool into(config, 5, 24);
    append_random(into, into.create(), 40, 8);
    load_checkpoint(file, into);
    EXPECT_TRUE(bit_identical(observe(into), observe(pool)));

    // The restored free list and next id hand out the same blocks and ids:
    // further appends, forks and creates stay identical.
    for (PagedKvPool* p : {&pool, &loaded, &into}) {
      const SequenceId first = p->sequences().front();
      const SequenceId fork = p->fork(first);
      append_random(*p, first, 6, 5);  // copies the partial block it now shares
      append_random(*p, fork, 3, 6);
      append_random(*p, p->create(), 7, 7);
    }
    EXPECT_TRUE(bit_identical(observe(loaded), observe(pool)));
    EXPECT_TRUE(bit_identical(observe(into), observe(pool)));
  }
}

TEST_F(Checkpoint, InspectReportsTheHeaderAndEverySection) {
  const PagedKvPool pool = interesting_pool(small_config(DType::kBF16, RopeSpec{.theta = 1e4f}));
  save_checkpoint(pool, path("pool.lbkv"));
  const CheckpointInfo info = inspect_checkpoint(path("pool.lbkv"));
  EXPECT_TRUE(info.intact()) << (info.problems.empty() ? "" : info.problems.front());
  EXPECT_EQ(info.version, 1u);
  ASSERT_EQ(info.kind, CheckpointKind::kPaged);
  ASSERT_TRUE(info.config.has_value());
  EXPECT_EQ(info.config->storage, DType::kBF16);
  EXPECT_TRUE(info.config->rope.has_value());
  EXPECT_EQ(info.block_size, 5);
  EXPECT_EQ(info.num_blocks, 24);
  EXPECT_EQ(info.used_blocks, 24 - pool.free_blocks());
  ASSERT_EQ(info.sequences.size(), pool.sequences().size());
  for (const CheckpointSequence& sequence : info.sequences) {
    EXPECT_EQ(sequence.length, pool.length(sequence.id));
    EXPECT_EQ(sequence.blocks, pool.block_table(sequence.id));
  }
  ASSERT_EQ(info.sections.size(), 4u);
  for (const CheckpointSection& section : info.sections)
    EXPECT_TRUE(section.crc_ok()) << section.name;
}

// ---- the documented layout ---------------------------------------------------------

TEST_F(Checkpoint, ContiguousLayoutMatchesTheDocumentation) {
  // docs/checkpoint.md: directory, then HEAD, KDAT, VDAT; only the filled
  // tokens are written, head-major and unpadded, little-endian.
  const CacheConfig config{.kv_heads = 3,
                           .head_dim = 5,
                           .storage = DType::kBF16,
                           .rope = RopeSpec{.theta = 10000.0f, .interleaved = true}};
  KvCache cache(config, 64);
  append_random(cache, 9, 1);
  save_checkpoint(cache, path("c.lbkv"));
  const FileBytes file = FileBytes::read(path("c.lbkv"));
  ASSERT_GE(file.bytes.size(), 24u);
  EXPECT_EQ(std::memcmp(file.bytes.data(), "LOOKBKV\0", 8), 0);
  EXPECT_EQ(file.u32(8), 1u);   // format version
  EXPECT_EQ(file.u32(12), 1u);  // kind: contiguous
  ASSERT_EQ(file.sections(), 3u);
  EXPECT_EQ(file.tag(0), "HEAD");
  EXPECT_EQ(file.tag(1), "KDAT");
  EXPECT_EQ(file.tag(2), "VDAT");
  EXPECT_EQ(file.offset(0), file.directory_bytes());
  const std::size_t head = file.offset(0);
  EXPECT_EQ(file.length(0), 48u);
  EXPECT_EQ(file.u64(head + 0), 3u);   // kv_heads
  EXPECT_EQ(file.u64(head + 8), 5u);   // head_dim
  EXPECT_EQ(file.u32(head + 16), 2u);  // storage: bf16
  EXPECT_EQ(file.u32(head + 20), 3u);  // RoPE enabled | interleaved
  float theta;
  const std::uint32_t theta_bits = file.u32(head + 24);
  std::memcpy(&theta, &theta_bits, 4);
  EXPECT_EQ(theta, 10000.0f);
  EXPECT_EQ(file.u64(head + 32), 64u);     // capacity
  EXPECT_EQ(file.u64(head + 40), 9u);      // length
  const std::size_t data = 3 * 9 * 5 * 2;  // kv_heads x length x head_dim x bf16
  EXPECT_EQ(file.length(1), data);
  EXPECT_EQ(file.length(2), data);
  EXPECT_EQ(file.bytes.size(), file.directory_bytes() + 48 + 2 * data);
  // Standard CRC-32 of each section, and of the directory before its CRC.
  for (std::size_t s = 0; s < 3; ++s) {
    EXPECT_EQ(file.u32(24 + 32 * s + 4), crc32(&file.bytes[file.offset(s)], file.length(s)));
  }
  EXPECT_EQ(file.u32(24 + 32 * 3), crc32(file.bytes.data(), 24 + 32 * 3));
}

TEST_F(Checkpoint, PagedLayoutWritesOnlyTheUsedBlocks) {
  const PagedKvPool pool = interesting_pool(small_config());
  save_checkpoint(pool, path("p.lbkv"));
  const FileBytes file = FileBytes::read(path("p.lbkv"));
  EXPECT_EQ(file.u32(12), 2u);  // kind: paged
  ASSERT_EQ(file.sections(), 4u);
  EXPECT_EQ(file.tag(1), "TABL");
  const std::size_t head = file.offset(0);
  EXPECT_EQ(file.length(0), 72u);
  EXPECT_EQ(file.u64(head + 32), 5u);   // block_size
  EXPECT_EQ(file.u64(head + 40), 24u);  // num_blocks
  const std::int64_t used = 24 - pool.free_blocks();
  EXPECT_EQ(file.u64(head + 48), static_cast<std::uint64_t>(used));
  EXPECT_EQ(file.u64(head + 56), pool.sequences().size());
  EXPECT_EQ(file.length(2), static_cast<std::size_t>(used * 2 * 5 * 24 * 4));
}

// ---- damage --------------------------------------------------------------------------

// Runs `check` on every file derived from `good` by `damage`, expecting
// loading into `into` to fail and leave it untouched.
template <typename Object>
void expect_rejected_and_untouched(const std::string& file, Object& into,
                                   const std::vector<float>& before, const std::string& what) {
  SCOPED_TRACE(what);
  try {
    load_checkpoint(file, into);
    ADD_FAILURE() << "loaded a damaged checkpoint";
  } catch (const Error& e) {
    EXPECT_EQ(static_cast<int>(e.code()), static_cast<int>(ErrorCode::kFormat)) << e.what();
    EXPECT_EQ(std::string(e.what()).rfind(file + ": ", 0), 0u) << e.what();
  }
  EXPECT_TRUE(bit_identical(observe(into), before));
  EXPECT_FALSE(inspect_checkpoint(file).intact());
}

TEST_F(Checkpoint, EveryTruncationIsAnErrorAndLeavesTheCacheUntouched) {
  const CacheConfig config = small_config(DType::kBF16, RopeSpec{.theta = 10000.0f});
  KvCache cache(config, 40);
  append_random(cache, 21, 1);
  save_checkpoint(cache, path("good.lbkv"));
  PagedKvPool pool = interesting_pool(config);
  save_checkpoint(pool, path("pool.lbkv"));

  KvCache into(config, 40);
  append_random(into, 13, 2);
  const std::vector<float> cache_before = observe(into);
  PagedKvPool pool_into(config, 5, 24);
  append_random(pool_into, pool_into.create(), 17, 3);
  const std::vector<float> pool_before = observe(pool_into);

  for (const std::string& name : {std::string("good.lbkv"), std::string("pool.lbkv")}) {
    const FileBytes good = FileBytes::read(path(name));
    const std::size_t size = good.bytes.size();
    // Every length in the directory and around each section boundary, and a
    // random sample of the rest.
    std::vector<std::size_t> lengths;
    for (std::size_t n = 0; n <= good.directory_bytes() + 1; ++n) lengths.push_back(n);
    for (std::size_t s = 0; s < good.sections(); ++s) {
      for (std::size_t edge : {good.offset(s), good.offset(s) + good.length(s)}) {
        for (std::size_t n : {edge - 1, edge, edge + 1}) lengths.push_back(n);
      }
    }
    std::mt19937_64 rng(11);
    for (int i = 0; i < 40; ++i) lengths.push_back(rng() % size);
    for (std::size_t n : lengths) {
      if (n >= size) continue;
      FileBytes cut = good;
      cut.bytes.resize(n);
      const std::string file = path("cut.lbkv");
      cut.write(file);
      if (name == "good.lbkv") {
        expect_rejected_and_untouched(file, into, cache_before,
                                      "truncated to " + std::to_string(n));
        expect_error([&] { load_kv_cache(file); }, ErrorCode::kFormat, file);
      } else {
        expect_rejected_and_untouched(file, pool_into, pool_before,
                                      "truncated to " + std::to_string(n));
        expect_error([&] { load_paged_pool(file); }, ErrorCode::kFormat, file);
      }
    }
    // Trailing bytes are damage too.
    FileBytes longer = good;
    longer.bytes.push_back(0);
    const std::string file = path("long.lbkv");
    longer.write(file);
    if (name == "good.lbkv") {
      expect_rejected_and_untouched(file, into, cache_before, "one byte longer");
    } else {
      expect_rejected_and_untouched(file, pool_into, pool_before, "one byte longer");
    }
  }
}

TEST_F(Checkpoint, EveryFlippedByteIsCaughtAndNamesItsSection) {
  const CacheConfig config = small_config(DType::kF16);
  KvCache cache(config, 12);
  append_random(cache, 5, 1);
  save_checkpoint(cache, path("c.lbkv"));
  const PagedKvPool pool = interesting_pool(config);
  save_checkpoint(pool, path("p.lbkv"));

  KvCache into(config, 12);
  append_random(into, 9, 2);
  const std::vector<float> cache_before = observe(into);
  PagedKvPool pool_into(config, 5, 24);
  append_random(pool_into, pool_into.create(), 11, 3);
  const std::vector<float> pool_before = observe(pool_into);

  const char* names[2][4] = {{"header", "keys", "values", ""},
                             {"header", "tables", "keys", "values"}};
  for (int kind = 0; kind < 2; ++kind) {
    const std::string source = path(kind == 0 ? "c.lbkv" : "p.lbkv");
    const FileBytes good = FileBytes::read(source);
    const std::string file = path("flipped.lbkv");
    // CRC-32 catches every error burst of up to 32 bits. Every byte of the
    // contiguous file is tried; in the larger paged file, every byte of the
    // directory, header and tables and every 5th of the K/V data.
    const std::size_t data_begin = kind == 0 ? good.bytes.size() : good.offset(2);
    for (std::size_t at = 0; at < good.bytes.size(); at += at < data_begin ? 1 : 5) {
      FileBytes bad = good;
      bad.bytes[at] ^= static_cast<std::uint8_t>(1u << (at % 8));
      bad.write(file);
      const std::string what = "byte " + std::to_string(at);
      if (kind == 0) {
        expect_rejected_and_untouched(file, into, cache_before, what);
      } else {
        expect_rejected_and_untouched(file, pool_into, pool_before, what);
      }
      // A flip inside a section is reported as that section's checksum.
      for (std::size_t s = 0; s < good.sections(); ++s) {
        if (at >= good.offset(s) && at < good.offset(s) + good.length(s)) {
          const CheckpointInfo info = inspect_checkpoint(file);
          ASSERT_EQ(info.sections.size(), good.sections());
          EXPECT_FALSE(info.sections[s].crc_ok()) << what;
          ASSERT_FALSE(info.problems.empty());
          EXPECT_NE(info.problems.front().find(names[kind][s]), std::string::npos)
              << what << ": " << info.problems.front();
        }
      }
    }
  }
}

TEST_F(Checkpoint, WrongMagicAndVersion) {
  KvCache cache(small_config(), 8);
  append_random(cache, 8, 1);
  save_checkpoint(cache, path("good.lbkv"));
  const FileBytes good = FileBytes::read(path("good.lbkv"));

  FileBytes magic = good;
  magic.bytes[3] = 'X';
  magic.write(path("magic.lbkv"));
  expect_error([&] { load_kv_cache(path("magic.lbkv")); }, ErrorCode::kFormat, path("magic.lbkv"),
               "magic");

  // A newer version is named as such, even when everything else is intact.
  FileBytes newer = good;
  newer.set_u32(8, 2);
  newer.reseal();
  newer.write(path("v2.lbkv"));
  const std::string message = expect_error([&] { load_kv_cache(path("v2.lbkv")); },
                                           ErrorCode::kFormat, path("v2.lbkv"), "version 2");
  EXPECT_NE(message.find("newer"), std::string::npos) << message;
  const CheckpointInfo info = inspect_checkpoint(path("v2.lbkv"));
  EXPECT_EQ(info.version, 2u);
  EXPECT_FALSE(info.intact());

  FileBytes zero = good;
  zero.set_u32(8, 0);
  zero.write(path("v0.lbkv"));
  expect_error([&] { load_kv_cache(path("v0.lbkv")); }, ErrorCode::kFormat, path("v0.lbkv"),
               "version 0");

  // Not a checkpoint at all, empty, missing, a folder.
  FileBytes text{{'h', 'e', 'l', 'l', 'o', '\n'}};
  text.write(path("text.lbkv"));
  expect_error([&] { load_kv_cache(path("text.lbkv")); }, ErrorCode::kFormat, path("text.lbkv"));
  FileBytes{}.write(path("empty.lbkv"));
  expect_error([&] { load_kv_cache(path("empty.lbkv")); }, ErrorCode::kFormat, path("empty.lbkv"));
  expect_error([&] { load_kv_cache(path("missing.lbkv")); }, ErrorCode::kIo, path("missing.lbkv"));
  expect_error([&] { inspect_checkpoint(path("missing.lbkv")); }, ErrorCode::kIo,
               path("missing.lbkv"));
  expect_error([&] { load_kv_cache(folder_); }, ErrorCode::kIo, folder_);
}

TEST_F(Checkpoint, LoadingIntoADifferentConfigurationIsAnErrorAndLeavesItUntouched) {
  const CacheConfig config = small_config(DType::kBF16, RopeSpec{.theta = 10000.0f});
  KvCache cache(config, 32);
  append_random(cache, 20, 1);
  save_checkpoint(cache, path("c.lbkv"));
  PagedKvPool pool = interesting_pool(config);
  save_checkpoint(pool, path("p.lbkv"));

  struct Case {
    const char* mentions;
    CacheConfig config;
    std::int64_t capacity;
  };
  CacheConfig other_theta = config;
  other_theta.rope->theta = 500000.0f;
  CacheConfig interleaved = config;
  interleaved.rope->interleaved = true;
  CacheConfig no_rope = config;
  no_rope.rope.reset();
  CacheConfig f32 = config;
  f32.storage = DType::kF32;
  CacheConfig heads = config;
  heads.kv_heads = 1;
  CacheConfig dim = config;
  dim.head_dim = 32;
  for (const Case& c :
       {Case{"kv_heads", heads, 32}, Case{"head_dim", dim, 32}, Case{"storage", f32, 32},
        Case{"RoPE", no_rope, 32}, Case{"RoPE", other_theta, 32}, Case{"RoPE", interleaved, 32},
        Case{"capacity", config, 33}}) {
    KvCache into(c.config, c.capacity);
    append_random(into, 4, 2);
    const std::vector<float> before = observe(into);
    expect_error([&] { load_checkpoint(path("c.lbkv"), into); }, ErrorCode::kInvalidArgument,
                 path("c.lbkv"), c.mentions);
    EXPECT_TRUE(bit_identical(observe(into), before)) << c.mentions;
  }
  for (auto [block_size, num_blocks, mentions] :
       {std::tuple{4, 24, "block_size"}, std::tuple{5, 25, "num_blocks"}}) {
    PagedKvPool into(config, block_size, num_blocks);
    append_random(into, into.create(), 9, 3);
    const std::vector<float> before = observe(into);
    expect_error([&] { load_checkpoint(path("p.lbkv"), into); }, ErrorCode::kInvalidArgument,
                 path("p.lbkv"), mentions);
    EXPECT_TRUE(bit_identical(observe(into), before)) << mentions;
  }
  // The other kind.
  KvCache into(config, 32);
  expect_error([&] { load_checkpoint(path("p.lbkv"), into); }, ErrorCode::kInvalidArgument,
               path("p.lbkv"), "paged");
  expect_error([&] { load_kv_cache(path("p.lbkv")); }, ErrorCode::kInvalidArgument, path("p.lbkv"),
               "load_paged_pool");
  expect_error([&] { load_paged_pool(path("c.lbkv")); }, ErrorCode::kInvalidArgument,
               path("c.lbkv"), "load_kv_cache");
}

// Files whose checksums are all valid but whose fields are absurd or
// inconsistent: each must be a lookback::Error (a std::bad_alloc or a crash
// would fail the test), decided before any allocation the file cannot back.
TEST_F(Checkpoint, AbsurdOrInconsistentFieldsAreErrorsWithoutHugeAllocations) {
  const CacheConfig config = small_config();
  KvCache cache(config, 16);
  append_random(cache, 10, 1);
  save_checkpoint(cache, path("c.lbkv"));
  const FileBytes contiguous = FileBytes::read(path("c.lbkv"));
  const std::size_t c_head = contiguous.offset(0);

  KvCache into(config, 16);
  append_random(into, 3, 2);
  const std::vector<float> before = observe(into);
  constexpr std::uint64_t kHuge = std::uint64_t{1} << 62;
  struct Patch {
    const char* what;
    std::size_t at;
    std::uint64_t value;
    bool wide;  // u64 (else u32)
    ErrorCode code;
  };
  const Patch contiguous_patches[] = {
      {"kv_heads", c_head + 0, std::uint64_t{1} << 40, true, ErrorCode::kFormat},
      {"kv_heads", c_head + 0, 0, true, ErrorCode::kFormat},
      {"head_dim", c_head + 8, 1000000, true, ErrorCode::kFormat},
      {"storage", c_head + 16, 7, false, ErrorCode::kFormat},
      {"RoPE", c_head + 20, 1, false, ErrorCode::kFormat},  // enabled with theta 0
      {"RoPE", c_head + 20, 8, false, ErrorCode::kFormat},
      {"capacity", c_head + 32, kHuge, true, ErrorCode::kFormat},  // overflows bytes
      {"capacity", c_head + 32, std::uint64_t{1} << 40, true, ErrorCode::kCapacity},
      {"capacity", c_head + 32, ~std::uint64_t{0}, true, ErrorCode::kFormat},
      {"length", c_head + 40, 17, true, ErrorCode::kFormat},  // > capacity
      {"keys", c_head + 40, 9, true, ErrorCode::kFormat},     // sections too big
      {"reserved", c_head + 28, 1, false, ErrorCode::kFormat},
      {"directory", 24 + 32 + 16, kHuge, true, ErrorCode::kFormat},  // section length
      {"directory", 24 + 32 + 8, 0, true, ErrorCode::kFormat},       // section offset
  };
  for (const Patch& patch : contiguous_patches) {
    FileBytes bad = contiguous;
    patch.wide ? bad.set_u64(patch.at, patch.value)
               : bad.set_u32(patch.at, static_cast<std::uint32_t>(patch.value));
    patch.at < bad.directory_bytes() ? bad.reseal_directory() : bad.reseal();
    bad.write(path("bad.lbkv"));
    SCOPED_TRACE(std::string(patch.what) + " = " + std::to_string(patch.value));
    if (patch.code == ErrorCode::kCapacity) {
      // Valid, just too big to allocate here: only a fresh load refuses it.
      expect_error([&] { load_kv_cache(path("bad.lbkv")); }, ErrorCode::kCapacity, path("bad.lbkv"),
                   "limit");
      EXPECT_TRUE(inspect_checkpoint(path("bad.lbkv")).intact());
      expect_error([&] { load_checkpoint(path("bad.lbkv"), into); }, ErrorCode::kInvalidArgument,
                   path("bad.lbkv"), "capacity");
    } else {
      expect_error([&] { load_kv_cache(path("bad.lbkv")); }, patch.code, path("bad.lbkv"));
      expect_rejected_and_untouched(path("bad.lbkv"), into, before, patch.what);
    }
  }
  // An explicit limit applies to a legitimate file.
  expect_error([&] { load_kv_cache(path("c.lbkv"), {.max_cache_bytes = 1024}); },
               ErrorCode::kCapacity, path("c.lbkv"), "limit");

  // The paged pool: header fields, then the tables.
  PagedKvPool pool(config, 4, 6);
  const SequenceId a = pool.create();
  append_random(pool, a, 6, 3);  // blocks 0, 1 (taken from the back of the free list)
  const SequenceId b = pool.fork(a);
  append_random(pool, b, 1, 4);  // copies block 1 into block 2
  save_checkpoint(pool, path("p.lbkv"));
  const FileBytes paged = FileBytes::read(path("p.lbkv"));
  const std::size_t p_head = paged.offset(0);
  const std::size_t tables = paged.offset(1);
  // tables: u32 references[6], u64 free_list[3], then sequences (id, length,
  // block count, blocks...).
  const std::size_t free_list = tables + 6 * 4;
  const std::size_t first_sequence = free_list + 3 * 8;
  ASSERT_EQ(paged.u32(tables + 0), 2u);  // block 0: shared by a and b
  ASSERT_EQ(paged.u64(first_sequence), 0u);
  ASSERT_EQ(paged.u64(first_sequence + 16), 2u);

  PagedKvPool pool_into(config, 4, 6);
  append_random(pool_into, pool_into.create(), 5, 5);
  const std::vector<float> pool_before = observe(pool_into);
  const Patch paged_patches[] = {
      {"num_blocks", p_head + 40, std::uint64_t{1} << 40, true, ErrorCode::kFormat},
      {"num_blocks", p_head + 40, 2, true, ErrorCode::kFormat},  // < used
      {"block_size", p_head + 32, kHuge, true, ErrorCode::kFormat},
      {"block_size", p_head + 32, 0, true, ErrorCode::kFormat},
      {"used_blocks", p_head + 48, 7, true, ErrorCode::kFormat},
      {"sequences", p_head + 56, std::uint64_t{1} << 40, true, ErrorCode::kFormat},
      {"next_id", p_head + 64, 1, true, ErrorCode::kFormat},  // 2 sequences, ids below 1
      {"reference count", tables + 0, 1, false, ErrorCode::kFormat},
      {"reference count", tables + 4 * 5, 1, false, ErrorCode::kFormat},
      {"free list", free_list, 0, true, ErrorCode::kFormat},  // a block in use
      {"free list", free_list, 99, true, ErrorCode::kFormat},
      {"free list", free_list + 8, paged.u64(free_list), true, ErrorCode::kFormat},  // twice
      {"sequence id", first_sequence, 5, true, ErrorCode::kFormat},
      {"length", first_sequence + 8, 9, true, ErrorCode::kFormat},  // needs 3 blocks
      {"block count", first_sequence + 16, std::uint64_t{1} << 60, true, ErrorCode::kFormat},
      {"block id", first_sequence + 24, 6, true, ErrorCode::kFormat},
      {"block id", first_sequence + 24, paged.u64(first_sequence + 32), true, ErrorCode::kFormat},
  };
  for (const Patch& patch : paged_patches) {
    FileBytes bad = paged;
    patch.wide ? bad.set_u64(patch.at, patch.value)
               : bad.set_u32(patch.at, static_cast<std::uint32_t>(patch.value));
    patch.at < bad.directory_bytes() ? bad.reseal_directory() : bad.reseal();
    bad.write(path("bad.lbkv"));
    SCOPED_TRACE(std::string(patch.what) + " = " + std::to_string(patch.value));
    expect_error([&] { load_paged_pool(path("bad.lbkv")); }, patch.code, path("bad.lbkv"));
    expect_rejected_and_untouched(path("bad.lbkv"), pool_into, pool_before, patch.what);
  }
}

// ---- rings -------------------------------------------------------------------------

// A ring of kRingSinks + kRingWindow + 3 slots: observe_ring's steps of 3
// tokens with that window and those sink tokens reach no overwritten key.
constexpr std::int64_t kRingSinks = 2, kRingWindow = 9, kRingSlots = kRingSinks + kRingWindow + 3;
constexpr DecodeOptions kRingOptions{.window_left = kRingWindow, .sink_tokens = kRingSinks};

KvCache make_ring(const CacheConfig& config, std::int64_t sinks = kRingSinks,
                  std::int64_t slots = kRingSlots) {
  return KvCache(config, slots, RingSpec{.sink_tokens = sinks});
}

// Appends `tokens` random tokens in steps of 1 to 5 (a ring takes at most
// capacity - sink tokens at once), so the ring wraps at odd points.
void fill_ring(KvCache& ring, std::int64_t tokens, std::uint64_t seed) {
  for (std::int64_t done = 0, step = 0; done < tokens; ++step) {
    const std::int64_t count = std::min<std::int64_t>(tokens - done, 1 + step % 5);
    append_random(ring, count, seed + static_cast<std::uint64_t>(step));
    done += count;
  }
}

// observe() for a ring: its geometry, then attention with a window and sink
// tokens (a wrapped ring refuses a step without a window).
std::vector<float> observe_ring(const KvCache& cache) {
  Context& context = shared_context();
  const std::optional<RingSpec> ring = cache.ring();
  std::vector<float> seen{static_cast<float>(cache.capacity()),
                          static_cast<float>(ring ? ring->sink_tokens : -1),
                          static_cast<float>(cache.first_kept())};
  observe_attention(
      cache.config(), cache.length(),
      [&](const DecodeStep& step) { cache.attend(step, kRingOptions, context); }, seen);
  return seen;
}

// Rings that wrapped many times, that wrapped just now, that are exactly
// full and that have not reached their sink tokens: loaded (fresh, or into a
// ring of the same shape holding other tokens), each attends bit for bit like
// the original, and goes on identically after more tokens.
TEST_F(Checkpoint, RingsRoundTripAndGoOnBitForBit) {
  const CacheConfig configs[] = {small_config(DType::kF32),
                                 small_config(DType::kBF16, RopeSpec{.theta = 10000.0f}),
                                 small_config(DType::kI8, RopeSpec{.theta = 500000.0f}),
                                 small_config(DType::kF16, RopeSpec{.interleaved = true})};
  for (const CacheConfig& config : configs) {
    for (std::int64_t tokens : {std::int64_t{100}, std::int64_t{15}, kRingSlots, std::int64_t{9},
                                std::int64_t{1}, std::int64_t{0}}) {
      SCOPED_TRACE(std::string(dtype_name(config.storage)) + (config.rope ? " rope" : "") + ", " +
                   std::to_string(tokens) + " tokens");
      KvCache ring = make_ring(config);
      fill_ring(ring, tokens, 10);
      ASSERT_EQ(ring.length(), tokens);
      save_checkpoint(ring, path("ring.lbkv"));

      KvCache loaded = load_kv_cache(path("ring.lbkv"));
      ASSERT_TRUE(loaded.ring().has_value());
      EXPECT_EQ(loaded.ring()->sink_tokens, kRingSinks);
      EXPECT_EQ(loaded.capacity(), kRingSlots);
      EXPECT_EQ(loaded.length(), tokens);
      EXPECT_EQ(loaded.first_kept(), ring.first_kept());
      EXPECT_TRUE(bit_identical(observe_ring(loaded), observe_ring(ring)));

      KvCache into = make_ring(config);
      fill_ring(into, 37, 50);  // other tokens, wrapped elsewhere
      load_checkpoint(path("ring.lbkv"), into);
      EXPECT_EQ(into.length(), tokens);
      EXPECT_TRUE(bit_identical(observe_ring(into), observe_ring(ring)));

      // Resuming: the next tokens land in the same slots, at the same positions.
      for (KvCache* c : {&ring, &loaded, &into}) fill_ring(*c, 23, 70);
      EXPECT_TRUE(bit_identical(observe_ring(loaded), observe_ring(ring)));
      EXPECT_TRUE(bit_identical(observe_ring(into), observe_ring(ring)));
    }
  }
}

// The data sections hold the stored tokens in position order, whatever slot
// each occupies: the sink tokens, then the newest capacity - sinks tokens.
TEST_F(Checkpoint, RingLayoutMatchesTheDocumentation) {
  const CacheConfig config = small_config(DType::kF32);  // stored as given: comparable
  const std::int64_t tokens = 23, slots = 7, sinks = 2;  // wraps 3 times, 5 window slots
  const KvRows rows(config, tokens, 4);
  KvCache ring = make_ring(config, sinks, slots);
  for (std::int64_t t = 0; t < tokens; t += 4) {
    const std::int64_t count = std::min<std::int64_t>(4, tokens - t);
    ring.append(slice(rows.k_view, 0, t, count), slice(rows.v_view, 0, t, count));
  }
  save_checkpoint(ring, path("ring.lbkv"));
  const FileBytes file = FileBytes::read(path("ring.lbkv"));
  EXPECT_EQ(file.u32(12), 3u);  // kind: ring
  ASSERT_EQ(file.sections(), 3u);
  EXPECT_EQ(file.tag(0), "HEAD");
  EXPECT_EQ(file.tag(1), "KDAT");
  EXPECT_EQ(file.tag(2), "VDAT");
  const std::size_t head = file.offset(0);
  EXPECT_EQ(file.length(0), 56u);
  EXPECT_EQ(file.u64(head + 32), static_cast<std::uint64_t>(slots));
  EXPECT_EQ(file.u64(head + 40), static_cast<std::uint64_t>(tokens));
  EXPECT_EQ(file.u64(head + 48), static_cast<std::uint64_t>(sinks));
  const std::size_t row_bytes = static_cast<std::size_t>(config.head_dim) * sizeof(float);
  ASSERT_EQ(file.length(1), static_cast<std::size_t>(config.kv_heads * slots) * row_bytes);
  const std::int64_t positions[] = {0, 1, 18, 19, 20, 21, 22};
  for (std::int64_t h = 0; h < config.kv_heads; ++h) {
    for (std::int64_t row = 0; row < slots; ++row) {
      const std::size_t input = static_cast<std::size_t>(
          (positions[row] * config.kv_heads + h) * config.head_dim);
      const std::size_t at = static_cast<std::size_t>(h * slots + row) * row_bytes;
      EXPECT_EQ(std::memcmp(&file.bytes[file.offset(1) + at], &rows.k[input], row_bytes), 0)
          << "keys, head " << h << ", row " << row;
      EXPECT_EQ(std::memcmp(&file.bytes[file.offset(2) + at], &rows.v[input], row_bytes), 0)
          << "values, head " << h << ", row " << row;
    }
  }
  const CheckpointInfo info = inspect_checkpoint(path("ring.lbkv"));
  EXPECT_TRUE(info.intact());
  ASSERT_EQ(info.kind, CheckpointKind::kRing);
  EXPECT_EQ(checkpoint_kind_name(*info.kind), "ring");
  EXPECT_EQ(info.capacity, slots);
  EXPECT_EQ(info.length, tokens);
  EXPECT_EQ(info.sink_tokens, sinks);
}

// load_checkpoint needs the ring's kind, capacity and sink tokens; anything
// else is a clear error that leaves the object untouched.
TEST_F(Checkpoint, RingsLoadOnlyIntoMatchingRings) {
  const CacheConfig config = small_config(DType::kBF16, RopeSpec{.theta = 10000.0f});
  KvCache ring = make_ring(config);
  fill_ring(ring, 40, 1);
  save_checkpoint(ring, path("ring.lbkv"));
  KvCache plain(config, kRingSlots);
  append_random(plain, 5, 2);
  save_checkpoint(plain, path("plain.lbkv"));

  struct Case {
    const char* file;
    std::optional<std::int64_t> sinks;  // the cache loaded into; nullopt: not a ring
    std::int64_t slots;
    const char* mentions;
  };
  for (const Case& c : {Case{"ring.lbkv", std::nullopt, kRingSlots, "is not a ring"},
                        Case{"ring.lbkv", kRingSinks + 1, kRingSlots, "ring sink_tokens 2"},
                        Case{"ring.lbkv", 0, kRingSlots, "ring sink_tokens 2"},
                        Case{"ring.lbkv", kRingSinks, kRingSlots + 1, "capacity"},
                        Case{"plain.lbkv", kRingSinks, kRingSlots, "is a ring (2 sink tokens)"}}) {
    SCOPED_TRACE(std::string(c.file) + " into " + c.mentions);
    KvCache into = c.sinks ? make_ring(config, *c.sinks, c.slots) : KvCache(config, c.slots);
    append_random(into, 4, 3);
    const std::vector<float> before = observe_ring(into);
    expect_error([&] { load_checkpoint(path(c.file), into); }, ErrorCode::kInvalidArgument,
                 path(c.file), c.mentions);
    EXPECT_TRUE(bit_identical(observe_ring(into), before));
  }
  PagedKvPool pool(config, 4, 8);
  expect_error([&] { load_checkpoint(path("ring.lbkv"), pool); }, ErrorCode::kInvalidArgument,
               path("ring.lbkv"), "load_kv_cache");
  expect_error([&] { load_paged_pool(path("ring.lbkv")); }, ErrorCode::kInvalidArgument,
               path("ring.lbkv"), "a ring checkpoint");
  expect_error([&] { load_kv_cache(path("ring.lbkv"), {.max_cache_bytes = 64}); },
               ErrorCode::kCapacity, path("ring.lbkv"), "capacity 14 tokens");
}

// Ring headers whose checksums are valid but whose fields are not.
TEST_F(Checkpoint, RingHeadersOutOfRangeAreFormatErrors) {
  const CacheConfig config = small_config();
  KvCache ring = make_ring(config);
  fill_ring(ring, 30, 1);  // wrapped: kRingSlots tokens stored
  save_checkpoint(ring, path("ring.lbkv"));
  const FileBytes good = FileBytes::read(path("ring.lbkv"));
  const std::size_t head = good.offset(0);
  KvCache into = make_ring(config);
  append_random(into, 6, 2);
  const std::vector<float> before = observe_ring(into);
  struct Patch {
    const char* what;
    std::size_t at;
    std::uint64_t value;
    const char* mentions;
  };
  const Patch patches[] = {
      {"sink_tokens = capacity", head + 48, kRingSlots, "sink_tokens is 14 (expected 0 to 13)"},
      {"sink_tokens huge", head + 48, std::uint64_t{1} << 63, "sink_tokens"},
      {"capacity 0", head + 32, 0, "capacity is 0 (expected 1"},
      {"capacity below sink_tokens", head + 32, 2, "sink_tokens is 2 (expected 0 to 1)"},
      {"length below capacity", head + 40, 5, "min(length 5, capacity 14)"},
      {"capacity above length", head + 32, 31, "min(length 30, capacity 31)"},
      {"capacity huge", head + 32, std::uint64_t{1} << 62, "overflow"},
      {"length negative", head + 40, ~std::uint64_t{0}, "length"},
  };
  for (const Patch& patch : patches) {
    FileBytes bad = good;
    bad.set_u64(patch.at, patch.value);
    bad.reseal();
    bad.write(path("bad.lbkv"));
    SCOPED_TRACE(patch.what);
    expect_error([&] { load_kv_cache(path("bad.lbkv")); }, ErrorCode::kFormat, path("bad.lbkv"),
                 patch.mentions);
    expect_error([&] { load_checkpoint(path("bad.lbkv"), into); }, ErrorCode::kFormat,
                 path("bad.lbkv"), patch.mentions);
    EXPECT_TRUE(bit_identical(observe_ring(into), before));
    EXPECT_FALSE(inspect_checkpoint(path("bad.lbkv")).intact());
  }
  // A length beyond the capacity keeps the data's size: a valid file (the
  // ring's tokens then sit at later positions).
  FileBytes later = good;
  later.set_u64(head + 40, 1000);
  later.reseal();
  later.write(path("later.lbkv"));
  EXPECT_EQ(load_kv_cache(path("later.lbkv")).first_kept(), 1000 - (kRingSlots - kRingSinks));
  // The kind says contiguous, the header is a ring's: the directory says so.
  FileBytes kind = good;
  kind.set_u32(12, 1);
  kind.reseal_directory();
  kind.write(path("kind.lbkv"));
  expect_error([&] { load_kv_cache(path("kind.lbkv")); }, ErrorCode::kFormat, path("kind.lbkv"),
               "header section is 56 bytes (expected 48");
  kind.set_u32(12, 4);
  kind.reseal_directory();
  kind.write(path("kind.lbkv"));
  expect_error([&] { load_kv_cache(path("kind.lbkv")); }, ErrorCode::kFormat, path("kind.lbkv"),
               "kind 4 (expected 1");
}

TEST_F(Checkpoint, SavingToAMissingFolderIsAnIoErrorAndWritesNothing) {
  KvCache cache(small_config(), 4);
  const std::string file = path("no/such/folder/c.lbkv");
  expect_error([&] { save_checkpoint(cache, file); }, ErrorCode::kIo, file);
  EXPECT_TRUE(fs::is_empty(folder_));
}

// ---- a writer killed mid-save -----------------------------------------------------

// The temporaries a save leaves while it runs (PATH.tmp.XXXXXX).
std::vector<fs::path> temporaries(const std::string& folder, const std::string& name) {
  std::vector<fs::path> found;
  for (const auto& entry : fs::directory_iterator(folder)) {
    if (entry.path().filename().string().rfind(name + ".tmp.", 0) == 0)
      found.push_back(entry.path());
  }
  return found;
}

TEST_F(Checkpoint, AWriterKilledMidSaveLeavesTheOldCheckpointIntact) {
  // A is small; B is 64 MiB so that a save takes long enough to be killed at
  // any point of it: before the data, in the middle, during fsync, around
  // the rename.
  const CacheConfig config{.kv_heads = 8, .head_dim = 128, .storage = DType::kF32, .rope = {}};
  KvCache a(config, 16);
  append_random(a, 16, 1);
  KvCache b(config, 8192);
  {
    std::vector<float> rows(static_cast<std::size_t>(8192 * 8 * 128));
    for (std::size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<float>(i % 977) * 1e-3f;
    const TensorView view = make_view(rows.data(), DType::kF32, {8192, 8, 128}, "k");
    b.append(view, view);
  }
  const std::vector<float> seen_a = observe(a);
  const std::vector<float> seen_b = observe(b);
  const std::string name = "resume.lbkv";
  const std::string file = path(name);
  save_checkpoint(a, file);

  const auto b_bytes = static_cast<std::uintmax_t>(fs::file_size(file)) - 16 * 8 * 128 * 4 * 2 +
                       std::uintmax_t{8192} * 8 * 128 * 4 * 2;
  int old_kept_mid_save = 0;  // rounds killed with a temporary half written and A still whole
  int new_kept_mid_save = 0;  // the same with B, committed by an earlier save, still whole
  bool b_committed = false;
  // Kill when the temporary has reached this many bytes; 0: wait until B is
  // committed once, then kill the next save as soon as it starts.
  const std::uintmax_t thresholds[] = {1, 1u << 20, 16u << 20, b_bytes - (1u << 20),
                                       0, 1,        8u << 20,  40u << 20};
  for (const std::uintmax_t threshold : thresholds) {
    SCOPED_TRACE("kill at " + std::to_string(threshold) + " bytes");
    // Temporaries of earlier rounds' killed writers stay; watch only new ones.
    const std::vector<fs::path> stale = temporaries(folder_, name);
    const auto fresh = [&] {
      std::vector<fs::path> found = temporaries(folder_, name);
      std::erase_if(found, [&](const fs::path& p) {
        return std::find(stale.begin(), stale.end(), p) != stale.end();
      });
      return found;
    };
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      // Save B over and over until killed; _exit skips the test framework's
      // atexit handlers, which belong to the parent.
      for (;;) {
        try {
          save_checkpoint(b, file);
        } catch (...) {
          ::_exit(3);
        }
      }
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    bool partial = false;  // killed while a new temporary was shorter than B
    bool waiting_for_commit = threshold == 0 && !b_committed;
    while (std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      if (waiting_for_commit) {
        std::error_code error;
        waiting_for_commit = fs::file_size(file, error) != b_bytes;
        continue;
      }
      std::uintmax_t largest = 0;
      for (const fs::path& temp : fresh()) {
        std::error_code error;
        const std::uintmax_t size = fs::file_size(temp, error);
        if (!error) largest = std::max(largest, size);
      }
      if (largest >= std::max<std::uintmax_t>(threshold, 1)) {
        partial = largest < b_bytes;
        break;
      }
    }
    const bool timed_out = std::chrono::steady_clock::now() >= deadline;
    ASSERT_EQ(::kill(child, SIGKILL), 0);
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFSIGNALED(status)) << "the writer exited by itself (status " << status << ")";
    ASSERT_FALSE(timed_out) << "the writer never got that far";

    // The path holds A or B, whole, whatever the moment of the kill.
    const CheckpointInfo info = inspect_checkpoint(file);
    ASSERT_TRUE(info.intact()) << info.problems.front();
    const std::vector<float> seen = observe(load_kv_cache(file));
    const bool is_a = bit_identical(seen, seen_a);
    const bool is_b = bit_identical(seen, seen_b);
    ASSERT_TRUE(is_a || is_b) << "the checkpoint is neither A nor B";
    if (is_b) b_committed = true;
    if (partial && !fresh().empty()) (is_b ? new_kept_mid_save : old_kept_mid_save) += 1;
  }
  // Some kills must have landed mid-write, or the test proved nothing.
  EXPECT_GT(old_kept_mid_save, 0);
  EXPECT_GT(new_kept_mid_save, 0);

  // Killed writers leave their temporaries behind (documented): loading
  // never reads them, a new save is unaffected, and they can be deleted.
  EXPECT_FALSE(temporaries(folder_, name).empty());
  save_checkpoint(a, file);
  EXPECT_TRUE(bit_identical(observe(load_kv_cache(file)), seen_a));
  for (const fs::path& temp : temporaries(folder_, name)) fs::remove(temp);
  EXPECT_TRUE(bit_identical(observe(load_kv_cache(file)), seen_a));
}

}  // namespace
}  // namespace lookback
