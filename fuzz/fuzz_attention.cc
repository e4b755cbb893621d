// Differential fuzzing of every attention path (DESIGN.md §4): a small
// problem and its options are decoded from the input, run through
// attend_with_mode, and then
//   - an invalid combination must throw lookback::Error, and exactly the
//     combinations predicted invalid below may throw it (DESIGN.md §5);
//   - a valid one must match reference_attention within the storage's
//     tolerance, with no NaN for finite inputs and empty rows exactly zero
//     with LSE -inf (DESIGN.md §2);
//   - and give the same bits with another thread count (docs/architecture.md,
//     "Deterministic parallelism").
// The SIMD target is fuzzed too, through force_simd_target.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "core/quant.hpp"
#include "fuzz_common.hpp"
#include "lookback/attention.hpp"
#include "lookback/error.hpp"
#include "lookback/modes.hpp"
#include "lookback/reference.hpp"

namespace lookback::fuzz {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Deliberately broken arguments, each of which validation must reject.
enum class Hostile : int {
  kNone,
  kOutShape,       // out has one query row too many
  kOutDtype,       // out is f16
  kLseShape,       // lse has one query row too many
  kNegativeBatch,  // batch -1
  kNegativeSeqlenQ,
  kNegativeSeqlenK,
  kVShape,  // v has one key fewer than k
  kCount,
};

struct Case {
  std::int64_t batch = 1, seqlen_q = 1, seqlen_k = 1, heads = 1, kv_heads = 1, head_dim = 1;
  MaskSpec mask;
  std::optional<float> scale;
  float softcap = 0.0f;
  std::vector<float> slopes;  // (heads,) when ALiBi is on
  ModeOptions options;
  int threads = 1;
  DType storage = DType::kF32;
  DType input = DType::kF32;  // dtype of q, k and v as handed in
  bool strided = false;  // (batch, heads, seqlen, head_dim + 3) storage, viewed through strides
  bool with_lse = true;
  bool large_scores = false;  // scale picked for scores up to about 1e10
  Hostile hostile = Hostile::kNone;
  std::string simd_target;

