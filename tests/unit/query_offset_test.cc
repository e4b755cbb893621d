// MaskSpec::query_offset: queries and keys as two slices of one sequence.
// Attention of a query slice against key slices placed by query_offset,
// merged through the LSEs, must equal the float64 reference of that query
// slice against all its keys (bottom-right alignment, no offset): the oracle
// does not use the feature under test.
#include <gtest/gtest.h>

#include <limits>
#include <vector>

#include "lookback/merge.hpp"
#include "lookback/modes.hpp"
#include "testing/testing.hpp"

namespace lookback::testing {
namespace {

TEST(QueryOffset, PlacesQueriesInTheKeysNumbering) {
  // 3 queries at positions 10..12 against keys numbered from 8: offset 2.
  const Mask mask(3, 6, {.causal = Causal::kBottomRight, .window_left = 1, .query_offset = 2});
  EXPECT_EQ(mask.position(0), 2);
  EXPECT_EQ(mask.key_range(0).begin, 1);
  EXPECT_EQ(mask.key_range(0).end, 3);
  EXPECT_FALSE(mask.visible(2, 5));
  EXPECT_TRUE(mask.visible(2, 4));
  // Queries before every key see nothing.
  EXPECT_EQ(Mask(4, 4, {.query_offset = -4}).visible_total(), 0);
  EXPECT_EQ(Mask(2, 4, {.query_offset = 10}).visible_total(), 8);
  EXPECT_TRUE(throws_error([] { Mask(1, 1, {.query_offset = kMaxQueryOffset + 1}); },
                           ErrorCode::kInvalidArgument, "query_offset"));
}

TEST(QueryOffset, CacheModesRefuseIt) {
  Problem problem = make_problem({.seqlen_q = 4, .seqlen_k = 4}, 1);
  AttentionParams params = problem.params();
  params.mask.query_offset = 0;
  Context context(1);
  EXPECT_TRUE(throws_error([&] { attend_with_mode(params, {.mode = Mode::kDecode}, context); },
                           ErrorCode::kInvalidArgument, "query_offset"));
}

struct Case {
  MaskSpec mask;
  float softcap;
  bool alibi;
  DType storage;
};

class QueryOffsetMerge : public ::testing::TestWithParam<Case> {};

TEST_P(QueryOffsetMerge, KeySlicesMergedEqualTheWholeKeyRange) {
  const Case c = GetParam();
  const std::int64_t n = 150;
  ProblemSpec spec{.seqlen_q = n, .seqlen_k = n, .heads = 4, .kv_heads = 2, .head_dim = 19};
  spec.softcap = c.softcap;
  spec.alibi = c.alibi;
  spec.storage = c.storage;
  Problem full = make_problem(spec, 11);
  Context context(1);
  for (const auto& [first, rows] : {std::pair<std::int64_t, std::int64_t>{0, 7}, {37, 50}, {90, 60}}) {
    const std::int64_t keys = first + rows;  // the keys these rows may see
    AttentionParams oracle = full.params();
    oracle.q = slice(oracle.q, 1, first, rows);
    oracle.out = slice(oracle.out, 1, first, rows);
    oracle.maybe_lse = slice(oracle.maybe_lse, 2, first, rows);
    oracle.k = slice(oracle.k, 1, 0, keys);
    oracle.v = slice(oracle.v, 1, 0, keys);
    oracle.mask = {.causal = Causal::kBottomRight, .window_left = c.mask.window_left};
    const ReferenceResult expected = reference_attention(oracle);

    // Keys in three uneven slices, each placed by query_offset, merged by LSE.
    const std::int64_t heads = spec.heads, dim = spec.head_dim;
    std::vector<float> acc(static_cast<std::size_t>(heads * rows * dim), 0.0f);
    std::vector<float> acc_lse(static_cast<std::size_t>(heads * rows),
                               -std::numeric_limits<float>::infinity());
    const std::int64_t cuts[] = {0, keys / 3, keys / 3 + keys / 5, keys};
    for (int part = 0; part < 3; ++part) {
      const std::int64_t begin = cuts[part], count = cuts[part + 1] - cuts[part];
      std::vector<float> out(static_cast<std::size_t>(rows * heads * dim));
      std::vector<float> lse(static_cast<std::size_t>(heads * rows));
      AttentionParams params = oracle;
      params.k = slice(full.params().k, 1, begin, count);
      params.v = slice(full.params().v, 1, begin, count);
      params.mask = {.causal = c.mask.causal, .window_left = c.mask.window_left,
                     .query_offset = first - begin};
      // (rows, heads, dim) viewed as (1, rows, heads, dim) over (heads, rows, dim) storage.
      params.out = make_mutable_view(out.data(), DType::kF32, {1, rows, heads, dim});
      params.out.strides = {0, dim, rows * dim, 1};
      params.maybe_lse = make_mutable_view(lse.data(), DType::kF32, {1, heads, rows});
      attend(params, context);
      merge_attention(acc.data(), acc_lse.data(), out.data(), lse.data(), heads * rows, dim);
    }
    std::vector<double> expected_out(acc.size());
    for (std::int64_t i = 0; i < rows; ++i) {
      for (std::int64_t h = 0; h < heads; ++h) {
        for (std::int64_t e = 0; e < dim; ++e) {
          expected_out[static_cast<std::size_t>((h * rows + i) * dim + e)] =
              expected.out[static_cast<std::size_t>((i * heads + h) * dim + e)];
        }
      }
    }
    EXPECT_LE(relative_l2(acc, expected_out), tolerance_for(spec.storage))
        << spec.describe() << " rows " << first << ".." << first + rows;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Masks, QueryOffsetMerge,
    ::testing::Values(Case{{}, 0.0f, false, DType::kF32},
                      Case{{.window_left = 20}, 3.0f, true, DType::kF32},
                      Case{{.causal = Causal::kTopLeft, .window_left = 64}, 0.0f, true, DType::kBF16},
                      Case{{}, 5.0f, true, DType::kF16}));

}  // namespace
}  // namespace lookback::testing
