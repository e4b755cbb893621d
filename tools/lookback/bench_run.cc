// Runs `lookback bench`'s plan: the ceilings, the baselines, lookback, the
// ceilings again (bench_report.hpp).
#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <span>
#include <thread>

#include "baseline.hpp"
#include "bench_report.hpp"
#include "ceilings.hpp"
#include "lookback/attention.hpp"
#include "lookback/kernel_caps.hpp"
#include "lookback/kv_cache.hpp"
#include "lookback/mask.hpp"
#include "machine.hpp"
#include "openblas.hpp"
#include "progress.hpp"

namespace lookback::cli {
namespace {

std::size_t count(std::int64_t a, std::int64_t b, std::int64_t c) {
  return static_cast<std::size_t>(a * b * c);
}

// A case of `suite` at `length` with the plan's shape; the caller fills in
// the implementation, the dtype and the measurements.
BenchCase new_case(const BenchPlan& plan, const std::string& suite, std::int64_t length) {
  BenchCase c;
  c.suite = suite;
  c.length = length;
  c.heads = plan.heads;
  c.kv_heads = suite == "prefill" ? plan.prefill_kv_heads : plan.decode_kv_heads;
  c.head_dim = plan.dim;
  return c;
}

struct Inputs {
  // In the memory lookback's CLI reads .npy files into (bench::Floats).
  bench::Floats q;  // prefill (1, n, heads, head_dim); decode (heads, head_dim)
  bench::Floats k;  // (n or the longest context, kv_heads, head_dim)
  bench::Floats v;  // (n or the longest context, kv_heads, head_dim)
};

Inputs make_inputs(std::int64_t q_tokens, std::int64_t kv_tokens, const BenchPlan& plan,
                   std::int64_t kv_heads, std::uint64_t seed) {
  Inputs in;
  in.q.resize(count(q_tokens, plan.heads, plan.dim));
  in.k.resize(count(kv_tokens, kv_heads, plan.dim));
  in.v.resize(in.k.size());
  bench::fill_uniform(in.q, seed);
  bench::fill_uniform(in.k, seed + 1);
  bench::fill_uniform(in.v, seed + 2);
  return in;
}

// Seeded by n, so the baseline and lookback see the same inputs.
Inputs prefill_inputs(const BenchPlan& plan, std::int64_t n) {
  return make_inputs(n, n, plan, plan.prefill_kv_heads, static_cast<std::uint64_t>(n) * 3);
}

Inputs decode_inputs(const BenchPlan& plan) {
  return make_inputs(1, *std::max_element(plan.contexts.begin(), plan.contexts.end()), plan,
                     plan.decode_kv_heads, 101);
}

double prefill_flops(const BenchPlan& plan, std::int64_t n) {
  // 4 * batch * heads * head_dim per visible pair (DESIGN.md §6).
  return 4.0 * static_cast<double>(plan.heads * plan.dim) *
         static_cast<double>(Mask(n, n).visible_total());
}

double kv_bytes(const BenchPlan& plan, std::int64_t context, DType storage) {
  // 8-bit rows carry one f32 scale each.
  return 2.0 * static_cast<double>(context) * static_cast<double>(plan.decode_kv_heads) *
         (static_cast<double>(plan.dim) * static_cast<double>(dtype_size(storage)) +
          (is_quantized(storage) ? 4.0 : 0.0));
}

// The ceilings are measured before the cases and again after them, and the
// higher of the two counts: on a shared machine a transient load can only
// lower a measured ceiling, which would flatter every fraction.
void measure_ceilings(Ceilings& ceilings, int threads, const char* when, Progress& progress) {
  progress.start_step(fmt::format("ceiling{}: FMA peak, {}", when, threads_text(threads)));
  const double fma = bench::measure_fma_peak_gflops(threads);
  ceilings.fma_gflops = std::max(ceilings.fma_gflops, fma);
  ceilings.target = bench::ceiling_target_name();
  progress.finish_step(fmt::format("{:.1f} GFLOP/s ({})", fma, ceilings.target));
  progress.start_step(fmt::format("ceiling{}: AMX bf16 peak, {}", when, threads_text(threads)));
  const double amx = bench::measure_amx_peak_gflops(threads);
  ceilings.amx_gflops = std::max(ceilings.amx_gflops, amx);
  progress.finish_step(amx > 0 ? fmt::format("{:.1f} GFLOP/s", amx) : "no AMX on this CPU or OS");
  progress.start_step(fmt::format("ceiling{}: bf16 dot-product peak, {}", when, threads_text(threads)));
  const double dots = bench::measure_bf16_dot_peak_gflops(threads);
  ceilings.bf16_dot_gflops = std::max(ceilings.bf16_dot_gflops, dots);
  progress.finish_step(dots > 0 ? fmt::format("{:.1f} GFLOP/s", dots) : "no AVX512-BF16 on this CPU");
  progress.start_step(fmt::format("ceiling{}: read bandwidth, {}", when, threads_text(threads)));
  const double bandwidth = bench::measure_read_bandwidth_gbs(threads);
  ceilings.bandwidth_gbs = std::max(ceilings.bandwidth_gbs, bandwidth);
  progress.finish_step(fmt::format("{:.1f} GB/s", bandwidth));
}

// The baselines' cases (all f32) and outputs, by length, to compare with.
struct Baselines {
  std::map<std::int64_t, BenchCase> prefill, decode;
  std::map<std::int64_t, bench::Floats> prefill_out, decode_out;
};

class CaseRunner {
 public:
  CaseRunner(const BenchPlan& plan, Context& context, BenchReport& report)
      : plan_(plan), context_(context), report_(report),
        progress_("lookback bench", true,
                  8 + static_cast<int>((plan.prefill ? plan.sizes.size() : 0) +
                                       (plan.decode ? plan.contexts.size() : 0)) *
                          (1 + static_cast<int>(plan.storages.size()))) {}

