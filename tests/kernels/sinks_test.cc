// Learned sink logits (gpt-oss) on every path against the float64
// reference: prefill, decode, chunked, paged and split-KV, where the sink
// must be added exactly once, at the merge. Rows with no visible key give
// o = 0 and lse = sink.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "lookback/attention.hpp"
#include "lookback/kv_cache.hpp"
#include "lookback/modes.hpp"
#include "testing/testing.hpp"

namespace lookback {
namespace {

struct SinkCase {
  testing::ProblemSpec spec;
  ModeOptions options;
};

void PrintTo(const SinkCase& c, std::ostream* os) {
  *os << mode_name(c.options.mode) << " splits=" << c.options.splits << " " << c.spec.describe();
}

std::vector<SinkCase> sink_cases() {
  const testing::ProblemShape shapes[] = {{1, 1, 8, 2, 1}, {7, 7, 40, 2, 1}, {113, 239, 59, 4, 2},
                                          {1, 1500, 96, 8, 2}, {64, 130, 128, 4, 4}};
  const std::optional<std::int64_t> windows[] = {std::nullopt, 0, 37};
  std::vector<SinkCase> all;
  int n = 0;
  for (const testing::ProblemShape& s : shapes) {
    for (Mode mode : all_modes()) {
      SinkCase c;
      c.spec.sinks = true;
      c.spec.set_shape(s);
      c.spec.mask.window_left = windows[n % 3];
      c.spec.softcap = n % 4 == 1 ? 4.0f : 0.0f;
      c.spec.alibi = n % 5 == 2;
      c.spec.batch = n % 4 == 3 ? 2 : 1;
      c.spec.storage = n % 6 == 4 ? DType::kBF16 : DType::kF32;
      c.options.mode = mode;
      c.options.chunk = n % 2 == 0 ? 1 : 6;
      c.options.block_size = 7;
      c.options.splits = 2 + n % 5;
      all.push_back(c);
      ++n;
    }
  }
  // Rows with no visible key: seqlen_q > seqlen_k (bottom-right) and
  // top-left with a window, through prefill and split-KV.
  for (Mode mode : {Mode::kPrefill, Mode::kSplit}) {
    for (Causal causal : {Causal::kBottomRight, Causal::kTopLeft}) {
      SinkCase c;
      c.spec.sinks = true;
      c.spec.seqlen_q = 30;
      c.spec.seqlen_k = 11;
      c.spec.heads = 4;
      c.spec.kv_heads = 2;
      c.spec.head_dim = 24;
      c.spec.mask.causal = causal;
      if (causal == Causal::kTopLeft) c.spec.mask.window_left = 3;
      c.options.mode = mode;
      c.options.splits = 4;
      all.push_back(c);
    }
  }
  return all;
}

class SinkSweep : public ::testing::TestWithParam<SinkCase> {};

TEST_P(SinkSweep, MatchesTheReferenceOnEveryTarget) {
  const SinkCase& c = GetParam();
  testing::Problem problem = testing::make_problem(c.spec, 313 + c.spec.seqlen_k);
  const ReferenceResult reference = reference_attention(problem.params());
  const Mask mask(c.spec.seqlen_q, c.spec.seqlen_k, c.spec.mask);
  Context context(2);
  for (const std::string& target : simd_targets()) {
    force_simd_target(target);
    SCOPED_TRACE("simd target " + target);
    problem.poison_outputs();
    attend_with_mode(problem.params(), c.options, context);
    const testing::Comparison result = testing::compare(problem, reference);
    EXPECT_TRUE(result.finite) << result.describe();
    EXPECT_LE(result.relative_l2, testing::tolerance_for(c.spec.storage)) << result.describe();
    EXPECT_LE(result.max_lse_error, c.spec.storage == DType::kF32 ? testing::kLseTolerance : 0.05)
        << result.describe();
    // Empty rows: zeros and lse = the head's sink, exactly.
    for (std::int64_t b = 0; b < c.spec.batch; ++b) {
      for (std::int64_t i = 0; i < c.spec.seqlen_q; ++i) {
        if (mask.visible_in_row(i) != 0) continue;
        for (std::int64_t h = 0; h < c.spec.heads; ++h) {
          EXPECT_EQ(problem.lse[static_cast<std::size_t>((b * c.spec.heads + h) * c.spec.seqlen_q + i)],
                    problem.sink_logits[static_cast<std::size_t>(h)]);
          for (std::int64_t e = 0; e < c.spec.head_dim; ++e) {
            EXPECT_EQ(problem.out[static_cast<std::size_t>(
                          ((b * c.spec.seqlen_q + i) * c.spec.heads + h) * c.spec.head_dim + e)],
                      0.0f);
          }
        }
      }
    }
  }
  force_simd_target("");
}

INSTANTIATE_TEST_SUITE_P(Sinks, SinkSweep, ::testing::ValuesIn(sink_cases()),
                         [](const ::testing::TestParamInfo<SinkCase>& info) {
                           return std::string(mode_name(info.param.options.mode)) + "_" +
                                  std::to_string(info.index);
                         });

// Split-KV adds the sink once: with k parts, forgetting it or adding it per
// part changes the denominator by e^sink or (k - 1) e^sink, which a large
// sink makes far larger than the tolerance. The reference fixes which.
TEST(Sinks, SplitAddsTheSinkExactlyOnce) {
  testing::ProblemSpec spec;
  spec.sinks = true;
  spec.seqlen_q = 16;
  spec.seqlen_k = 200;
  spec.heads = 2;
  spec.head_dim = 32;
  testing::Problem problem = testing::make_problem(spec, 5);
  problem.sink_logits = {4.0f, 4.0f};  // e^4 against about 200 keys of weight ~1
  const ReferenceResult with_sink = reference_attention(problem.params());
  AttentionParams without = problem.params();
  without.maybe_sink_logits = nullptr;
  const ReferenceResult no_sink = reference_attention(without);
  // The case is sharp: the sink moves the output far beyond the tolerance.
  ASSERT_GT(testing::relative_l2(std::vector<float>(no_sink.out.begin(), no_sink.out.end()),
                                 with_sink.out),
            0.1);
  Context context(2);
  for (std::int64_t splits : {1, 2, 3, 8}) {
    attend_with_mode(problem.params(), {.mode = Mode::kSplit, .splits = splits}, context);
    EXPECT_LE(testing::compare(problem, with_sink).relative_l2, testing::kF32Tolerance)
        << splits << " parts";
  }
  // Decode's key parts (flash-decoding) merge the same way.
  const CacheConfig config{.kv_heads = 1, .head_dim = 32};
  KvCache cache(config, 200);
  cache.append(make_view(problem.k.data(), DType::kF32, {200, 1, 32}),
               make_view(problem.v.data(), DType::kF32, {200, 1, 32}));
  std::vector<float> out(2 * 32), lse(2);
  const std::int64_t last = spec.seqlen_q - 1;
  for (std::int64_t splits : {1, 2, 5}) {
    cache.attend({.q = make_view(problem.q.data() + last * 2 * 32, DType::kF32, {1, 2, 32}),
                  .out = make_mutable_view(out.data(), DType::kF32, {1, 2, 32}),
                  .maybe_lse = make_mutable_view(lse.data(), DType::kF32, {2, 1})},
                 {.maybe_sink_logits = problem.sink_logits.data(), .splits = splits}, context);
    for (std::int64_t h = 0; h < 2; ++h) {
      EXPECT_NEAR(lse[static_cast<std::size_t>(h)],
                  with_sink.lse[static_cast<std::size_t>(h * spec.seqlen_q + last)], 1e-4)
          << splits << " parts";
      for (std::int64_t e = 0; e < 32; ++e) {
        EXPECT_NEAR(out[static_cast<std::size_t>(h * 32 + e)],
                    with_sink.out[static_cast<std::size_t>((last * 2 + h) * 32 + e)], 1e-5)
            << splits << " parts";
      }
    }
  }
}

TEST(Sinks, NonFiniteLogitsAreRefused) {
  testing::ProblemSpec spec;
  spec.sinks = true;
  spec.heads = 2;
  testing::Problem problem = testing::make_problem(spec, 1);
  problem.sink_logits[1] = INFINITY;
  Context context(1);
  EXPECT_TRUE(testing::throws_error([&] { attend(problem.params(), context); },
                                    ErrorCode::kInvalidArgument, "sink_logits"));
}

TEST(Sinks, FutureInputsNeverChangeEarlierOutputs) {
  for (Mode mode : all_modes()) {
    testing::ProblemSpec spec;
    spec.sinks = true;
    spec.seqlen_q = 41;
    spec.seqlen_k = 41;
    spec.heads = 4;
    spec.kv_heads = 2;
    spec.head_dim = 20;
    spec.mask.window_left = 9;
    testing::Problem before = testing::make_problem(spec, 3);
    Context context(2);
    const ModeOptions options{.mode = mode, .chunk = 4, .block_size = 5, .splits = 3};
    attend_with_mode(before.params(), options, context);
    for (std::int64_t position : {0, 17, 39}) {
      testing::Problem after = before;
      testing::perturb_future(after, position, 50 + position);
      attend_with_mode(after.params(), options, context);
      EXPECT_TRUE(testing::prefix_unchanged(before, after, position))
          << mode_name(mode) << " position " << position;
    }
  }
}

}  // namespace
}  // namespace lookback
