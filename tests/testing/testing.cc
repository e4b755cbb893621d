#include "testing/testing.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>

#include "kernels/dispatch.hpp"
#include "lookback/kernel_caps.hpp"
#include "lookback/mask.hpp"

namespace lookback::testing {

std::string ProblemSpec::describe() const {
  std::ostringstream text;
  text << "batch=" << batch << " seqlen_q=" << seqlen_q << " seqlen_k=" << seqlen_k
       << " heads=" << heads << " kv_heads=" << kv_heads << " head_dim=" << head_dim
       << " causal=" << causal_name(mask.causal);
  if (mask.window_left) text << " window=" << *mask.window_left;
  if (mask.sink_tokens > 0) text << " sink_tokens=" << mask.sink_tokens;
  if (softcap > 0) text << " softcap=" << softcap;
  if (alibi) text << " alibi";
  if (sinks) text << " sinks";
  if (strided) text << " strided";
  text << " storage=" << dtype_name(storage);
  return text.str();
}

void PrintTo(const ProblemSpec& spec, std::ostream* os) { *os << spec.describe(); }

namespace {

std::int64_t padded_dim(const ProblemSpec& spec) {
  return spec.strided ? spec.head_dim + 3 : spec.head_dim;
}

void fill(std::vector<float>& values, std::mt19937_64& rng, float magnitude) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& value : values) value = magnitude * normal(rng);
}

}  // namespace

std::int64_t Problem::q_offset(std::int64_t b, std::int64_t pos, std::int64_t head) const {
  const std::int64_t dim = padded_dim(spec);
  if (spec.strided) return ((b * spec.heads + head) * spec.seqlen_q + pos) * dim;
  return ((b * spec.seqlen_q + pos) * spec.heads + head) * dim;
}

std::int64_t Problem::kv_offset(std::int64_t b, std::int64_t pos, std::int64_t kv_head) const {
  const std::int64_t dim = padded_dim(spec);
  if (spec.strided) return ((b * spec.kv_heads + kv_head) * spec.seqlen_k + pos) * dim;
  return ((b * spec.seqlen_k + pos) * spec.kv_heads + kv_head) * dim;
}

Problem make_problem(const ProblemSpec& spec, std::uint64_t seed) {
  Problem problem;
  problem.spec = spec;
  std::mt19937_64 rng(seed);
  const std::int64_t dim = padded_dim(spec);
  problem.q.resize(static_cast<std::size_t>(spec.batch * spec.seqlen_q * spec.heads * dim));
  problem.k.resize(static_cast<std::size_t>(spec.batch * spec.seqlen_k * spec.kv_heads * dim));
  problem.v.resize(problem.k.size());
  fill(problem.q, rng, spec.magnitude);
  fill(problem.k, rng, spec.magnitude);
  fill(problem.v, rng, spec.magnitude);
  if (spec.sinks) {
    std::uniform_real_distribution<float> uniform(-2.0f, 3.0f);
    for (std::int64_t h = 0; h < spec.heads; ++h) problem.sink_logits.push_back(uniform(rng));
  }
  if (spec.alibi) {
    // The standard geometric slopes 2^(-8 h / heads).
    for (std::int64_t h = 0; h < spec.heads; ++h) {
      problem.slopes.push_back(std::pow(2.0f, -8.0f * static_cast<float>(h + 1) /
                                                  static_cast<float>(spec.heads)));
    }
  }
  problem.out.assign(static_cast<std::size_t>(spec.batch * spec.seqlen_q * spec.heads * spec.head_dim), 0.0f);
  problem.lse.assign(static_cast<std::size_t>(spec.batch * spec.heads * spec.seqlen_q), 0.0f);
  return problem;
}