  void ceilings(const char* when) {
    measure_ceilings(report_.ceilings, plan_.threads, when, progress_);
  }

  void prefill_baselines() {
    std::vector<std::vector<float>> scores(static_cast<std::size_t>(plan_.threads));
    for (std::int64_t n : plan_.sizes) {
      step(fmt::format("prefill n={} f32 baseline (OpenBLAS {})", n, report_.machine.openblas_core));
      const Inputs in = prefill_inputs(plan_, n);
      bench::Floats& out = baselines_.prefill_out[n];
      out.assign(in.q.size(), 0.0f);
      for (auto& s : scores) s.resize(count(n, n, 1));
      BenchCase c = new_case(plan_, "prefill", n);
      c.time = bench::time_it(plan_.reps, [&] {
        bench::materialised_attention(in.q, in.k, in.v, out, n, plan_.heads,
                                      plan_.prefill_kv_heads, plan_.dim, plan_.threads, scores);
      });
      c.work = prefill_flops(plan_, n);
      c.ceiling = "fma";
      done(baselines_.prefill[n] = c);
    }
  }

  void decode_baselines() {
    const Inputs in = decode_inputs(plan_);
    std::vector<std::vector<float>> scores(static_cast<std::size_t>(plan_.threads));
    for (std::int64_t n : plan_.contexts) {
      step(fmt::format("decode context={} f32 baseline (plain C++ loop)", n));
      bench::Floats& out = baselines_.decode_out[n];
      out.assign(in.q.size(), 0.0f);
      for (auto& s : scores) s.resize(static_cast<std::size_t>(n));
      BenchCase c = new_case(plan_, "decode", n);
      c.time = bench::time_it(plan_.reps, [&] {
        bench::plain_decode(in.q, in.k, in.v, out, n, plan_.heads, plan_.decode_kv_heads,
                            plan_.dim, plan_.threads, scores);
      });
      c.work = kv_bytes(plan_, n, DType::kF32);
      c.ceiling = "read_bandwidth";
      done(baselines_.decode[n] = c);
    }
  }

  void prefill() {
    for (std::int64_t n : plan_.sizes) {
      const Inputs in = prefill_inputs(plan_, n);
      bench::Floats out(in.q.size());
      const std::int64_t kv_heads = plan_.prefill_kv_heads;
      bench::Halves q16, k16, v16;  // bf16 or f16 inputs (bench::storage_input)
      AttentionParams params;
      params.out = make_mutable_view(out.data(), DType::kF32, {1, n, plan_.heads, plan_.dim}, "out");
      report_.cases.push_back(baselines_.prefill[n]);
      for (DType storage : plan_.storages) {
        step(fmt::format("prefill n={} {} lookback", n, dtype_name(storage)));
        params.storage = storage;
        params.q = bench::storage_input(in.q, storage, q16, {1, n, plan_.heads, plan_.dim}, "q");
        params.k = bench::storage_input(in.k, storage, k16, {1, n, kv_heads, plan_.dim}, "k");
        params.v = bench::storage_input(in.v, storage, v16, {1, n, kv_heads, plan_.dim}, "v");
        BenchCase c = ours("prefill", n, storage, [&] { attend(params, context_); });
        c.work = prefill_flops(plan_, n);
        c.ceiling = storage != DType::kBF16   ? "fma"
                    : report_.amx_kernels      ? "amx_bf16"
                    : report_.bf16_dot_kernels ? "bf16_dot"
                                               : "fma";
        finish(c, baselines_.prefill[n], out, baselines_.prefill_out[n]);
      }
      baselines_.prefill_out.erase(n);
    }
  }

