// The leak check through its public header (include/lookback/leakcheck.hpp),
// as the CLI and future bindings call it: the experiment on a known leak, the
// black-box runner on a shell command, and the built-in plan.
#include "lookback/leakcheck.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <string_view>

#include "lookback/error.hpp"
#include "lookback/shape.hpp"

namespace lookback::diagnostics {
namespace {

constexpr LeakShape kShape{.batch = 1, .seqlen = 7, .heads = 2, .kv_heads = 1, .head_dim = 4};

// O row i = V row min(i + 1, n - 1): reads one position into the future.
NpyArray next_value(const LeakInputs& inputs, const RunInfo&) {
  const LeakShape& s = inputs.shape;
  NpyArray out;
  out.dtype = DType::kF32;
  out.shape = {s.batch, s.seqlen, s.heads, s.head_dim};
  std::vector<float> values(inputs.q.size());  // (batch, seqlen, heads, head_dim)
  for (std::int64_t i = 0; i < s.seqlen; ++i) {
    const std::int64_t source = std::min(i + 1, s.seqlen - 1);
    for (std::int64_t h = 0; h < s.heads; ++h) {
      std::copy_n(inputs.v.begin() + (source * s.kv_heads + h / (s.heads / s.kv_heads)) * s.head_dim,
                  s.head_dim, values.begin() + (i * s.heads + h) * s.head_dim);
    }
  }
  out.data.resize(values.size() * sizeof(float));
  std::memcpy(out.data.data(), values.data(), out.data.size());
  return out;
}

TEST(LeakCheck, FindsAReadOfTheNextPosition) {
  const LeakReport report = check_leaks(next_value, {.shape = kShape, .mask = {}, .jobs = 2});
  EXPECT_EQ(report.runs, kShape.seqlen + 2);  // the base run, its repeat, one per position
  ASSERT_FALSE(report.result.causal());
  // Rows 0..n-2 read the next position; the last row reads itself.
  EXPECT_EQ(report.result.leaks.size(), static_cast<std::size_t>(kShape.seqlen - 1));
  EXPECT_EQ(report.result.leaks.front(), (Pair{0, 1}));
}

// O = V row by row, each run scaled by 1 + run * 1e-6: causal, but identical
// inputs give outputs that differ by about 1e-6 relative.
NpyArray noisy_own_value(const LeakInputs& inputs, const RunInfo& run) {
  const LeakShape& s = inputs.shape;
  NpyArray out;
  out.dtype = DType::kF64;
  out.shape = {s.batch, s.seqlen, s.heads, s.head_dim};
  std::vector<double> values(inputs.q.size());  // (batch, seqlen, heads, head_dim)
  const double noise = 1 + 1e-6 * static_cast<double>(run.run);
  for (std::int64_t i = 0; i < s.seqlen; ++i) {
    for (std::int64_t h = 0; h < s.heads; ++h) {
      for (std::int64_t d = 0; d < s.head_dim; ++d) {
        values[static_cast<std::size_t>((i * s.heads + h) * s.head_dim + d)] =
            noise * inputs.v[static_cast<std::size_t>(
                        (i * s.kv_heads + h / (s.heads / s.kv_heads)) * s.head_dim + d)];
      }
    }
  }
  out.data.resize(values.size() * sizeof(double));
  std::memcpy(out.data.data(), values.data(), out.data.size());
  return out;
}

// Runs `body`, expecting a lookback::Error whose message holds each of `parts`.
template <typename Body>
void expect_error(Body body, std::initializer_list<std::string_view> parts) {
  try {
    body();
    ADD_FAILURE() << "expected lookback::Error";
  } catch (const Error& e) {
    for (std::string_view part : parts) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  }
}

TEST(LeakCheck, NondeterminismIsReportedNotCountedAsLeaks) {
  expect_error([] { check_leaks(noisy_own_value, {.shape = kShape, .mask = {}, .jobs = 2}); },
               {"nondeterministic: identical inputs changed outputs by up to 1e-06"});
  // Below the tolerance, the noise is no change: each row depends on its own v only.
  const LeakReport report =
      check_leaks(noisy_own_value, {.shape = kShape, .mask = {}, .jobs = 2, .tolerance = 1e-4});
  EXPECT_TRUE(report.result.causal());
  EXPECT_EQ(report.result.missing.size(),
            static_cast<std::size_t>(kShape.seqlen * (kShape.seqlen - 1) / 2));
}

TEST(LeakCheck, NanOutputIsAFindingOfItsOwn) {
  const auto all_nan = [](const LeakInputs& inputs, const RunInfo& run) {
    NpyArray out = noisy_own_value(inputs, run);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    for (std::size_t at = 0; at < out.data.size(); at += sizeof nan) {
      std::memcpy(out.data.data() + at, &nan, sizeof nan);
    }
    return out;
  };
  expect_error([&] { check_leaks(all_nan, {.shape = kShape, .mask = {}, .jobs = 2}); },
               {"output of the base run: NaN in 14 of 14 output rows", "--allow-nan"});
  const LeakReport report =
      check_leaks(all_nan, {.shape = kShape, .mask = {}, .jobs = 2, .allow_nan = true});
  EXPECT_EQ(report.nan_rows, report.runs * kShape.seqlen * kShape.heads);
}

TEST(LeakCheck, CommandPastItsTimeoutIsKilledAndNamed) {
  const auto began = std::chrono::steady_clock::now();
  expect_error(
      [] {
        check_leaks(command_implementation("sleep 30 # {q} {k} {v} {out}",
                                           {.timeout_seconds = 0.2}),
                    {.shape = kShape, .mask = {}, .jobs = 2});
      },
      {"timeout of 0.2 s on the base run"});
  EXPECT_LT(std::chrono::steady_clock::now() - began, std::chrono::seconds(20));
}

TEST(LeakCheck, BuiltinRefusesAHeadDimNoPathTakes) {
  LeakShape shape = kShape;
  shape.head_dim = kMaxHeadDim + 1;
  expect_error([&] { run_builtin_checks({.shape = shape, .window = 3, .jobs = 1}); },
               {"head_dim 257"});
}

TEST(LeakCheck, CommandTemplateNeedsEveryPath) {
  EXPECT_NO_THROW(check_command_template("attn {q} {k} {v} {out}"));
  try {
    check_command_template("attn {q} {k} {v}");
    FAIL() << "expected lookback::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--exec"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("{out}"), std::string::npos) << e.what();
  }
}

TEST(LeakCheck, RunsAShellCommandAsTheImplementation) {
  // O = Q: row i depends on position i only, so it is causal, and the
  // earlier positions it may see are reported missing.
  const LeakReport report = check_leaks(command_implementation("cp {q} {out} && : {k} {v}"),
                                        {.shape = kShape, .mask = {}, .jobs = 2});
  EXPECT_TRUE(report.result.causal());
  EXPECT_EQ(report.result.missing.size(),
            static_cast<std::size_t>(kShape.seqlen * (kShape.seqlen - 1) / 2));
}

TEST(LeakCheck, BuiltinPlanChecksEveryPathDtypeAndWindow) {
  const std::vector<BuiltinCheck> plan = builtin_plan(3);
  // Four configurations per path: none, window, window + sink tokens, sink
  // logits; then the chunked ring cache with window and sink tokens.
  ASSERT_EQ(plan.size(), (all_modes().size() * 4 + 1) * 6);
  EXPECT_EQ(plan[0].storage, DType::kF32);
  EXPECT_EQ(plan[1].storage, DType::kBF16);
  EXPECT_EQ(plan[2].storage, DType::kF16);
  EXPECT_EQ(plan[3].storage, DType::kI8);
  EXPECT_EQ(plan[4].storage, DType::kFP8E4M3);
  EXPECT_EQ(plan[5].storage, DType::kFP8E5M2);
  EXPECT_FALSE(plan[0].window.has_value());
  EXPECT_EQ(plan[6].window, 3);
  EXPECT_EQ(plan[6].label, path_label(plan[6].mode) + ", window 3");
  EXPECT_EQ(plan[12].window, 3);
  EXPECT_EQ(plan[12].sink_tokens, kBuiltinSinkTokens);
  EXPECT_EQ(plan[12].label, path_label(plan[12].mode) + ", window 3, 2 sink tokens");
  EXPECT_FALSE(plan[18].window.has_value());
  EXPECT_TRUE(plan[18].sink_logits);
  EXPECT_EQ(plan[18].label, path_label(plan[18].mode) + ", sink logits");
  EXPECT_TRUE(plan.back().mode.ring);
  EXPECT_EQ(plan.back().label, "chunked (chunk 5), ring cache, window 3, 2 sink tokens");

  std::int64_t last_done = 0, last_total = 0;
  const std::vector<BuiltinCheck> checks =
      run_builtin_checks({.shape = kShape, .window = 3, .jobs = 2,
                          .progress = [&](std::int64_t done, std::int64_t total) {
                            last_done = done;
                            last_total = total;
                          }});
  ASSERT_EQ(checks.size(), plan.size());
  for (const BuiltinCheck& check : checks) {
    EXPECT_EQ(check.verdict, Verdict::kCausal)
        << check.label << " " << dtype_name(check.storage) << ": " << check.message;
  }
  EXPECT_EQ(last_total, static_cast<std::int64_t>(checks.size()) * (kShape.seqlen + 2));
  EXPECT_EQ(last_done, last_total);
}

// The built-in sink checks are only worth something if the sinks reach the
// path: with learned sink logits or sink tokens every path's output differs
// from the plain one, and the sink tokens' columns are observed.
TEST(LeakCheck, BuiltinSinksReachEveryPath) {
  const LeakShape shape{.batch = 1, .seqlen = 11, .heads = 2, .kv_heads = 1, .head_dim = 8};
  LeakInputs inputs{.shape = shape};
  for (auto* values : {&inputs.q, &inputs.k, &inputs.v}) {
    const std::int64_t heads = values == &inputs.q ? shape.heads : shape.kv_heads;
    for (std::int64_t c = 0; c < shape.seqlen * heads * shape.head_dim; ++c) {
      values->push_back(static_cast<float>((c * 7919) % 23) / 11.0f - 1.0f);
    }
  }
  const std::vector<float> logits{builtin_sink_logit(0), builtin_sink_logit(1)};
  const MaskSpec window{.window_left = 2};
  const MaskSpec sinks{.window_left = 2, .sink_tokens = 2};
  for (const BuiltinCheck& check : builtin_plan(2)) {
    if (check.storage != DType::kF32 || check.window || check.sink_logits) continue;
    const RunInfo run{.total = 1};
    const NpyArray plain = mode_implementation(check.mode, DType::kF32, window, 1)(inputs, run);
    const NpyArray with_sinks = mode_implementation(check.mode, DType::kF32, sinks, 1)(inputs, run);
    const NpyArray with_logits =
        mode_implementation(check.mode, DType::kF32, window, 1, logits)(inputs, run);
    EXPECT_NE(plain.data, with_sinks.data) << check.label;
    EXPECT_NE(plain.data, with_logits.data) << check.label;
  }
  expect_error(
      [&] {
        mode_implementation(builtin_plan(2)[0].mode, DType::kF32, {}, 1, {0.5f})(inputs, {});
      },
      {"sink_logits: 1 logits (expected heads = 2)"});
}

}  // namespace
}  // namespace lookback::diagnostics
