// The oracle itself, against cases worked by hand.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "lookback/error.hpp"
#include "lookback/reference.hpp"

namespace lookback {
namespace {

struct Tiny {
  std::vector<float> q, k, v, out, lse;
  AttentionParams params(std::int64_t seqlen_q, std::int64_t seqlen_k, std::int64_t heads,
                         std::int64_t kv_heads, std::int64_t dim) {
    out.assign(static_cast<std::size_t>(seqlen_q * heads * dim), 0.0f);
    lse.assign(static_cast<std::size_t>(seqlen_q * heads), 0.0f);
    AttentionParams p;
    p.q = make_view(q.data(), DType::kF32, {1, seqlen_q, heads, dim}, "q");
    p.k = make_view(k.data(), DType::kF32, {1, seqlen_k, kv_heads, dim}, "k");
    p.v = make_view(v.data(), DType::kF32, {1, seqlen_k, kv_heads, dim}, "v");
    p.out = make_mutable_view(out.data(), DType::kF32, {1, seqlen_q, heads, dim}, "out");
    p.maybe_lse = make_mutable_view(lse.data(), DType::kF32, {1, heads, seqlen_q}, "lse");
    return p;
  }
};

TEST(Reference, TwoTokensOneHeadByHand) {
  Tiny t{.q = {1, 2}, .k = {1, 3}, .v = {10, 20}};
  AttentionParams p = t.params(2, 2, 1, 1, 1);
  p.scale = 1.0f;
  const ReferenceResult r = reference_attention(p);
  // Row 0 sees key 0 only.
  EXPECT_DOUBLE_EQ(r.out[0], 10.0);
  EXPECT_DOUBLE_EQ(r.lse[0], 1.0);
  // Row 1: scores 2 and 6.
  const double e2 = std::exp(2.0), e6 = std::exp(6.0);
  EXPECT_NEAR(r.out[1], (10 * e2 + 20 * e6) / (e2 + e6), 1e-12);
  EXPECT_NEAR(r.lse[1], std::log(e2 + e6), 1e-12);
}

TEST(Reference, DefaultScaleIsInverseSqrtHeadDim) {
  Tiny t{.q = {1, 1, 1, 1, 1, 1, 1, 1}, .k = {1, 1, 1, 1, 0, 0, 0, 2}, .v = {1, 0, 0, 0, 0, 1, 0, 0}};
  const ReferenceResult r = reference_attention(t.params(2, 2, 1, 1, 4));
  // Row 1: dots 4 and 2, scaled by 1/2: scores 2 and 1.
  const double w0 = std::exp(2.0) / (std::exp(2.0) + std::exp(1.0));
  EXPECT_NEAR(r.out[4], w0, 1e-12);
  EXPECT_NEAR(r.out[5], 1 - w0, 1e-12);
}

TEST(Reference, SoftcapAndAlibi) {
  Tiny t{.q = {1, 2}, .k = {1, 3}, .v = {10, 20}};
  AttentionParams p = t.params(2, 2, 1, 1, 1);
  p.scale = 1.0f;
  p.softcap = 4.0f;
  const float slope = 0.5f;
  p.maybe_alibi_slopes = &slope;
  const ReferenceResult r = reference_attention(p);
  // Row 1 (position 1): s0 = 4 tanh(2/4) - 0.5 * 1, s1 = 4 tanh(6/4) - 0.
  const double s0 = 4 * std::tanh(0.5) - 0.5, s1 = 4 * std::tanh(1.5);
  EXPECT_NEAR(r.out[1], (10 * std::exp(s0) + 20 * std::exp(s1)) / (std::exp(s0) + std::exp(s1)), 1e-9);
  EXPECT_NEAR(r.lse[1], std::log(std::exp(s0) + std::exp(s1)), 1e-9);
}

TEST(Reference, GroupedQueryHeadsShareTheKvHead) {
  // Two query heads, one kv head: both read the same K/V.
  Tiny t{.q = {1, 5, 2, 0}, .k = {1, 3}, .v = {10, 20}};
  AttentionParams p = t.params(2, 2, 2, 1, 1);
  p.scale = 1.0f;
  const ReferenceResult r = reference_attention(p);
  EXPECT_DOUBLE_EQ(r.out[0], 10.0);  // (row 0, head 0)
  EXPECT_DOUBLE_EQ(r.out[1], 10.0);  // (row 0, head 1)
  // Row 1, head 1: q = 0, scores 0 and 0: the mean of v.
  EXPECT_NEAR(r.out[3], 15.0, 1e-12);
  EXPECT_NEAR(r.lse[1 * 2 + 1], std::log(2.0), 1e-12);  // (head 1, row 1)
}

TEST(Reference, EmptyRowsAreZeroWithMinusInfinityLse) {
  // seqlen_q 2 > seqlen_k 1, bottom-right: row 0 is at position -1.
  Tiny t{.q = {1, 2}, .k = {1}, .v = {7}};
  const ReferenceResult r = reference_attention(t.params(2, 1, 1, 1, 1));
  EXPECT_EQ(r.out[0], 0.0);
  EXPECT_TRUE(std::isinf(r.lse[0]) && r.lse[0] < 0);
  EXPECT_DOUBLE_EQ(r.out[1], 7.0);
  EXPECT_FALSE(std::isnan(r.out[0]));
}

TEST(Reference, ValidatesArguments) {
  Tiny t{.q = {1, 2, 3, 4}, .k = {1, 3}, .v = {10, 20}};
  AttentionParams p = t.params(1, 1, 2, 1, 2);
  p.softcap = -1.0f;
  EXPECT_THROW(reference_attention(p), Error);
  p.softcap = 0.0f;
  p.mask.window_left = -3;
  EXPECT_THROW(reference_attention(p), Error);
}

}  // namespace
}  // namespace lookback

namespace lookback {
namespace {

TEST(Reference, NanScorePoisonsItsRowOnly) {
  Tiny t{.q = {1, std::nanf("")}, .k = {1, 3}, .v = {10, 20}};
  const ReferenceResult r = reference_attention(t.params(2, 2, 1, 1, 1));
  EXPECT_DOUBLE_EQ(r.out[0], 10.0);
  EXPECT_TRUE(std::isnan(r.out[1]));
  EXPECT_TRUE(std::isnan(r.lse[1]));
}

}  // namespace
}  // namespace lookback