  void decode() {
    const Inputs in = decode_inputs(plan_);
    const std::int64_t kv_heads = plan_.decode_kv_heads;
    std::vector<float> out(in.q.size());
    const DecodeStep step_params{
        .q = make_view(in.q.data(), DType::kF32, {1, plan_.heads, plan_.dim}, "q"),
        .out = make_mutable_view(out.data(), DType::kF32, {1, plan_.heads, plan_.dim}, "out"),
        .maybe_lse = {}};
    for (std::int64_t n : plan_.contexts) {
      report_.cases.push_back(baselines_.decode[n]);
      for (DType storage : plan_.storages) {
        step(fmt::format("decode context={} {} lookback", n, dtype_name(storage)));
        KvCache cache({.kv_heads = kv_heads, .head_dim = plan_.dim, .storage = storage, .rope = {}},
                      n);
        cache.append(make_view(in.k.data(), DType::kF32, {n, kv_heads, plan_.dim}, "k"),
                     make_view(in.v.data(), DType::kF32, {n, kv_heads, plan_.dim}, "v"));
        BenchCase c = ours("decode", n, storage, [&] { cache.attend(step_params, {}, context_); });
        c.work = kv_bytes(plan_, n, storage);
        c.ceiling = "read_bandwidth";
        finish(c, baselines_.decode[n], out, baselines_.decode_out[n]);
      }
    }
  }

 private:
  void step(const std::string& what) { progress_.start_step(what); }
  void done(const BenchCase& c) { progress_.finish_step(fmt::format("{} ms", bench::ms(c.time.median))); }

  BenchCase ours(const std::string& suite, std::int64_t n, DType storage,
                 const std::function<void()>& body) {
    BenchCase c = new_case(plan_, suite, n);
    c.ours = true;
    c.storage = storage;
    c.time = bench::time_it(plan_.reps, body);
    return c;
  }

  void finish(BenchCase& c, const BenchCase& baseline, std::span<const float> out,
              std::span<const float> baseline_out) {
    c.speedup = baseline.time.median / c.time.median;
    c.rel_l2 = bench::rel_l2(out, baseline_out);
    report_.cases.push_back(c);
    done(c);
  }

  const BenchPlan& plan_;
  Context& context_;
  BenchReport& report_;
  Progress progress_;
  Baselines baselines_;
};

BenchMachine describe_machine(bool load_openblas) {
  BenchMachine machine;
  // simd_target_name() applies LOOKBACK_SIMD's cap to Highway's dispatch,
  // which the ceilings' loops share: call it first so the FMA peak is
  // measured on the same vector unit the kernels use.
  machine.simd_target = simd_target_name();
  machine.kernels = describe_kernels();
  machine.cpu = bench::cpu_model();
  machine.cores_online = std::thread::hardware_concurrency();
  machine.openblas_core = "not loaded";
  if (load_openblas) {
    const bench::OpenBlas& blas = bench::openblas();
    machine.openblas_core = blas.core;
    machine.openblas_coretype = blas.coretype;
    machine.openblas_trials = blas.trials;
  }
  return machine;
}

}  // namespace

std::string threads_text(int threads) {
  return fmt::format("{} thread{}", threads, threads == 1 ? "" : "s");
}

BenchReport run_benchmark(const BenchPlan& plan, Context& context) {
  BenchReport report;
  report.plan = plan;
  // Only the prefill baseline needs OpenBLAS; it is loaded before any
  // measurement, so its thread pool is up before anything is timed.
  report.machine = describe_machine(plan.prefill);
  CaseRunner runner(plan, context, report);
  runner.ceilings("");
  // bf16 prefill on AMX tiles is held to the tile unit's peak; every other
  // prefill to the FMA peak.
  report.amx_kernels = report.ceilings.amx_gflops > 0 &&
                       report.machine.kernels.find("AMX") != std::string::npos;
  // ... and where AVX512-BF16 dot products run it, to their peak.
  report.bf16_dot_kernels = report.ceilings.bf16_dot_gflops > 0 && kernel_caps().bf16_dot_prefill;
  // Baselines first (all f32), then lookback; outputs are kept to compare.
  if (plan.prefill) runner.prefill_baselines();
  if (plan.decode) runner.decode_baselines();
  if (plan.prefill) runner.prefill();
  if (plan.decode) runner.decode();
  runner.ceilings(" again");
  const Ceilings& ceilings = report.ceilings;
  for (BenchCase& c : report.cases) {
    c.rate = c.work / c.time.median * 1e-9;
    c.ceiling_value = c.ceiling == "fma"        ? ceilings.fma_gflops
                      : c.ceiling == "amx_bf16" ? ceilings.amx_gflops
                      : c.ceiling == "bf16_dot" ? ceilings.bf16_dot_gflops
                                                : ceilings.bandwidth_gbs;
  }
  return report;
}

}  // namespace lookback::cli
