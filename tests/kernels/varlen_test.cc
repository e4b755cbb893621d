// Variable-length packed batches: equal, bit for bit, to running each
// sequence alone, and to the float64 reference per sequence; every bad
// cu_seqlens is a clear error.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "lookback/attention.hpp"
#include "lookback/reference.hpp"
#include "lookback/varlen.hpp"
#include "testing/testing.hpp"

namespace lookback {
namespace {

struct Packed {
  std::vector<std::int64_t> cu_q, cu_k;
  std::int64_t heads, kv_heads, dim;
  std::vector<float> q, k, v, out, lse, sinks;

  std::int64_t total_q() const { return cu_q.back(); }
  std::int64_t total_k() const { return cu_k.back(); }

  VarlenParams params(const MaskSpec& mask, DType storage, bool with_sinks) {
    VarlenParams p;
    p.q = make_view(q.data(), DType::kF32, {total_q(), heads, dim}, "q");
    p.k = make_view(k.data(), DType::kF32, {total_k(), kv_heads, dim}, "k");
    p.v = make_view(v.data(), DType::kF32, {total_k(), kv_heads, dim}, "v");
    const auto batch_plus_one = static_cast<std::int64_t>(cu_q.size());
    p.cu_seqlens_q = make_view(cu_q.data(), DType::kI64, {batch_plus_one}, "cu_q");
    p.cu_seqlens_k = make_view(cu_k.data(), DType::kI64, {static_cast<std::int64_t>(cu_k.size())}, "cu_k");
    p.out = make_mutable_view(out.data(), DType::kF32, {total_q(), heads, dim}, "out");
    p.maybe_lse = make_mutable_view(lse.data(), DType::kF32, {heads, total_q()}, "lse");
    p.mask = mask;
    p.storage = storage;
    p.maybe_sink_logits = with_sinks ? sinks.data() : nullptr;
    return p;
  }
};

Packed make_packed(const std::vector<std::pair<std::int64_t, std::int64_t>>& lengths,
                   std::int64_t heads, std::int64_t kv_heads, std::int64_t dim, std::uint64_t seed) {
  Packed p{.cu_q = {0}, .cu_k = {0}, .heads = heads, .kv_heads = kv_heads, .dim = dim};
  for (const auto& [sq, sk] : lengths) {
    p.cu_q.push_back(p.cu_q.back() + sq);
    p.cu_k.push_back(p.cu_k.back() + sk);
  }
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  p.q.resize(static_cast<std::size_t>(p.total_q() * heads * dim));
  p.k.resize(static_cast<std::size_t>(p.total_k() * kv_heads * dim));
  p.v.resize(p.k.size());
  for (auto* x : {&p.q, &p.k, &p.v}) for (float& e : *x) e = normal(rng);
  for (std::int64_t h = 0; h < heads; ++h) p.sinks.push_back(normal(rng));
  p.out.assign(p.q.size(), 12345.0f);
  p.lse.assign(static_cast<std::size_t>(heads * p.total_q()), 12345.0f);
  return p;
}

// Runs sequence b alone through lookback::attend (batch of one, its own
// buffers) and checks the packed result's rows against it, bit for bit, and
// against the float64 reference within the storage's tolerance.
void expect_equals_alone(Packed& packed, std::size_t b, const MaskSpec& mask, DType storage,
                         bool with_sinks, Context& context) {
  const std::int64_t q0 = packed.cu_q[b], sq = packed.cu_q[b + 1] - q0;
  const std::int64_t k0 = packed.cu_k[b], sk = packed.cu_k[b + 1] - k0;
  const std::int64_t heads = packed.heads, kv = packed.kv_heads, dim = packed.dim;
  if (sq == 0) return;
  std::vector<float> q(packed.q.begin() + q0 * heads * dim, packed.q.begin() + (q0 + sq) * heads * dim);
  std::vector<float> k(packed.k.begin() + k0 * kv * dim, packed.k.begin() + (k0 + sk) * kv * dim);
  std::vector<float> v(packed.v.begin() + k0 * kv * dim, packed.v.begin() + (k0 + sk) * kv * dim);
  std::vector<float> out(q.size()), lse(static_cast<std::size_t>(heads * sq));
  AttentionParams params;
  params.q = make_view(q.data(), DType::kF32, {1, sq, heads, dim});
  params.k = make_view(k.data(), DType::kF32, {1, sk, kv, dim});
  params.v = make_view(v.data(), DType::kF32, {1, sk, kv, dim});
  params.out = make_mutable_view(out.data(), DType::kF32, {1, sq, heads, dim});
  params.maybe_lse = make_mutable_view(lse.data(), DType::kF32, {1, heads, sq});
  params.mask = mask;
  params.storage = storage;
  params.maybe_sink_logits = with_sinks ? packed.sinks.data() : nullptr;
  attend(params, context);
  for (std::int64_t i = 0; i < sq * heads * dim; ++i) {
    ASSERT_EQ(packed.out[static_cast<std::size_t>(q0 * heads * dim + i)], out[static_cast<std::size_t>(i)])
        << "sequence " << b << " element " << i;
  }
  for (std::int64_t h = 0; h < heads; ++h) {
    for (std::int64_t i = 0; i < sq; ++i) {
      const float packed_lse = packed.lse[static_cast<std::size_t>(h * packed.total_q() + q0 + i)];
      const float alone = lse[static_cast<std::size_t>(h * sq + i)];
      ASSERT_TRUE(packed_lse == alone || (std::isnan(packed_lse) && std::isnan(alone)))
          << "sequence " << b << " head " << h << " row " << i;
    }
  }
  // The reference on the shorter sequences (the kernel on long ones is the
  // prefill tests' subject; here the check is the bitwise one above).
  if (storage == DType::kF32 && sq * sk <= 300 * 300) {
    const ReferenceResult reference = reference_attention(params);
    EXPECT_LE(testing::relative_l2(out, reference.out), testing::kF32Tolerance) << "sequence " << b;
  }
}

TEST(Varlen, EqualsEachSequenceAlone) {
  // Lengths 1, 7, 300 and 2000, an empty sequence, and seqlen_q != seqlen_k
  // both ways (more queries than keys leaves rows with no key).
  const std::vector<std::pair<std::int64_t, std::int64_t>> lengths = {
      {1, 1}, {7, 7}, {0, 0}, {300, 300}, {1, 2000}, {2000, 2000}, {0, 5}, {7, 300}, {40, 9}, {3, 0}};
  Packed packed = make_packed(lengths, 4, 2, 40, 11);
  Context context(2);
  struct Variant {
    MaskSpec mask;
    DType storage;
    bool sinks;
  };
  const Variant variants[] = {{{}, DType::kF32, false},
                              {{.window_left = 37}, DType::kF32, true},
                              {{.causal = Causal::kTopLeft, .window_left = 3}, DType::kF32, false},
                              {{.causal = Causal::kNone}, DType::kF32, false},
                              {{}, DType::kI8, true},
                              {{.window_left = 5}, DType::kBF16, false},
                              {{.window_left = 5, .sink_tokens = 4}, DType::kF32, true},
                              {{.causal = Causal::kTopLeft, .window_left = 3, .sink_tokens = 2},
                               DType::kBF16, false}};
  for (const Variant& variant : variants) {
    SCOPED_TRACE(std::string(causal_name(variant.mask.causal)) + " " + std::string(dtype_name(variant.storage)));
    std::fill(packed.out.begin(), packed.out.end(), 12345.0f);
    attend_varlen(packed.params(variant.mask, variant.storage, variant.sinks), context);
    for (float x : packed.out) ASSERT_FALSE(std::isnan(x));
    for (std::size_t b = 0; b + 1 < packed.cu_q.size(); ++b) {
      expect_equals_alone(packed, b, variant.mask, variant.storage, variant.sinks, context);
    }
  }
}

TEST(Varlen, BitIdenticalForAnyThreadCountAndCausal) {
  Packed packed = make_packed({{5, 5}, {130, 140}, {1, 64}, {70, 70}}, 4, 1, 24, 3);
  Context one(1), three(3);
  attend_varlen(packed.params({}, DType::kF32, false), one);
  const std::vector<float> first = packed.out, first_lse = packed.lse;
  attend_varlen(packed.params({}, DType::kF32, false), three);
  EXPECT_EQ(packed.out, first);
  EXPECT_EQ(packed.lse, first_lse);
  // The last token of sequence 1 changes: only that row of the batch may move.
  const std::int64_t last_q = packed.cu_q[2] - 1, last_k = packed.cu_k[2] - 1;
  for (std::int64_t e = 0; e < 4 * 24; ++e) packed.q[static_cast<std::size_t>(last_q * 4 * 24 + e)] += 1.0f;
  for (std::int64_t e = 0; e < 24; ++e) {
    packed.k[static_cast<std::size_t>(last_k * 24 + e)] += 1.0f;
    packed.v[static_cast<std::size_t>(last_k * 24 + e)] -= 1.0f;
  }
  attend_varlen(packed.params({}, DType::kF32, false), three);
  for (std::int64_t row = 0; row < packed.total_q(); ++row) {
    const bool changed_row = row == last_q;
    for (std::int64_t e = 0; e < 4 * 24; ++e) {
      const auto i = static_cast<std::size_t>(row * 4 * 24 + e);
      if (!changed_row) ASSERT_EQ(packed.out[i], first[i]) << "row " << row;
    }
  }
}

TEST(Varlen, BadOffsetsAreClearErrors) {
  Packed packed = make_packed({{3, 3}, {4, 6}}, 2, 1, 8, 1);
  Context context(1);
  auto with = [&](std::vector<std::int64_t> cu_q, std::vector<std::int64_t> cu_k,
                  std::string_view needle) {
    Packed copy = packed;
    copy.cu_q = std::move(cu_q);
    copy.cu_k = std::move(cu_k);
    VarlenParams p = copy.params({}, DType::kF32, false);
    // The views keep the original totals: only the offsets are wrong.
    p.q = make_view(copy.q.data(), DType::kF32, {7, 2, 8});
    p.k = make_view(copy.k.data(), DType::kF32, {9, 1, 8});
    p.v = make_view(copy.v.data(), DType::kF32, {9, 1, 8});
    p.out = make_mutable_view(copy.out.data(), DType::kF32, {7, 2, 8});
    p.maybe_lse = make_mutable_view(copy.lse.data(), DType::kF32, {2, 7});
    return testing::throws_error([&] { attend_varlen(p, context); }, ErrorCode::kInvalidArgument,
                                 needle);
  };
  EXPECT_TRUE(with({0, 3, 7}, {0, 3, 9}, "x") == false);  // valid: no error
  EXPECT_TRUE(with({0, 5, 3, 7}, {0, 3, 4, 9}, "cu_seqlens_q: entry 2 is 3, below entry 1"));
  EXPECT_TRUE(with({1, 3, 7}, {0, 3, 9}, "cu_seqlens_q: starts at 1 (expected 0)"));
  EXPECT_TRUE(with({0, 3, 6}, {0, 3, 9}, "cu_seqlens_q: ends at 6 (expected 7"));
  EXPECT_TRUE(with({0, 3, 7}, {0, 3, 8}, "cu_seqlens_k: ends at 8 (expected 9"));
  EXPECT_TRUE(with({0, 3, 7}, {0, 9}, "cu_seqlens_k: 2 entries (expected 3"));
  EXPECT_TRUE(with({7}, {9}, "cu_seqlens_q: 1 entries (expected batch + 1 >= 2"));
  EXPECT_TRUE(with({0, -2, 7}, {0, 3, 9}, "cu_seqlens_q: entry 1 is -2 (expected offsets >= 0)"));
  // Offsets of a float dtype.
  VarlenParams p = packed.params({}, DType::kF32, false);
  std::vector<float> floats{0, 3, 7};
  p.cu_seqlens_q = make_view(floats.data(), DType::kF32, {3});
  EXPECT_TRUE(testing::throws_error([&] { attend_varlen(p, context); },
                                    ErrorCode::kInvalidArgument, "cu_seqlens_q: dtype f32"));
  // int32 offsets work like int64.
  std::vector<std::int32_t> narrow{0, 3, 7};
  p = packed.params({}, DType::kF32, false);
  p.cu_seqlens_q = make_view(narrow.data(), DType::kI32, {3});
  EXPECT_NO_THROW(attend_varlen(p, context));
}

}  // namespace
}  // namespace lookback
