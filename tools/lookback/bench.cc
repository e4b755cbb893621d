// lookback bench: where lookback stands on this machine (DESIGN.md §6).
//
// In one run, at one thread count: first the machine's ceilings (the FMA peak
// on the vector unit the dispatcher picks, the AMX bf16 tile peak where
// present, the read bandwidth), then the baselines a user would otherwise
// write (prefill: materialised attention with OpenBLAS sgemm; decode: a plain
// C++ loop over a token-major cache), then lookback, then the ceilings again
// (the higher measurement of each counts). Every time is the median of a few
// repetitions after a warm-up, with min-max; rates are divided by the
// ceilings and by the baseline, so the figures read as ratios.
//
// --format json writes one object:
//   machine   {cpu, cores_online, threads, simd_target, kernels, ceiling_target,
//              openblas_core, openblas_coretype (null when unset)}
//   settings  {quick, warmup_runs, repetitions}
//   ceilings  {fma_gflops, amx_bf16_gflops (0 without AMX), read_bandwidth_gbs}
//   cases[]   {suite ("prefill"|"decode"), implementation ("baseline"|"lookback"),
//              dtype, n (prefill) or context (decode), batch, heads, kv_heads,
//              head_dim, ms {median, min, max}, repetitions, work (useful FLOPs,
//              or KV bytes read), rate, rate_unit ("GFLOP/s"|"GB/s"), ceiling
//              ("fma"|"amx_bf16"|"read_bandwidth"), fraction_of_ceiling; lookback
//              cases add speedup_vs_baseline and rel_l2_vs_baseline}
//
// The benchmark code (ceilings, the OpenBLAS baseline) lives in bench/; a
// build without it (LOOKBACK_BUILD_BENCH=OFF or no OpenBLAS) keeps the
// command, which then says so.
#include <fmt/format.h>

#include "common.hpp"
#include "lookback/error.hpp"

#ifdef LOOKBACK_HAVE_BENCH
#include <cblas.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <numeric>
#include <optional>
#include <thread>
#include <vector>

#include "baseline.hpp"
#include "ceilings.hpp"
#include "lookback/attention.hpp"
#include "lookback/kv_cache.hpp"
#include "lookback/mask.hpp"
#include "machine.hpp"
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

using Clock = std::chrono::steady_clock;

struct BenchOptions {
  std::string suite = "all";
  int threads = 0;
  std::string dtype = "f32";
  bool quick = false;
  std::string format = "text";
  std::string out;
  // Overrides of the standard cases, for tests and experiments.
  std::vector<std::int64_t> sizes;
  std::vector<std::int64_t> contexts;
  std::int64_t heads = 32;
  std::optional<std::int64_t> kv_heads;
  std::int64_t dim = 128;
  std::optional<int> reps;
};

// Everything a run decided before it started: the shapes and repetitions.
struct Plan {
  bool prefill = true, decode = true;
  std::vector<DType> storages;
  std::vector<std::int64_t> sizes, contexts;
  std::int64_t heads = 32, prefill_kv_heads = 32, decode_kv_heads = 8, dim = 128;
  int reps = 3;
  int threads = 1;
};

struct Timing {
  double median = 0, min = 0, max = 0;  // seconds
  int reps = 0;
};

struct Ceilings {
  double fma_gflops = 0;
  double amx_gflops = 0;  // 0: no AMX on this CPU or OS
  double bandwidth_gbs = 0;
  std::string target;     // the Highway target the FMA loop ran on
};

struct Case {
  std::string suite;             // "prefill" or "decode"
  bool ours = false;             // lookback, or the baseline
  DType storage = DType::kF32;
  std::int64_t length = 0;       // n (prefill) or context (decode)
  std::int64_t heads = 0, kv_heads = 0, head_dim = 0;
  Timing time;
  double work = 0;               // useful FLOPs (prefill) or KV bytes read (decode)
  double rate = 0;               // GFLOP/s or GB/s
  std::string ceiling;           // "fma", "amx_bf16" or "read_bandwidth"
  double ceiling_value = 0;
  std::optional<double> speedup;  // baseline time / our time
  std::optional<double> rel_l2;   // our output against the baseline's
};

struct Machine {
  std::string cpu;
  unsigned cores_online = 0;
  std::string simd_target;
  std::string kernels;
  std::string openblas_core;
  std::optional<std::string> openblas_coretype;
};

struct Report {
  Machine machine;
  Ceilings ceilings;
  Plan plan;
  bool quick = false;
  bool amx_kernels = false;  // bf16 prefill runs on AMX tiles
  std::vector<Case> cases;  // in table order: per length, the baseline then lookback
};

// The progress line on stderr: "[3/12] prefill n=2048 f32 lookback ... 176.0 ms".
class Progress {
 public:
  explicit Progress(int total) : total_(total) {}

  void start(const std::string& what) {
    ++step_;
    fmt::print(stderr, "[{}/{}] {} ... ", step_, total_, what);
    std::fflush(stderr);
  }

