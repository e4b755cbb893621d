// The prefill kernel against the float64 reference, on every SIMD target this
// CPU supports, across the sweep of shapes and options in the prefill issue.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "lookback/attention.hpp"
#include "lookback/error.hpp"
#include "lookback/kv_cache.hpp"
#include "testing/testing.hpp"

namespace lookback {
namespace {

using testing::ProblemSpec;

// Runs `body` once per kernel path: every SIMD target, and bf16 prefill
// without AMX where the CPU has it (testing::for_each_kernel_path).
template <typename Body>
void for_each_target(Body&& body) {
  testing::for_each_kernel_path(body);
}

std::vector<ProblemSpec> sweep() {
  struct Shape {
    std::int64_t seqlen_q, seqlen_k;
    Causal causal;
  };
  const Shape shapes[] = {
      {1, 1, Causal::kBottomRight},       {7, 7, Causal::kBottomRight},
      {113, 203, Causal::kBottomRight},   {128, 217, Causal::kBottomRight},
      {239, 239, Causal::kBottomRight},   {1, 1024, Causal::kBottomRight},
      {256, 512, Causal::kBottomRight},   {1023, 1024, Causal::kBottomRight},
      {1024, 1024, Causal::kBottomRight}, {33, 17, Causal::kTopLeft},
      {17, 33, Causal::kTopLeft},         {40, 30, Causal::kBottomRight},
      {65, 65, Causal::kNone},
  };
  const std::int64_t head_dims[] = {8, 40, 59, 64, 80, 96, 111, 128, 256};
  const std::int64_t groups[] = {1, 2, 4, 8};
  const std::optional<std::int64_t> windows[] = {std::nullopt, 0, 37, 64};
  std::vector<ProblemSpec> specs;
  int n = 0;
  for (const Shape& shape : shapes) {
    // Two variants per shape, rotating through the options so that every
    // head_dim, group size, window, softcap, ALiBi, batch > 1 and strided
    // layout meets several shapes.
    for (int variant = 0; variant < 2; ++variant, ++n) {
      ProblemSpec spec;
      spec.seqlen_q = shape.seqlen_q;
      spec.seqlen_k = shape.seqlen_k;
      spec.mask.causal = shape.causal;
      const bool big = shape.seqlen_q * shape.seqlen_k > 100000;
      spec.head_dim = head_dims[(n * 5) % 9];
      if (big) spec.head_dim = std::min<std::int64_t>(spec.head_dim, 64);
      spec.kv_heads = big ? 1 : 2;
      spec.heads = spec.kv_heads * groups[n % 4];
      if (big) spec.heads = std::min<std::int64_t>(spec.heads, 2);
      if (shape.causal != Causal::kNone) spec.mask.window_left = windows[(n / 2 + variant) % 4];
      spec.softcap = n % 3 == 1 ? 5.0f : 0.0f;
      spec.alibi = n % 4 == 2;
      spec.batch = n % 5 == 3 ? 2 : 1;
      spec.strided = n % 2 == 1;
      specs.push_back(spec);
    }
  }
  // bf16 and f16 storage (bf16 runs as AVX512-BF16 dot products where the CPU
  // has them) on a third of the cases.
  const std::size_t f32_cases = specs.size();
  for (std::size_t i = 0; i < f32_cases; i += 3) {
    ProblemSpec half = specs[i];
    half.storage = (i / 3) % 2 == 0 ? DType::kBF16 : DType::kF16;
    specs.push_back(half);
  }
  // Long bf16 rows: on AMX, full key tiles go in spans of up to kAmxSpan,
  // cut short by windows; with ALiBi and softcap the span's columns must
  // keep their key positions.
  for (int variant = 0; variant < 4; ++variant) {
    ProblemSpec spec;
    spec.seqlen_q = 300;
    spec.seqlen_k = 700;
    spec.head_dim = 96;
    spec.heads = 4;
    spec.kv_heads = 2;
    spec.storage = DType::kBF16;
    if (variant == 1) spec.mask.window_left = 250;
    spec.alibi = variant == 2;
    spec.softcap = variant == 3 ? 5.0f : 0.0f;
    specs.push_back(spec);
  }
  // Every head_dim, including the specialised ones, on one odd shape.
  for (std::int64_t head_dim : head_dims) {
    ProblemSpec spec;
    spec.seqlen_q = 113;
    spec.seqlen_k = 203;
    spec.head_dim = head_dim;
    spec.heads = 4;
    spec.kv_heads = 2;
    specs.push_back(spec);
  }
  // Every GQA ratio with every window on a short odd shape.
  for (std::int64_t group : groups) {
    for (const auto& window : windows) {
      ProblemSpec spec;
      spec.seqlen_q = 70;
      spec.seqlen_k = 133;
      spec.head_dim = 24;
      spec.kv_heads = 2;
      spec.heads = 2 * group;
      spec.mask.window_left = window;
      specs.push_back(spec);
    }
  }
  return specs;
}

class PrefillSweep : public ::testing::TestWithParam<ProblemSpec> {};

TEST_P(PrefillSweep, MatchesReferenceOnEveryTarget) {
  const ProblemSpec& spec = GetParam();
  SCOPED_TRACE(spec.describe());
  testing::Problem problem = testing::make_problem(spec, 1234 + spec.seqlen_q * 7 + spec.head_dim);
  const ReferenceResult reference = reference_attention(problem.params());
  // One thread: head tasks (each packs its kv head); two: K/V packed for the
  // whole call first where the heads are few (kernels/prefill.hpp).
  for (int threads : {1, 2}) {
    Context context(threads);
    for_each_target([&](const std::string&) {
      problem.poison_outputs();
      attend(problem.params(), context);
      const testing::Comparison result = testing::compare(problem, reference);
      EXPECT_TRUE(result.finite) << result.describe() << ", " << threads << " threads";
      EXPECT_TRUE(result.empty_rows_exact) << result.describe();
      EXPECT_LE(result.relative_l2, testing::tolerance_for(spec.storage)) << result.describe();
      EXPECT_LE(result.max_lse_error, spec.storage == DType::kF32 ? testing::kLseTolerance : 0.05)
          << result.describe();
    });
  }
}

INSTANTIATE_TEST_SUITE_P(Sweep, PrefillSweep, ::testing::ValuesIn(sweep()),
                         [](const ::testing::TestParamInfo<ProblemSpec>& info) {
                           const ProblemSpec& s = info.param;
                           return "case" + std::to_string(info.index) + "_q" +
                                  std::to_string(s.seqlen_q) + "_k" + std::to_string(s.seqlen_k) +
                                  "_d" + std::to_string(s.head_dim);
                         });

TEST(Prefill, HalfStorageWithinHalfTolerance) {
  for (DType storage : {DType::kBF16, DType::kF16}) {
    ProblemSpec spec;
    spec.seqlen_q = spec.seqlen_k = 150;
    spec.head_dim = 64;
    spec.heads = 4;
    spec.kv_heads = 2;
    spec.storage = storage;
    testing::Problem problem = testing::make_problem(spec, 99);
    Context context(2);
    attend(problem.params(), context);
    const testing::Comparison result = testing::check_against_reference(problem);
    EXPECT_TRUE(result.finite);
    EXPECT_LE(result.relative_l2, testing::kHalfTolerance) << dtype_name(storage);
    // bf16 rounding is visible: the result must not be bit-equal to f32.
    EXPECT_GT(result.relative_l2, 0.0);
  }
}

TEST(Prefill, BitwiseIdenticalForAnyThreadCount) {
  // f32 (head_dim 80) and bf16 (head_dim 96: the AMX or bf16-dot pair
  // layouts), on every kernel path.
  for (DType storage : {DType::kF32, DType::kBF16}) {
    ProblemSpec spec;
    spec.seqlen_q = spec.seqlen_k = 300;
    spec.head_dim = storage == DType::kF32 ? 80 : 96;
    spec.heads = 8;
    spec.kv_heads = 2;
    spec.batch = 2;
    spec.mask.window_left = 100;
    spec.storage = storage;
    testing::Problem problem = testing::make_problem(spec, 7);
    for_each_target([&](const std::string&) {
      std::vector<float> first_out, first_lse;
      for (int threads : {1, 2, 3}) {
        Context context(threads);
        problem.poison_outputs();
        attend(problem.params(), context);
        if (threads == 1) {
          first_out = problem.out;
          first_lse = problem.lse;
          continue;
        }
        EXPECT_EQ(std::memcmp(first_out.data(), problem.out.data(), first_out.size() * 4), 0)
            << threads << " threads, " << dtype_name(storage);
        EXPECT_EQ(std::memcmp(first_lse.data(), problem.lse.data(), first_lse.size() * 4), 0)
            << threads << " threads, " << dtype_name(storage);
      }
    });
  }
}

TEST(Prefill, NonFiniteHiddenKeysDoNotReachVisibleOutputs) {
  // NaN and Inf in keys/values that the mask hides (the future, and keys left
  // of a window) must be skipped, not multiplied by zero.
  ProblemSpec spec;
  spec.seqlen_q = spec.seqlen_k = 100;
  spec.head_dim = 32;
  spec.mask.window_left = 10;
  const testing::Problem clean_problem = testing::make_problem(spec, 5);
  testing::Problem problem = clean_problem;
  Context context(2);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Key 70 is hidden from rows < 70 (future) and rows > 80 (window).
  for (std::int64_t e = 0; e < spec.head_dim; ++e) {
    problem.k[static_cast<std::size_t>(problem.kv_offset(0, 70, 0) + e)] = nan;
    problem.v[static_cast<std::size_t>(problem.kv_offset(0, 70, 0) + e)] =
        std::numeric_limits<float>::infinity();
  }
  for_each_target([&](const std::string&) {
    testing::Problem clean_run = clean_problem;
    attend(clean_run.params(), context);
    const std::vector<float>& clean = clean_run.out;
    attend(problem.params(), context);
    for (std::int64_t row = 0; row < 100; ++row) {
      const bool sees_70 = row >= 70 && row <= 80;
      for (std::int64_t e = 0; e < spec.head_dim; ++e) {
        const auto index = static_cast<std::size_t>(row * spec.head_dim + e);
        if (sees_70) {
          EXPECT_TRUE(std::isnan(problem.out[index]));
        } else {
          ASSERT_EQ(problem.out[index], clean[index]) << "row " << row;
        }
      }
    }
  });
}

// An output of 4 MiB or more is written with streaming stores, in vectors
// aligned to the output: it must match the reference, and an output buffer
// that starts at any 4-byte offset (as a slice of a larger array would)
// must receive exactly the values an aligned one does.
TEST(Prefill, LargeAndMisalignedOutputs) {
  ProblemSpec spec;
  spec.seqlen_q = spec.seqlen_k = 263;
  spec.head_dim = 125;  // rows that end mid-vector
  spec.heads = 32;
  spec.kv_heads = 4;
  testing::Problem problem = testing::make_problem(spec, 21);
  ASSERT_GE(problem.out.size() * sizeof(float), std::size_t{4} << 20);
  const ReferenceResult reference = reference_attention(problem.params());
  Context context(2);
  for_each_target([&](const std::string&) {
    problem.poison_outputs();
    attend(problem.params(), context);
    const testing::Comparison result = testing::compare(problem, reference);
    EXPECT_TRUE(result.finite) << result.describe();
    EXPECT_LE(result.relative_l2, testing::tolerance_for(spec.storage)) << result.describe();
    const std::vector<float> aligned = problem.out;
    for (std::size_t shift : {1u, 3u, 4u, 15u}) {
      std::vector<float> buffer(aligned.size() + 16, -7.0f);
      AttentionParams params = problem.params();
      params.out = make_mutable_view(buffer.data() + shift, DType::kF32,
                                     {1, spec.seqlen_q, spec.heads, spec.head_dim}, "out");
      attend(params, context);
      EXPECT_EQ(std::memcmp(buffer.data() + shift, aligned.data(), aligned.size() * 4), 0)
          << "shift " << shift;
      for (std::size_t i = 0; i < shift; ++i) EXPECT_EQ(buffer[i], -7.0f) << "before, shift " << shift;
      for (std::size_t i = shift + aligned.size(); i < buffer.size(); ++i) {
        EXPECT_EQ(buffer[i], -7.0f) << "after, shift " << shift;
      }
    }
  });
}

TEST(Prefill, EmptyRowsAndEmptyKeys) {
  // seqlen_k = 0: every row is empty.
  ProblemSpec spec;
  spec.seqlen_q = 5;
  spec.seqlen_k = 0;
  testing::Problem problem = testing::make_problem(spec, 1);
  Context context(1);
  problem.poison_outputs();
  attend(problem.params(), context);
  for (float value : problem.out) EXPECT_EQ(value, 0.0f);
  for (float value : problem.lse) EXPECT_TRUE(std::isinf(value) && value < 0);
}

TEST(Prefill, LargeMagnitudesDoNotOverflow) {
  ProblemSpec spec;
  spec.seqlen_q = spec.seqlen_k = 64;
  spec.head_dim = 16;
  spec.magnitude = 100.0f;  // scores up to ~1e4 * sqrt(d)
  testing::Problem problem = testing::make_problem(spec, 11);
  Context context(1);
  attend(problem.params(), context);
  const testing::Comparison result = testing::check_against_reference(problem);
  EXPECT_TRUE(result.finite);
  EXPECT_LE(result.relative_l2, testing::kF32Tolerance) << result.describe();
}

// Long f32 and bf16 rows whose scores step up tile after tile (by 3, below
// the one-pass softmax step's margin of 8 ln 2, and by 6, above it), or stay
// flat: the one-pass step must hold probabilities above 1 in the first case
// and fall back and rescale in the second. Scores are exact (q = e0, k_j[0]
// small integers), so the only rounding is P's. A visible NaN key must still
// poison exactly the rows that see it; with flat scores every full step
// after a row's first takes the one-pass step where a path has one (AVX-512),
// and that step must find the NaN as the two passes do.
TEST(Prefill, RowsWhoseMaxStepsUpAndVisibleNaN) {
  for (const DType storage : {DType::kF32, DType::kBF16}) {
    for (const float step : {0.0f, 3.0f, 6.0f}) {
      SCOPED_TRACE(std::string(dtype_name(storage)) + ", step " + std::to_string(step));
      ProblemSpec spec;
      spec.seqlen_q = spec.seqlen_k = 700;
      spec.head_dim = 64;
      spec.heads = 2;
      spec.scale = 1.0f;
      spec.storage = storage;
      testing::Problem problem = testing::make_problem(spec, 21);
      for (std::int64_t j = 0; j < spec.seqlen_q; ++j) {
        for (std::int64_t h = 0; h < spec.heads; ++h) {
          float* q = problem.q.data() + problem.q_offset(0, j, h);
          for (std::int64_t e = 0; e < spec.head_dim; ++e) q[e] = e == 0 ? 1.0f : 0.0f;
        }
        float* k = problem.k.data() + problem.kv_offset(0, j, 0);
        k[0] = step * static_cast<float>(j / 64) + static_cast<float>(j % 5);
      }
      const ReferenceResult reference = reference_attention(problem.params());
      Context context(2);
      for_each_target([&](const std::string&) {
        problem.poison_outputs();
        attend(problem.params(), context);
        const testing::Comparison result = testing::compare(problem, reference);
        EXPECT_TRUE(result.finite) << result.describe();
        EXPECT_LE(result.relative_l2, testing::tolerance_for(storage)) << result.describe();
        EXPECT_LE(result.max_lse_error, 1e-3) << result.describe();
      });

      constexpr std::int64_t kPoisoned = 400;
      problem.k[static_cast<std::size_t>(problem.kv_offset(0, kPoisoned, 0) + 3)] =
          std::numeric_limits<float>::quiet_NaN();
      for_each_target([&](const std::string&) {
        problem.poison_outputs();
        attend(problem.params(), context);
        for (std::int64_t row = 0; row < spec.seqlen_q; ++row) {
          for (std::int64_t head = 0; head < spec.heads; ++head) {
            const auto first = static_cast<std::size_t>((row * spec.heads + head) * spec.head_dim);
            const float out = problem.out[first];
            const float lse = problem.lse[static_cast<std::size_t>(head * spec.seqlen_q + row)];
            if (row < kPoisoned) {
              ASSERT_TRUE(std::isfinite(out) && std::isfinite(lse)) << "row " << row;
            } else {
              ASSERT_TRUE(std::isnan(out) && std::isnan(lse)) << "row " << row;
            }
          }
        }
      });
    }
  }
}

float round_to_storage_reference(float value, DType storage) {
  return storage == DType::kBF16 ? bf16_to_f32(f32_to_bf16(value)) : f16_to_f32(f32_to_f16(value));
}

// Rounding to bf16 and f16 storage is exact on every path and input dtype:
// with one key, the output is V's row as stored, so it must equal
// round_to_storage of each value bit for bit (NaN apart, which stays NaN,
// and -0, which the accumulation turns into +0):
// ties both ways, the largest finite values and overflow to infinity,
// subnormals, signed zeros.
TEST(Prefill, StorageRoundingIsExactOnEveryTarget) {
  constexpr std::int64_t kDim = 48;
  const float tie = std::ldexp(1.0f, -8), f16_tie = std::ldexp(1.0f, -11);
  const std::vector<float> values = {
      1.0f + tie,  1.0f + 3 * tie,  -1.0f - tie,  -1.0f - 3 * tie,
      1.0f + f16_tie, 1.0f + 3 * f16_tie,
      65504.0f,    65519.0f,        65520.0f,     -65520.0f,       3.3895314e38f,  -3.4028235e38f,
      std::ldexp(1.0f, -25), std::ldexp(3.0f, -25), std::ldexp(1.0f, -24), std::ldexp(1.0f, -14),
      std::ldexp(1.0f, -126), std::ldexp(1.0f, -149), 0.0f, -0.0f,
      std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
      std::numeric_limits<float>::quiet_NaN(), 0.1f, -0.7f, 3.14159f, 1e-3f, 1e5f};
  std::vector<float> v(kDim, 0.25f), k(kDim, 0.5f), q(kDim, 0.125f), out(kDim);
  std::copy(values.begin(), values.end(), v.begin());
  for (DType storage : {DType::kBF16, DType::kF16}) {
    for (DType input : {DType::kF32, DType::kBF16, DType::kF16}) {
      // Inputs in a narrower dtype hold the values as that dtype rounds them.
      std::vector<std::uint16_t> v16(kDim), k16(kDim), q16(kDim);
      for (std::int64_t e = 0; e < kDim; ++e) {
        const auto i = static_cast<std::size_t>(e);
        v16[i] = input == DType::kBF16 ? f32_to_bf16(v[i]) : f32_to_f16(v[i]);
        k16[i] = input == DType::kBF16 ? f32_to_bf16(k[i]) : f32_to_f16(k[i]);
        q16[i] = input == DType::kBF16 ? f32_to_bf16(q[i]) : f32_to_f16(q[i]);
      }
      const bool narrow = input != DType::kF32;
      AttentionParams params;
      auto data = [&](std::vector<std::uint16_t>& narrow_row, std::vector<float>& row) {
        return narrow ? static_cast<const void*>(narrow_row.data()) : row.data();
      };
      params.q = make_view(data(q16, q), input, {1, 1, 1, kDim});
      params.k = make_view(data(k16, k), input, {1, 1, 1, kDim});
      params.v = make_view(data(v16, v), input, {1, 1, 1, kDim});
      params.out = make_mutable_view(out.data(), DType::kF32, {1, 1, 1, kDim});
      params.storage = storage;
      for (const std::string& target : simd_targets()) {
        force_simd_target(target);
        SCOPED_TRACE("storage " + std::string(dtype_name(storage)) + ", input " +
                     std::string(dtype_name(input)) + ", simd target " + target);
        Context context(1);
        attend(params, context);
        if (!narrow) {
          // The decode kernel on a cache that stores the row (in the cache's
          // own append path) must read it back as the same values.
          std::vector<float> decoded(kDim);
          KvCache cache({.kv_heads = 1, .head_dim = kDim, .storage = storage}, 1);
          cache.append(make_view(k.data(), DType::kF32, {1, 1, kDim}),
                       make_view(v.data(), DType::kF32, {1, 1, kDim}));
          cache.attend({.q = make_view(q.data(), DType::kF32, {1, 1, kDim}),
                        .out = make_mutable_view(decoded.data(), DType::kF32, {1, 1, kDim})},
                       DecodeOptions{}, context);
          for (std::int64_t e = 0; e < kDim; ++e) {
            const auto i = static_cast<std::size_t>(e);
            const float stored = round_to_storage_reference(v[i], storage);
            if (std::isnan(stored)) {
              EXPECT_TRUE(std::isnan(decoded[i])) << "decode, element " << e;
            } else {
              EXPECT_EQ(decoded[i], stored) << "decode, element " << e;
            }
          }
        }
        for (std::int64_t e = 0; e < kDim; ++e) {
          const auto i = static_cast<std::size_t>(e);
          const float given = !narrow                  ? v[i]
                              : input == DType::kBF16 ? bf16_to_f32(v16[i])
                                                      : f16_to_f32(v16[i]);
          const float expected = round_to_storage_reference(given, storage);
          if (std::isnan(expected)) {
            EXPECT_TRUE(std::isnan(out[i])) << "element " << e;
          } else if (expected == 0.0f) {
            EXPECT_EQ(out[i], 0.0f) << "element " << e;  // O = 0 + p v: -0 reads as +0
          } else {
            EXPECT_EQ(std::bit_cast<std::uint32_t>(out[i]), std::bit_cast<std::uint32_t>(expected))
                << "element " << e << ": " << given << " stored as " << out[i] << ", expected "
                << expected;
          }
        }
      }
      force_simd_target("");
    }
  }
}

TEST(Prefill, RejectsBadArguments) {
  ProblemSpec spec;
  spec.heads = 3;
  spec.kv_heads = 2;
  testing::Problem problem = testing::make_problem(spec, 1);
  Context context(1);
  try {
    attend(problem.params(), context);
    FAIL() << "heads 3 with kv_heads 2 was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("kv_heads 2 does not divide heads 3"), std::string::npos)
        << e.what();
  }
  spec.heads = spec.kv_heads = 1;
  spec.head_dim = 300;
  testing::Problem wide = testing::make_problem(spec, 1);
  EXPECT_THROW(attend(wide.params(), context), Error);
  EXPECT_THROW(force_simd_target("NOT_A_TARGET"), Error);
}

TEST(Prefill, ReportsSimdTargets) {
  const std::vector<std::string> targets = simd_targets();
  ASSERT_FALSE(targets.empty());
  EXPECT_EQ(simd_target_name(), targets.front());
}

}  // namespace
}  // namespace lookback
