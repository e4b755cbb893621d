// Causality is a guarantee: perturbing any input after position i (queries
// after i, keys and values no row <= i can see) leaves output rows <= i
// bit-identical, on every SIMD target.
#include <gtest/gtest.h>

#include "lookback/attention.hpp"
#include "testing/testing.hpp"

namespace lookback {
namespace {

using testing::ProblemSpec;

TEST(Causality, PrefillFutureNeverChangesThePast) {
  ProblemSpec specs[4];
  specs[0].seqlen_q = specs[0].seqlen_k = 239;
  specs[0].head_dim = 40;
  specs[0].heads = 4;
  specs[0].kv_heads = 2;
  specs[1].seqlen_q = 113;
  specs[1].seqlen_k = 203;  // queries appended after cached keys
  specs[1].head_dim = 64;
  specs[1].mask.window_left = 37;
  specs[1].alibi = true;
  specs[2].seqlen_q = specs[2].seqlen_k = 130;
  specs[2].head_dim = 59;
  specs[2].softcap = 3.0f;
  specs[2].batch = 2;
  specs[2].strided = true;
  specs[3].seqlen_q = specs[3].seqlen_k = 300;  // bf16: the AMX or bf16-dot path, with spans
  specs[3].head_dim = 96;
  specs[3].heads = 4;
  specs[3].kv_heads = 2;
  specs[3].storage = DType::kBF16;
  Context context(2);
  testing::for_each_kernel_path([&](const std::string& target) {
    for (const ProblemSpec& spec : specs) {
      SCOPED_TRACE(target + " " + spec.describe());
      testing::Problem base = testing::make_problem(spec, 42);
      attend(base.params(), context);
      for (std::int64_t row : {std::int64_t{0}, spec.seqlen_q / 3, spec.seqlen_q / 2 + 1,
                               spec.seqlen_q - 2}) {
        testing::Problem changed = base;
        testing::perturb_future(changed, row, 1000 + static_cast<std::uint64_t>(row));
        attend(changed.params(), context);
        ASSERT_TRUE(testing::prefix_unchanged(base, changed, row));
      }
    }
  });
}

}  // namespace
}  // namespace lookback