  std::string describe() const {
    std::string text = "batch=" + std::to_string(batch) + " seqlen_q=" + std::to_string(seqlen_q) +
                       " seqlen_k=" + std::to_string(seqlen_k) + " heads=" + std::to_string(heads) +
                       " kv_heads=" + std::to_string(kv_heads) +
                       " head_dim=" + std::to_string(head_dim) +
                       " causal=" + std::string(causal_name(mask.causal));
    if (mask.window_left) text += " window=" + std::to_string(*mask.window_left);
    if (scale) text += " scale=" + std::to_string(*scale);
    text += " softcap=" + std::to_string(softcap) + " alibi=" + (slopes.empty() ? "no" : "yes") +
            " mode=" + std::string(mode_name(options.mode)) +
            " chunk=" + std::to_string(options.chunk) +
            " block_size=" + std::to_string(options.block_size) +
            " splits=" + std::to_string(options.splits) + " threads=" + std::to_string(threads) +
            " storage=" + std::string(dtype_name(storage)) +
            " input=" + std::string(dtype_name(input)) + " strided=" + std::to_string(strided) +
            " lse=" + std::to_string(with_lse) +
            " hostile=" + std::to_string(static_cast<int>(hostile)) + " simd=" + simd_target;
    return text;
  }
};

Case decode_case(FuzzedDataProvider& in) {
  // Every choice maps the provider's default (0 once the input is used up)
  // to the common valid case, so short inputs are useful inputs.
  Case c;
  const int batch_pick = in.ConsumeIntegralInRange(0, 15);
  c.batch = batch_pick == 15 ? 0 : 1 + batch_pick % 2;
  c.seqlen_q = in.ConsumeIntegralInRange(0, 40);
  c.seqlen_k = in.ConsumeIntegralInRange(0, 40);
  c.heads = in.ConsumeIntegralInRange(1, 4);
  if (in.ConsumeIntegralInRange(0, 3) < 3) {
    // Mostly a divisor of heads, as a GQA/MQA model has.
    std::vector<std::int64_t> divisors;
    for (std::int64_t d = 1; d <= c.heads; ++d) {
      if (c.heads % d == 0) divisors.push_back(d);
    }
    c.kv_heads = divisors[in.ConsumeIntegralInRange<std::size_t>(0, divisors.size() - 1)];
  } else {
    c.kv_heads = in.ConsumeIntegralInRange(0, 4);  // 0 and non-divisors are invalid
  }
  const int dim_pick = in.ConsumeIntegralInRange(0, 63);
  constexpr std::int64_t kOddDims[] = {0, 256, 257, 300, -1, 128, 48, 80};
  c.head_dim = dim_pick < 56 ? 1 + dim_pick % 40 : kOddDims[dim_pick - 56];

  const int causal_pick = in.ConsumeIntegralInRange(0, 7);
  c.mask.causal = causal_pick < 6    ? Causal::kBottomRight
                  : causal_pick == 6 ? Causal::kTopLeft
                                     : Causal::kNone;
  if (in.ConsumeIntegralInRange(0, 7) >= 5) c.mask.window_left = in.ConsumeIntegralInRange(-2, 44);

  // Values stay modest so that scores stay within a few tens: float32 meets
  // the 1e-5 contract there; hostile magnitudes are their own tests.
  const double dim_for_scale = static_cast<double>(std::max<std::int64_t>(c.head_dim, 1));
  switch (in.ConsumeIntegralInRange(0, 7)) {
    case 4:
      // Large but finite scores, about 1e4 .. 1e10: checked by the
      // properties that hold whatever the ties (check_large_scores).
      c.scale = static_cast<float>(std::pow(10.0, in.ConsumeIntegralInRange(4, 10)) /
                                   std::sqrt(dim_for_scale));
      c.large_scores = true;
      break;
    case 5:
    case 6:
      c.scale =
          static_cast<float>(in.ConsumeIntegralInRange(-48, 48) / 32.0 / std::sqrt(dim_for_scale));
      break;
    case 7: {
      constexpr float kOddScales[] = {kInf, -kInf, kNaN, 0.0f};  // 0 is valid
      c.scale = kOddScales[in.ConsumeIntegralInRange(0, 3)];
      break;
    }
    default:
      break;
  }
  switch (in.ConsumeIntegralInRange(0, 7)) {
    case 5:
    case 6:
      c.softcap = static_cast<float>(in.ConsumeIntegralInRange(1, 400)) / 8.0f;
      break;
    case 7: {
      constexpr float kOddSoftcaps[] = {-1.0f, kNaN, kInf, -0.0f};  // -0 is valid (off)
      c.softcap = kOddSoftcaps[in.ConsumeIntegralInRange(0, 3)];
      break;
    }
    default:
      break;
  }
  if (in.ConsumeIntegralInRange(0, 3) == 3) {
    for (std::int64_t h = 0; h < c.heads; ++h) {
      c.slopes.push_back(static_cast<float>(in.ConsumeIntegralInRange(-16, 64)) / 128.0f);
    }
    if (in.ConsumeIntegralInRange(0, 15) == 15) {
      c.slopes[in.ConsumeIntegralInRange<std::size_t>(0, c.slopes.size() - 1)] =
          in.ConsumeBool() ? kNaN : kInf;
    }
  }

  c.options.mode = static_cast<Mode>(in.ConsumeIntegralInRange(0, 4));
  // 0 (invalid) is one pick in eleven or twenty-one, never the default.
  c.options.chunk = (in.ConsumeIntegralInRange(0, 10) + 1) % 11;
  c.options.block_size = (in.ConsumeIntegralInRange(0, 20) + 1) % 21;
  c.options.splits = (in.ConsumeIntegralInRange(0, 10) + 1) % 11;
  c.threads = in.ConsumeIntegralInRange(1, 3);

  const int storage_pick = in.ConsumeIntegralInRange(0, 18);
  constexpr DType kEightBit[] = {DType::kI8, DType::kFP8E4M3, DType::kFP8E5M2};
  c.storage = storage_pick < 10   ? DType::kF32
              : storage_pick < 13 ? DType::kBF16
              : storage_pick < 15 ? DType::kF16
              : storage_pick == 15 ? DType::kF64  // not a storage dtype
                                   : kEightBit[storage_pick - 16];
  constexpr DType kInputs[] = {DType::kF32, DType::kF32, DType::kF32,  DType::kF32,
                               DType::kF32, DType::kF16, DType::kBF16, DType::kF64};
  c.input = kInputs[in.ConsumeIntegralInRange(0, 7)];
  c.strided = in.ConsumeBool();
  c.with_lse = !in.ConsumeBool();
  const int hostile_pick = in.ConsumeIntegralInRange(0, 63);
  c.hostile = hostile_pick < static_cast<int>(Hostile::kCount) ? static_cast<Hostile>(hostile_pick)
                                                               : Hostile::kNone;
  switch (c.hostile) {
    case Hostile::kNegativeBatch:
      c.batch = -1;
      break;
    case Hostile::kNegativeSeqlenQ:
      c.seqlen_q = -1;
      break;
    case Hostile::kNegativeSeqlenK:
      c.seqlen_k = -1;
      break;
    default:
      break;
  }
  const std::vector<std::string> targets = simd_targets();
  c.simd_target = targets[in.ConsumeIntegralInRange<std::size_t>(0, targets.size() - 1)];
  return c;
}

// Exactly the combinations attend_with_mode documents as errors.
bool predicted_valid(const Case& c) {
  if (c.batch < 0 || c.seqlen_q < 0 || c.seqlen_k < 0) return false;
  if (c.head_dim < 1 || c.head_dim > kMaxHeadDim) return false;
  if (c.heads < 1 || c.kv_heads < 1 || c.heads % c.kv_heads != 0) return false;
  if (c.hostile != Hostile::kNone) return false;
  if (c.scale && !std::isfinite(*c.scale)) return false;
  if (!(c.softcap >= 0.0f) || !std::isfinite(c.softcap)) return false;
  for (float slope : c.slopes) {
    if (!std::isfinite(slope)) return false;
  }
  if (c.storage != DType::kF32 && c.storage != DType::kF16 && c.storage != DType::kBF16 &&
      !is_quantized(c.storage))
    return false;
  if (c.mask.window_left && (*c.mask.window_left < 0 || c.mask.causal == Causal::kNone))
    return false;
  if (c.options.chunk < 1 || c.options.block_size < 1 || c.options.splits < 1) return false;
  const bool uses_cache = c.options.mode == Mode::kDecode || c.options.mode == Mode::kChunked ||
                          c.options.mode == Mode::kPaged;
  if (uses_cache && (c.mask.causal != Causal::kBottomRight || c.seqlen_q > c.seqlen_k))
    return false;
  return true;
}

std::int64_t nonnegative(std::int64_t n) { return std::max<std::int64_t>(n, 0); }

// One input tensor (batch, seqlen, heads, head_dim) in the case's dtype and
// layout. Allocated to its exact extent so that ASan sees any overread.
struct Input {
  std::vector<std::byte> storage;
  TensorView view;
  std::vector<double> effective;  // (batch, seqlen, heads, head_dim): what the kernels see

