// Varlen benchmark: a packed batch of sequences of very different lengths
// against one sequence with (about) the same number of visible query-key
// pairs, in useful GFLOP/s (4 * heads * head_dim per visible pair,
// DESIGN.md §6). The two run alternately, several rounds, so that a load on
// a shared machine hits both alike; the ratio is the figure.
//
//   varlen_bench [--threads N] [--rounds R] [--heads H] [--dim D]
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "harness.hpp"
#include "lookback/attention.hpp"
#include "lookback/mask.hpp"
#include "lookback/varlen.hpp"
#include "machine.hpp"

int main(int argc, char** argv) {
  int threads = 2, rounds = 5;
  std::int64_t heads = 16, dim = 128;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string arg = argv[i];
    if (arg == "--threads") threads = std::stoi(argv[i + 1]);
    else if (arg == "--rounds") rounds = std::stoi(argv[i + 1]);
    else if (arg == "--heads") heads = std::stoll(argv[i + 1]);
    else if (arg == "--dim") dim = std::stoll(argv[i + 1]);
    else {
      fmt::print(stderr, "usage: varlen_bench [--threads N] [--rounds R] [--heads H] [--dim D]\n");
      return 2;
    }
  }
  using namespace lookback;
  // Mixed lengths, as a serving batch of prompts and continuations is.
  const std::vector<std::int64_t> lengths = {1, 7, 2000, 300, 1, 1024, 64, 513, 7, 1500, 129, 1};
  std::vector<std::int64_t> cu{0};
  double pairs = 0;
  for (std::int64_t n : lengths) {
    cu.push_back(cu.back() + n);
    pairs += static_cast<double>(Mask(n, n).visible_total());
  }
  // One sequence with about as many visible pairs: n (n + 1) / 2 = pairs.
  const auto single = static_cast<std::int64_t>(std::llround((std::sqrt(8 * pairs + 1) - 1) / 2));
  const double single_pairs = static_cast<double>(Mask(single, single).visible_total());
  const std::int64_t total = cu.back();

  std::vector<float> q(static_cast<std::size_t>(std::max(total, single) * heads * dim));
  std::vector<float> k(q.size()), v(q.size()), out(q.size());
  bench::fill_uniform(q, 1);
  bench::fill_uniform(k, 2);
  bench::fill_uniform(v, 3);
  Context context(threads);

  VarlenParams packed;
  packed.q = make_view(q.data(), DType::kF32, {total, heads, dim});
  packed.k = make_view(k.data(), DType::kF32, {total, heads, dim});
  packed.v = make_view(v.data(), DType::kF32, {total, heads, dim});
  packed.cu_seqlens_q = make_view(cu.data(), DType::kI64, {static_cast<std::int64_t>(cu.size())});
  packed.cu_seqlens_k = packed.cu_seqlens_q;
  packed.out = make_mutable_view(out.data(), DType::kF32, {total, heads, dim});
  AttentionParams one;
  one.q = make_view(q.data(), DType::kF32, {1, single, heads, dim});
  one.k = make_view(k.data(), DType::kF32, {1, single, heads, dim});
  one.v = make_view(v.data(), DType::kF32, {1, single, heads, dim});
  one.out = make_mutable_view(out.data(), DType::kF32, {1, single, heads, dim});

  fmt::print("machine: {}; lookback SIMD path {}; {} threads\n", bench::cpu_model(),
             simd_target_name(), threads);
  fmt::print("varlen: {} sequences, {} tokens, {:.0f} visible pairs; one sequence of {} tokens, "
             "{:.0f} pairs; {} heads, head_dim {}, f32\n",
             lengths.size(), total, pairs, single, single_pairs, heads, dim);
  const double flop = 4.0 * static_cast<double>(heads * dim);
  std::vector<double> ratios;
  for (int round = 0; round < rounds; ++round) {
    const bench::Timing varlen = bench::time_it(3, [&] { attend_varlen(packed, context); });
    const bench::Timing alone = bench::time_it(3, [&] { attend(one, context); });
    const double varlen_rate = flop * pairs / varlen.median / 1e9;
    const double alone_rate = flop * single_pairs / alone.median / 1e9;
    ratios.push_back(varlen_rate / alone_rate);
    fmt::print("round {}: varlen {:.1f} GFLOP/s ({} ms), one sequence {:.1f} GFLOP/s ({} ms), "
               "ratio {:.3f}\n",
               round + 1, varlen_rate, bench::ms(varlen.median), alone_rate,
               bench::ms(alone.median), ratios.back());
  }
  std::sort(ratios.begin(), ratios.end());
  fmt::print("median ratio varlen / one sequence: {:.3f}\n", ratios[ratios.size() / 2]);
  return 0;
}