  void done(const std::string& result) {
    fmt::print(stderr, "{}\n", result);
    std::fflush(stderr);
  }

 private:
  int total_;
  int step_ = 0;
};

double seconds_of(const std::function<void()>& body) {
  const auto start = Clock::now();
  body();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// One warm-up run (page faults, caches, thread start), then `reps` timed
// runs. A case slower than a second per run gets at most 2: its spread is
// small next to its length, and the full suite must stay under ten minutes.
Timing time_it(int reps, const std::function<void()>& body) {
  const double warmup = seconds_of(body);
  if (warmup > 1.0) reps = std::min(reps, 2);
  std::vector<double> seconds;
  for (int r = 0; r < reps; ++r) seconds.push_back(seconds_of(body));
  std::sort(seconds.begin(), seconds.end());
  const std::size_t mid = seconds.size() / 2;
  return {.median = seconds.size() % 2 ? seconds[mid] : (seconds[mid - 1] + seconds[mid]) / 2,
          .min = seconds.front(),
          .max = seconds.back(),
          .reps = reps};
}

std::string threads_text(int threads) {
  return fmt::format("{} thread{}", threads, threads == 1 ? "" : "s");
}

// Milliseconds with about four significant digits: decode steps take
// fractions of a millisecond, prefill at n = 4096 hundreds.
std::string ms(double seconds) {
  const double value = seconds * 1e3;
  return value < 1 ? fmt::format("{:.3f}", value)
         : value < 100 ? fmt::format("{:.2f}", value)
                       : fmt::format("{:.1f}", value);
}

std::string ms_text(const Timing& t) {
  return fmt::format("{} ({}-{})", ms(t.median), ms(t.min), ms(t.max));
}

// Uniform values in [-1, 1) from splitmix64: the values do not change the
// work done, and a cheap generator keeps filling 64k-token caches quick.
void fill_uniform(std::vector<float>& values, std::uint64_t seed) {
  std::uint64_t state = seed;
  for (float& x : values) {
    state += 0x9E3779B97F4A7C15ull;
    std::uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    x = static_cast<float>(static_cast<double>(z >> 40) * 0x1.0p-23 - 1.0);
  }
}

double rel_l2(const std::vector<float>& ours, const std::vector<float>& reference) {
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < ours.size(); ++i) {
    const double d = static_cast<double>(ours[i]) - static_cast<double>(reference[i]);
    diff += d * d;
    norm += static_cast<double>(reference[i]) * static_cast<double>(reference[i]);
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

std::size_t count(std::int64_t a, std::int64_t b, std::int64_t c, std::int64_t d = 1) {
  return static_cast<std::size_t>(a * b * c * d);
}

// The decode loop a user writes by hand (llama2.c's shape): the cache is
// token-major, (context, kv_heads, head_dim) f32; per query head, a dot
// product with every cached key, a softmax, a weighted sum of the values.
// Heads are split across threads. Plain C++ compiled with the project's
// flags: no intrinsics, no Highway, no -ffast-math.
void plain_decode(const std::vector<float>& q,  // (heads, head_dim)
                  const std::vector<float>& k,  // (>= context, kv_heads, head_dim)
                  const std::vector<float>& v,  // (>= context, kv_heads, head_dim)
                  std::vector<float>& out,      // (heads, head_dim)
                  std::int64_t context, std::int64_t heads, std::int64_t kv_heads,
                  std::int64_t dim, int threads,
                  std::vector<std::vector<float>>& scores) {  // (threads, context)
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  const std::int64_t group = heads / kv_heads;
  const std::int64_t row = kv_heads * dim;  // floats between two tokens of one head
  auto run_heads = [&](int worker) {
    float* att = scores[static_cast<std::size_t>(worker)].data();
    for (std::int64_t h = worker; h < heads; h += threads) {
      const float* qh = q.data() + h * dim;
      const std::int64_t offset = (h / group) * dim;
      float max = -INFINITY;
      for (std::int64_t t = 0; t < context; ++t) {
        const float* kt = k.data() + t * row + offset;
        float dot = 0;
        for (std::int64_t d = 0; d < dim; ++d) dot += qh[d] * kt[d];
        att[t] = dot * scale;
        max = std::max(max, att[t]);
      }
      float sum = 0;
      for (std::int64_t t = 0; t < context; ++t) {
        att[t] = std::exp(att[t] - max);
        sum += att[t];
      }
      float* oh = out.data() + h * dim;
      std::fill(oh, oh + dim, 0.0f);
      for (std::int64_t t = 0; t < context; ++t) {
        const float* vt = v.data() + t * row + offset;
        const float p = att[t] / sum;
        for (std::int64_t d = 0; d < dim; ++d) oh[d] += p * vt[d];
      }
    }
  };
  std::vector<std::thread> workers;
  for (int t = 1; t < threads; ++t) workers.emplace_back(run_heads, t);
  run_heads(0);
  for (auto& worker : workers) worker.join();
}

// OpenBLAS 0.3.21 does not recognise this CPU and falls back to a generic
// kernel unless OPENBLAS_CORETYPE names one; it reads the variable when the
// library loads, so set it and start this command again (as prefill_bench
// does). Only `lookback bench` does this, only when the prefill baseline
// runs, and never over a value the user set. If exec fails the run goes on
// and the report names whatever core OpenBLAS picked.
void reexec_with_openblas_coretype() {
  if (!bench::cpu_has_flag("avx512f") || std::getenv("OPENBLAS_CORETYPE") != nullptr) return;
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  const std::string cmdline((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> args;
  std::string current;
  for (char c : cmdline) {  // each argument ends with a NUL, empty ones included
    if (c == '\0') {
      args.push_back(current);
      current.clear();
    } else {
      current += c;
    }
  }
  if (args.empty()) return;
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  setenv("OPENBLAS_CORETYPE", "SkylakeX", 1);
  execv("/proc/self/exe", argv.data());
  unsetenv("OPENBLAS_CORETYPE");
}

Plan make_plan(const BenchOptions& o, int threads) {
  Plan plan;
  plan.prefill = o.suite != "decode";
  plan.decode = o.suite != "prefill";
  if (o.dtype == "all") {
    plan.storages = {DType::kF32, DType::kBF16, DType::kF16};
  } else {
    plan.storages = {parse_dtype(o.dtype, "--dtype")};
  }
  plan.sizes = !o.sizes.empty() ? o.sizes
               : o.quick        ? std::vector<std::int64_t>{512, 2048}
                                : std::vector<std::int64_t>{512, 1024, 2048, 4096};
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

// A case of `suite` at `length` with the plan's shape; the caller fills in
// the implementation, the dtype and the measurements.
Case new_case(const Plan& plan, const std::string& suite, std::int64_t length) {
  Case c;
  c.suite = suite;
  c.length = length;
  c.heads = plan.heads;
  c.kv_heads = suite == "prefill" ? plan.prefill_kv_heads : plan.decode_kv_heads;
  c.head_dim = plan.dim;
  return c;
}

const char* ceiling_label(const std::string& ceiling) {
  if (ceiling == "fma") return "FMA";
  if (ceiling == "amx_bf16") return "AMX";
  return "bw";
}

// ---------------------------------------------------------------- prefill

struct PrefillInputs {
  std::vector<float> q;  // (1, n, heads, head_dim)
  std::vector<float> k;  // (1, n, kv_heads, head_dim)
  std::vector<float> v;  // (1, n, kv_heads, head_dim)
};

PrefillInputs prefill_inputs(const Plan& plan, std::int64_t n) {
  PrefillInputs in;
  in.q.resize(count(n, plan.heads, plan.dim));
  in.k.resize(count(n, plan.prefill_kv_heads, plan.dim));
  in.v.resize(in.k.size());
  // Seeded by n, so the baseline and lookback see the same inputs.
  const auto seed = static_cast<std::uint64_t>(n) * 3;
  fill_uniform(in.q, seed);
  fill_uniform(in.k, seed + 1);
  fill_uniform(in.v, seed + 2);
  return in;
}

double prefill_flops(const Plan& plan, std::int64_t n) {
  // 4 * batch * heads * head_dim per visible pair (DESIGN.md §6).
  return 4.0 * static_cast<double>(plan.heads * plan.dim) *
         static_cast<double>(Mask(n, n).visible_total());
}

// ----------------------------------------------------------------- decode

struct DecodeInputs {
  std::vector<float> q;  // (heads, head_dim): the new token's query
  std::vector<float> k;  // (max context, kv_heads, head_dim)
  std::vector<float> v;  // (max context, kv_heads, head_dim)
};

DecodeInputs decode_inputs(const Plan& plan) {
  const std::int64_t longest = *std::max_element(plan.contexts.begin(), plan.contexts.end());
  DecodeInputs in;
  in.q.resize(count(1, plan.heads, plan.dim));
  in.k.resize(count(longest, plan.decode_kv_heads, plan.dim));
  in.v.resize(in.k.size());
  fill_uniform(in.q, 101);
  fill_uniform(in.k, 102);
  fill_uniform(in.v, 103);
  return in;
}

double kv_bytes(const Plan& plan, std::int64_t context, DType storage) {
  return 2.0 * static_cast<double>(context) * static_cast<double>(plan.decode_kv_heads * plan.dim) *
         static_cast<double>(dtype_size(storage));
}

// ------------------------------------------------------------------- run

Report run_benchmark(const BenchOptions& o) {
  Context context(o.threads);
  const int threads = context.threads();
  Plan plan = make_plan(o, threads);  // every argument checked before any work
  if (plan.prefill) reexec_with_openblas_coretype();

  Report report;
  report.quick = o.quick;
  // simd_target_name() applies LOOKBACK_SIMD's cap to Highway's dispatch,
  // which the ceilings' loops share: call it first so the FMA peak is
  // measured on the same vector unit the kernels use.
  report.machine.simd_target = simd_target_name();
  report.machine.kernels = describe_kernels();
  report.machine.cpu = bench::cpu_model();
  report.machine.cores_online = std::thread::hardware_concurrency();
  report.machine.openblas_core = openblas_get_corename();
  if (const char* coretype = std::getenv("OPENBLAS_CORETYPE")) {
    report.machine.openblas_coretype = coretype;
  }
  // The baseline's threads each run single-threaded OpenBLAS calls.
  openblas_set_num_threads(1);

  const int lengths = static_cast<int>((plan.prefill ? plan.sizes.size() : 0) +
                                       (plan.decode ? plan.contexts.size() : 0));
  Progress progress(6 + lengths * (1 + static_cast<int>(plan.storages.size())));

  // The ceilings are measured before the cases and again after them, and
  // the higher of the two counts: on a shared machine a transient load can
  // only lower a measured ceiling, which would flatter every fraction.
  Ceilings& ceilings = report.ceilings;
  auto measure_ceilings = [&](const char* when) {
    progress.start(fmt::format("ceiling{}: FMA peak, {}", when, threads_text(threads)));
    const double fma = bench::measure_fma_peak_gflops(threads);
    ceilings.fma_gflops = std::max(ceilings.fma_gflops, fma);
    ceilings.target = bench::ceiling_target_name();
    progress.done(fmt::format("{:.1f} GFLOP/s ({})", fma, ceilings.target));
    progress.start(fmt::format("ceiling{}: AMX bf16 peak, {}", when, threads_text(threads)));
    const double amx = bench::measure_amx_peak_gflops(threads);
    ceilings.amx_gflops = std::max(ceilings.amx_gflops, amx);
    progress.done(amx > 0 ? fmt::format("{:.1f} GFLOP/s", amx) : "no AMX on this CPU or OS");
    progress.start(fmt::format("ceiling{}: read bandwidth, {}", when, threads_text(threads)));
    const double bandwidth = bench::measure_read_bandwidth_gbs(threads);
    ceilings.bandwidth_gbs = std::max(ceilings.bandwidth_gbs, bandwidth);
    progress.done(fmt::format("{:.1f} GB/s", bandwidth));
  };
  measure_ceilings("");

  // bf16 prefill on AMX tiles is held to the tile unit's peak; every other
  // prefill to the FMA peak.
  report.amx_kernels =
      ceilings.amx_gflops > 0 && report.machine.kernels.find("AMX") != std::string::npos;

  // Baselines first (all f32), then lookback; outputs are kept to compare.
  std::map<std::int64_t, Case> prefill_base, decode_base;
  std::map<std::int64_t, std::vector<float>> prefill_base_out, decode_base_out;
  if (plan.prefill) {
    std::vector<std::vector<float>> scores(static_cast<std::size_t>(threads));
    for (std::int64_t n : plan.sizes) {
      progress.start(fmt::format("prefill n={} f32 baseline (OpenBLAS {})", n,
                                 report.machine.openblas_core));
      const PrefillInputs in = prefill_inputs(plan, n);
      std::vector<float>& out = prefill_base_out[n];
      out.assign(in.q.size(), 0.0f);
      for (auto& s : scores) s.resize(count(n, n, 1));
      Case c = new_case(plan, "prefill", n);
      c.time = time_it(plan.reps, [&] {
        bench::materialised_attention(in.q, in.k, in.v, out, n, plan.heads, plan.prefill_kv_heads,
                                      plan.dim, threads, scores);
      });
      c.work = prefill_flops(plan, n);
      c.ceiling = "fma";
      c.ceiling_value = ceilings.fma_gflops;
      prefill_base[n] = c;
      progress.done(fmt::format("{} ms", ms(c.time.median)));
    }
  }
  if (plan.decode) {
    const DecodeInputs in = decode_inputs(plan);
    std::vector<std::vector<float>> scores(static_cast<std::size_t>(threads));
    for (std::int64_t n : plan.contexts) {
      progress.start(fmt::format("decode context={} f32 baseline (plain C++ loop)", n));
      std::vector<float>& out = decode_base_out[n];
      out.assign(in.q.size(), 0.0f);
      for (auto& s : scores) s.resize(static_cast<std::size_t>(n));
      Case c = new_case(plan, "decode", n);
      c.time = time_it(plan.reps, [&] {
        plain_decode(in.q, in.k, in.v, out, n, plan.heads, plan.decode_kv_heads, plan.dim, threads,
                     scores);
      });
      c.work = kv_bytes(plan, n, DType::kF32);
      c.ceiling = "read_bandwidth";
      c.ceiling_value = ceilings.bandwidth_gbs;
      decode_base[n] = c;
      progress.done(fmt::format("{} ms", ms(c.time.median)));
    }
  }

  if (plan.prefill) {
    for (std::int64_t n : plan.sizes) {
      const PrefillInputs in = prefill_inputs(plan, n);
      std::vector<float> out(in.q.size());
      AttentionParams params;
      params.q = make_view(in.q.data(), DType::kF32, {1, n, plan.heads, plan.dim}, "q");
      params.k = make_view(in.k.data(), DType::kF32, {1, n, plan.prefill_kv_heads, plan.dim}, "k");
      params.v = make_view(in.v.data(), DType::kF32, {1, n, plan.prefill_kv_heads, plan.dim}, "v");
      params.out = make_mutable_view(out.data(), DType::kF32, {1, n, plan.heads, plan.dim}, "out");
      report.cases.push_back(prefill_base[n]);
      for (DType storage : plan.storages) {
        progress.start(fmt::format("prefill n={} {} lookback", n, dtype_name(storage)));
        params.storage = storage;
        Case c = new_case(plan, "prefill", n);
        c.ours = true;
        c.storage = storage;
        c.time = time_it(plan.reps, [&] { attend(params, context); });
        c.work = prefill_flops(plan, n);
        const bool amx = storage == DType::kBF16 && report.amx_kernels;
        c.ceiling = amx ? "amx_bf16" : "fma";
        c.ceiling_value = amx ? ceilings.amx_gflops : ceilings.fma_gflops;
        c.speedup = prefill_base[n].time.median / c.time.median;
        c.rel_l2 = rel_l2(out, prefill_base_out[n]);
        report.cases.push_back(c);
        progress.done(fmt::format("{} ms", ms(c.time.median)));
      }
      prefill_base_out.erase(n);
    }
  }
  if (plan.decode) {
    const DecodeInputs in = decode_inputs(plan);
    std::vector<float> out(in.q.size());
    const DecodeStep step{
        .q = make_view(in.q.data(), DType::kF32, {1, plan.heads, plan.dim}, "q"),
        .out = make_mutable_view(out.data(), DType::kF32, {1, plan.heads, plan.dim}, "out"),
        .maybe_lse = {}};
    for (std::int64_t n : plan.contexts) {
      report.cases.push_back(decode_base[n]);
      for (DType storage : plan.storages) {
        progress.start(fmt::format("decode context={} {} lookback", n, dtype_name(storage)));
        const CacheConfig config{
            .kv_heads = plan.decode_kv_heads, .head_dim = plan.dim, .storage = storage, .rope = {}};
        KvCache cache(config, n);
        cache.append(make_view(in.k.data(), DType::kF32, {n, plan.decode_kv_heads, plan.dim}, "k"),
                     make_view(in.v.data(), DType::kF32, {n, plan.decode_kv_heads, plan.dim}, "v"));
        Case c = new_case(plan, "decode", n);
        c.ours = true;
        c.storage = storage;
        c.time = time_it(plan.reps, [&] { cache.attend(step, {}, context); });
        c.work = kv_bytes(plan, n, storage);
        c.ceiling = "read_bandwidth";
        c.ceiling_value = ceilings.bandwidth_gbs;
        c.speedup = decode_base[n].time.median / c.time.median;
        c.rel_l2 = rel_l2(out, decode_base_out[n]);
        report.cases.push_back(c);
        progress.done(fmt::format("{} ms", ms(c.time.median)));
      }
    }
  }
  measure_ceilings(" again");
  for (Case& c : report.cases) {
    c.rate = c.work / c.time.median * 1e-9;
    c.ceiling_value = c.ceiling == "fma"        ? ceilings.fma_gflops
                      : c.ceiling == "amx_bf16" ? ceilings.amx_gflops
                                                : ceilings.bandwidth_gbs;
  }
  report.plan = std::move(plan);
  return report;
}

// ---------------------------------------------------------------- output

std::string openblas_text(const Machine& m) {
  return fmt::format("OpenBLAS core {}{}", m.openblas_core,
                     m.openblas_coretype ? fmt::format(" (OPENBLAS_CORETYPE={})", *m.openblas_coretype)
                                         : std::string(" (OPENBLAS_CORETYPE unset)"));
}

std::string case_name(const Case& c) {
  return fmt::format("{}={} {} {}", c.suite == "prefill" ? "n" : "context", c.length,
                     c.ours ? "lookback" : "baseline", dtype_name(c.storage));
}

std::string render_text(const Report& r) {
  const Machine& m = r.machine;
  const Plan& p = r.plan;
  std::string text = fmt::format(
      "lookback bench: {}, {} ({} cores online)\n"
      "kernels: {}\n"
      "ceilings at {} (the higher of a measurement before and after the cases): FMA peak "
      "{:.1f} GFLOP/s ({}), {}, read bandwidth {:.1f} GB/s\n"
      "times: median of {} after a warm-up, min-max in brackets (at most 2 runs for cases over "
      "a second)\n",
      m.cpu, threads_text(p.threads), m.cores_online, m.kernels, threads_text(p.threads),
      r.ceilings.fma_gflops,
      r.ceilings.target,
      r.ceilings.amx_gflops > 0
          ? fmt::format("AMX bf16 peak {:.1f} GFLOP/s{}", r.ceilings.amx_gflops,
                        r.amx_kernels ? "" : " (the kernels do not use AMX here)")
          : std::string("no AMX"),
      r.ceilings.bandwidth_gbs, p.reps == 1 ? std::string("1 run") : fmt::format("{} runs", p.reps));
  auto table = [&](const std::string& suite, const char* unit) {
    text += fmt::format("{:<28} {:>26} {:>9} {:>11} {:>9}\n", "case", "ms (min-max)", unit,
                        "of ceiling", "speed-up");
    std::map<DType, double> worst;  // largest difference from the baseline per dtype
    for (const Case& c : r.cases) {
      if (c.suite != suite) continue;
      text += fmt::format("{:<28} {:>26} {:>9.1f} {:>6.1f}% {:<3} {:>9}\n", case_name(c),
                          ms_text(c.time), c.rate, 100.0 * c.rate / c.ceiling_value,
                          ceiling_label(c.ceiling),
                          c.speedup ? fmt::format("{:.2f}x", *c.speedup) : std::string("-"));
      if (c.rel_l2) worst[c.storage] = std::max(worst[c.storage], *c.rel_l2);
    }
    std::string agreement;
    for (const auto& [storage, value] : worst) {
      agreement += fmt::format("{}{} {:.1e}", agreement.empty() ? "" : ", ", dtype_name(storage), value);
    }
    if (!agreement.empty()) {
      text += fmt::format("largest relative L2 difference from the baseline's output: {}\n", agreement);
    }
  };
  if (p.prefill) {
    text += fmt::format(
        "\ncausal prefill: batch 1, {} heads, {} kv heads, head_dim {}; useful GFLOP/s = "
        "4*heads*head_dim*n(n+1)/2 / time\n"
        "baseline: materialised attention (sgemm, mask, softmax, sgemm per head) in f32, {}\n",
        p.heads, p.prefill_kv_heads, p.dim, openblas_text(m));
    table("prefill", "GFLOP/s");
  }
  if (p.decode) {
    text += fmt::format(
        "\ndecode of 1 token: batch 1, {} heads, {} kv heads, head_dim {}; GB/s = KV bytes read / "
        "time\n"
        "baseline: a plain C++ loop per head (dot with every cached key, softmax, weighted sum) "
        "over a token-major f32 cache\n",
        p.heads, p.decode_kv_heads, p.dim);
    table("decode", "GB/s");
  }
  return text;
}

std::string render_json(const Report& r) {
  const Machine& m = r.machine;
  nlohmann::ordered_json machine{{"cpu", m.cpu},
                                 {"cores_online", m.cores_online},
                                 {"threads", r.plan.threads},
                                 {"simd_target", m.simd_target},
                                 {"kernels", m.kernels},
                                 {"ceiling_target", r.ceilings.target},
                                 {"openblas_core", m.openblas_core},
                                 {"openblas_coretype", nullptr}};
  if (m.openblas_coretype) machine["openblas_coretype"] = *m.openblas_coretype;
  nlohmann::ordered_json cases = nlohmann::ordered_json::array();
  for (const Case& c : r.cases) {
    nlohmann::ordered_json row{{"suite", c.suite},
                               {"implementation", c.ours ? "lookback" : "baseline"},
                               {"dtype", std::string(dtype_name(c.storage))},
                               {c.suite == "prefill" ? "n" : "context", c.length},
                               {"batch", 1},
                               {"heads", c.heads},
                               {"kv_heads", c.kv_heads},
                               {"head_dim", c.head_dim},
                               {"ms", {{"median", c.time.median * 1e3},
                                       {"min", c.time.min * 1e3},
                                       {"max", c.time.max * 1e3}}},
                               {"repetitions", c.time.reps},
                               {"work", c.work},
                               {"rate", c.rate},
                               {"rate_unit", c.suite == "prefill" ? "GFLOP/s" : "GB/s"},
                               {"ceiling", c.ceiling},
                               {"fraction_of_ceiling", c.rate / c.ceiling_value}};
    if (c.speedup) row["speedup_vs_baseline"] = *c.speedup;
    if (c.rel_l2) row["rel_l2_vs_baseline"] = *c.rel_l2;
    cases.push_back(row);
  }
  return nlohmann::ordered_json{
             {"machine", machine},
             {"settings", {{"quick", r.quick}, {"warmup_runs", 1}, {"repetitions", r.plan.reps}}},
             {"ceilings", {{"fma_gflops", r.ceilings.fma_gflops},
                           {"amx_bf16_gflops", r.ceilings.amx_gflops},
                           {"read_bandwidth_gbs", r.ceilings.bandwidth_gbs}}},
             {"cases", cases}}
             .dump(2) +
         "\n";
}

// One panel per suite: rate against n or context (log scale), one line per
// implementation and dtype, the ceilings as dashed horizontal lines.
std::string render_svg_panel(const Report& r, const std::string& suite, double top) {
  const double left = 80, plot_w = 480, plot_h = 260, legend_x = left + plot_w + 20;
  const bool prefill = suite == "prefill";
  struct Series {
    std::string label, colour;
    std::vector<std::pair<double, double>> points;  // (length, rate)
  };
  std::vector<Series> series;
  auto series_for = [&](const Case& c) -> Series& {
    const std::string label = c.ours ? fmt::format("lookback {}", dtype_name(c.storage))
                                     : std::string(prefill ? "baseline (OpenBLAS) f32"
                                                           : "baseline (plain loop) f32");
    for (Series& s : series) {
      if (s.label == label) return s;
    }
    static const std::map<std::string, std::string> colours{
        {"f32", "#1f77b4"}, {"bf16", "#ff7f0e"}, {"f16", "#2ca02c"}};
    series.push_back({label, c.ours ? colours.at(std::string(dtype_name(c.storage))) : "#555555", {}});
    return series.back();
  };
  std::vector<std::pair<std::string, double>> ceiling_lines;  // (label, value)
  double x_min = INFINITY, x_max = 0, y_max = 0;
  for (const Case& c : r.cases) {
    if (c.suite != suite) continue;
    series_for(c).points.emplace_back(static_cast<double>(c.length), c.rate);
    x_min = std::min(x_min, static_cast<double>(c.length));
    x_max = std::max(x_max, static_cast<double>(c.length));
    y_max = std::max(y_max, c.rate);
    const std::string label = c.ceiling == "fma"        ? "FMA peak"
                              : c.ceiling == "amx_bf16" ? "AMX bf16 peak"
                                                        : "read bandwidth";
    if (std::none_of(ceiling_lines.begin(), ceiling_lines.end(),
                     [&](const auto& line) { return line.first == label; })) {
      ceiling_lines.emplace_back(label, c.ceiling_value);
    }
  }
  // The scale covers the rates and the ceilings near them; a ceiling far
  // above (the AMX peak is ten times the FMA peak) would flatten every line,
  // so it is named at the top instead of drawn.
  const double rates_max = y_max;
  double near_max = 0;
  for (const auto& line : ceiling_lines) {
    if (line.second <= 4 * rates_max) near_max = std::max(near_max, line.second);
  }
  y_max = std::max(rates_max, near_max) * 1.05;
  // Ticks at 1, 2 or 5 times a power of ten.
  double step = y_max > 0 ? std::pow(10.0, std::floor(std::log10(y_max / 4))) : 1.0;
  for (double factor : {1.0, 2.0, 5.0, 10.0}) {
    if (y_max / (step * factor) <= 5) {
      step *= factor;
      break;
    }
  }
  y_max = y_max > 0 ? std::ceil(y_max / step) * step : 1.0;
  const double lx_min = std::log2(x_min), lx_max = std::log2(x_max);
  auto x_of = [&](double length) {
    if (lx_max <= lx_min) return left + plot_w / 2;
    return left + plot_w * (std::log2(length) - lx_min) / (lx_max - lx_min);
  };
  auto y_of = [&](double rate) { return top + plot_h * (1.0 - rate / y_max); };

  std::string svg = fmt::format(
      "<text x=\"{}\" y=\"{}\" font-size=\"14\">{}: {} heads, {} kv heads, head_dim {}, "
      "{}</text>\n",
      left, top - 12, prefill ? "Causal prefill" : "Decode of 1 token", r.plan.heads,
      prefill ? r.plan.prefill_kv_heads : r.plan.decode_kv_heads, r.plan.dim,
      threads_text(r.plan.threads));
  svg += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\" stroke=\"black\"/>\n", left,
                     top, top + plot_h);
  svg += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"black\"/>\n", left,
                     top + plot_h, left + plot_w);
  for (double value = 0; value <= y_max * 1.0001; value += step) {
    svg += fmt::format("<text x=\"{}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n", left - 6,
                       y_of(value) + 4, step < 1 ? fmt::format("{:.1f}", value)
                                                 : fmt::format("{:.0f}", value));
  }
  std::vector<std::int64_t> lengths;
  for (const Case& c : r.cases) {
    if (c.suite == suite && std::find(lengths.begin(), lengths.end(), c.length) == lengths.end()) {
      lengths.push_back(c.length);
    }
  }
  for (std::int64_t length : lengths) {
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                       x_of(static_cast<double>(length)), top + plot_h + 18, length);
  }
  svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{} (tokens, log scale)</text>\n",
                     left + plot_w / 2, top + plot_h + 40, prefill ? "n" : "context");
  svg += fmt::format(
      "<text transform=\"translate({},{}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n", left - 50,
      top + plot_h / 2, prefill ? "useful GFLOP/s" : "KV read GB/s");

  double legend_y = top + 10;
  std::vector<std::string> above;  // ceilings too high to draw, named in the legend
  for (const auto& [label, value] : ceiling_lines) {
    if (value > y_max) {
      above.push_back(fmt::format("{} {:.1f}", label, value));
      continue;
    }
    svg += fmt::format(
        "<line x1=\"{}\" y1=\"{:.1f}\" x2=\"{}\" y2=\"{:.1f}\" stroke=\"#d62728\" "
        "stroke-dasharray=\"6,4\"/>\n",
        left, y_of(value), left + plot_w, y_of(value));
    svg += fmt::format("<text x=\"{}\" y=\"{:.1f}\" fill=\"#d62728\" text-anchor=\"end\">{} "
                       "{:.1f}</text>\n",
                       left + plot_w - 4, y_of(value) - 4, label, value);
  }
  for (const Series& s : series) {
    std::string points;
    for (const auto& [length, rate] : s.points) {
      points += fmt::format("{:.1f},{:.1f} ", x_of(length), y_of(rate));
    }
    svg += fmt::format(
        "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>\n", s.colour, points);
    for (const auto& [length, rate] : s.points) {
      svg += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"{}\"/>\n", x_of(length),
                         y_of(rate), s.colour);
    }
    svg += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"{3}\" "
                       "stroke-width=\"2\"/>\n<text x=\"{4}\" y=\"{5}\">{6}</text>\n",
                       legend_x, legend_y, legend_x + 20, s.colour, legend_x + 26, legend_y + 4,
                       s.label);
    legend_y += 18;
  }
  svg += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"#d62728\" "
                     "stroke-dasharray=\"6,4\"/>\n<text x=\"{3}\" y=\"{4}\">ceiling (measured)</text>\n",
                     legend_x, legend_y, legend_x + 20, legend_x + 26, legend_y + 4);
  for (const std::string& note : above) {
    legend_y += 18;
    svg += fmt::format("<text x=\"{}\" y=\"{}\" fill=\"#d62728\">{}</text>\n<text x=\"{}\" "
                       "y=\"{}\" fill=\"#d62728\">(above the scale)</text>\n",
                       legend_x, legend_y + 4, note, legend_x, legend_y + 20);
    legend_y += 16;
  }
  return svg;
}

