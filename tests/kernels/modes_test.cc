// Every path (DESIGN.md §4) against the float64 reference and against
// prefill: decode, chunked, paged (shuffled block tables, block sizes 1, 16,
// 128) and split-KV, across odd shapes and every mask option, on every SIMD
// target.
#include <gtest/gtest.h>

#include "lookback/attention.hpp"
#include "lookback/error.hpp"
#include "lookback/modes.hpp"
#include "testing/testing.hpp"

namespace lookback {
namespace {

using testing::ProblemShape;
using testing::ProblemSpec;

struct ModeCase {
  ProblemSpec spec;
  ModeOptions options;
};

void PrintTo(const ModeCase& c, std::ostream* os) {
  *os << mode_name(c.options.mode) << " chunk=" << c.options.chunk
      << " block_size=" << c.options.block_size << " splits=" << c.options.splits << " "
      << c.spec.describe();
}

std::vector<ModeCase> cases() {
  const ProblemShape shapes[] = {{1, 1, 8, 1, 1}, {7, 7, 40, 2, 1}, {113, 203, 59, 4, 2},
                                 {128, 217, 64, 8, 2}, {239, 239, 80, 2, 2}, {1, 1024, 96, 8, 1},
                                 {33, 300, 111, 4, 4}, {20, 20, 128, 4, 2}, {5, 90, 256, 2, 1}};
  const std::optional<std::int64_t> windows[] = {std::nullopt, 0, 37, 64};
  std::vector<ModeCase> all;
  int n = 0;
  for (const ProblemShape& s : shapes) {
    for (Mode mode : {Mode::kDecode, Mode::kChunked, Mode::kPaged, Mode::kSplit}) {
      ModeCase c;
      c.spec.set_shape(s);
      c.spec.mask.window_left = windows[n % 4];
      c.spec.softcap = n % 3 == 1 ? 4.0f : 0.0f;
      c.spec.alibi = n % 5 == 2;
      c.spec.batch = n % 4 == 3 ? 2 : 1;
      c.spec.strided = n % 2 == 1;
      c.options.mode = mode;
      c.options.chunk = (n % 3 == 0) ? 1 : (n % 3 == 1 ? 3 : 64);
      const std::int64_t block_sizes[] = {1, 16, 128, 5};
      c.options.block_size = block_sizes[n % 4];
      const std::int64_t splits[] = {2, 3, 7};
      // More parts than keys on the short shapes (each part is a prefill call).
      c.options.splits = s.seqlen_k <= 64 ? 1000 : splits[n % 3];
      all.push_back(c);
      ++n;
    }
  }
  // Split-KV with top-left and bidirectional masks (cache modes refuse them).
  for (Causal causal : {Causal::kTopLeft, Causal::kNone}) {
    ModeCase c;
    c.spec.seqlen_q = 33;
    c.spec.seqlen_k = 17;
    c.spec.head_dim = 24;
    c.spec.mask.causal = causal;
    c.options.mode = Mode::kSplit;
    c.options.splits = 4;
    all.push_back(c);
  }
  // bf16 and f16 storage through every cache path, at a head dim of whole
  // 16-dim groups and at one padded to them (AVX2 decode reads bf16 rows in
  // pairs of dims, 16 at a time).
  const ProblemShape storage_shapes[] = {{40, 100, 64, 4, 2}, {7, 239, 111, 8, 2}};
  for (const ProblemShape& s : storage_shapes) {
    for (DType storage : {DType::kBF16, DType::kF16}) {
      for (Mode mode : {Mode::kDecode, Mode::kChunked, Mode::kPaged, Mode::kSplit}) {
        ModeCase c;
      c.spec.set_shape(s);
        c.spec.storage = storage;
        c.options.mode = mode;
        c.options.chunk = 7;
        c.options.block_size = 16;
        c.options.splits = 3;
        all.push_back(c);
      }
    }
  }
  return all;
}

class ModeSweep : public ::testing::TestWithParam<ModeCase> {};

TEST_P(ModeSweep, MatchesReferenceAndPrefillOnEveryTarget) {
  const ModeCase& c = GetParam();
  testing::Problem problem = testing::make_problem(c.spec, 77 + c.spec.seqlen_k);
  const ReferenceResult reference = reference_attention(problem.params());
  Context context(2);
  for (const std::string& target : simd_targets()) {
    force_simd_target(target);
    SCOPED_TRACE("simd target " + target);
    problem.poison_outputs();
    attend_with_mode(problem.params(), c.options, context);
    const testing::Comparison result = testing::compare(problem, reference);
    EXPECT_TRUE(result.finite) << result.describe();
    EXPECT_TRUE(result.empty_rows_exact) << result.describe();
    EXPECT_LE(result.relative_l2, testing::tolerance_for(c.spec.storage)) << result.describe();
    EXPECT_LE(result.max_lse_error, c.spec.storage == DType::kF32 ? testing::kLseTolerance : 0.05)
        << result.describe();
    // Against prefill on the same target: the same function.
    const std::vector<float> path_out = problem.out;
    attend(problem.params(), context);
    EXPECT_LE(testing::relative_l2(path_out, std::vector<double>(problem.out.begin(), problem.out.end())),
              testing::tolerance_for(c.spec.storage));
  }
  force_simd_target("");
}

INSTANTIATE_TEST_SUITE_P(Modes, ModeSweep, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<ModeCase>& info) {
                           return std::string(mode_name(info.param.options.mode)) + "_" +
                                  std::to_string(info.index);
                         });

TEST(Modes, CacheModesNeedBottomRightAndValidOptions) {
  ProblemSpec spec;
  spec.mask.causal = Causal::kTopLeft;
  testing::Problem problem = testing::make_problem(spec, 1);
  Context context(1);
  for (Mode mode : {Mode::kDecode, Mode::kChunked, Mode::kPaged}) {
    try {
      attend_with_mode(problem.params(), {.mode = mode}, context);
      FAIL() << "top-left accepted by " << mode_name(mode);
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("bottom-right"), std::string::npos) << e.what();
    }
  }
  spec.mask.causal = Causal::kBottomRight;
  testing::Problem ok = testing::make_problem(spec, 1);
  EXPECT_THROW(attend_with_mode(ok.params(), {.mode = Mode::kChunked, .chunk = 0}, context), Error);
  EXPECT_THROW(attend_with_mode(ok.params(), {.mode = Mode::kPaged, .block_size = 0}, context), Error);
  EXPECT_THROW(attend_with_mode(ok.params(), {.mode = Mode::kSplit, .splits = 0}, context), Error);
  EXPECT_THROW(parse_mode("sideways"), Error);
  spec.seqlen_q = 9;
  spec.seqlen_k = 4;
  testing::Problem long_q = testing::make_problem(spec, 1);
  EXPECT_THROW(attend_with_mode(long_q.params(), {.mode = Mode::kDecode}, context), Error);
}

}  // namespace
}  // namespace lookback
