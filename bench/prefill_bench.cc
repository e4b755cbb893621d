// Causal prefill benchmark: lookback against the machine's measured FMA peak
// and against the materialised baseline a user would write by hand (per head:
// OpenBLAS sgemm for Q K^T, mask, softmax, sgemm for P V), all in one run.
//
//   prefill_bench [--quick] [--threads 1,2] [--sizes 512,1024,2048,4096]
//                 [--heads 32] [--kv-heads 32] [--dim 128] [--reps 3] [--no-baseline]
//
// Useful work (DESIGN.md §6): 4 * batch * heads * head_dim * visible pairs.
#include <fmt/format.h>

#include <cstdlib>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "baseline.hpp"
#include "ceilings.hpp"
#include "harness.hpp"
#include "lookback/attention.hpp"
#include "lookback/mask.hpp"
#include "machine.hpp"
#include "openblas.hpp"

namespace {

struct Options {
  std::vector<int> threads{1, 2};
  std::vector<std::int64_t> sizes{512, 1024, 2048, 4096};
  std::int64_t heads = 32, kv_heads = 32, dim = 128;
  int reps = 3;
  bool baseline = true;
  lookback::DType storage = lookback::DType::kF32;
};

// The options, or nullopt after a usage line on stderr.
std::optional<Options> parse_options(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto next = [&] {
      if (i + 1 >= argc) {
        fmt::print(stderr, "prefill_bench: {} needs a value\n", arg);
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--quick") {
      options.sizes = {512, 2048};
      options.reps = 2;
    } else if (arg == "--threads") {
      options.threads.clear();
      for (auto t : lookback::bench::parse_list(next(), arg)) {
        options.threads.push_back(static_cast<int>(t));
      }
    } else if (arg == "--sizes") {
      options.sizes = lookback::bench::parse_list(next(), arg);
    } else if (arg == "--heads") {
      options.heads = std::stoll(next());
    } else if (arg == "--kv-heads") {
      options.kv_heads = std::stoll(next());
    } else if (arg == "--dim") {
      options.dim = std::stoll(next());
    } else if (arg == "--reps") {
      options.reps = std::stoi(next());
    } else if (arg == "--dtype") {
      options.storage = lookback::parse_dtype(next(), "--dtype");
    } else if (arg == "--no-baseline") {
      options.baseline = false;
    } else {
      fmt::print(stderr,
                 "usage: prefill_bench [--quick] [--threads 1,2] [--sizes 512,1024,2048,4096] "
                 "[--heads H] [--kv-heads HK] [--dim D] [--dtype f32|bf16|f16] [--reps R] [--no-baseline]\n");
      return std::nullopt;
    }
  }
  if (options.kv_heads > options.heads) options.kv_heads = options.heads;
  return options;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace lookback;
  const std::optional<Options> parsed = parse_options(argc, argv);
  if (!parsed) return 2;
  const Options& options = *parsed;

  // Loaded before anything is timed, so that the report names its core.
  const bench::OpenBlas* blas = options.baseline ? &bench::openblas() : nullptr;
  fmt::print("machine: {}, {} cores online; lookback SIMD path {}; OpenBLAS core {}{}\n",
             bench::cpu_model(), std::thread::hardware_concurrency(), simd_target_name(),
             blas ? blas->core : std::string("not loaded (--no-baseline)"),
             blas && !blas->trials.empty()
                 ? fmt::format(" (the fastest correct of {})", bench::describe_trials(*blas))
                 : "");
  fmt::print("causal prefill, batch 1, {} heads, {} kv heads, head_dim {}, {} storage; median of "
             "{} (min-max)\n\n",
             options.heads, options.kv_heads, options.dim, dtype_name(options.storage), options.reps);

  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal;
  for (int threads : options.threads) {
    const double fma_peak = bench::measure_fma_peak_gflops(threads);
    const double amx_peak = options.storage == DType::kBF16 ? bench::measure_amx_peak_gflops(threads) : 0.0;
    const bool amx = amx_peak > 0.0 && kernel_caps().amx_prefill;
    const double dot_peak =
        options.storage == DType::kBF16 ? bench::measure_bf16_dot_peak_gflops(threads) : 0.0;
    const bool dots = !amx && dot_peak > 0.0 && kernel_caps().bf16_dot_prefill;
    // bf16 work on AMX is measured against the tile unit's peak, by
    // VDPBF16PS against that instruction's.
    const double peak = amx ? amx_peak : dots ? dot_peak : fma_peak;
    fmt::print("threads {}: FMA peak {:.1f} GFLOP/s ({}){}{}\n", threads, fma_peak,
               bench::ceiling_target_name(),
               amx_peak > 0.0 ? fmt::format(", AMX bf16 peak {:.1f} GFLOP/s", amx_peak) : "",
               dot_peak > 0.0 ? fmt::format(", bf16 dot-product peak {:.1f} GFLOP/s", dot_peak) : "");
    fmt::print("%peak below is of the {} peak\n", amx ? "AMX" : dots ? "bf16 dot-product" : "FMA");
    fmt::print("{:>6} {:>22} {:>9} {:>7} {:>22} {:>9} {:>8}\n", "n", "lookback ms", "GFLOP/s",
               "%peak", "baseline ms", "GFLOP/s", "speedup");
    Context context(threads);
    for (std::int64_t n : options.sizes) {
      bench::Floats q(static_cast<std::size_t>(n * options.heads * options.dim));
      bench::Floats k(static_cast<std::size_t>(n * options.kv_heads * options.dim));
      bench::Floats v(k.size()), out(q.size());
      for (float& x : q) x = normal(rng);
      for (float& x : k) x = normal(rng);
      for (float& x : v) x = normal(rng);
      bench::Halves q16, k16, v16;  // bf16 or f16 inputs (bench::storage_input)
      const DType storage = options.storage;
      const std::int64_t heads = options.heads, kv_heads = options.kv_heads, dim = options.dim;
      AttentionParams params;
      params.q = bench::storage_input(q, storage, q16, {1, n, heads, dim}, "q");
      params.k = bench::storage_input(k, storage, k16, {1, n, kv_heads, dim}, "k");
      params.v = bench::storage_input(v, storage, v16, {1, n, kv_heads, dim}, "v");
      params.out = make_mutable_view(out.data(), DType::kF32, {1, n, options.heads, options.dim}, "out");
      params.storage = options.storage;
      const double useful = 4.0 * static_cast<double>(options.heads * options.dim) *
                            static_cast<double>(Mask(n, n).visible_total());
      const bench::Timing ours = bench::time_it(options.reps, [&] { attend(params, context); });
      const double ours_rate = useful / ours.median * 1e-9;
      std::string baseline_ms = "-", baseline_rate = "-", speedup = "-";
      if (options.baseline) {
        std::vector<std::vector<float>> scores(static_cast<std::size_t>(threads),
                                               std::vector<float>(static_cast<std::size_t>(n * n)));
        bench::Floats reference_out(out.size());
        const bench::Timing base = bench::time_it(options.reps, [&] {
          bench::materialised_attention(q, k, v, reference_out, n, options.heads, options.kv_heads,
                                 options.dim, threads, scores);
        });
        baseline_ms = bench::ms_text(base);
        baseline_rate = fmt::format("{:.1f}", useful / base.median * 1e-9);
        speedup = fmt::format("{:.2f}x", base.median / ours.median);
      }
      fmt::print("{:>6} {:>22} {:>9.1f} {:>6.1f}% {:>22} {:>9} {:>8}\n", n, bench::ms_text(ours),
                 ours_rate, 100.0 * ours_rate / peak, baseline_ms, baseline_rate, speedup);
      std::fflush(stdout);
    }
    fmt::print("\n");
  }
  return 0;
}
