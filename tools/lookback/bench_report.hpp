// `lookback bench`'s run and report: what was planned, what was measured,
// and how it prints (text, json, svg). The timing, the inputs, the ceilings
// and the baselines come from bench/'s harness; bench.cc holds the flags.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "harness.hpp"
#include "openblas.hpp"
#include "lookback/context.hpp"
#include "lookback/dtype.hpp"

namespace lookback::cli {

// Everything a run decided before it started: the shapes and repetitions.
struct BenchPlan {
  bool prefill = true, decode = true;
  bool quick = false;
  std::vector<DType> storages;
  std::vector<std::int64_t> sizes, contexts;
  std::int64_t heads = 32, prefill_kv_heads = 32, decode_kv_heads = 8, dim = 128;
  int reps = 3;
  int threads = 1;
};

struct Ceilings {
  double fma_gflops = 0;
  double amx_gflops = 0;  // 0: no AMX on this CPU or OS
  double bf16_dot_gflops = 0;  // VDPBF16PS; 0: no AVX512-BF16
  double bandwidth_gbs = 0;
  std::string target;     // the Highway target the FMA loop ran on
};

struct BenchCase {
  std::string suite;             // "prefill" or "decode"
  bool ours = false;             // lookback, or the baseline
  DType storage = DType::kF32;
  std::int64_t length = 0;       // n (prefill) or context (decode)
  std::int64_t heads = 0, kv_heads = 0, head_dim = 0;
  bench::Timing time;
  double work = 0;               // useful FLOPs (prefill) or KV bytes read (decode)
  double rate = 0;               // GFLOP/s or GB/s
  std::string ceiling;           // "fma", "amx_bf16" or "read_bandwidth"
  double ceiling_value = 0;
  std::optional<double> speedup;  // baseline time / our time
  std::optional<double> rel_l2;   // our output against the baseline's
};

struct BenchMachine {
  std::string cpu;
  unsigned cores_online = 0;
  std::string simd_target;
  std::string kernels;
  std::string openblas_core;  // "not loaded" when no prefill baseline ran
  std::optional<std::string> openblas_coretype;
  std::vector<bench::OpenBlasCoreTrial> openblas_trials;  // the cores measured to pick openblas_core
};

struct BenchReport {
  BenchMachine machine;
  Ceilings ceilings;
  BenchPlan plan;
  bool amx_kernels = false;     // bf16 prefill runs on AMX tiles
  bool bf16_dot_kernels = false;  // bf16 prefill runs as VDPBF16PS dot products
  std::vector<BenchCase> cases;  // in table order: per length, the baseline then lookback
};

// Runs the plan on `context`'s threads, with progress steps on stderr.
BenchReport run_benchmark(const BenchPlan& plan, Context& context);

std::string render_bench_text(const BenchReport& report);
std::string render_bench_json(const BenchReport& report);
std::string render_bench_svg(const BenchReport& report);

// "1 thread", "2 threads".
std::string threads_text(int threads);

}  // namespace lookback::cli
