// 8-bit K/V storage (int8, fp8 e4m3, fp8 e5m2) through every path. The
// quantization rule (docs/semantics.md, "8-bit K/V storage") is written here
// a second time, independently of src/core/quant.cc: fp8 by searching the
// table of every representable value (the library rounds by exponent
// arithmetic), int8 by floor-and-compare (the library by nearbyint). The
// float64 reference then runs on the dequantized K and V, and every path must
// match it within kQuantTolerance; NaN never passes.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "core/quant.hpp"
#include "lookback/attention.hpp"
#include "lookback/checkpoint.hpp"
#include "lookback/kv_cache.hpp"
#include "lookback/modes.hpp"
#include "testing/testing.hpp"

namespace lookback {
namespace {

using testing::kQuantTolerance;  // against the reference on the dequantized K and V

const DType kQuantized[] = {DType::kI8, DType::kFP8E4M3, DType::kFP8E5M2};

// ---- The independent rule ----

struct Fp8Table {
  std::vector<double> values;  // every non-negative finite value, ascending; index = code
};

Fp8Table fp8_table(DType dtype) {
  const int exponent_bits = dtype == DType::kFP8E4M3 ? 4 : 5;
  const int mantissa_bits = 7 - exponent_bits;
  const int bias = (1 << (exponent_bits - 1)) - 1;
  Fp8Table table;
  for (int code = 0; code < 128; ++code) {
    const int field = code >> mantissa_bits, mantissa = code & ((1 << mantissa_bits) - 1);
    if (dtype == DType::kFP8E4M3 && code == 0x7F) break;                 // NaN
    if (dtype == DType::kFP8E5M2 && field == (1 << exponent_bits) - 1) break;  // Inf, NaN
    const double fraction = mantissa / static_cast<double>(1 << mantissa_bits);
    table.values.push_back(field == 0 ? fraction * std::pow(2.0, 1 - bias)
                                      : (1.0 + fraction) * std::pow(2.0, field - bias));
  }
  return table;
}

double reference_range(DType dtype) {
  return dtype == DType::kI8 ? 127.0 : dtype == DType::kFP8E4M3 ? 448.0 : 57344.0;
}

// decode(code(x)) for x already divided by the scale.
double reference_round(float x, DType dtype, const Fp8Table& table) {
  if (dtype == DType::kI8) {
    const double lower = std::floor(static_cast<double>(x));
    const double fraction = x - lower;
    double rounded = fraction > 0.5 ? lower + 1 : fraction < 0.5 ? lower
                     : (std::fmod(lower, 2.0) == 0.0 ? lower : lower + 1);
    return std::fmin(127.0, std::fmax(-127.0, rounded));
  }
  const double magnitude = std::fabs(static_cast<double>(x));
  std::size_t best = 0;
  for (std::size_t c = 1; c < table.values.size(); ++c) {
    const double here = std::fabs(table.values[c] - magnitude);
    const double there = std::fabs(table.values[best] - magnitude);
    // Nearest; on a tie the even code (its last mantissa bit 0).
    if (here < there || (here == there && c % 2 == 0)) best = c;
  }
  return std::copysign(table.values[best], static_cast<double>(x));
}

// A row as the kernels must see it: decode(code) * scale, in f32.
void reference_quantize_row(float* row, std::int64_t count, DType dtype) {
  const Fp8Table table = dtype == DType::kI8 ? Fp8Table{} : fp8_table(dtype);
  float max_abs = 0.0f;
  for (std::int64_t e = 0; e < count; ++e) max_abs = std::fmax(max_abs, std::fabs(row[e]));
  const float scale = max_abs / static_cast<float>(reference_range(dtype));
  for (std::int64_t e = 0; e < count; ++e) {
    row[e] = scale == 0.0f ? 0.0f
                           : static_cast<float>(reference_round(row[e] / scale, dtype, table)) * scale;
  }
}

// The problem with every K and V row replaced by its dequantized value.
testing::Problem dequantized(const testing::Problem& problem, DType dtype) {
  testing::Problem copy = problem;
  const testing::ProblemSpec& spec = problem.spec;
  for (std::int64_t b = 0; b < spec.batch; ++b) {
    for (std::int64_t j = 0; j < spec.seqlen_k; ++j) {
      for (std::int64_t h = 0; h < spec.kv_heads; ++h) {
        const auto offset = static_cast<std::size_t>(problem.kv_offset(b, j, h));
        reference_quantize_row(copy.k.data() + offset, spec.head_dim, dtype);
        reference_quantize_row(copy.v.data() + offset, spec.head_dim, dtype);
      }
    }
  }
  copy.spec.storage = DType::kF32;
  return copy;
}

// ---- The scalar rule: the library's codes against the independent one ----

TEST(QuantRule, CodesMatchTheIndependentRule) {
  std::mt19937_64 rng(5);
  for (DType dtype : kQuantized) {
    SCOPED_TRACE(std::string(dtype_name(dtype)));
    const Fp8Table table = dtype == DType::kI8 ? Fp8Table{} : fp8_table(dtype);
    const double range = reference_range(dtype);
    std::vector<float> values;
    // Every representable value, the midpoints between neighbours (ties),
    // and values just either side of them.
    if (dtype == DType::kI8) {
      for (int c = -127; c <= 127; ++c) {
        values.push_back(static_cast<float>(c));
        values.push_back(c + 0.5f);
        values.push_back(std::nextafter(c + 0.5f, 1e9f));
        values.push_back(std::nextafter(c + 0.5f, -1e9f));
      }
    } else {
      for (std::size_t c = 0; c < table.values.size(); ++c) {
        const auto value = static_cast<float>(table.values[c]);
        values.push_back(value);
        values.push_back(-value);
        if (c + 1 < table.values.size()) {
          const auto middle = static_cast<float>((table.values[c] + table.values[c + 1]) / 2);
          values.push_back(middle);
          values.push_back(-middle);
          values.push_back(std::nextafter(middle, 1e9f));
          values.push_back(std::nextafter(middle, -1e9f));
        }
      }
    }
    std::uniform_real_distribution<float> uniform(static_cast<float>(-range * 1.1),
                                                  static_cast<float>(range * 1.1));
    for (int i = 0; i < 20000; ++i) values.push_back(uniform(rng));
    for (int i = 0; i < 2000; ++i) values.push_back(uniform(rng) * 1e-5f);
    values.push_back(static_cast<float>(range) * 1.5f);   // saturates
    values.push_back(-static_cast<float>(range) * 1.5f);
    for (float x : values) {
      const double expected = reference_round(x, dtype, table);
      const float actual = decode_code(encode_code(x, dtype), dtype);
      ASSERT_EQ(static_cast<double>(actual), expected) << "x = " << x;
    }
  }
}

TEST(QuantRule, RowsMatchTheIndependentRuleAndZerosStayZero) {
  std::mt19937_64 rng(6);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (DType dtype : kQuantized) {
    for (std::int64_t dim : {1, 7, 59, 128, 256}) {
      std::vector<float> row(static_cast<std::size_t>(dim));
      for (float& x : row) x = normal(rng);
      std::vector<float> expected = row, actual = row;
      reference_quantize_row(expected.data(), dim, dtype);
      round_row_to_quantized(actual.data(), dim, dtype);
      EXPECT_EQ(actual, expected) << dtype_name(dtype) << " dim " << dim;
      std::vector<std::uint8_t> codes(static_cast<std::size_t>(dim));
      const float scale = quantize_row(row.data(), dim, dtype, codes.data());
      for (std::int64_t e = 0; e < dim; ++e) {
        ASSERT_EQ(decode_code(codes[static_cast<std::size_t>(e)], dtype) * scale,
                  expected[static_cast<std::size_t>(e)]);
      }
    }
    std::vector<float> zeros(40, 0.0f);
    std::vector<std::uint8_t> codes(40, 0xAB);
    EXPECT_EQ(quantize_row(zeros.data(), 40, dtype, codes.data()), 0.0f);
    for (std::uint8_t c : codes) EXPECT_EQ(decode_code(c, dtype), 0.0f);
  }
}

// Every code as the kernels read it: V rows made of representable values
// with the range at element 0 (so the scale is exactly 1) decode to
// themselves, subnormal fp8 codes and both signs included, through the
// decode kernel (a cache of one token: the output is its V row) and the
// prefill kernels, on every SIMD target.
TEST(QuantRule, KernelsDecodeEveryCode) {
  constexpr std::int64_t kDim = 32;
  for (DType dtype : kQuantized) {
    SCOPED_TRACE(std::string(dtype_name(dtype)));
    std::vector<float> values;
    if (dtype == DType::kI8) {
      for (int c = -127; c <= 127; ++c) values.push_back(static_cast<float>(c));
    } else {
      for (double magnitude : fp8_table(dtype).values) {
        values.push_back(static_cast<float>(magnitude));
        if (magnitude != 0.0) values.push_back(-static_cast<float>(magnitude));
      }
    }
    const auto range = static_cast<float>(reference_range(dtype));
    for (const std::string& target : simd_targets()) {
      force_simd_target(target);
      SCOPED_TRACE("simd target " + target);
      Context context(1);
      for (std::size_t first = 0; first < values.size(); first += kDim - 1) {
        std::vector<float> v(kDim, 0.0f), k(kDim, 0.5f), q(kDim, 0.25f), out(kDim, -1.0f);
        v[0] = range;
        for (std::size_t e = 1; e < kDim && first + e - 1 < values.size(); ++e) {
          v[e] = values[first + e - 1];
        }
        KvCache cache({.kv_heads = 1, .head_dim = kDim, .storage = dtype}, 1);
        cache.append(make_view(k.data(), DType::kF32, {1, 1, kDim}),
                     make_view(v.data(), DType::kF32, {1, 1, kDim}));
        cache.attend({.q = make_view(q.data(), DType::kF32, {1, 1, kDim}),
                      .out = make_mutable_view(out.data(), DType::kF32, {1, 1, kDim})},
                     DecodeOptions{}, context);
        for (std::int64_t e = 0; e < kDim; ++e) {
          ASSERT_FLOAT_EQ(out[static_cast<std::size_t>(e)], v[static_cast<std::size_t>(e)])
              << "decode, element " << e;
        }
        AttentionParams params;
        params.q = make_view(q.data(), DType::kF32, {1, 1, 1, kDim});
        params.k = make_view(k.data(), DType::kF32, {1, 1, 1, kDim});
        params.v = make_view(v.data(), DType::kF32, {1, 1, 1, kDim});
        params.out = make_mutable_view(out.data(), DType::kF32, {1, 1, 1, kDim});
        params.storage = dtype;
        std::fill(out.begin(), out.end(), -1.0f);
        attend(params, context);
        for (std::int64_t e = 0; e < kDim; ++e) {
          ASSERT_FLOAT_EQ(out[static_cast<std::size_t>(e)], v[static_cast<std::size_t>(e)])
              << "prefill, element " << e;
        }
      }
    }
    force_simd_target("");
  }
}

// ---- Every path against the reference on the dequantized K and V ----

struct QuantCase {
  testing::ProblemSpec spec;
  ModeOptions options;
};

void PrintTo(const QuantCase& c, std::ostream* os) {
  *os << mode_name(c.options.mode) << " " << c.spec.describe();
}

std::vector<QuantCase> quant_cases() {
  const testing::ProblemShape shapes[] = {{1, 1, 8, 1, 1}, {7, 7, 40, 2, 1}, {113, 203, 59, 4, 2},
                                          {1, 239, 96, 8, 2}, {33, 130, 111, 4, 4}};
  const std::optional<std::int64_t> windows[] = {std::nullopt, 0, 37};
  std::vector<QuantCase> all;
  int n = 0;
  for (DType dtype : kQuantized) {
    for (const testing::ProblemShape& s : shapes) {
      for (Mode mode : all_modes()) {
        QuantCase c;
        c.spec.storage = dtype;
        c.spec.set_shape(s);
        c.spec.mask.window_left = windows[n % 3];
        c.spec.softcap = n % 4 == 1 ? 4.0f : 0.0f;
        c.spec.alibi = n % 5 == 2;
        c.spec.batch = n % 4 == 3 ? 2 : 1;
        c.spec.strided = n % 2 == 1;
        c.spec.magnitude = n % 3 == 2 ? 30.0f : 1.0f;
        c.options.mode = mode;
        c.options.chunk = n % 2 == 0 ? 1 : 5;
        c.options.block_size = n % 3 == 0 ? 16 : 7;
        c.options.splits = 3;
        all.push_back(c);
        ++n;
      }
    }
  }
  return all;
}

class QuantSweep : public ::testing::TestWithParam<QuantCase> {};

TEST_P(QuantSweep, MatchesTheReferenceOnDequantizedKvOnEveryTarget) {
  const QuantCase& c = GetParam();
  testing::Problem problem = testing::make_problem(c.spec, 91 + c.spec.seqlen_k);
  testing::Problem exact = dequantized(problem, c.spec.storage);
  const ReferenceResult reference = reference_attention(exact.params());
  Context context(2);
  for (const std::string& target : simd_targets()) {
    force_simd_target(target);
    SCOPED_TRACE("simd target " + target);
    problem.poison_outputs();
    attend_with_mode(problem.params(), c.options, context);
    const testing::Comparison result = testing::compare(problem, reference);
    EXPECT_TRUE(result.finite) << result.describe();
    EXPECT_TRUE(result.empty_rows_exact) << result.describe();
    EXPECT_LE(result.relative_l2, kQuantTolerance) << result.describe();
    EXPECT_LE(result.max_lse_error, testing::kLseTolerance * c.spec.magnitude * c.spec.magnitude)
        << result.describe();
  }
  force_simd_target("");
}

INSTANTIATE_TEST_SUITE_P(Quant, QuantSweep, ::testing::ValuesIn(quant_cases()),
                         [](const ::testing::TestParamInfo<QuantCase>& info) {
                           return std::string(dtype_name(info.param.spec.storage)) + "_" +
                                  std::string(mode_name(info.param.options.mode)) + "_" +
                                  std::to_string(info.index);
                         });

// The measured cost of 8 bits against unquantized K/V on N(0, 1) inputs
// (docs/semantics.md states these figures): the bound is loose, the printed
// value is the figure.
TEST(QuantError, AgainstUnquantizedReference) {
  testing::ProblemSpec spec;
  spec.seqlen_q = 256;
  spec.seqlen_k = 256;
  spec.heads = 4;
  spec.kv_heads = 2;
  spec.head_dim = 128;
  testing::Problem problem = testing::make_problem(spec, 2024);
  const ReferenceResult reference = reference_attention(problem.params());
  Context context(2);
  const double bounds[] = {3e-2, 8e-2, 0.2};
  for (int i = 0; i < 3; ++i) {
    problem.spec.storage = kQuantized[i];
    attend(problem.params(), context);
    const testing::Comparison result = testing::compare(problem, reference);
    std::printf("%s: relative L2 %.3g against unquantized K/V (N(0,1), 256 x 256, head_dim 128)\n",
                std::string(dtype_name(kQuantized[i])).c_str(), result.relative_l2);
    EXPECT_TRUE(result.finite);
    EXPECT_LE(result.relative_l2, bounds[i]) << dtype_name(kQuantized[i]);
    EXPECT_GT(result.relative_l2, 1e-4) << "8-bit storage that changes nothing is not quantizing";
  }
}

// ---- Causality and determinism ----

TEST(QuantProperties, FutureInputsNeverChangeEarlierOutputs) {
  for (DType dtype : kQuantized) {
    for (Mode mode : all_modes()) {
      testing::ProblemSpec spec;
      spec.storage = dtype;
      spec.seqlen_q = 37;
      spec.seqlen_k = 37;
      spec.heads = 4;
      spec.kv_heads = 2;
      spec.head_dim = 24;
      testing::Problem before = testing::make_problem(spec, 3);
      Context context(2);
      const ModeOptions options{.mode = mode, .chunk = 4, .block_size = 5, .splits = 3};
      attend_with_mode(before.params(), options, context);
      for (std::int64_t position : {0, 11, 30}) {
        testing::Problem after = before;
        testing::perturb_future(after, position, 100 + position);
        attend_with_mode(after.params(), options, context);
        EXPECT_TRUE(testing::prefix_unchanged(before, after, position))
            << dtype_name(dtype) << " " << mode_name(mode) << " position " << position;
      }
    }
  }
}

TEST(QuantProperties, BitIdenticalForAnyThreadCount) {
  for (DType dtype : kQuantized) {
    for (Mode mode : all_modes()) {
      testing::ProblemSpec spec;
      spec.storage = dtype;
      spec.seqlen_q = 70;
      spec.seqlen_k = 1500;
      spec.heads = 4;
      spec.kv_heads = 1;
      spec.head_dim = 72;
      testing::Problem one = testing::make_problem(spec, 8);
      testing::Problem three = one;
      Context single(1), several(3);
      const ModeOptions options{.mode = mode, .chunk = 16, .block_size = 32, .splits = 3};
      attend_with_mode(one.params(), options, single);
      attend_with_mode(three.params(), options, several);
      EXPECT_EQ(one.out, three.out) << dtype_name(dtype) << " " << mode_name(mode);
      EXPECT_EQ(one.lse, three.lse) << dtype_name(dtype) << " " << mode_name(mode);
    }
  }
}

// A cache's 8-bit footprint: codes plus one f32 scale per row.
TEST(QuantCache, PagedEqualsContiguousAndZeroRowsDecodeToZero) {
  for (DType dtype : kQuantized) {
    const CacheConfig config{.kv_heads = 2, .head_dim = 20, .storage = dtype};
    KvCache cache(config, 64);
    PagedKvPool pool(config, 3, 40);
    pool.shuffle_blocks(9);
    const SequenceId id = pool.create();
    std::mt19937_64 rng(1);
    std::normal_distribution<float> normal;
    std::vector<float> k(static_cast<std::size_t>(50 * 2 * 20)), v(k.size());
    for (float& x : k) x = normal(rng);
    for (float& x : v) x = normal(rng);
    // A row of zeros (token 4, kv head 1) has scale 0.
    for (int e = 0; e < 20; ++e) k[static_cast<std::size_t>((4 * 2 + 1) * 20 + e)] = 0.0f;
    const TensorView kv_k = make_view(k.data(), DType::kF32, {50, 2, 20});
    const TensorView kv_v = make_view(v.data(), DType::kF32, {50, 2, 20});
    cache.append(kv_k, kv_v);
    pool.append(id, slice(kv_k, 0, 0, 20), slice(kv_v, 0, 0, 20));
    pool.append(id, slice(kv_k, 0, 20, 30), slice(kv_v, 0, 20, 30));
    std::vector<float> q(static_cast<std::size_t>(4 * 20));
    for (float& x : q) x = normal(rng);
    std::vector<float> out_cache(q.size()), out_pool(q.size());
    Context context(1);
    const DecodeOptions options{.splits = 1};
    cache.attend({.q = make_view(q.data(), DType::kF32, {1, 4, 20}),
                  .out = make_mutable_view(out_cache.data(), DType::kF32, {1, 4, 20})},
                 options, context);
    pool.attend(id, {.q = make_view(q.data(), DType::kF32, {1, 4, 20}),
                     .out = make_mutable_view(out_pool.data(), DType::kF32, {1, 4, 20})},
                options, context);
    EXPECT_EQ(out_cache, out_pool) << dtype_name(dtype);
    for (float x : out_cache) EXPECT_TRUE(std::isfinite(x));
  }
}

// Checkpoints keep the codes and their scales: a loaded cache or pool
// attends bit for bit like the one saved, and its file size counts one f32
// scale per row.
TEST(QuantCache, CheckpointsRoundTripCodesAndScales) {
  testing::TempDir dir;
  for (DType dtype : kQuantized) {
    SCOPED_TRACE(std::string(dtype_name(dtype)));
    const CacheConfig config{.kv_heads = 2, .head_dim = 19, .storage = dtype};
    std::mt19937_64 rng(4);
    std::normal_distribution<float> normal(0.0f, 2.0f);
    std::vector<float> k(static_cast<std::size_t>(23 * 2 * 19)), v(k.size()), q(4 * 19);
    for (float& x : k) x = normal(rng);
    for (float& x : v) x = normal(rng);
    for (float& x : q) x = normal(rng);
    const TensorView kk = make_view(k.data(), DType::kF32, {23, 2, 19});
    const TensorView vv = make_view(v.data(), DType::kF32, {23, 2, 19});
    KvCache cache(config, 40);
    cache.append(kk, vv);
    PagedKvPool pool(config, 4, 12);
    pool.shuffle_blocks(2);
    const SequenceId id = pool.create();
    pool.append(id, kk, vv);
    const std::string cache_path = (dir.path() / "cache.lbkv").string();
    const std::string pool_path = (dir.path() / "pool.lbkv").string();
    save_checkpoint(cache, cache_path);
    save_checkpoint(pool, pool_path);
    const CheckpointInfo info = inspect_checkpoint(cache_path);
    ASSERT_TRUE(info.config.has_value());
    EXPECT_EQ(info.config->storage, dtype);
    KvCache loaded = load_kv_cache(cache_path);
    PagedKvPool loaded_pool = load_paged_pool(pool_path);
    Context context(1);
    auto attend_cache = [&](const KvCache& c) {
      std::vector<float> out(q.size());
      c.attend({.q = make_view(q.data(), DType::kF32, {1, 4, 19}),
                .out = make_mutable_view(out.data(), DType::kF32, {1, 4, 19})},
               {}, context);
      return out;
    };
    auto attend_pool = [&](const PagedKvPool& p) {
      std::vector<float> out(q.size());
      p.attend(id, {.q = make_view(q.data(), DType::kF32, {1, 4, 19}),
                    .out = make_mutable_view(out.data(), DType::kF32, {1, 4, 19})},
               {}, context);
      return out;
    };
    EXPECT_EQ(attend_cache(cache), attend_cache(loaded));
    EXPECT_EQ(attend_pool(pool), attend_pool(loaded_pool));
    EXPECT_EQ(loaded.config().storage, dtype);
  }
}

}  // namespace
}  // namespace lookback