  // values[first + n] fills the n-th element in logical order (cycling).
  Input(const Case& c, std::int64_t seqlen, std::int64_t heads, const std::vector<float>& values,
        std::size_t first) {
    const std::int64_t b = nonnegative(c.batch), s = nonnegative(seqlen), h = heads,
                       d = nonnegative(c.head_dim);
    const std::int64_t row = c.strided ? d + 3 : d;
    const std::int64_t elements = b * s * h * row;
    const std::size_t element_bytes = dtype_size(c.input);
    storage.resize(static_cast<std::size_t>(elements) * element_bytes);
    view.data = elements == 0 ? nullptr : storage.data();
    view.dtype = c.input;
    view.rank = 4;
    view.shape = {c.batch, seqlen, heads, c.head_dim};
    view.strides = c.strided ? std::array<std::int64_t, kMaxRank>{h * s * row, row, s * row, 1}
                             : std::array<std::int64_t, kMaxRank>{s * h * row, h * row, row, 1};
    effective.resize(static_cast<std::size_t>(b * s * h * d));
    std::size_t next = 0;
    for (std::int64_t bi = 0; bi < b; ++bi) {
      for (std::int64_t si = 0; si < s; ++si) {
        for (std::int64_t hi = 0; hi < h; ++hi) {
          for (std::int64_t e = 0; e < d; ++e, ++next) {
            const float value = values[(first + next) % values.size()];
            const std::int64_t index = view.offset(bi, si, hi, e);
            void* slot = storage.data() + static_cast<std::size_t>(index) * element_bytes;
            store(value, slot);
            effective[next] = round_to_storage(load_as_float(storage.data(), c.input, index),
                                               c.storage == DType::kF64 ? DType::kF32 : c.storage);
          }
        }
      }
    }
  }

