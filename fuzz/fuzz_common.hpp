// Shared by the fuzz targets: how a finding is reported, storage rounding as
// the kernels do it, and the comparison of a result with the float64
// reference under the tolerances of tests/testing/testing.hpp (DESIGN.md §4).
#pragma once

#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "lookback/dtype.hpp"
#include "lookback/reference.hpp"
#include "testing/testing.hpp"

namespace lookback::fuzz {

// A finding: print why, then trap, so libFuzzer stores the input as a crash
// artifact (a plain exception could be mistaken for a rejected input).
[[noreturn]] inline void fail(const char* format, ...) __attribute__((format(printf, 1, 2)));
inline void fail(const char* format, ...) {
  va_list args;
  va_start(args, format);
  std::fputs("FUZZ FINDING: ", stderr);
  std::vfprintf(stderr, format, args);
  std::fputc('\n', stderr);
  va_end(args);
  __builtin_trap();
}

#define LOOKBACK_FUZZ_CHECK(condition, ...)                \
  do {                                                     \
    if (!(condition)) ::lookback::fuzz::fail(__VA_ARGS__); \
  } while (0)

// What a kernel holds after converting an input to its storage dtype: Q, K
// and V are rounded on the way in and everything after is float32
// (DESIGN.md §1). The reference is run on these values, so half-precision
// storage is judged on its arithmetic, not on the rounding of its inputs,
// which an adversarial input can make arbitrarily visible.
inline float round_to_storage(float value, DType storage) {
  switch (storage) {
    case DType::kBF16:
      return bf16_to_f32(f32_to_bf16(value));
    case DType::kF16:
      return f16_to_f32(f32_to_f16(value));
    default:
      return value;
  }
}

// One output row (a query position and head) as the comparison sees it.
struct RowResult {
  const float* out;        // (head_dim,), contiguous
  const float* maybe_lse;  // one value, or null when the caller asked for none
};

// Accumulates the comparison of many rows with the reference.
class Comparison {
 public:
  explicit Comparison(DType storage) : tolerance_(testing::tolerance_for(storage)) {}

  // expected: the reference row; expected_abs: the same row computed with |v|
  // (sum_j p_j |v_j|), the size of the terms float32 actually adds.
  // (batch, row, head) name the row in a finding's message.
  void add_row(const RowResult& actual, const double* expected, const double* expected_abs,
               double expected_lse, std::int64_t head_dim, const char* where, std::int64_t batch,
               std::int64_t row, std::int64_t head) {
    const long long b = batch, i = row, h = head;
    if (std::isinf(expected_lse) && expected_lse < 0) {
      // An empty row: exactly zeros and -inf, never NaN (DESIGN.md §2).
      for (std::int64_t e = 0; e < head_dim; ++e) {
        LOOKBACK_FUZZ_CHECK(
            actual.out[e] == 0.0f,
            "%s at (b=%lld, i=%lld, h=%lld): empty row has out[%lld] = %g (expected 0)", where, b,
            i, h, static_cast<long long>(e), static_cast<double>(actual.out[e]));
      }
      if (actual.maybe_lse != nullptr) {
        LOOKBACK_FUZZ_CHECK(std::isinf(*actual.maybe_lse) && *actual.maybe_lse < 0,
                            "%s at (b=%lld, i=%lld, h=%lld): empty row has lse %g (expected -inf)",
                            where, b, i, h, static_cast<double>(*actual.maybe_lse));
      }
      return;
    }
    for (std::int64_t e = 0; e < head_dim; ++e) {
      LOOKBACK_FUZZ_CHECK(
          std::isfinite(actual.out[e]),
          "%s at (b=%lld, i=%lld, h=%lld): out[%lld] = %g for finite inputs (expected %g)", where,
          b, i, h, static_cast<long long>(e), static_cast<double>(actual.out[e]), expected[e]);
      const double diff = static_cast<double>(actual.out[e]) - expected[e];
      error_ += diff * diff;
      norm_ += expected[e] * expected[e];
      norm_abs_ += expected_abs[e] * expected_abs[e];
    }
    if (actual.maybe_lse != nullptr) {
      const double lse = *actual.maybe_lse;
      LOOKBACK_FUZZ_CHECK(
          std::isfinite(lse) && std::fabs(lse - expected_lse) <= testing::kLseTolerance,
          "%s at (b=%lld, i=%lld, h=%lld): lse %.9g (expected %.9g within %g)", where, b, i, h, lse,
          expected_lse, testing::kLseTolerance);
    }
  }

  // The contract's relative L2 error. Where the output is a nearly cancelling
  // sum (sum_j p_j v_j << sum_j p_j |v_j|), float32's rounding error scales
  // with the terms, not with their sum, so the denominator is floored at a
  // tenth of the terms' norm: a wrong mask, a lost split or a bad merge still
  // shows as an error of order one.
  void finish(const char* where) const {
    const double denominator = std::max(norm_, 0.01 * norm_abs_);
    if (denominator == 0.0) {
      LOOKBACK_FUZZ_CHECK(error_ == 0.0, "%s: output %g off an all-zero reference", where,
                          std::sqrt(error_));
      return;
    }
    const double relative = std::sqrt(error_ / denominator);
    LOOKBACK_FUZZ_CHECK(relative <= tolerance_,
                        "%s: relative L2 error %.3g (tolerance %g; |ref| %.3g, |terms| %.3g)",
                        where, relative, tolerance_, std::sqrt(norm_), std::sqrt(norm_abs_));
  }

 private:
  double tolerance_;
  double error_ = 0.0;
  double norm_ = 0.0;
  double norm_abs_ = 0.0;
};

}  // namespace lookback::fuzz