std::string render_svg(const Report& r) {
  const double panel_h = 340, width = 800;
  const int panels = (r.plan.prefill ? 1 : 0) + (r.plan.decode ? 1 : 0);
  const double height = 50 + panel_h * panels;
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" "
      "fill=\"white\"/>\n",
      width, height);
  svg += fmt::format("<text x=\"20\" y=\"22\" font-size=\"15\">lookback bench: {}</text>\n",
                     r.machine.cpu);
  double top = 70;
  if (r.plan.prefill) {
    svg += render_svg_panel(r, "prefill", top);
    top += panel_h;
  }
  if (r.plan.decode) svg += render_svg_panel(r, "decode", top);
  return svg + "</svg>\n";
}

int run_bench(const BenchOptions& o) {
  const Report report = run_benchmark(o);
  std::string text;
  if (o.format == "json") {
    text = render_json(report);
  } else if (o.format == "svg") {
    text = render_svg(report);
  } else {
    text = render_text(report);
  }
  write_output(o.out, text);
  return kExitOk;
}

}  // namespace

void add_bench_command(CLI::App& app, Runner& runner) {
  auto o = std::make_shared<BenchOptions>();
  CLI::App* command = app.add_subcommand(
      "bench", "Benchmark lookback on this machine, against its measured ceilings and a baseline.");
  command->footer(
      "First the ceilings at the chosen thread count (FMA peak on the dispatched vector unit,\n"
      "AMX bf16 tile peak where present, read bandwidth), then the baselines (prefill:\n"
      "materialised attention with OpenBLAS sgemm; decode: a plain C++ loop), then lookback,\n"
      "then the ceilings again (the higher of the two measurements counts).\n"
      "Prefill: batch 1, 32 heads, head_dim 128, n = 512..4096, in useful GFLOP/s. Decode: 32\n"
      "heads, 8 kv heads, contexts 1k..64k, in KV GB/s. Progress goes to stderr; times are\n"
      "medians after a warm-up. --quick runs in under a minute, the full suite in under ten.");
  command->add_option("--suite", o->suite, "prefill, decode or all (default)")
      ->check(CLI::IsMember({"prefill", "decode", "all"}));
  command->add_option("--threads", o->threads, "threads (default: all cores)")->check(kPositive);
  command->add_option("--dtype", o->dtype, "lookback's storage: f32 (default), bf16, f16 or all")
      ->check(CLI::IsMember({"f32", "bf16", "f16", "all"}));
  command->add_flag("--quick", o->quick, "two sizes and two contexts, 2 repetitions");
  command->add_option("--format", o->format, "text (default), json or svg")
      ->check(CLI::IsMember({"text", "json", "svg"}));
  command->add_option("--out", o->out, "write to FILE instead of stdout (- is stdout)")
      ->check(kOutputPath);
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
