// Hostile numerics (the bugs that shipped in PyTorch #101967, FlashInfer #941,
// FlashInfer PR #58, TorchTitan #3235): huge scores, NaN and Inf in hidden
// keys and values, empty rows, window 0, seqlen 1, empty caches, split-KV
// with more parts than keys and with empty parts — on every path.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <limits>

#include "kernels/pack.hpp"
#include "lookback/error.hpp"
#include "lookback/kv_cache.hpp"
#include "lookback/modes.hpp"
#include "testing/testing.hpp"

namespace lookback {
namespace {

using testing::ProblemSpec;

const ModeOptions kPaths[] = {
    {.mode = Mode::kPrefill},
    {.mode = Mode::kDecode},
    {.mode = Mode::kChunked, .chunk = 5},
    {.mode = Mode::kPaged, .chunk = 3, .block_size = 4},
    {.mode = Mode::kSplit, .splits = 3},
};

std::string name(const ModeOptions& options) { return std::string(mode_name(options.mode)); }

TEST(Hostile, HugeScoresDoNotOverflow) {
  // Inputs of magnitude 1e2..1e4: scores up to about 1e4 * sqrt(d) and far
  // beyond; exp must never see a positive argument, LSE must stay finite.
  Context context(2);
  for (float magnitude : {1e2f, 1e3f, 1e4f}) {
    ProblemSpec spec;
    spec.seqlen_q = 40;
    spec.seqlen_k = 70;
    spec.head_dim = 16;
    spec.heads = 2;
    spec.magnitude = magnitude;
    testing::Problem problem = testing::make_problem(spec, 17);
    const ReferenceResult reference = reference_attention(problem.params());
    for (const ModeOptions& options : kPaths) {
      SCOPED_TRACE(name(options) + " magnitude " + std::to_string(magnitude));
      problem.poison_outputs();
      attend_with_mode(problem.params(), options, context);
      const testing::Comparison result = testing::compare(problem, reference);
      EXPECT_TRUE(result.finite) << result.describe();
      EXPECT_LE(result.relative_l2, testing::kF32Tolerance) << result.describe();
      // LSE is about magnitude^2 here; compare it relatively.
      EXPECT_LE(result.max_lse_error, testing::kLseTolerance * magnitude * magnitude)
          << result.describe();
    }
  }
}

// Rounds every stored value to the storage dtype, so that the float64
// reference sees exactly the values the kernels attend to (at scores near
// 1e10 the storage rounding of an input moves a score by far more than the
// gap between the two largest ones).
void round_inputs_to(testing::Problem& problem, DType storage) {
  for (auto* values : {&problem.q, &problem.k, &problem.v}) {
    for (float& x : *values) x = kernels::round_to_storage(x, storage);
  }
}

TEST(Hostile, LargeFiniteScoresAgreeWithTheReferenceOnEveryPathDtypeAndTarget) {
  // Scores from about 1e-3 to 1e10, all finite: the row maximum's own
  // probability must be exactly 1 (an exponent rounded apart from the max
  // overflowed the sums to Inf and gave NaN rows from scores near 1e8).
  Context context(2);
  for (DType storage : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (float scale : {1e-4f, 1.0f, 1e4f, 1e7f, 1e8f, 1e9f}) {
      ProblemSpec spec;
      spec.seqlen_q = 90;
      spec.seqlen_k = 150;  // full, diagonal and span-sized key tiles
      spec.head_dim = 96;  // not a power of two, and whole AMX rows (the bf16 tile path)
      spec.heads = 4;
      spec.kv_heads = 2;
      spec.scale = scale;
      spec.storage = storage;
      testing::Problem problem = testing::make_problem(spec, 41);
      round_inputs_to(problem, storage);
      const ReferenceResult reference = reference_attention(problem.params());
      double largest_lse = 1.0;
      for (double lse : reference.lse) largest_lse = std::max(largest_lse, std::abs(lse));
      testing::for_each_kernel_path([&](const std::string& target) {
        for (const ModeOptions& options : kPaths) {
          SCOPED_TRACE(name(options) + " " + std::string(dtype_name(storage)) + " scale " +
                       std::to_string(scale) + " target " + target);
          problem.poison_outputs();
          attend_with_mode(problem.params(), options, context);
          const testing::Comparison result = testing::compare(problem, reference);
          EXPECT_TRUE(result.finite) << result.describe();
          EXPECT_LE(result.relative_l2, testing::tolerance_for(storage)) << result.describe();
          EXPECT_LE(result.max_lse_error, testing::kLseTolerance * largest_lse)
              << result.describe();
        }
      });
    }
  }
}

// Sets every element of K and V at key position `key` (all batch elements,
// all kv heads) to `value`.
void poison_key(testing::Problem& problem, std::int64_t key, float k_value, float v_value) {
  const ProblemSpec& s = problem.spec;
  for (std::int64_t b = 0; b < s.batch; ++b) {
    for (std::int64_t h = 0; h < s.kv_heads; ++h) {
      for (std::int64_t e = 0; e < s.head_dim; ++e) {
        const auto index = static_cast<std::size_t>(problem.kv_offset(b, key, h) + e);
        problem.k[index] = k_value;
        problem.v[index] = v_value;
      }
    }
  }
}

TEST(Hostile, NonFiniteHiddenKeysAndValuesAreSkippedNotMultipliedByZero) {
  // Key 50 is the future for rows whose position < 50 and outside the window
  // (W = 8) for rows whose position > 58. Those rows must be bit-identical to
  // a clean run; the rows that do see key 50 must turn NaN (never hide it).
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  Context context(2);
  ProblemSpec spec;
  spec.seqlen_q = 60;
  spec.seqlen_k = 80;  // positions 20..79
  spec.head_dim = 24;
  spec.heads = 4;
  spec.kv_heads = 2;
  spec.mask.window_left = 8;
  for (DType storage : {DType::kF32, DType::kBF16, DType::kF16}) {
  spec.storage = storage;
  const testing::Problem clean = testing::make_problem(spec, 23);
  for (const auto& [k_value, v_value] : {std::pair{nan, nan}, std::pair{inf, -inf}, std::pair{1.0f, nan}}) {
    for (const ModeOptions& options : kPaths) {
      SCOPED_TRACE(name(options) + " " + std::string(dtype_name(storage)) + " k=" +
                   std::to_string(k_value) + " v=" + std::to_string(v_value));
      testing::Problem expected = clean;
      attend_with_mode(expected.params(), options, context);
      testing::Problem poisoned = clean;
      poison_key(poisoned, 50, k_value, v_value);
      attend_with_mode(poisoned.params(), options, context);
      const Mask mask(spec.seqlen_q, spec.seqlen_k, spec.mask);
      for (std::int64_t i = 0; i < spec.seqlen_q; ++i) {
        const auto offset = static_cast<std::size_t>(i * spec.heads * spec.head_dim);
        const auto bytes = static_cast<std::size_t>(spec.heads * spec.head_dim) * sizeof(float);
        if (mask.visible(i, 50)) {
          EXPECT_TRUE(std::isnan(poisoned.out[offset])) << "row " << i << " hid a NaN it sees";
        } else {
          ASSERT_EQ(std::memcmp(expected.out.data() + offset, poisoned.out.data() + offset, bytes), 0)
              << "row " << i << " changed by a key it must not see";
        }
      }
    }
  }
  }
}

TEST(Hostile, VisibleNonFiniteKeysInALateFullTilePoisonTheirRowsOnEveryPath) {
  // Key 200 lies in a key tile that rows past 256 see whole, after tiles
  // that gave them a max: with scores of one scale throughout, those tiles
  // take the one-pass softmax step where a path has one (AVX-512), which
  // must find a NaN or infinite score as the two passes do. Rows before key
  // 200 stay bit-identical.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  Context context(2);
  ProblemSpec spec;
  spec.seqlen_q = spec.seqlen_k = 300;
  spec.head_dim = 24;
  spec.heads = 4;
  spec.kv_heads = 2;
  constexpr std::int64_t kKey = 200;
  for (DType storage : {DType::kF32, DType::kBF16}) {
    spec.storage = storage;
    const testing::Problem clean = testing::make_problem(spec, 31);
    for (const float k_value : {nan, inf, -inf}) {
      for (const ModeOptions& options : kPaths) {
        SCOPED_TRACE(name(options) + " " + std::string(dtype_name(storage)) + " k=" +
                     std::to_string(k_value));
        testing::Problem expected = clean;
        attend_with_mode(expected.params(), options, context);
        testing::Problem poisoned = clean;
        poison_key(poisoned, kKey, k_value, 1.0f);
        attend_with_mode(poisoned.params(), options, context);
        for (std::int64_t i = 0; i < spec.seqlen_q; ++i) {
          const auto offset = static_cast<std::size_t>(i * spec.heads * spec.head_dim);
          const auto bytes = static_cast<std::size_t>(spec.heads * spec.head_dim) * sizeof(float);
          if (i >= kKey) {
            for (std::int64_t h = 0; h < spec.heads; ++h) {
              ASSERT_TRUE(std::isnan(poisoned.out[offset + static_cast<std::size_t>(h * spec.head_dim)]))
                  << "row " << i << " head " << h << " hid a non-finite score it sees";
            }
          } else {
            ASSERT_EQ(std::memcmp(expected.out.data() + offset, poisoned.out.data() + offset, bytes), 0)
                << "row " << i << " changed by a key it must not see";
          }
        }
      }
    }
  }
}

TEST(Hostile, EmptyRowsWindowZeroAndSeqlenOne) {
  Context context(1);
  struct Case {
    std::int64_t seqlen_q, seqlen_k;
    std::optional<std::int64_t> window;
    Causal causal;
  };
  const Case cases[] = {
      {1, 1, std::nullopt, Causal::kBottomRight},  // seqlen 1
      {1, 1, 0, Causal::kBottomRight},
      {9, 9, 0, Causal::kBottomRight},   // window 0: each row sees itself only
      {9, 30, 0, Causal::kBottomRight},
      {12, 5, std::nullopt, Causal::kTopLeft},  // fewer keys than queries
      {12, 5, 2, Causal::kTopLeft},             // last rows empty (window)
      {12, 5, std::nullopt, Causal::kBottomRight},  // first rows empty
      {4, 0, std::nullopt, Causal::kBottomRight},   // no keys at all
  };
  for (const Case& c : cases) {
    ProblemSpec spec;
    spec.seqlen_q = c.seqlen_q;
    spec.seqlen_k = c.seqlen_k;
    spec.head_dim = 8;
    spec.heads = 2;
    spec.mask = {.causal = c.causal, .window_left = c.window};
    testing::Problem problem = testing::make_problem(spec, 29);
    const ReferenceResult reference = reference_attention(problem.params());
    for (const ModeOptions& options : kPaths) {
      const bool cache_path = options.mode == Mode::kDecode || options.mode == Mode::kChunked ||
                              options.mode == Mode::kPaged;
      if (cache_path && (c.causal != Causal::kBottomRight || c.seqlen_q > c.seqlen_k)) continue;
      SCOPED_TRACE(name(options) + " " + spec.describe());
      problem.poison_outputs();
      attend_with_mode(problem.params(), options, context);
      const testing::Comparison result = testing::compare(problem, reference);
      EXPECT_TRUE(result.finite) << result.describe();
      EXPECT_TRUE(result.empty_rows_exact) << result.describe();
      EXPECT_LE(result.relative_l2, testing::kF32Tolerance) << result.describe();
    }
  }
}

TEST(Hostile, EmptyCacheAttendedWithAChunk) {
  Context context(1);
  const CacheConfig config{.kv_heads = 1, .head_dim = 8};
  std::vector<float> q(3 * 2 * 8, 0.5f), k(3 * 8, 0.25f), v(3 * 8, 1.0f), out(q.size());
  const DecodeStep step{.q = make_view(q.data(), DType::kF32, {3, 2, 8}, "q"),
                        .out = make_mutable_view(out.data(), DType::kF32, {3, 2, 8}, "out")};
  // Nothing cached yet: attending is an error, never a read of empty memory.
  KvCache cache(config, 8);
  EXPECT_THROW(cache.attend(step, {}, context), Error);
  PagedKvPool pool(config, 4, 2);
  const SequenceId sequence = pool.create();
  EXPECT_THROW(pool.attend(sequence, step, {}, context), Error);
  // A chunk appended to the empty cache then attends causally within itself.
  cache.append(make_view(k.data(), DType::kF32, {3, 1, 8}, "k"), make_view(v.data(), DType::kF32, {3, 1, 8}, "v"));
  cache.attend(step, {}, context);
  for (float x : out) EXPECT_FLOAT_EQ(x, 1.0f);  // every value row is 1
}

TEST(Hostile, SplitsWithMorePartsThanKeysAndEmptyParts) {
  Context context(2);
  ProblemSpec spec;
  spec.seqlen_q = 6;
  spec.seqlen_k = 200;
  spec.head_dim = 16;
  spec.heads = 2;
  spec.mask.window_left = 3;  // every row sees 4 keys near the end: most parts are empty
  testing::Problem problem = testing::make_problem(spec, 31);
  const ReferenceResult reference = reference_attention(problem.params());
  for (std::int64_t splits : {1, 7, 50, 200, 1000}) {
    SCOPED_TRACE("splits " + std::to_string(splits));
    problem.poison_outputs();
    attend_with_mode(problem.params(), {.mode = Mode::kSplit, .splits = splits}, context);
    const testing::Comparison result = testing::compare(problem, reference);
    EXPECT_TRUE(result.finite);
    EXPECT_LE(result.relative_l2, testing::kF32Tolerance) << result.describe();
    EXPECT_LE(result.max_lse_error, testing::kLseTolerance) << result.describe();
  }
  // Decode's own split-KV: more parts than keys.
  const CacheConfig config{.kv_heads = 1, .head_dim = 16};
  testing::ProblemSpec one;
  one.seqlen_q = 1;
  one.seqlen_k = 5;
  one.head_dim = 16;
  one.heads = 2;
  testing::Problem small = testing::make_problem(one, 37);
  const ReferenceResult small_reference = reference_attention(small.params());
  KvCache cache(config, 5);
  cache.append(make_view(small.k.data(), DType::kF32, {5, 1, 16}, "k"),
               make_view(small.v.data(), DType::kF32, {5, 1, 16}, "v"));
  cache.attend({.q = make_view(small.q.data(), DType::kF32, {1, 2, 16}, "q"),
                .out = make_mutable_view(small.out.data(), DType::kF32, {1, 2, 16}, "out")},
               {.splits = 64}, context);
  EXPECT_LE(testing::relative_l2(small.out, small_reference.out), testing::kF32Tolerance);
}

TEST(Hostile, SplitCountsUpToInt64MaxAreClampedToTheKeys) {
  // One part per key at most: 2^63 - 1 parts of 16 keys is 16 parts, not a
  // loop of 2^63 prefill calls.
  Context context(2);
  ProblemSpec spec;
  spec.seqlen_q = 16;
  spec.seqlen_k = 16;
  spec.heads = 2;
  testing::Problem problem = testing::make_problem(spec, 43);
  const ReferenceResult reference = reference_attention(problem.params());
  for (std::int64_t splits : {std::int64_t{1} << 40, std::numeric_limits<std::int64_t>::max()}) {
    problem.poison_outputs();
    attend_with_mode(problem.params(), {.mode = Mode::kSplit, .splits = splits}, context);
    const testing::Comparison result = testing::compare(problem, reference);
    EXPECT_TRUE(result.finite) << result.describe();
    EXPECT_LE(result.relative_l2, testing::kF32Tolerance) << result.describe();
  }
}

TEST(Hostile, WindowsThatReachKeyZeroEqualNoWindowUpToInt64Max) {
  // p - W must never overflow: a window at least as long as the last row's
  // position hides nothing, so every path gives no window's bits.
  Context context(2);
  constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
  struct Case {
    std::int64_t seqlen_q, seqlen_k;
    Causal causal;
  };
  for (const Case& c : {Case{40, 100, Causal::kBottomRight}, Case{70, 30, Causal::kTopLeft}}) {
    ProblemSpec spec;
    spec.seqlen_q = c.seqlen_q;
    spec.seqlen_k = c.seqlen_k;
    spec.heads = 2;
    spec.head_dim = 24;
    spec.mask.causal = c.causal;
    testing::Problem problem = testing::make_problem(spec, 47);
    const std::int64_t last_position =
        c.causal == Causal::kTopLeft ? c.seqlen_q - 1 : c.seqlen_k - 1;
    for (const std::string& target : simd_targets()) {
      force_simd_target(target);
      for (const ModeOptions& options : kPaths) {
        const bool uses_cache = options.mode != Mode::kPrefill && options.mode != Mode::kSplit;
        if (uses_cache && (c.causal != Causal::kBottomRight || c.seqlen_q > c.seqlen_k)) continue;
        problem.spec.mask.window_left.reset();
        problem.poison_outputs();
        attend_with_mode(problem.params(), options, context);
        const testing::Problem unwindowed = problem;
        for (std::int64_t window : {last_position, last_position + 1, std::int64_t{1} << 40,
                                    kMax - 1, kMax}) {
          SCOPED_TRACE(name(options) + " window " + std::to_string(window) + " target " + target);
          problem.spec.mask.window_left = window;
          EXPECT_EQ(Mask(c.seqlen_q, c.seqlen_k, problem.spec.mask).visible_total(),
                    Mask(c.seqlen_q, c.seqlen_k, {.causal = c.causal}).visible_total());
          problem.poison_outputs();
          attend_with_mode(problem.params(), options, context);
          EXPECT_TRUE(testing::prefix_unchanged(unwindowed, problem, c.seqlen_q - 1));
        }
      }
    }
    force_simd_target("");
  }
}

}  // namespace
}  // namespace lookback