  // 8-bit storage quantizes K and V rows (one token of one kv head) by the
  // rule of core/quant.hpp; the reference then runs on decode(code) * scale.
  void quantize_rows(DType storage, std::int64_t head_dim) {
    if (!is_quantized(storage) || head_dim < 1) return;
    std::vector<float> row(static_cast<std::size_t>(head_dim));
    for (std::size_t first = 0; first + row.size() <= effective.size(); first += row.size()) {
      for (std::size_t e = 0; e < row.size(); ++e) row[e] = static_cast<float>(effective[first + e]);
      round_row_to_quantized(row.data(), head_dim, storage);
      for (std::size_t e = 0; e < row.size(); ++e) effective[first + e] = row[e];
    }
  }

  void store(float value, void* slot) const {
    switch (view.dtype) {
      case DType::kF32:
        std::memcpy(slot, &value, sizeof value);
        break;
      case DType::kF64: {
        const double wide = value;
        std::memcpy(slot, &wide, sizeof wide);
        break;
      }
      case DType::kF16: {
        const std::uint16_t bits = f32_to_f16(value);
        std::memcpy(slot, &bits, sizeof bits);
        break;
      }
      case DType::kBF16: {
        const std::uint16_t bits = f32_to_bf16(value);
        std::memcpy(slot, &bits, sizeof bits);
        break;
      }
      default:  // inputs are f32, f64, f16 or bf16 (kInputs)
        break;
    }
  }
};

// The outputs of one run, in the case's layout (transposed when strided).
struct Outputs {
  std::vector<float> out, lse;
  MutableTensorView out_view, lse_view;

  explicit Outputs(const Case& c) {
    const std::int64_t b = nonnegative(c.batch), s = nonnegative(c.seqlen_q), h = c.heads,
                       d = nonnegative(c.head_dim);
    const std::int64_t out_rows = s + (c.hostile == Hostile::kOutShape ? 1 : 0);
    out.assign(static_cast<std::size_t>(b * out_rows * h * d), kNaN);  // NaN: unwritten shows
    out_view.data = out.empty() ? nullptr : out.data();
    out_view.dtype = c.hostile == Hostile::kOutDtype ? DType::kF16 : DType::kF32;
    out_view.rank = 4;
    out_view.shape = {c.batch, out_rows, c.heads, c.head_dim};
    out_view.strides =
        c.strided ? std::array<std::int64_t, kMaxRank>{h * out_rows * d, d, out_rows * d, 1}
                  : std::array<std::int64_t, kMaxRank>{out_rows * h * d, h * d, d, 1};
    if (!c.with_lse && c.hostile != Hostile::kLseShape) return;
    const std::int64_t lse_rows = s + (c.hostile == Hostile::kLseShape ? 1 : 0);
    lse.assign(static_cast<std::size_t>(b * h * lse_rows), kNaN);
    lse_view.data = lse.empty() ? nullptr : lse.data();
    // An empty view means "no LSE": give a zero-size one a dangling but
    // non-null pointer so that it still counts as requested.
    if (lse_view.data == nullptr) lse_view.data = &lse_sentinel;
    lse_view.dtype = DType::kF32;
    lse_view.rank = 3;
    lse_view.shape = {c.batch, c.heads, lse_rows};
    lse_view.strides = c.strided ? std::array<std::int64_t, kMaxRank>{lse_rows * h, 1, h, 0}
                                 : std::array<std::int64_t, kMaxRank>{h * lse_rows, lse_rows, 1, 0};
  }

  float lse_sentinel = 0.0f;
};

Context& context_for(int threads) {
  // One context per thread count for the whole run: creating threads on
  // every input would dominate the time of an iteration.
  static Context one(1), two(2), three(3);
  return threads == 1 ? one : threads == 2 ? two : three;
}

std::vector<float> make_values(FuzzedDataProvider& in, std::size_t count) {
  // Either the input's own bytes (so the fuzzer can steer values, e.g. make
  // ties or zeros) or a seeded normal distribution as the tests use.
  std::vector<float> values;
  const bool from_bytes = in.ConsumeIntegralInRange(0, 3) == 3;
  const std::uint64_t seed = in.ConsumeIntegral<std::uint64_t>();
  constexpr float kMagnitudes[] = {1.0f, 0.5f, 1.5f, 0.25f};
  const float magnitude = kMagnitudes[in.ConsumeIntegralInRange(0, 3)];
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, magnitude);
  if (from_bytes) {
    for (std::uint8_t byte : in.ConsumeRemainingBytes<std::uint8_t>()) {
      values.push_back(static_cast<float>(static_cast<std::int8_t>(byte)) / 128.0f);
    }
  }
  while (values.size() < std::max<std::size_t>(count, 1)) values.push_back(normal(rng));
  return values;
}

