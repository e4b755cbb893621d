// Fuzzing of variable-length packed batches (attend_varlen): up to five
// sequences of 0 to 40 query and key tokens, sometimes with broken offsets
// (not ascending, wrong start or end, negative, q and k of different
// lengths), any mask, sinks, storage dtype (8-bit included) and thread count.
//   - broken offsets must throw lookback::Error, valid ones must not;
//   - each sequence's rows must equal, bit for bit, lookback::attend on that
//     sequence alone, and the float64 reference on it within the storage's
//     tolerance (the reference on the dequantized K/V for 8-bit storage);
//   - and the same bits with another thread count.
#include <fuzzer/FuzzedDataProvider.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/quant.hpp"
#include "fuzz_common.hpp"
#include "lookback/attention.hpp"
#include "lookback/error.hpp"
#include "lookback/reference.hpp"
#include "lookback/varlen.hpp"

namespace lookback::fuzz {
namespace {

Context& context_for(int threads) {
  static Context one(1), two(2), three(3);
  return threads == 1 ? one : threads == 2 ? two : three;
}

enum class Broken : int { kNone, kDescending, kStart, kEnd, kNegative, kLength, kCount };

void run(FuzzedDataProvider& in) {
  const int sequences = in.ConsumeIntegralInRange(1, 5);
  std::vector<std::int64_t> cu_q{0}, cu_k{0};
  for (int b = 0; b < sequences; ++b) {
    cu_q.push_back(cu_q.back() + in.ConsumeIntegralInRange(0, 40));
    cu_k.push_back(cu_k.back() + in.ConsumeIntegralInRange(0, 40));
  }
  const std::int64_t heads = in.ConsumeIntegralInRange(1, 4);
  const std::int64_t kv_heads = heads % 2 == 0 && in.ConsumeBool() ? heads / 2 : heads;
  const std::int64_t dim = in.ConsumeIntegralInRange(1, 48);
  MaskSpec mask;
  const int causal_pick = in.ConsumeIntegralInRange(0, 5);
  mask.causal = causal_pick < 4 ? Causal::kBottomRight : causal_pick == 4 ? Causal::kTopLeft : Causal::kNone;
  if (mask.causal != Causal::kNone && in.ConsumeIntegralInRange(0, 3) == 3) {
    mask.window_left = in.ConsumeIntegralInRange(0, 40);
  }
  constexpr DType kStorages[] = {DType::kF32, DType::kF32, DType::kBF16, DType::kF16,
                                 DType::kI8,  DType::kFP8E4M3, DType::kFP8E5M2, DType::kF32};
  const DType storage = kStorages[in.ConsumeIntegralInRange(0, 7)];
  const bool sinks = in.ConsumeIntegralInRange(0, 3) == 3;
  const int threads = in.ConsumeIntegralInRange(1, 3);
  // Mostly valid; picks 11 .. 15 break the query offsets one way each.
  const int broken_pick = in.ConsumeIntegralInRange(0, 15);
  const Broken broken = broken_pick <= 10 ? Broken::kNone : static_cast<Broken>(broken_pick - 10);
  std::mt19937_64 rng(in.ConsumeIntegral<std::uint64_t>());
  std::normal_distribution<float> normal;

  const std::int64_t total_q = cu_q.back(), total_k = cu_k.back();
  std::vector<float> q(static_cast<std::size_t>(total_q * heads * dim));
  std::vector<float> k(static_cast<std::size_t>(total_k * kv_heads * dim)), v(k.size());
  std::vector<float> sink_logits;
  for (auto* x : {&q, &k, &v}) for (float& e : *x) e = normal(rng);
  for (std::int64_t h = 0; h < heads; ++h) sink_logits.push_back(normal(rng));
  std::vector<float> out(q.size() + 1), lse(static_cast<std::size_t>(heads * total_q) + 1);

  std::vector<std::int64_t> offsets_q = cu_q;
  switch (broken) {
    case Broken::kDescending:
      if (sequences >= 2) {
        offsets_q[1] = offsets_q[2] + 1;
      } else {
        offsets_q.push_back(0);  // then too long as well
      }
      break;
    case Broken::kStart: offsets_q[0] = 1; break;
    case Broken::kEnd: offsets_q.back() += 1; break;
    case Broken::kNegative: offsets_q[1] = -1; break;
    case Broken::kLength: offsets_q.push_back(total_q); break;
    default: break;
  }
  VarlenParams params;
  params.q = make_view(q.empty() ? nullptr : q.data(), DType::kF32, {total_q, heads, dim});
  params.k = make_view(k.empty() ? nullptr : k.data(), DType::kF32, {total_k, kv_heads, dim});
  params.v = make_view(v.empty() ? nullptr : v.data(), DType::kF32, {total_k, kv_heads, dim});
  params.cu_seqlens_q = make_view(offsets_q.data(), DType::kI64, {static_cast<std::int64_t>(offsets_q.size())});
  params.cu_seqlens_k = make_view(cu_k.data(), DType::kI64, {static_cast<std::int64_t>(cu_k.size())});
  params.out = make_mutable_view(out.data(), DType::kF32, {total_q, heads, dim});
  params.maybe_lse = make_mutable_view(lse.data(), DType::kF32, {heads, total_q});
  params.mask = mask;
  params.storage = storage;
  params.maybe_sink_logits = sinks ? sink_logits.data() : nullptr;
  const bool valid = broken == Broken::kNone;
  try {
    attend_varlen(params, context_for(threads));
  } catch (const Error& error) {
    if (valid) fail("valid varlen batch rejected: %s", error.what());
    LOOKBACK_FUZZ_CHECK(std::strlen(error.what()) > 0, "empty error message");
    return;
  }
  if (!valid) fail("broken offsets (kind %d) accepted", static_cast<int>(broken));

  for (int b = 0; b < sequences; ++b) {
    const std::int64_t q0 = cu_q[b], sq = cu_q[b + 1] - q0, k0 = cu_k[b], sk = cu_k[b + 1] - k0;
    if (sq == 0) continue;
    std::vector<float> qs(q.begin() + q0 * heads * dim, q.begin() + (q0 + sq) * heads * dim);
    std::vector<float> ks(k.begin() + k0 * kv_heads * dim, k.begin() + (k0 + sk) * kv_heads * dim);
    std::vector<float> vs(v.begin() + k0 * kv_heads * dim, v.begin() + (k0 + sk) * kv_heads * dim);
    std::vector<float> alone(qs.size()), alone_lse(static_cast<std::size_t>(heads * sq));
    AttentionParams p;
    p.q = make_view(qs.data(), DType::kF32, {1, sq, heads, dim});
    p.k = make_view(ks.empty() ? nullptr : ks.data(), DType::kF32, {1, sk, kv_heads, dim});
    p.v = make_view(vs.empty() ? nullptr : vs.data(), DType::kF32, {1, sk, kv_heads, dim});
    p.out = make_mutable_view(alone.data(), DType::kF32, {1, sq, heads, dim});
    p.maybe_lse = make_mutable_view(alone_lse.data(), DType::kF32, {1, heads, sq});
    p.mask = mask;
    p.storage = storage;
    p.maybe_sink_logits = params.maybe_sink_logits;
    attend(p, context_for(threads % 3 + 1));
    LOOKBACK_FUZZ_CHECK(std::memcmp(alone.data(), out.data() + q0 * heads * dim,
                                    alone.size() * sizeof(float)) == 0,
                        "sequence %d of %d differs from its run alone", b, sequences);
    for (std::int64_t h = 0; h < heads; ++h) {
      LOOKBACK_FUZZ_CHECK(std::memcmp(alone_lse.data() + h * sq, lse.data() + h * total_q + q0,
                                      static_cast<std::size_t>(sq) * sizeof(float)) == 0,
                          "sequence %d: lse of head %lld differs from its run alone", b,
                          static_cast<long long>(h));
    }
    // The reference on what the kernels hold.
    for (float& x : ks) x = round_to_storage(x, storage);
    for (float& x : vs) x = round_to_storage(x, storage);
    if (is_quantized(storage)) {
      for (std::size_t first = 0; first < ks.size(); first += static_cast<std::size_t>(dim)) {
        round_row_to_quantized(ks.data() + first, dim, storage);
        round_row_to_quantized(vs.data() + first, dim, storage);
      }
    } else {
      for (float& x : qs) x = round_to_storage(x, storage);
    }
    const ReferenceResult expected = reference_attention(p);
    // The same with |v|: the size of the terms float32 adds (fuzz_common.hpp).
    for (float& x : vs) x = std::fabs(x);
    const ReferenceResult expected_abs = reference_attention(p);
    Comparison comparison(storage);
    for (std::int64_t i = 0; i < sq; ++i) {
      for (std::int64_t h = 0; h < heads; ++h) {
        const auto row = static_cast<std::size_t>((i * heads + h) * dim);
        comparison.add_row({alone.data() + row, &alone_lse[static_cast<std::size_t>(h * sq + i)]},
                           &expected.out[row], &expected_abs.out[row],
                           expected.lse[static_cast<std::size_t>(h * sq + i)], dim, "varlen", 0, i, h);
      }
    }
    comparison.finish("varlen");
  }
}

}  // namespace
}  // namespace lookback::fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  lookback::fuzz::run(in);
  return 0;
}
