// lookback bench: where lookback stands on this machine (DESIGN.md §6).
//
// In one run, at one thread count: first the machine's ceilings (the FMA peak
// on the vector unit the dispatcher picks, the AMX bf16 tile peak where
// present, the read bandwidth), then the baselines a user would otherwise
// write (prefill: materialised attention with OpenBLAS sgemm; decode: a plain
// C++ loop over a token-major cache), then lookback, then the ceilings again
// (the higher measurement of each counts). Inputs and outputs are held as
// the CLI holds .npy files (bench::Floats). Every time is the median of a few
// repetitions after a warm-up, with min-max; rates are divided by the
// ceilings and by the baseline, so the figures read as ratios.
//
// --format json writes one object:
//   machine   {cpu, cores_online, threads, simd_target, kernels, ceiling_target,
//              openblas_core ("not loaded" without the prefill suite),
//              openblas_coretype (null when unset), openblas_cores_measured[]
//              {core, sgemm_gflops, correct}: openblas_core is the fastest correct}
//   settings  {quick, warmup_runs, repetitions}
//   ceilings  {fma_gflops, amx_bf16_gflops (0 without AMX), bf16_dot_gflops (0 without
//              AVX512-BF16), read_bandwidth_gbs}
//   cases[]   {suite ("prefill"|"decode"), implementation ("baseline"|"lookback"),
//              dtype, n (prefill) or context (decode), batch, heads, kv_heads,
//              head_dim, ms {median, min, max}, repetitions, work (useful FLOPs,
//              or KV bytes read), rate, rate_unit ("GFLOP/s"|"GB/s"), ceiling
//              ("fma"|"amx_bf16"|"bf16_dot"|"read_bandwidth"), fraction_of_ceiling; lookback
//              cases add speedup_vs_baseline and rel_l2_vs_baseline}
//
// This file holds the flags and the plan; bench_run.cc runs it and
// bench_render.cc prints it. The harness (timing, inputs, ceilings, both
// baselines, OpenBLAS loaded on demand) lives in bench/; a build without it
// (LOOKBACK_BUILD_BENCH=OFF or no OpenBLAS headers) keeps the command, which
// then says so.
#include <fmt/format.h>

#include "common.hpp"
#include "lookback/error.hpp"

#ifdef LOOKBACK_HAVE_BENCH
#include <algorithm>
#include <numeric>
#include <optional>
#include <vector>

#include "bench_report.hpp"
#include "lookback/attention.hpp"
#include "output_format.hpp"
#endif

