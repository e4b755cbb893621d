// Prefill never materialises the n x n score matrix. At n = 32768, 8 heads,
// head_dim 128 the scores of one head alone would take 4 GiB; the bound
// lookback keeps is inputs + output + one packed copy of K and V (the kernel's
// transposed tiles) + a per-thread scratch of
// 2 * group * 64 * padded_head_dim + 64 * 64 floats.
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "lookback/attention.hpp"

namespace lookback {
namespace {

std::int64_t peak_rss_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<std::int64_t>(usage.ru_maxrss) * 1024;  // Linux reports KiB
}

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;  // shadow memory makes RSS meaningless
#else
constexpr bool kSanitized = false;
#endif

TEST(Memory, PrefillAt32kTokensStaysWithinItsBound) {
  if (kSanitized) GTEST_SKIP() << "peak RSS is not comparable under sanitizers";
  constexpr std::int64_t n = 32768, heads = 8, dim = 128;
  const auto elements = static_cast<std::size_t>(n * heads * dim);
  std::vector<float> q(elements), k(elements), v(elements), out(elements);
  // A cheap deterministic fill (a normal RNG would dominate the test's time).
  std::uint32_t state = 12345;
  for (auto* tensor : {&q, &k, &v}) {
    for (float& x : *tensor) {
      state = state * 1664525u + 1013904223u;
      x = static_cast<float>(state >> 8) / 16777216.0f - 0.5f;
    }
  }
  AttentionParams params{
      .q = make_view(q.data(), DType::kF32, {1, n, heads, dim}, "q"),
      .k = make_view(k.data(), DType::kF32, {1, n, heads, dim}, "k"),
      .v = make_view(v.data(), DType::kF32, {1, n, heads, dim}, "v"),
      .out = make_mutable_view(out.data(), DType::kF32, {1, n, heads, dim}, "out"),
      // A window keeps the work small; the mask, not the allocation, is what
      // a window changes, so an O(n^2) allocation would still show.
      .mask = {.causal = Causal::kBottomRight, .window_left = 64},
  };
  Context context(2);
  attend(params, context);
  for (std::int64_t i : {std::int64_t{0}, n / 2, n - 1}) {
    ASSERT_TRUE(std::isfinite(out[static_cast<std::size_t>(i * heads * dim)]));
  }
  const double tensor_bytes = static_cast<double>(elements) * sizeof(float);
  const double bound = 4 * tensor_bytes      // q, k, v, out
                       + 2 * tensor_bytes    // packed K and V
                       + 2 * 1e6;            // per-thread scratch
  const double scores_of_one_head = static_cast<double>(n) * n * sizeof(float);
  const double peak = static_cast<double>(peak_rss_bytes());
  RecordProperty("peak_rss_mib", static_cast<int>(peak / (1 << 20)));
  // Allow the allocator's and sanitizers' overhead, still far below n^2.
  EXPECT_LT(peak, 1.3 * bound + 200e6) << "peak RSS " << peak / 1e6 << " MB, bound "
                                       << bound / 1e6 << " MB";
  EXPECT_LT(peak, scores_of_one_head / 3);
}

}  // namespace
}  // namespace lookback
