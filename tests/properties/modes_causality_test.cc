// Causality for every path: perturbing the future (queries after i, keys and
// values no row <= i may see) leaves output rows <= i bit-identical.
#include <gtest/gtest.h>

#include "lookback/modes.hpp"
#include "testing/testing.hpp"

namespace lookback {
namespace {

TEST(Causality, EveryModeFutureNeverChangesThePast) {
  testing::ProblemSpec spec;
  spec.seqlen_q = 70;
  spec.seqlen_k = 150;
  spec.head_dim = 48;
  spec.heads = 4;
  spec.kv_heads = 2;
  spec.batch = 2;
  const ModeOptions modes[] = {
      {.mode = Mode::kPrefill},
      {.mode = Mode::kDecode},
      {.mode = Mode::kChunked, .chunk = 6},
      {.mode = Mode::kPaged, .block_size = 16},
      {.mode = Mode::kPaged, .chunk = 5, .block_size = 3},
      {.mode = Mode::kSplit, .splits = 3},
  };
  Context context(2);
  for (const std::optional<std::int64_t> window : {std::optional<std::int64_t>{}, std::optional<std::int64_t>{20}}) {
    for (DType storage : {DType::kF32, DType::kBF16}) {
      spec.mask.window_left = window;
      spec.storage = storage;
      for (const ModeOptions& options : modes) {
        SCOPED_TRACE(std::string(mode_name(options.mode)) + " " + spec.describe());
        testing::Problem base = testing::make_problem(spec, 3);
        attend_with_mode(base.params(), options, context);
        for (std::int64_t row : {std::int64_t{0}, std::int64_t{33}, std::int64_t{68}}) {
          testing::Problem changed = base;
          testing::perturb_future(changed, row, 500 + static_cast<std::uint64_t>(row));
          attend_with_mode(changed.params(), options, context);
          ASSERT_TRUE(testing::prefix_unchanged(base, changed, row));
        }
      }
    }
  }
}

}  // namespace
}  // namespace lookback