// Scores near 1e10 make the softmax nearly one-hot, and which key wins a
// near tie depends on float32 rounding, so the reference's output is not a
// fair target there. What must hold whatever the ties: every output is
// finite and lies within the range of the values of its kv head (a convex
// combination), and the LSE is finite and within a relative 1e-3 of the
// reference's (it is the largest score plus at most log(seqlen_k)), plus
// 1e-4 of the LSE of |q| and |k| (`magnitude`): a score's f32 rounding
// grows with the sum of its terms' magnitudes, not with its value (one
// input scores -86 from terms of 4.3e6 at scale 1.6e5, and f32 is 0.19 off).
void check_large_scores(const Case& c, const Outputs& actual, const ReferenceResult& expected,
                        const ReferenceResult& magnitude, const std::vector<double>& v) {
  const std::string where = c.describe();
  for (std::int64_t b = 0; b < c.batch; ++b) {
    for (std::int64_t h = 0; h < c.heads; ++h) {
      const std::int64_t kv_head = h / (c.heads / c.kv_heads);
      for (std::int64_t e = 0; e < c.head_dim; ++e) {
        double low = 0.0, high = 0.0;  // empty rows give 0
        for (std::int64_t j = 0; j < c.seqlen_k; ++j) {
          const double value =
              v[static_cast<std::size_t>(((b * c.seqlen_k + j) * c.kv_heads + kv_head) * c.head_dim + e)];
          low = std::min(low, value);
          high = std::max(high, value);
        }
        const double slack = 1e-5 * std::max(1.0, std::max(-low, high));
        for (std::int64_t i = 0; i < c.seqlen_q; ++i) {
          const float out = actual.out[static_cast<std::size_t>(actual.out_view.offset(b, i, h, e))];
          LOOKBACK_FUZZ_CHECK(std::isfinite(out) && out >= low - slack && out <= high + slack,
                              "%s at (b=%lld, i=%lld, h=%lld): out[%lld] = %g outside the values' range [%g, %g]",
                              where.c_str(), static_cast<long long>(b), static_cast<long long>(i),
                              static_cast<long long>(h), static_cast<long long>(e),
                              static_cast<double>(out), low, high);
        }
      }
      if (!c.with_lse) continue;
      for (std::int64_t i = 0; i < c.seqlen_q; ++i) {
        const double lse = actual.lse[static_cast<std::size_t>(actual.lse_view.offset(b, h, i))];
        const auto at = static_cast<std::size_t>((b * c.heads + h) * c.seqlen_q + i);
        const double want = expected.lse[at];
        const double tolerance =
            testing::kLseTolerance + 1e-3 * std::fabs(want) + 1e-4 * std::fabs(magnitude.lse[at]);
        const bool ok = std::isinf(want) ? lse == want : std::fabs(lse - want) <= tolerance;
        LOOKBACK_FUZZ_CHECK(ok, "%s at (b=%lld, i=%lld, h=%lld): lse %.9g (expected %.9g, magnitude %.9g)",
                            where.c_str(), static_cast<long long>(b), static_cast<long long>(i),
                            static_cast<long long>(h), lse, want, magnitude.lse[at]);
      }
    }
  }
}