AttentionParams Problem::params() {
  const std::int64_t dim = padded_dim(spec);
  auto input_view = [&](const std::vector<float>& data, std::int64_t seqlen, std::int64_t heads) {
    TensorView view;
    view.data = data.data();
    view.dtype = DType::kF32;
    view.rank = 4;
    view.shape = {spec.batch, seqlen, heads, spec.head_dim};
    if (spec.strided) {
      view.strides = {heads * seqlen * dim, dim, seqlen * dim, 1};
    } else {
      view.strides = {seqlen * heads * dim, heads * dim, dim, 1};
    }
    return view;
  };
  AttentionParams params;
  params.q = input_view(q, spec.seqlen_q, spec.heads);
  params.k = input_view(k, spec.seqlen_k, spec.kv_heads);
  params.v = input_view(v, spec.seqlen_k, spec.kv_heads);
  params.out = make_mutable_view(out.data(), DType::kF32,
                                 {spec.batch, spec.seqlen_q, spec.heads, spec.head_dim}, "out");
  params.maybe_lse = make_mutable_view(lse.data(), DType::kF32,
                                       {spec.batch, spec.heads, spec.seqlen_q}, "lse");
  params.maybe_alibi_slopes = spec.alibi ? slopes.data() : nullptr;
  params.maybe_sink_logits = spec.sinks ? sink_logits.data() : nullptr;
  params.scale = spec.scale;
  params.softcap = spec.softcap;
  params.mask = spec.mask;
  params.storage = spec.storage;
  return params;
}

void Problem::poison_outputs() {
  std::fill(out.begin(), out.end(), 12345.0f);
  std::fill(lse.begin(), lse.end(), 12345.0f);
}

void perturb_future(Problem& problem, std::int64_t query_position, std::uint64_t seed) {
  const ProblemSpec& spec = problem.spec;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const Mask mask(spec.seqlen_q, spec.seqlen_k, spec.mask);
  // Keys that no query row <= query_position may see: every key after the
  // last of those rows' ranges.
  // Sink tokens (visible beside the window) grow with the row, as the ranges do.
  const std::int64_t first_hidden_key =
      query_position < 0 ? 0
                         : std::max(mask.key_range_of_rows(0, query_position + 1).end,
                                    mask.sink_range(std::min(query_position, spec.seqlen_q - 1)).end);
  for (std::int64_t b = 0; b < spec.batch; ++b) {
    for (std::int64_t pos = query_position + 1; pos < spec.seqlen_q; ++pos) {
      for (std::int64_t h = 0; h < spec.heads; ++h) {
        for (std::int64_t e = 0; e < spec.head_dim; ++e) {
          problem.q[static_cast<std::size_t>(problem.q_offset(b, pos, h) + e)] = normal(rng);
        }
      }
    }
    for (std::int64_t pos = std::max<std::int64_t>(first_hidden_key, 0); pos < spec.seqlen_k; ++pos) {
      for (std::int64_t h = 0; h < spec.kv_heads; ++h) {
        for (std::int64_t e = 0; e < spec.head_dim; ++e) {
          const auto index = static_cast<std::size_t>(problem.kv_offset(b, pos, h) + e);
          problem.k[index] = normal(rng);
          problem.v[index] = normal(rng);
        }
      }
    }
  }
}

::testing::AssertionResult prefix_unchanged(const Problem& before, const Problem& after,
                                            std::int64_t last_row) {
  const ProblemSpec& s = before.spec;
  const auto row_bytes = static_cast<std::size_t>(s.heads * s.head_dim) * sizeof(float);
  for (std::int64_t b = 0; b < s.batch; ++b) {
    for (std::int64_t i = 0; i <= last_row; ++i) {
      const auto offset = static_cast<std::size_t>((b * s.seqlen_q + i) * s.heads * s.head_dim);
      if (std::memcmp(before.out.data() + offset, after.out.data() + offset, row_bytes) != 0) {
        return ::testing::AssertionFailure() << "output row " << i << " (batch " << b
                                             << ") changed when the future after " << last_row
                                             << " changed";
      }
      for (std::int64_t h = 0; h < s.heads; ++h) {
        const auto l = static_cast<std::size_t>((b * s.heads + h) * s.seqlen_q + i);
        if (std::memcmp(&before.lse[l], &after.lse[l], sizeof(float)) != 0) {
          return ::testing::AssertionFailure() << "lse of row " << i << " (batch " << b << ", head "
                                               << h << ") changed when the future after "
                                               << last_row << " changed";
        }
      }
    }
  }
  return ::testing::AssertionSuccess();
}

