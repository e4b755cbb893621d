// KvCache as a ring (RingSpec): a window (and StreamingLLM sink tokens) served
// in sink_tokens + window + chunk slots. A ring must attend bit for bit like a
// cache that kept every token, through any number of wraps, for every storage
// dtype and with RoPE (positions stay absolute); asking for a key it has
// overwritten is an error, never a wrong answer (also after a checkpoint;
// checkpoint_test.cc has the ring checkpoints' round trips).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "lookback/checkpoint.hpp"
#include "lookback/error.hpp"
#include "lookback/kv_cache.hpp"
#include "lookback/modes.hpp"
#include "lookback/reference.hpp"
#include "testing/testing.hpp"

namespace lookback {
namespace {

constexpr std::int64_t kHeads = 4, kKvHeads = 2, kDim = 20;

std::vector<float> random_floats(std::size_t count, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> x(count);
  for (float& e : x) e = normal(rng);
  return x;
}

struct Stream {
  std::int64_t n;
  std::vector<float> q, k, v;
  explicit Stream(std::int64_t tokens, std::uint64_t seed)
      : n(tokens),
        q(random_floats(static_cast<std::size_t>(tokens * kHeads * kDim), seed)),
        k(random_floats(static_cast<std::size_t>(tokens * kKvHeads * kDim), seed + 1)),
        v(random_floats(static_cast<std::size_t>(tokens * kKvHeads * kDim), seed + 2)) {}
  TensorView k_rows(std::int64_t begin, std::int64_t count) const {
    return make_view(k.data() + begin * kKvHeads * kDim, DType::kF32, {count, kKvHeads, kDim});
  }
  TensorView v_rows(std::int64_t begin, std::int64_t count) const {
    return make_view(v.data() + begin * kKvHeads * kDim, DType::kF32, {count, kKvHeads, kDim});
  }
  TensorView q_rows(std::int64_t begin, std::int64_t count) const {
    return make_view(q.data() + begin * kHeads * kDim, DType::kF32, {count, kHeads, kDim});
  }
};

struct StepResult {
  std::vector<float> out, lse;
};

StepResult attend_last(const KvCache& cache, const Stream& s, std::int64_t count,
                       const DecodeOptions& options, Context& context) {
  StepResult r{std::vector<float>(static_cast<std::size_t>(count * kHeads * kDim)),
               std::vector<float>(static_cast<std::size_t>(kHeads * count))};
  cache.attend({.q = s.q_rows(cache.length() - count, count),
                .out = make_mutable_view(r.out.data(), DType::kF32, {count, kHeads, kDim}),
                .maybe_lse = make_mutable_view(r.lse.data(), DType::kF32, {kHeads, count})},
               options, context);
  return r;
}

struct RingCase {
  DType storage;
  bool rope;
  std::int64_t window, sinks, chunk;
};

// Steps of 1..chunk tokens through a ring of sinks + window + chunk slots and
// through a cache holding all of them: every step's outputs and LSEs agree to
// the bit, and so the ring wraps many times without drifting.
TEST(RingCache, AttendsBitForBitLikeACacheThatKeepsEveryToken) {
  const RingCase cases[] = {{DType::kF32, false, 20, 3, 1},   {DType::kF32, true, 7, 0, 5},
                            {DType::kBF16, true, 33, 4, 3},   {DType::kF16, false, 0, 2, 1},
                            {DType::kI8, true, 12, 1, 4},     {DType::kFP8E4M3, false, 9, 5, 2},
                            {DType::kFP8E5M2, true, 16, 0, 6}};
  Context context(2);
  for (const RingCase& c : cases) {
    SCOPED_TRACE(std::string(dtype_name(c.storage)) + " window " + std::to_string(c.window) +
                 " sinks " + std::to_string(c.sinks) + " chunk " + std::to_string(c.chunk) +
                 (c.rope ? " rope" : ""));
    const Stream s(300, 7 + c.window);
    CacheConfig config{.kv_heads = kKvHeads, .head_dim = kDim, .storage = c.storage};
    if (c.rope) config.rope = RopeSpec{};
    const std::int64_t slots = c.sinks + c.window + c.chunk;
    KvCache ring(config, slots, RingSpec{.sink_tokens = c.sinks});
    KvCache full(config, s.n);
    const DecodeOptions options{.softcap = c.storage == DType::kF32 ? 3.0f : 0.0f,
                                .window_left = c.window,
                                .sink_tokens = c.sinks};
    std::int64_t step = 0;
    for (std::int64_t done = 0; done < s.n; ++step) {
      const std::int64_t count = std::min<std::int64_t>(s.n - done, 1 + step % c.chunk);
      ring.append(s.k_rows(done, count), s.v_rows(done, count));
      full.append(s.k_rows(done, count), s.v_rows(done, count));
      done += count;
      ASSERT_EQ(ring.length(), done);
      const StepResult a = attend_last(ring, s, count, options, context);
      const StepResult b = attend_last(full, s, count, options, context);
      ASSERT_EQ(std::memcmp(a.out.data(), b.out.data(), a.out.size() * sizeof(float)), 0)
          << "step ending at token " << done;
      ASSERT_EQ(std::memcmp(a.lse.data(), b.lse.data(), a.lse.size() * sizeof(float)), 0)
          << "step ending at token " << done;
      for (float x : a.out) ASSERT_TRUE(std::isfinite(x));
    }
    EXPECT_EQ(ring.first_kept(), s.n - (slots - c.sinks));
    EXPECT_EQ(ring.capacity(), slots);
  }
}

// The ring through attend_with_mode (decode and chunked), against the float64
// reference with a window and sink tokens.
TEST(RingCache, ModesMatchTheReference) {
  for (Mode mode : {Mode::kDecode, Mode::kChunked}) {
    for (DType storage : {DType::kF32, DType::kBF16, DType::kF16}) {
      testing::ProblemSpec spec;
      spec.seqlen_q = 113;
      spec.seqlen_k = 239;
      spec.heads = 4;
      spec.kv_heads = 2;
      spec.head_dim = 33;
      spec.batch = 2;
      spec.mask.window_left = 17;
      spec.mask.sink_tokens = 3;
      spec.storage = storage;
      spec.alibi = storage == DType::kF32;
      testing::Problem problem = testing::make_problem(spec, 5);
      const ReferenceResult reference = reference_attention(problem.params());
      Context context(2);
      attend_with_mode(problem.params(), {.mode = mode, .chunk = 5, .ring = true}, context);
      const testing::Comparison result = testing::compare(problem, reference);
      EXPECT_TRUE(result.finite) << result.describe();
      EXPECT_LE(result.relative_l2, testing::tolerance_for(storage))
          << mode_name(mode) << " " << dtype_name(storage) << " " << result.describe();
    }
  }
}

TEST(RingCache, FutureInputsNeverChangeEarlierOutputs) {
  testing::ProblemSpec spec;
  spec.seqlen_q = 60;
  spec.seqlen_k = 60;
  spec.heads = 4;
  spec.kv_heads = 2;
  spec.head_dim = 16;
  spec.mask.window_left = 6;
  spec.mask.sink_tokens = 2;
  testing::Problem before = testing::make_problem(spec, 3);
  Context context(2);
  const ModeOptions options{.mode = Mode::kChunked, .chunk = 4, .ring = true};
  attend_with_mode(before.params(), options, context);
  for (std::int64_t position : {0, 1, 2, 25, 58}) {
    testing::Problem after = before;
    testing::perturb_future(after, position, 40 + position);
    attend_with_mode(after.params(), options, context);
    EXPECT_TRUE(testing::prefix_unchanged(before, after, position)) << "position " << position;
  }
}

// Before the ring wraps, every option works; afterwards, a step that would see
// an overwritten key is refused, naming what the ring keeps.
TEST(RingCache, RefusesStepsThatReachOverwrittenKeys) {
  const Stream s(40, 3);
  const CacheConfig config{.kv_heads = kKvHeads, .head_dim = kDim};
  KvCache ring(config, 12, RingSpec{.sink_tokens = 2});  // 10 window slots
  Context context(1);
  ring.append(s.k_rows(0, 10), s.v_rows(0, 10));
  EXPECT_NO_THROW(attend_last(ring, s, 3, {}, context));  // nothing overwritten yet
  EXPECT_TRUE(testing::throws_error([&] { ring.append(s.k_rows(10, 11), s.v_rows(10, 11)); },
                                    ErrorCode::kCapacity, "at most 10 tokens at once"));
  EXPECT_EQ(ring.length(), 10);
  ring.append(s.k_rows(10, 10), s.v_rows(10, 10));  // keys 2..9 overwritten
  EXPECT_EQ(ring.first_kept(), 10);
  EXPECT_TRUE(testing::throws_error([&] { attend_last(ring, s, 1, {}, context); },
                                    ErrorCode::kInvalidArgument,
                                    "no window, but this ring cache keeps keys 0..1 and 10..19"));
  EXPECT_TRUE(testing::throws_error(
      [&] { attend_last(ring, s, 2, {.window_left = 9}, context); }, ErrorCode::kInvalidArgument,
      "window 9 with 2 new tokens reaches key 9"));
  EXPECT_NO_THROW(attend_last(ring, s, 2, {.window_left = 8}, context));
  EXPECT_NO_THROW(attend_last(ring, s, 1, {.window_left = 9, .sink_tokens = 2}, context));
  EXPECT_TRUE(testing::throws_error(
      [&] { attend_last(ring, s, 1, {.window_left = 5, .sink_tokens = 3}, context); },
      ErrorCode::kInvalidArgument, "expected at most 2 sink tokens"));
  // A checkpoint of the ring loads as the same ring: it refuses the same steps.
  const std::string file = ::testing::TempDir() + "/lookback-ring-refusals.lbkv";
  save_checkpoint(ring, file);
  const KvCache loaded = load_kv_cache(file);
  std::remove(file.c_str());
  EXPECT_EQ(loaded.first_kept(), 10);
  EXPECT_TRUE(testing::throws_error([&] { attend_last(loaded, s, 1, {}, context); },
                                    ErrorCode::kInvalidArgument,
                                    "no window, but this ring cache keeps keys 0..1 and 10..19"));
  EXPECT_NO_THROW(attend_last(loaded, s, 1, {.window_left = 9, .sink_tokens = 2}, context));
  EXPECT_TRUE(testing::throws_error([&] { KvCache(config, 4, RingSpec{.sink_tokens = 4}); },
                                    ErrorCode::kInvalidArgument, "ring sink_tokens: 4"));
  EXPECT_TRUE(testing::throws_error([&] { KvCache(config, 4, RingSpec{.sink_tokens = -1}); },
                                    ErrorCode::kInvalidArgument, "ring sink_tokens: -1"));
  ring.clear();
  EXPECT_EQ(ring.length(), 0);
  EXPECT_EQ(ring.first_kept(), 0);
}

TEST(RingCache, ModesRefuseRingsTheyCannotRun) {
  testing::ProblemSpec spec;
  spec.mask.window_left = 3;
  testing::Problem problem = testing::make_problem(spec, 1);
  Context context(1);
  EXPECT_TRUE(testing::throws_error(
      [&] { attend_with_mode(problem.params(), {.mode = Mode::kPaged, .ring = true}, context); },
      ErrorCode::kInvalidArgument, "ring: with mode paged"));
  AttentionParams params = problem.params();
  params.mask.window_left.reset();
  EXPECT_TRUE(testing::throws_error(
      [&] { attend_with_mode(params, {.mode = Mode::kDecode, .ring = true}, context); },
      ErrorCode::kInvalidArgument, "ring: without a window"));
}

// One batch mixing a ring and a plain cache of different lengths.
TEST(RingCache, BatchesMixRingsAndPlainCaches) {
  const Stream s(90, 11);
  const CacheConfig config{.kv_heads = kKvHeads, .head_dim = kDim, .storage = DType::kBF16};
  KvCache ring(config, 16, RingSpec{.sink_tokens = 4});
  KvCache plain(config, 90);
  KvCache ring_alone_twin(config, 90);
  for (std::int64_t t = 0; t < 90; t += 10) ring.append(s.k_rows(t, 10), s.v_rows(t, 10));
  plain.append(s.k_rows(0, 37), s.v_rows(0, 37));
  ring_alone_twin.append(s.k_rows(0, 90), s.v_rows(0, 90));
  const DecodeOptions options{.window_left = 11, .sink_tokens = 4};
  Context context(2);
  std::vector<float> out_ring(kHeads * kDim), out_plain(kHeads * kDim);
  const std::vector<const KvCache*> caches{&ring, &plain};
  const std::vector<DecodeStep> steps{
      {.q = s.q_rows(89, 1), .out = make_mutable_view(out_ring.data(), DType::kF32, {1, kHeads, kDim})},
      {.q = s.q_rows(36, 1), .out = make_mutable_view(out_plain.data(), DType::kF32, {1, kHeads, kDim})}};
  attend_batch(caches, steps, options, context);
  const StepResult alone = attend_last(ring_alone_twin, s, 1, options, context);
  EXPECT_EQ(std::memcmp(out_ring.data(), alone.out.data(), out_ring.size() * sizeof(float)), 0);
  const StepResult plain_alone = attend_last(plain, s, 1, options, context);
  EXPECT_EQ(std::memcmp(out_plain.data(), plain_alone.out.data(), out_plain.size() * sizeof(float)),
            0);
}

}  // namespace
}  // namespace lookback
