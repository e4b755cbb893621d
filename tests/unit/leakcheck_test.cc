// The leak check through its public header (include/lookback/leakcheck.hpp),
// as the CLI and future bindings call it: the experiment on a known leak, the
// black-box runner on a shell command, and the built-in plan.
#include "lookback/leakcheck.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "lookback/error.hpp"

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
  EXPECT_EQ(report.runs, kShape.seqlen + 1);
  ASSERT_FALSE(report.result.causal());
  // Rows 0..n-2 read the next position; the last row reads itself.
  EXPECT_EQ(report.result.leaks.size(), static_cast<std::size_t>(kShape.seqlen - 1));
  EXPECT_EQ(report.result.leaks.front(), (Pair{0, 1}));
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
  ASSERT_EQ(plan.size(), all_modes().size() * 2 * 3);
  EXPECT_EQ(plan[0].storage, DType::kF32);
  EXPECT_EQ(plan[1].storage, DType::kBF16);
  EXPECT_EQ(plan[2].storage, DType::kF16);
  EXPECT_FALSE(plan[0].window.has_value());
  EXPECT_EQ(plan[3].window, 3);
  EXPECT_EQ(plan[3].label, path_label(plan[3].mode) + ", window 3");

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
  EXPECT_EQ(last_total, static_cast<std::int64_t>(checks.size()) * (kShape.seqlen + 1));
  EXPECT_EQ(last_done, last_total);
}

}  // namespace
}  // namespace lookback::diagnostics
