// The one shared testing module: random problems, the tolerances, the
// comparison against the float64 reference, and the checks of errors and the
// temporary folders that many test files need. No test file re-derives the
// mask or re-implements the reference.
#pragma once

#include <stdlib.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <ostream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "lookback/attention.hpp"
#include "lookback/error.hpp"
#include "lookback/reference.hpp"

namespace lookback::testing {

// Relative L2 error against the float64 reference (DESIGN.md §4).
inline constexpr double kF32Tolerance = 1e-5;
inline constexpr double kHalfTolerance = 1e-2;  // bf16 / f16 storage
// 8-bit K/V storage, against the reference on the dequantized K and V: the
// kernels compute in f32 on exactly those values.
inline constexpr double kQuantTolerance = 1e-4;
// Absolute error of the natural-log LSE.
inline constexpr double kLseTolerance = 1e-4;

inline double tolerance_for(DType storage) {
  return storage == DType::kF32 ? kF32Tolerance
         : is_quantized(storage) ? kQuantTolerance
                                 : kHalfTolerance;
}

// The sizes a parameterised sweep varies, in the order its tables list them.
struct ProblemShape {
  std::int64_t seqlen_q, seqlen_k, head_dim, heads, kv_heads;
};

struct ProblemSpec {
  std::int64_t batch = 1;
  std::int64_t seqlen_q = 7;
  std::int64_t seqlen_k = 7;
  std::int64_t heads = 1;
  std::int64_t kv_heads = 1;
  std::int64_t head_dim = 16;
  MaskSpec mask;
  float softcap = 0.0f;
  bool alibi = false;
  bool sinks = false;  // learned sink logits, one per head, in [-2, 3]
  std::optional<float> scale;
  DType storage = DType::kF32;
  // Store Q/K/V as (batch, heads, seqlen, head_dim + 3) and view them through
  // strides, as a transposed, padded PyTorch tensor would be.
  bool strided = false;
  float magnitude = 1.0f;  // inputs are magnitude * N(0, 1)

  void set_shape(const ProblemShape& shape) {
    seqlen_q = shape.seqlen_q;
    seqlen_k = shape.seqlen_k;
    head_dim = shape.head_dim;
    heads = shape.heads;
    kv_heads = shape.kv_heads;
  }
  std::string describe() const;
};

// Lets GoogleTest print a spec readably in parameterised test names/failures.
void PrintTo(const ProblemSpec& spec, std::ostream* os);

// Owns the inputs and outputs of one attention call.
struct Problem {
  ProblemSpec spec;
  std::vector<float> q, k, v;  // physical storage (see ProblemSpec::strided)
  std::vector<float> slopes;   // (heads,) when spec.alibi
  std::vector<float> sink_logits;  // (heads,) when spec.sinks
  std::vector<float> out;      // (batch, seqlen_q, heads, head_dim)
  std::vector<float> lse;      // (batch, heads, seqlen_q)

  // Views onto the members above; valid while the Problem lives and is not moved.
  AttentionParams params();
  // Element offsets of (b, pos, head, 0) in q and in k/v storage.
  std::int64_t q_offset(std::int64_t b, std::int64_t pos, std::int64_t head) const;
  std::int64_t kv_offset(std::int64_t b, std::int64_t pos, std::int64_t kv_head) const;
  // Fills out and lse with a sentinel that no kernel would produce.
  void poison_outputs();
};

Problem make_problem(const ProblemSpec& spec, std::uint64_t seed);

// Overwrites with fresh random values the q rows at positions > query_position
// and the k/v rows at key positions not visible to any query <= query_position.
// (All of them when the mask is bottom-right and seqlen_q == seqlen_k.)
void perturb_future(Problem& problem, std::int64_t query_position, std::uint64_t seed);

// Success when every output row <= last_row (of every batch element and
// head) and its LSE are bit-identical in `before` and `after`: the check of
// the future-perturbation (causality) tests.
::testing::AssertionResult prefix_unchanged(const Problem& before, const Problem& after,
                                            std::int64_t last_row);

struct Comparison {
  double relative_l2 = 0.0;       // of out against the reference
  double max_lse_error = 0.0;     // over rows with a visible key
  bool finite = true;             // no NaN or Inf anywhere in out or lse
  bool empty_rows_exact = true;   // rows without keys: out == 0, lse == -inf
  std::string describe() const;
};

Comparison compare(const Problem& problem, const ReferenceResult& reference);

// Runs the reference and returns the comparison for problem.out / problem.lse.
Comparison check_against_reference(Problem& problem);

double relative_l2(const std::vector<float>& actual, const std::vector<double>& expected);

// Runs `body(name)` once per kernel path this CPU can take: on every SIMD
// target (dispatch forced to it) and, on the AVX-512 targets of a CPU whose
// bf16 prefill runs on AMX, once more with AMX off, named "<target> without
// AMX" (bf16 prefill by AVX512-BF16 dot products, the path of CPUs without
// AMX). Dispatch and AMX are restored afterwards.
void for_each_kernel_path(const std::function<void(const std::string&)>& body);

// Succeeds when `statement` throws lookback::Error with `code` and a message
// containing `needle`; the failure says what happened instead.
template <typename Statement>
::testing::AssertionResult throws_error(Statement&& statement, ErrorCode code,
                                        std::string_view needle) {
  try {
    statement();
  } catch (const Error& error) {
    const std::string message = error.what();
    if (error.code() != code) {
      return ::testing::AssertionFailure()
             << "error code " << static_cast<int>(error.code()) << ", expected "
             << static_cast<int>(code) << "; message: " << message;
    }
    if (message.find(needle) == std::string::npos) {
      return ::testing::AssertionFailure()
             << "message \"" << message << "\" does not contain \"" << needle << "\"";
    }
    return ::testing::AssertionSuccess();
  } catch (const std::exception& other) {
    return ::testing::AssertionFailure() << "threw a non-lookback exception: " << other.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

// A fresh directory under the system temporary folder, removed afterwards.
class TempDir {
 public:
  TempDir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "lookback_test.XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  const std::filesystem::path& path() const { return path_; }
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(path_))
      names.push_back(entry.path().filename().string());
    return names;
  }

 private:
  std::filesystem::path path_;
};

}  // namespace lookback::testing
