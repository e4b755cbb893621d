// StreamingLLM sink tokens (MaskSpec::sink_tokens, with a window) on every
// path against the float64 reference: prefill, decode, chunked, paged and
// split-KV, on every kernel path of this CPU. A row then sees two key ranges
// (the sinks and its window); every path must agree with the reference, whose
// mask is the rule of DESIGN.md §2 (checked cell by cell in mask_test.cc).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "lookback/attention.hpp"
#include "lookback/kv_cache.hpp"
#include "lookback/modes.hpp"
#include "lookback/reference.hpp"
#include "testing/testing.hpp"

namespace lookback {
namespace {

struct SinkTokenCase {
  testing::ProblemSpec spec;
  ModeOptions options;
};

void PrintTo(const SinkTokenCase& c, std::ostream* os) {
  *os << mode_name(c.options.mode) << (c.options.ring ? " ring" : "") << " chunk=" << c.options.chunk
      << " splits=" << c.options.splits << " " << c.spec.describe();
}

std::vector<SinkTokenCase> sink_token_cases() {
  const testing::ProblemShape shapes[] = {{1, 1, 8, 2, 1}, {7, 7, 40, 2, 1}, {113, 113, 59, 4, 2},
                                          {113, 239, 33, 4, 2}, {1, 1500, 96, 8, 2},
                                          {64, 130, 128, 4, 4}};
  const std::int64_t windows[] = {0, 5, 37};
  const std::int64_t sinks[] = {1, 4, 3000};
  std::vector<SinkTokenCase> all;
  int n = 0;
  for (const testing::ProblemShape& s : shapes) {
    for (Mode mode : all_modes()) {
      SinkTokenCase c;
      c.spec.set_shape(s);
      c.spec.mask.window_left = windows[n % 3];
      c.spec.mask.sink_tokens = sinks[(n / 3) % 3];
      c.spec.softcap = n % 4 == 1 ? 4.0f : 0.0f;
      c.spec.alibi = n % 5 == 2;
      c.spec.sinks = n % 7 == 3;  // learned sink logits too
      c.spec.batch = n % 4 == 3 ? 2 : 1;
      c.spec.storage = n % 3 == 1 ? DType::kBF16 : DType::kF32;
      c.options.mode = mode;
      c.options.chunk = n % 2 == 0 ? 1 : 6;
      c.options.block_size = 7;
      c.options.splits = 1 + n % 5;
      // Half the contiguous-cache cases run their caches as rings.
      c.options.ring = (mode == Mode::kDecode || mode == Mode::kChunked) && (n / 2) % 2 == 1;
      all.push_back(c);
      ++n;
    }
  }
  // Alignments only prefill and split-KV take: top-left (rows past the keys
  // see only their sinks) and query_offset (ring attention's block pairs).
  for (Mode mode : {Mode::kPrefill, Mode::kSplit}) {
    for (int variant = 0; variant < 3; ++variant) {
      SinkTokenCase c;
      c.spec.seqlen_q = 30;
      c.spec.seqlen_k = 11;
      c.spec.heads = 4;
      c.spec.kv_heads = 2;
      c.spec.head_dim = 24;
      c.spec.mask.window_left = 3;
      c.spec.mask.sink_tokens = 2;
      if (variant == 0) c.spec.mask.causal = Causal::kTopLeft;
      if (variant == 1) c.spec.mask.query_offset = 9;
      c.spec.alibi = variant == 2;
      c.options.mode = mode;
      c.options.splits = 3;
      all.push_back(c);
    }
  }
  return all;
}

class SinkTokenSweep : public ::testing::TestWithParam<SinkTokenCase> {};

TEST_P(SinkTokenSweep, MatchesTheReferenceOnEveryKernelPath) {
  const SinkTokenCase& c = GetParam();
  testing::Problem problem = testing::make_problem(c.spec, 911 + c.spec.seqlen_k);
  const ReferenceResult reference = reference_attention(problem.params());
  Context context(2);
  testing::for_each_kernel_path([&](const std::string& path) {
    SCOPED_TRACE("kernel path " + path);
    problem.poison_outputs();
    attend_with_mode(problem.params(), c.options, context);
    const testing::Comparison result = testing::compare(problem, reference);
    EXPECT_TRUE(result.finite) << result.describe();
    EXPECT_TRUE(result.empty_rows_exact) << result.describe();
    EXPECT_LE(result.relative_l2, testing::tolerance_for(c.spec.storage)) << result.describe();
    EXPECT_LE(result.max_lse_error, c.spec.storage == DType::kF32 ? testing::kLseTolerance : 0.05)
        << result.describe();
  });
}

INSTANTIATE_TEST_SUITE_P(SinkTokens, SinkTokenSweep, ::testing::ValuesIn(sink_token_cases()),
                         [](const ::testing::TestParamInfo<SinkTokenCase>& info) {
                           return std::string(mode_name(info.param.options.mode)) + "_" +
                                  std::to_string(info.index);
                         });

// The case is sharp: the sinks move the reference far beyond the tolerance,
// so a path that dropped them (or saw the sinks twice) would fail.
TEST(SinkTokens, SinksChangeTheResultAndEveryPathKeepsThem) {
  testing::ProblemSpec spec;
  spec.seqlen_q = 50;
  spec.seqlen_k = 90;
  spec.heads = 2;
  spec.head_dim = 16;
  spec.mask.window_left = 6;
  spec.mask.sink_tokens = 4;
  testing::Problem problem = testing::make_problem(spec, 77);
  const ReferenceResult with_sinks = reference_attention(problem.params());
  AttentionParams without = problem.params();
  without.mask.sink_tokens = 0;
  const ReferenceResult no_sinks = reference_attention(without);
  ASSERT_GT(testing::relative_l2(std::vector<float>(no_sinks.out.begin(), no_sinks.out.end()),
                                 with_sinks.out),
            0.1);
  Context context(2);
  for (Mode mode : all_modes()) {
    problem.poison_outputs();
    attend_with_mode(problem.params(), {.mode = mode, .chunk = 5, .block_size = 3, .splits = 3},
                     context);
    EXPECT_LE(testing::compare(problem, with_sinks).relative_l2, testing::kF32Tolerance)
        << mode_name(mode);
  }
}

// Decode straight on a cache, with the key range split into 1 to 5 parts
// (flash-decoding) beside the sink part.
TEST(SinkTokens, DecodeSplitsMergeTheSinkPartExactly) {
  testing::ProblemSpec spec;
  spec.seqlen_q = 3;
  spec.seqlen_k = 300;
  spec.heads = 4;
  spec.kv_heads = 2;
  spec.head_dim = 32;
  spec.mask.window_left = 40;
  spec.mask.sink_tokens = 5;
  testing::Problem problem = testing::make_problem(spec, 12);
  const ReferenceResult reference = reference_attention(problem.params());
  const CacheConfig config{.kv_heads = 2, .head_dim = 32};
  KvCache cache(config, 300);
  cache.append(make_view(problem.k.data(), DType::kF32, {300, 2, 32}),
               make_view(problem.v.data(), DType::kF32, {300, 2, 32}));
  Context context(2);
  for (std::int64_t splits : {1, 2, 5}) {
    std::vector<float> out(3 * 4 * 32), lse(4 * 3);
    cache.attend({.q = make_view(problem.q.data(), DType::kF32, {3, 4, 32}),
                  .out = make_mutable_view(out.data(), DType::kF32, {3, 4, 32}),
                  .maybe_lse = make_mutable_view(lse.data(), DType::kF32, {4, 3})},
                 {.window_left = 40, .sink_tokens = 5, .splits = splits}, context);
    EXPECT_LE(testing::relative_l2(out, reference.out), testing::kF32Tolerance) << splits;
    for (std::size_t r = 0; r < lse.size(); ++r) {
      EXPECT_NEAR(lse[r], reference.lse[r], 1e-4) << splits << " parts, row " << r;
    }
  }
  std::vector<float> out(3 * 4 * 32);
  EXPECT_TRUE(testing::throws_error(
      [&] {
        cache.attend({.q = make_view(problem.q.data(), DType::kF32, {3, 4, 32}),
                      .out = make_mutable_view(out.data(), DType::kF32, {3, 4, 32})},
                     {.sink_tokens = 5}, context);
      },
      ErrorCode::kInvalidArgument, "sink_tokens"));
}

TEST(SinkTokens, FutureInputsNeverChangeEarlierOutputs) {
  for (Mode mode : all_modes()) {
    for (DType storage : {DType::kF32, DType::kBF16}) {
      testing::ProblemSpec spec;
      spec.seqlen_q = 41;
      spec.seqlen_k = 41;
      spec.heads = 4;
      spec.kv_heads = 2;
      spec.head_dim = 20;
      spec.mask.window_left = 5;
      spec.mask.sink_tokens = 3;
      spec.alibi = true;
      spec.storage = storage;
      testing::Problem before = testing::make_problem(spec, 3);
      Context context(2);
      const ModeOptions options{.mode = mode, .chunk = 4, .block_size = 5, .splits = 3};
      attend_with_mode(before.params(), options, context);
      for (std::int64_t position : {0, 2, 17, 39}) {
        testing::Problem after = before;
        testing::perturb_future(after, position, 50 + position);
        attend_with_mode(after.params(), options, context);
        EXPECT_TRUE(testing::prefix_unchanged(before, after, position))
            << mode_name(mode) << " " << dtype_name(storage) << " position " << position;
      }
    }
  }
}

TEST(SinkTokens, BadSinkTokensAreRefused) {
  testing::ProblemSpec spec;
  testing::Problem problem = testing::make_problem(spec, 1);
  AttentionParams params = problem.params();
  params.mask.sink_tokens = 2;  // no window
  Context context(1);
  EXPECT_TRUE(testing::throws_error([&] { attend(params, context); },
                                    ErrorCode::kInvalidArgument, "sink_tokens"));
  params.mask.window_left = 2;
  params.mask.sink_tokens = -3;
  EXPECT_TRUE(testing::throws_error([&] { attend(params, context); },
                                    ErrorCode::kInvalidArgument, "sink_tokens: -3"));
}

}  // namespace
}  // namespace lookback