namespace lookback::cli {

#ifndef LOOKBACK_HAVE_BENCH

void add_bench_command(CLI::App& app, Runner& runner) {
  CLI::App* command = app.add_subcommand(
      "bench", "Benchmark lookback against this machine's ceilings and a baseline (not built in)");
  command->allow_extras();
  command->callback([&runner] {
    runner = []() -> int {
      throw Error("bench: built without the benchmark (LOOKBACK_BUILD_BENCH=OFF)");
    };
  });
}

#else

namespace {

struct BenchOptions {
  std::string suite = "all";
  int threads = 0;
  std::string dtype = "f32";
  bool quick = false;
  OutputFormat format = OutputFormat::kText;
  std::string out;
  // Overrides of the standard cases, for tests and experiments.
  std::vector<std::int64_t> sizes;
  std::vector<std::int64_t> contexts;
  std::int64_t heads = 32;
  std::optional<std::int64_t> kv_heads;
  std::int64_t dim = 128;
  std::optional<int> reps;
};

BenchPlan make_plan(const BenchOptions& o, int threads) {
  BenchPlan plan;
  plan.quick = o.quick;
  plan.prefill = o.suite != "decode";
  plan.decode = o.suite != "prefill";
  if (o.dtype == "all") {
    plan.storages = {DType::kF32, DType::kBF16, DType::kF16};
  } else {
    plan.storages = {parse_dtype(o.dtype, "--dtype")};
  }
  plan.sizes = !o.sizes.empty() ? o.sizes
               : o.quick        ? std::vector<std::int64_t>{512, 2048}
                                : std::vector<std::int64_t>{512, 1024, 2048, 4096, 16384};
  plan.contexts = !o.contexts.empty() ? o.contexts
                  : o.quick           ? std::vector<std::int64_t>{1024, 16384}
                                      : std::vector<std::int64_t>{1024, 4096, 16384, 65536};
  // Ascending and without repeats: the table and the plot read left to right.
  for (auto* lengths : {&plan.sizes, &plan.contexts}) {
    std::sort(lengths->begin(), lengths->end());
    lengths->erase(std::unique(lengths->begin(), lengths->end()), lengths->end());
  }
  plan.heads = o.heads;
  plan.dim = o.dim;
  // Prefill is multi-head (kv heads = heads), decode grouped-query with 8 kv
  // heads, as in the models these shapes come from; gcd keeps a divisor for
  // any --heads.
  plan.prefill_kv_heads = o.kv_heads.value_or(o.heads);
  plan.decode_kv_heads = o.kv_heads.value_or(std::gcd(o.heads, std::int64_t{8}));
  plan.reps = o.reps.value_or(o.quick ? 2 : 3);
  plan.threads = threads;

  if (o.kv_heads && o.heads % *o.kv_heads != 0) {
    throw Error(fmt::format("--kv-heads: {} does not divide --heads {} (expected a divisor)",
                            *o.kv_heads, o.heads));
  }
  if (o.dim > kMaxHeadDim) {
    throw Error(fmt::format("--dim: {} (expected 1 to {})", o.dim, kMaxHeadDim));
  }
  // Sizes whose buffers would not fit any reasonable machine are refused
  // before anything is allocated.
  constexpr double kMaxBytes = 16.0 * (1ull << 30);
  for (std::int64_t n : plan.sizes) {
    // The baseline holds an n x n score matrix per thread.
    const double bytes = 4.0 * static_cast<double>(n) * static_cast<double>(n) * threads +
                         4.0 * 4.0 * static_cast<double>(n) * static_cast<double>(o.heads * o.dim);
    if (bytes > kMaxBytes) {
      throw Error(fmt::format("--sizes: {} needs {:.1f} GiB (expected at most 16 GiB)", n,
                              bytes / (1ull << 30)));
    }
  }
  for (std::int64_t context : plan.contexts) {
    // The source K/V and lookback's cache of them, both f32 at worst.
    const double bytes = 4.0 * 4.0 * static_cast<double>(context) *
                         static_cast<double>(plan.decode_kv_heads * o.dim);
    if (bytes > kMaxBytes) {
      throw Error(fmt::format("--contexts: {} needs {:.1f} GiB (expected at most 16 GiB)",
                              context, bytes / (1ull << 30)));
    }
  }
  return plan;
}

int run_bench(const BenchOptions& o) {
  Context context(o.threads);
  const BenchPlan plan = make_plan(o, context.threads());  // every argument checked before any work
  const BenchReport report = run_benchmark(plan, context);
  std::string text;
  switch (o.format) {
    case OutputFormat::kJson: text = render_bench_json(report); break;
    case OutputFormat::kSvg: text = render_bench_svg(report); break;
    default: text = render_bench_text(report); break;
  }
  write_output(o.out, text);
  return kExitOk;
}

}  // namespace

void add_bench_command(CLI::App& app, Runner& runner) {
  auto o = std::make_shared<BenchOptions>();
  CLI::App* command = add_command(
      app, "bench",
      "Benchmark lookback on this machine, against its measured ceilings and a baseline.",
      "First the ceilings at the chosen thread count (FMA peak on the dispatched vector unit,\n"
      "AMX bf16 tile peak and AVX512-BF16 dot-product peak where present, read bandwidth),\n"
      "then the baselines (prefill: materialised attention with OpenBLAS sgemm on the fastest\n"
      "correct core, measured; decode: a plain C++ loop), then lookback,\n"
      "then the ceilings again (the higher of the two measurements counts).\n"
      "Prefill: batch 1, 32 heads, head_dim 128, n = 512..16384, in useful GFLOP/s. Decode: 32\n"
      "heads, 8 kv heads, contexts 1k..64k, in KV GB/s. bf16 and f16 prefill take Q, K and V\n"
      "in that dtype (the f32 inputs rounded), as a model that keeps its tensors in it passes\n"
      "them. Inputs and outputs sit in 64-byte aligned, huge-page advised memory. Progress goes\n"
      "to stderr; times are medians after a warm-up. --quick runs in under a minute, the full\n"
      "suite in under ten.");
  command->add_option("--suite", o->suite, "prefill, decode or all (default)")
      ->check(CLI::IsMember({"prefill", "decode", "all"}));
  command->add_option("--threads", o->threads, "threads (default: all cores)")->check(kPositive);
  command->add_option("--dtype", o->dtype,
                      "lookback's storage: f32 (default), bf16, f16, all (those three), or K/V "
                      "in 8 bits: int8, fp8e4m3, fp8e5m2")
      ->check(CLI::IsMember({"f32", "bf16", "f16", "all", "int8", "fp8e4m3", "fp8e5m2"}));
  command->add_flag("--quick", o->quick, "two sizes and two contexts, 2 repetitions");
  add_format_option(*command, o->format,
                    {OutputFormat::kText, OutputFormat::kJson, OutputFormat::kSvg});
  add_out_option(*command, o->out);
  const std::string overrides = "Overrides of the standard cases";
  command->add_option("--sizes", o->sizes, "prefill lengths, comma-separated")
      ->delimiter(',')
      ->check(kPositive)
      ->group(overrides);
  command->add_option("--contexts", o->contexts, "decode context lengths, comma-separated")
      ->delimiter(',')
      ->check(kPositive)
      ->group(overrides);
  command->add_option("--heads", o->heads, "query heads (default 32)")->check(kPositive)->group(overrides);
  command->add_option("--kv-heads", o->kv_heads,
                      "kv heads for both suites (default: prefill = heads, decode = gcd(heads, 8))")
      ->check(kPositive)
      ->group(overrides);
  command->add_option("--dim", o->dim, "head_dim (default 128)")->check(kPositive)->group(overrides);
  command->add_option("--reps", o->reps, "timed repetitions after the warm-up (default 3, --quick 2)")
      ->check(kPositive)
      ->group(overrides);
  command->callback([&runner, o] { runner = [o] { return run_bench(*o); }; });
}

#endif  // LOOKBACK_HAVE_BENCH

}  // namespace lookback::cli