double relative_l2(const std::vector<float>& actual, const std::vector<double>& expected) {
  double error = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const double diff = static_cast<double>(actual[i]) - expected[i];
    error += diff * diff;
    norm += expected[i] * expected[i];
  }
  if (std::isnan(error)) return std::numeric_limits<double>::infinity();
  if (norm == 0.0) return std::sqrt(error);
  return std::sqrt(error / norm);
}

Comparison compare(const Problem& problem, const ReferenceResult& reference) {
  Comparison result;
  for (float value : problem.out) result.finite = result.finite && std::isfinite(value);
  result.relative_l2 = relative_l2(problem.out, reference.out);
  const ProblemSpec& spec = problem.spec;
  for (std::int64_t b = 0; b < spec.batch; ++b) {
    for (std::int64_t h = 0; h < spec.heads; ++h) {
      for (std::int64_t i = 0; i < spec.seqlen_q; ++i) {
        const auto index = static_cast<std::size_t>((b * spec.heads + h) * spec.seqlen_q + i);
        const double expected = reference.lse[index];
        const float actual = problem.lse[index];
        if (std::isinf(expected)) {
          // An empty row: exactly -inf and exactly zero output.
          if (!(std::isinf(actual) && actual < 0)) result.empty_rows_exact = false;
          for (std::int64_t e = 0; e < spec.head_dim; ++e) {
            const auto o = static_cast<std::size_t>(((b * spec.seqlen_q + i) * spec.heads + h) * spec.head_dim + e);
            if (problem.out[o] != 0.0f) result.empty_rows_exact = false;
          }
          continue;
        }
        if (!std::isfinite(actual)) {
          result.finite = false;
          continue;
        }
        result.max_lse_error = std::max(result.max_lse_error, std::fabs(actual - expected));
      }
    }
  }
  return result;
}

Comparison check_against_reference(Problem& problem) {
  return compare(problem, reference_attention(problem.params()));
}

std::string Comparison::describe() const {
  std::ostringstream text;
  text << "relative_l2=" << relative_l2 << " max_lse_error=" << max_lse_error
       << " finite=" << finite << " empty_rows_exact=" << empty_rows_exact;
  return text.str();
}

void for_each_kernel_path(const std::function<void(const std::string&)>& body) {
  struct Restore {
    ~Restore() {
      kernels::force_amx_off(false);
      kernels::force_bf16_dot_prefill(false);
      force_simd_target("");
    }
  } restore;
  for (const std::string& target : simd_targets()) {
    force_simd_target(target);
    {
      SCOPED_TRACE("simd target " + target);
      body(target);
    }
    if (kernel_caps().amx_prefill) {
      kernels::force_amx_off(true);
      {
        SCOPED_TRACE("simd target " + target + " without AMX");
        body(target + " without AMX");
      }
      kernels::force_amx_off(false);
    }
    if (kernel_caps().avx512_bf16 && !kernel_caps().bf16_dot_prefill) {
      // The VDPBF16PS path, where the default is AMX or the f32 path.
      kernels::force_amx_off(true);
      kernels::force_bf16_dot_prefill(true);
      if (kernel_caps().bf16_dot_prefill) {
        SCOPED_TRACE("simd target " + target + " on AVX512-BF16 dot products");
        body(target + " on AVX512-BF16 dot products");
      }
      kernels::force_bf16_dot_prefill(false);
      kernels::force_amx_off(false);
    }
  }
}

}  // namespace lookback::testing
