// One test per finding of the fuzzers in fuzz/, each reproducing it through
// the public API. The fuzz input itself lives in fuzz/regressions/<target>/,
// where `make fuzz` replays it (fuzz/README.md, "When a fuzzer finds
// something").
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "lookback/attention.hpp"
#include "lookback/modes.hpp"
#include "lookback/reference.hpp"
#include "testing/testing.hpp"

namespace lookback {
namespace {

const ModeOptions kPaths[] = {
    {.mode = Mode::kPrefill},
    {.mode = Mode::kDecode},
    {.mode = Mode::kChunked, .chunk = 3},
    {.mode = Mode::kPaged, .chunk = 2, .block_size = 3},
    {.mode = Mode::kSplit, .splits = 3},
};

// fuzz/regressions/fuzz_attention/prefill_bf16_scale_zero_nan (fuzz_attention,
// found 2026-11-26): with bf16 storage, a scale of 0 (valid: every visible key
// weighs the same) gave NaN outputs and LSEs from prefill and split on CPUs
// that take the bf16 dot-product path (AVX512-BF16 / AMX-BF16). That path
// recovered the unscaled Q as (q * scale) * (1 / scale): 0 * inf for scale 0,
// and inf once 1 / scale overflows (scale below about 3e-39). Elsewhere these
// tests pass trivially.
TEST(FuzzRegressions, Bf16StorageWithZeroScaleAveragesTheVisibleValues) {
  // The minimised input: one query, one key, head_dim 1. With one visible key
  // the output is that key's value and the LSE is the score, 0.
  const float q = 1.0f, k = 1.0f, v = 0.6875f;  // exact in bf16
  float out = std::numeric_limits<float>::quiet_NaN(), lse = out;
  AttentionParams params{.q = make_view(&q, DType::kF32, {1, 1, 1, 1}, "q"),
                         .k = make_view(&k, DType::kF32, {1, 1, 1, 1}, "k"),
                         .v = make_view(&v, DType::kF32, {1, 1, 1, 1}, "v"),
                         .out = make_mutable_view(&out, DType::kF32, {1, 1, 1, 1}, "out"),
                         .maybe_lse = make_mutable_view(&lse, DType::kF32, {1, 1, 1}, "lse"),
                         .scale = 0.0f,
                         .storage = DType::kBF16};
  Context context(1);
  attend(params, context);
  EXPECT_EQ(out, v);
  EXPECT_EQ(lse, 0.0f);
}

TEST(FuzzRegressions, Bf16StorageWithZeroOrTinyScaleMatchesTheReferenceOnEveryPath) {
  Context context(2);
  for (float scale : {0.0f, 1e-39f}) {
    testing::ProblemSpec spec;
    spec.seqlen_q = 9;
    spec.seqlen_k = 13;
    spec.heads = 2;
    spec.head_dim = 26;
    spec.scale = scale;
    spec.storage = DType::kBF16;
    testing::Problem problem = testing::make_problem(spec, 29);
    for (const ModeOptions& options : kPaths) {
      SCOPED_TRACE(std::string(mode_name(options.mode)) +
                   (scale == 0.0f ? " scale 0" : " scale 1e-39"));
      problem.poison_outputs();
      attend_with_mode(problem.params(), options, context);
      const testing::Comparison result = testing::check_against_reference(problem);
      EXPECT_TRUE(result.finite) << result.describe();
      EXPECT_LE(result.relative_l2, testing::kHalfTolerance) << result.describe();
      EXPECT_LE(result.max_lse_error, testing::kLseTolerance) << result.describe();
    }
  }
}

// fuzz/regressions/fuzz_attention/prefill_amx_null_k_transposed_offset
// (fuzz_attention under clang's UBSan, found 2026-11-26): on the AMX path,
// where K is packed only as bf16 pairs, prefill still computed the address of
// each key tile in the absent f32 Kᵀ buffer (a non-zero offset on a null
// pointer, undefined behaviour although never dereferenced). The same call
// through the public API, checked against the reference.
TEST(FuzzRegressions, AmxPrefillWithSeveralKeyTilesAndHeads) {
  testing::ProblemSpec spec;
  spec.seqlen_q = 70;
  spec.seqlen_k = 200;
  spec.heads = 4;
  spec.kv_heads = 2;
  spec.head_dim = 32;
  spec.storage = DType::kBF16;
  testing::Problem problem = testing::make_problem(spec, 31);
  Context context(2);
  attend(problem.params(), context);
  const testing::Comparison result = testing::check_against_reference(problem);
  EXPECT_TRUE(result.finite) << result.describe();
  EXPECT_LE(result.relative_l2, testing::kHalfTolerance) << result.describe();
}

}  // namespace
}  // namespace lookback
