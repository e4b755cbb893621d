// The caches as data structures: capacity and pool exhaustion, sizes beyond
// the machine's memory, release, fork and copy-on-write, shuffled block
// tables, slots past a sequence's length (never read, saved as zeros), RoPE on
// the way in, and merge. Attention results are checked
// against the float64 reference (on inputs pre-rotated for RoPE).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <random>
#include <string>

#include "lookback/checkpoint.hpp"
#include "lookback/error.hpp"
#include "lookback/kv_cache.hpp"
#include "lookback/merge.hpp"
#include "testing/testing.hpp"

namespace lookback {
namespace {

constexpr std::int64_t kHeads = 4, kKvHeads = 2, kDim = 24;

// A sequence's worth of random tokens: q (n, heads, dim), k and v (n, kv_heads, dim).
struct Tokens {
  std::vector<float> q, k, v;
  std::int64_t n = 0;
  explicit Tokens(std::int64_t count, std::uint64_t seed) : n(count) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal;
    q.resize(static_cast<std::size_t>(n * kHeads * kDim));
    k.resize(static_cast<std::size_t>(n * kKvHeads * kDim));
    v.resize(k.size());
    for (float& x : q) x = normal(rng);
    for (float& x : k) x = normal(rng);
    for (float& x : v) x = normal(rng);
  }
  TensorView k_rows(std::int64_t begin, std::int64_t count) const {
    return make_view(k.data() + begin * kKvHeads * kDim, DType::kF32, {count, kKvHeads, kDim}, "k");
  }
  TensorView v_rows(std::int64_t begin, std::int64_t count) const {
    return make_view(v.data() + begin * kKvHeads * kDim, DType::kF32, {count, kKvHeads, kDim}, "v");
  }
  TensorView q_rows(std::int64_t begin, std::int64_t count) const {
    return make_view(q.data() + begin * kHeads * kDim, DType::kF32, {count, kHeads, kDim}, "q");
  }
};

// Reference output of the last `count` queries of tokens [0, length).
std::vector<double> expected_last(const Tokens& t, std::int64_t length, std::int64_t count) {
  std::vector<float> out(static_cast<std::size_t>(count * kHeads * kDim));
  AttentionParams p;
  p.q = make_view(t.q.data() + (length - count) * kHeads * kDim, DType::kF32, {1, count, kHeads, kDim}, "q");
  p.k = make_view(t.k.data(), DType::kF32, {1, length, kKvHeads, kDim}, "k");
  p.v = make_view(t.v.data(), DType::kF32, {1, length, kKvHeads, kDim}, "v");
  p.out = make_mutable_view(out.data(), DType::kF32, {1, count, kHeads, kDim}, "out");
  return reference_attention(p).out;
}

std::vector<float> attend_last(const PagedKvPool& pool, SequenceId id, const Tokens& t,
                               std::int64_t count, Context& context) {
  const std::int64_t length = pool.length(id);
  std::vector<float> out(static_cast<std::size_t>(count * kHeads * kDim));
  pool.attend(id,
              {.q = t.q_rows(length - count, count),
               .out = make_mutable_view(out.data(), DType::kF32, {count, kHeads, kDim}, "out")},
              {}, context);
  return out;
}

CacheConfig config(DType storage = DType::kF32) {
  return {.kv_heads = kKvHeads, .head_dim = kDim, .storage = storage};
}

TEST(KvCache, AppendAttendAndCapacity) {
  const Tokens t(50, 1);
  KvCache cache(config(), 50);
  Context context(2);
  cache.append(t.k_rows(0, 30), t.v_rows(0, 30));
  cache.append(t.k_rows(30, 20), t.v_rows(30, 20));
  EXPECT_EQ(cache.length(), 50);
  std::vector<float> out(static_cast<std::size_t>(5 * kHeads * kDim));
  cache.attend({.q = t.q_rows(45, 5),
                .out = make_mutable_view(out.data(), DType::kF32, {5, kHeads, kDim}, "out")},
               {}, context);
  EXPECT_LE(testing::relative_l2(out, expected_last(t, 50, 5)), testing::kF32Tolerance);
  try {
    cache.append(t.k_rows(0, 1), t.v_rows(0, 1));
    FAIL() << "appended past capacity";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCapacity);
  }
  // Still intact and attending correctly.
  EXPECT_EQ(cache.length(), 50);
  std::fill(out.begin(), out.end(), 0.0f);
  cache.attend({.q = t.q_rows(45, 5),
                .out = make_mutable_view(out.data(), DType::kF32, {5, kHeads, kDim}, "out")},
               {}, context);
  EXPECT_LE(testing::relative_l2(out, expected_last(t, 50, 5)), testing::kF32Tolerance);
  // Attending more tokens than cached is an error, not a read past the end.
  std::vector<float> big(static_cast<std::size_t>(51 * kHeads * kDim));
  std::vector<float> q51(big.size());
  EXPECT_THROW(cache.attend({.q = make_view(q51.data(), DType::kF32, {51, kHeads, kDim}, "q"),
                             .out = make_mutable_view(big.data(), DType::kF32, {51, kHeads, kDim}, "out")},
                            {}, context),
               Error);
}