void run_case(const Case& c, const std::vector<float>& values) {
  // Q, K and V take consecutive stretches of the values, so no two alias.
  const Input q(c, c.seqlen_q, c.heads, values, 0);
  Input k(c, c.seqlen_k, c.kv_heads, values, q.effective.size());
  const std::int64_t v_seqlen = c.hostile == Hostile::kVShape ? c.seqlen_k - 1 : c.seqlen_k;
  Input v(c, v_seqlen, c.kv_heads, values, q.effective.size() + k.effective.size());
  k.quantize_rows(c.storage, c.head_dim);
  v.quantize_rows(c.storage, c.head_dim);

  Outputs first(c);
  AttentionParams params{.q = q.view,
                         .k = k.view,
                         .v = v.view,
                         .out = first.out_view,
                         .maybe_lse = first.lse_view,
                         .maybe_alibi_slopes = c.slopes.empty() ? nullptr : c.slopes.data(),
                         .scale = c.scale,
                         .softcap = c.softcap,
                         .mask = c.mask,
                         .storage = c.storage};
  force_simd_target(c.simd_target);
  const bool valid = predicted_valid(c);
  try {
    attend_with_mode(params, c.options, context_for(c.threads));
  } catch (const Error& error) {
    if (valid) fail("valid case rejected: %s\n  case: %s", error.what(), c.describe().c_str());
    LOOKBACK_FUZZ_CHECK(std::strlen(error.what()) > 0, "empty error message");
    return;
  } catch (const std::exception& error) {
    fail("non-lookback exception: %s\n  case: %s", error.what(), c.describe().c_str());
  }
  if (!valid) fail("invalid case accepted\n  case: %s", c.describe().c_str());
  if (c.batch == 0 || c.seqlen_q == 0) return;  // nothing to compute

  // The reference on what the kernels hold, and on |v| for the size of the
  // terms (see Comparison::finish).
  auto reference_on = [&](const std::vector<double>& v_values,
                          const std::vector<double>& q_values, const std::vector<double>& k_values) {
    AttentionParams r = params;
    r.q = make_view(q_values.data(), DType::kF64, {c.batch, c.seqlen_q, c.heads, c.head_dim}, "q");
    r.k = make_view(k_values.data(), DType::kF64, {c.batch, c.seqlen_k, c.kv_heads, c.head_dim},
                    "k");
    r.v =
        make_view(v_values.data(), DType::kF64, {c.batch, c.seqlen_k, c.kv_heads, c.head_dim}, "v");
    r.out = params.out;
    r.maybe_lse = {};
    r.storage = DType::kF32;
    return reference_attention(r);
  };
  const auto absolute = [](std::vector<double> values) {
    for (double& value : values) value = std::fabs(value);
    return values;
  };
  const ReferenceResult expected = reference_on(v.effective, q.effective, k.effective);
  const std::string where = c.describe();
  if (c.large_scores) {
    check_large_scores(c, first, expected,
                       reference_on(v.effective, absolute(q.effective), absolute(k.effective)),
                       v.effective);
  } else {
    const ReferenceResult expected_abs = reference_on(absolute(v.effective), q.effective, k.effective);

    Comparison comparison(c.storage);
    std::vector<float> row(static_cast<std::size_t>(c.head_dim));
    for (std::int64_t b = 0; b < c.batch; ++b) {
      for (std::int64_t i = 0; i < c.seqlen_q; ++i) {
        for (std::int64_t h = 0; h < c.heads; ++h) {
          for (std::int64_t e = 0; e < c.head_dim; ++e) {
            row[static_cast<std::size_t>(e)] =
                first.out[static_cast<std::size_t>(first.out_view.offset(b, i, h, e))];
          }
          const float* lse =
              c.with_lse ? &first.lse[static_cast<std::size_t>(first.lse_view.offset(b, h, i))]
                         : nullptr;
          const auto ref_row =
              static_cast<std::size_t>(((b * c.seqlen_q + i) * c.heads + h) * c.head_dim);
          const double ref_lse =
              expected.lse[static_cast<std::size_t>((b * c.heads + h) * c.seqlen_q + i)];
          comparison.add_row({row.data(), lse}, &expected.out[ref_row], &expected_abs.out[ref_row],
                             ref_lse, c.head_dim, where.c_str(), b, i, h);
        }
      }
    }
    comparison.finish(where.c_str());
  }

  // Same bits with another thread count.
  Outputs second(c);
  params.out = second.out_view;
  params.maybe_lse = second.lse_view;
  attend_with_mode(params, c.options, context_for(c.threads % 3 + 1));
  // Compared as bits: NaN == NaN here, and -0 != +0.
  auto same_bits = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() &&
           (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  };
  LOOKBACK_FUZZ_CHECK(same_bits(first.out, second.out) && same_bits(first.lse, second.lse),
                      "output depends on the thread count (%d vs %d)\n  case: %s", c.threads,
                      c.threads % 3 + 1, where.c_str());
}

}  // namespace
}  // namespace lookback::fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace lookback::fuzz;
  FuzzedDataProvider in(data, size);
  const Case c = decode_case(in);
  // LOOKBACK_FUZZ_PRINT=1 names each case, to triage a finding or pick seeds.
  static const bool print = std::getenv("LOOKBACK_FUZZ_PRINT") != nullptr;
  if (print) std::fprintf(stderr, "case: %s\n", c.describe().c_str());
  // Enough values for Q, K and V without repeating.
  const std::size_t count = static_cast<std::size_t>(
      3 * std::max<std::int64_t>(c.batch, 0) *
      std::max<std::int64_t>(std::max(c.seqlen_q, c.seqlen_k), 0) * std::max(c.heads, c.kv_heads) *
      std::max<std::int64_t>(c.head_dim, 0));
  run_case(c, make_values(in, count));
  return 0;
}