TEST(PagedKvPool, ExhaustionAppendsNothingAndLeavesSequencesIntact) {
  const Tokens t(40, 2);
  PagedKvPool pool(config(), 16, 4);  // 64 tokens in all
  Context context(1);
  const SequenceId a = pool.create(), b = pool.create();
  pool.append(a, t.k_rows(0, 40), t.v_rows(0, 40));  // 3 blocks
  pool.append(b, t.k_rows(0, 10), t.v_rows(0, 10));  // 1 block
  EXPECT_EQ(pool.free_blocks(), 0);
  try {
    pool.append(b, t.k_rows(10, 10), t.v_rows(10, 10));  // needs a 5th block
    FAIL() << "pool exhaustion not reported";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCapacity);
    EXPECT_NE(std::string(e.what()).find("nothing was appended"), std::string::npos);
  }
  EXPECT_EQ(pool.length(b), 10);
  EXPECT_LE(testing::relative_l2(attend_last(pool, a, t, 4, context), expected_last(t, 40, 4)),
            testing::kF32Tolerance);
  EXPECT_LE(testing::relative_l2(attend_last(pool, b, t, 3, context), expected_last(t, 10, 3)),
            testing::kF32Tolerance);
  // Releasing a frees its blocks; b can grow again.
  pool.release(a);
  EXPECT_EQ(pool.free_blocks(), 3);
  pool.append(b, t.k_rows(10, 30), t.v_rows(10, 30));
  EXPECT_LE(testing::relative_l2(attend_last(pool, b, t, 6, context), expected_last(t, 40, 6)),
            testing::kF32Tolerance);
  EXPECT_THROW(pool.release(a), Error);  // already released
  EXPECT_THROW(pool.release(12345), Error);
  EXPECT_THROW(pool.length(12345), Error);
  EXPECT_THROW(PagedKvPool(config(), 0, 4), Error);
}

TEST(PagedKvPool, ForkSharesThePrefixAndCopiesOnWrite) {
  // Two continuations of one prompt: the fork shares the prompt's blocks,
  // then both diverge, the shared partial block copied on first write.
  const Tokens left(45, 3);
  Tokens right = left;
  std::mt19937_64 rng(9);
  std::normal_distribution<float> normal;
  for (std::int64_t i = 30 * kKvHeads * kDim; i < 45 * kKvHeads * kDim; ++i) {
    right.k[static_cast<std::size_t>(i)] = normal(rng);
    right.v[static_cast<std::size_t>(i)] = normal(rng);
  }
  for (std::int64_t i = 30 * kHeads * kDim; i < 45 * kHeads * kDim; ++i) {
    right.q[static_cast<std::size_t>(i)] = normal(rng);
  }
  for (std::int64_t block_size : {1, 16, 128}) {
    SCOPED_TRACE("block_size " + std::to_string(block_size));
    PagedKvPool pool(config(), block_size, 200);
    pool.shuffle_blocks(block_size);
    Context context(2);
    const SequenceId parent = pool.create();
    pool.append(parent, left.k_rows(0, 30), left.v_rows(0, 30));
    const std::int64_t used = pool.num_blocks() - pool.free_blocks();
    const SequenceId child = pool.fork(parent);
    EXPECT_EQ(pool.num_blocks() - pool.free_blocks(), used);  // nothing copied yet
    EXPECT_EQ(pool.block_table(child), pool.block_table(parent));
    pool.append(parent, left.k_rows(30, 15), left.v_rows(30, 15));
    pool.append(child, right.k_rows(30, 15), right.v_rows(30, 15));
    EXPECT_LE(testing::relative_l2(attend_last(pool, parent, left, 15, context), expected_last(left, 45, 15)),
              testing::kF32Tolerance);
    EXPECT_LE(testing::relative_l2(attend_last(pool, child, right, 15, context), expected_last(right, 45, 15)),
              testing::kF32Tolerance);
    // Releasing the parent keeps the child's shared prefix alive.
    pool.release(parent);
    EXPECT_LE(testing::relative_l2(attend_last(pool, child, right, 15, context), expected_last(right, 45, 15)),
              testing::kF32Tolerance);
    pool.release(child);
    EXPECT_EQ(pool.free_blocks(), pool.num_blocks());
  }
}

TEST(PagedKvPool, ShuffledTablesAndBatchedDecode) {
  std::vector<Tokens> tokens;
  for (int s = 0; s < 5; ++s) tokens.emplace_back(20 + 37 * s, 100 + s);
  PagedKvPool pool(config(), 16, 100);
  Context context(2);
  std::vector<SequenceId> ids;
  for (const Tokens& t : tokens) {
    ids.push_back(pool.create());
    pool.append(ids.back(), t.k_rows(0, t.n), t.v_rows(0, t.n));
    pool.shuffle_blocks(ids.back() + 7);  // move blocks between appends
  }
  std::vector<std::vector<float>> outs;
  std::vector<DecodeStep> steps;
  for (const Tokens& t : tokens) {
    outs.emplace_back(static_cast<std::size_t>(kHeads * kDim));
    steps.push_back({.q = t.q_rows(t.n - 1, 1),
                     .out = make_mutable_view(outs.back().data(), DType::kF32, {1, kHeads, kDim}, "out")});
  }
  pool.attend_batch(ids, steps, {}, context);
  for (std::size_t s = 0; s < tokens.size(); ++s) {
    EXPECT_LE(testing::relative_l2(outs[s], expected_last(tokens[s], tokens[s].n, 1)),
              testing::kF32Tolerance)
        << "sequence " << s;
  }
}

TEST(PagedKvPool, SlotsPastTheLengthAreNeverRead) {
  // A released sequence leaves NaN in its blocks; a new, shorter sequence
  // that reuses them must never read the stale slots, not even times zero.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> poison(static_cast<std::size_t>(32 * kKvHeads * kDim), nan);
  PagedKvPool pool(config(), 32, 1);
  Context context(1);
  const SequenceId dirty = pool.create();
  const TensorView poison_view = make_view(poison.data(), DType::kF32, {32, kKvHeads, kDim}, "k");
  pool.append(dirty, poison_view, poison_view);
  pool.release(dirty);
  const Tokens t(5, 4);
  const SequenceId clean = pool.create();
  pool.append(clean, t.k_rows(0, 5), t.v_rows(0, 5));
  const std::vector<float> out = attend_last(pool, clean, t, 5, context);
  for (float x : out) ASSERT_TRUE(std::isfinite(x));
  EXPECT_LE(testing::relative_l2(out, expected_last(t, 5, 5)), testing::kF32Tolerance);
}

TEST(KvCache, SizesBeyondTheMachinesMemoryAreRefusedBeforeAllocating) {
  using testing::throws_error;
  // 2^40 tokens of 256 bytes, for K and again for V: 512 TiB.
  EXPECT_TRUE(throws_error([] { KvCache(config(), std::int64_t{1} << 40); }, ErrorCode::kCapacity,
                           "capacity: 1099511627776 tokens need 562949953421312 bytes"));
  EXPECT_TRUE(throws_error([] { PagedKvPool(config(), 16, std::int64_t{1} << 36); },
                           ErrorCode::kCapacity,
                           "num_blocks: 68719476736 blocks of 16 tokens need"));
  EXPECT_TRUE(throws_error([] { PagedKvPool(config(), std::int64_t{1} << 40, 1); },
                           ErrorCode::kCapacity,
                           "block_size: 1099511627776 tokens per block need 562949953421312"));
  // Still a clear error when the byte count overflows.
  EXPECT_TRUE(throws_error([] { KvCache(config(), std::int64_t{1} << 60); }, ErrorCode::kCapacity,
                           "capacity"));
}

TEST(PagedKvPool, CheckpointsHoldNoUninitialisedBytes) {
  // The pool's memory is not zeroed when allocated; the slots past the
  // sequence's length in its last block are still saved as zeros, whatever
  // the allocator handed out: pools built over different garbage save
  // byte-identical files.
  constexpr std::int64_t kBlockSize = 8, kBlocks = 3;
  constexpr std::size_t kPoolBytes = kBlocks * kBlockSize * kKvHeads * 32 * sizeof(float);
  const testing::TempDir dir;
  const Tokens t(3, 9);
  std::vector<std::string> files;
  for (const int garbage : {0xab, 0xcd}) {
    {  // Freed chunks of the pool's size, full of garbage, for malloc to reuse.
      std::vector<std::unique_ptr<std::byte[]>> chunks;
      for (int i = 0; i < 16; ++i) {
        chunks.push_back(std::make_unique<std::byte[]>(kPoolBytes));
        std::memset(chunks.back().get(), garbage, kPoolBytes);
      }
    }
    PagedKvPool pool(config(), kBlockSize, kBlocks);
    const SequenceId id = pool.create();
    pool.append(id, t.k_rows(0, 3), t.v_rows(0, 3));
    const std::string path = (dir.path() / ("pool" + std::to_string(garbage))).string();
    save_checkpoint(pool, path);
    std::ifstream in(path, std::ios::binary);
    files.emplace_back(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  ASSERT_FALSE(files[0].empty());
  EXPECT_TRUE(files[0] == files[1]) << "the saved slots past the length differ";
}

TEST(KvCache, RopeMatchesTheReferenceOnPreRotatedInputs) {
  for (bool interleaved : {false, true}) {
    SCOPED_TRACE(interleaved ? "interleaved" : "neox");
    const Tokens t(33, 5);
    CacheConfig c = config();
    c.rope = RopeSpec{.theta = 500.0f, .interleaved = interleaved};
    KvCache cache(c, 33);
    Context context(1);
    cache.append(t.k_rows(0, 20), t.v_rows(0, 20));
    cache.append(t.k_rows(20, 13), t.v_rows(20, 13));
    std::vector<float> out(static_cast<std::size_t>(13 * kHeads * kDim));
    cache.attend({.q = t.q_rows(20, 13),
                  .out = make_mutable_view(out.data(), DType::kF32, {13, kHeads, kDim}, "out")},
                 {}, context);
    Tokens rotated = t;
    apply_rope(rotated.q.data(), 33, kHeads, kDim, 0, *c.rope);
    apply_rope(rotated.k.data(), 33, kKvHeads, kDim, 0, *c.rope);
    EXPECT_LE(testing::relative_l2(out, expected_last(rotated, 33, 13)), testing::kF32Tolerance);
    // And RoPE did something: the unrotated reference differs.
    EXPECT_GT(testing::relative_l2(out, expected_last(t, 33, 13)), 1e-2);
  }
}

TEST(Merge, EmptyStatesAssociativityAndMinusInfinity) {
  constexpr std::int64_t kRows = 3, kDimension = 5;
  const float inf = std::numeric_limits<float>::infinity();
  std::mt19937_64 rng(11);
  std::normal_distribution<float> normal;
  auto random_part = [&](std::vector<float>& out, std::vector<float>& lse) {
    out.resize(kRows * kDimension);
    lse.resize(kRows);
    for (float& x : out) x = normal(rng);
    for (float& x : lse) x = 3.0f * normal(rng);
  };
  std::vector<float> a, la, b, lb, c, lc;
  random_part(a, la);
  random_part(b, lb);
  random_part(c, lc);
  // (a + b) + c == a + (b + c), within rounding.
  std::vector<float> left = a, l_left = la;
  merge_attention(left.data(), l_left.data(), b.data(), lb.data(), kRows, kDimension);
  merge_attention(left.data(), l_left.data(), c.data(), lc.data(), kRows, kDimension);
  std::vector<float> right = b, l_right = lb;
  merge_attention(right.data(), l_right.data(), c.data(), lc.data(), kRows, kDimension);
  std::vector<float> whole = a, l_whole = la;
  merge_attention(whole.data(), l_whole.data(), right.data(), l_right.data(), kRows, kDimension);
  for (std::size_t i = 0; i < left.size(); ++i) EXPECT_NEAR(left[i], whole[i], 1e-5);
  for (std::size_t i = 0; i < l_left.size(); ++i) EXPECT_NEAR(l_left[i], l_whole[i], 1e-5);
  // The weights are right: merging two equal halves gives lse + log 2.
  std::vector<float> same = a, l_same = la;
  merge_attention(same.data(), l_same.data(), a.data(), la.data(), kRows, kDimension);
  for (std::int64_t r = 0; r < kRows; ++r) EXPECT_NEAR(l_same[r], la[r] + std::log(2.0f), 1e-5);
  // Empty (0, -inf) is the identity, on either side.
  std::vector<float> empty(kRows * kDimension, 0.0f), l_empty(kRows, -inf);
  std::vector<float> x = a, lx = la;
  merge_attention(x.data(), lx.data(), empty.data(), l_empty.data(), kRows, kDimension);
  EXPECT_EQ(x, a);
  EXPECT_EQ(lx, la);
  std::vector<float> y = empty, ly = l_empty;
  merge_attention(y.data(), ly.data(), a.data(), la.data(), kRows, kDimension);
  EXPECT_EQ(y, a);
  EXPECT_EQ(ly, la);
  // Two empty states merge to the empty state, never NaN.
  std::vector<float> z = empty, lz = l_empty;
  merge_attention(z.data(), lz.data(), empty.data(), l_empty.data(), kRows, kDimension);
  for (float value : z) EXPECT_EQ(value, 0.0f);
  for (float value : lz) EXPECT_TRUE(std::isinf(value) && value < 0);
}

}  // namespace
}  // namespace lookback
