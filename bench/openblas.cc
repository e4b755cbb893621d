#include "openblas.hpp"

#include <dlfcn.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "lookback/error.hpp"
#include "lookback/kernel_caps.hpp"
#include "machine.hpp"

namespace lookback::bench {
namespace {

// Debian's soname first (the alternatives system picks the pthread, openmp
// or serial build behind it), then a plain development link.
constexpr const char* kLibraries[] = {"libopenblas.so.0", "libopenblas.so"};

template <typename Function>
Function symbol(void* library, const char* name) {
  void* address = dlsym(library, name);
  if (address == nullptr) {
    throw Error(fmt::format("bench: OpenBLAS has no symbol {} (expected OpenBLAS 0.3)", name));
  }
  return reinterpret_cast<Function>(address);
}

// A DYNAMIC_ARCH OpenBLAS (Debian's) picks its core in
// gotoblas_dynamic_init, from OPENBLAS_CORETYPE or CPUID; quitting and
// initialising again with another OPENBLAS_CORETYPE switches the core of
// the loaded library (no call may run meanwhile: this runs before any).
struct CoreSwitch {
  void (*init)() = nullptr;
  void (*quit)() = nullptr;
  char* (*corename)() = nullptr;

  std::string to(const std::string& name) const {
    quit();
    setenv("OPENBLAS_CORETYPE", name.c_str(), 1);
    init();
    return corename();
  }
};

// Relative L2 error of sgemm against a float64 product on odd sizes (every
// kernel's edge handling), both layouts the baseline uses.
double sgemm_error(decltype(&cblas_sgemm) sgemm) {
  constexpr int m = 37, n = 53, k = 29;
  std::vector<float> a(m * k), b(k * n), c(m * n);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = std::sin(0.37f * static_cast<float>(i));
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = std::cos(0.21f * static_cast<float>(i));
  double worst = 0;
  for (const bool transposed : {false, true}) {
    // transposed: B stored as (n x k), as K is in Q K^T.
    sgemm(CblasRowMajor, CblasNoTrans, transposed ? CblasTrans : CblasNoTrans, m, n, k, 1.0f,
          a.data(), k, b.data(), transposed ? k : n, 0.0f, c.data(), n);
    double error = 0, norm = 0;
    for (int i = 0; i < m; ++i) {
      for (int j = 0; j < n; ++j) {
        double exact = 0;
        for (int p = 0; p < k; ++p) {
          const float bv = transposed ? b[static_cast<std::size_t>(j * k + p)]
                                      : b[static_cast<std::size_t>(p * n + j)];
          exact += static_cast<double>(a[static_cast<std::size_t>(i * k + p)]) * bv;
        }
        const double diff = c[static_cast<std::size_t>(i * n + j)] - exact;
        error += diff * diff;
        norm += exact * exact;
      }
    }
    const double relative = std::sqrt(error / norm);
    worst = std::isfinite(relative) ? std::max(worst, relative) : INFINITY;
  }
  return worst;
}

// sgemm GFLOP/s on the baseline's two shapes at n = 1024, head_dim 128
// (S = Q K^T, then P V), one thread, the best of a few runs.
double sgemm_gflops(decltype(&cblas_sgemm) sgemm) {
  constexpr int n = 1024, d = 128;
  std::vector<float> q(n * d, 0.5f), k(n * d, 0.25f), s(n * n), out(n * d);
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>(i % 7) * 0.1f;
  double best = INFINITY;
  for (int run = 0; run < 3; ++run) {
    const auto start = std::chrono::steady_clock::now();
    sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, d, 1.0f, q.data(), d, k.data(), d, 0.0f,
          s.data(), n);
    sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, n, 1.0f, s.data(), n, k.data(), d,
          0.0f, out.data(), d);
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
    if (run > 0) best = std::min(best, took.count());  // the first run warms up
  }
  return 2.0 * 2.0 * n * n * d / best * 1e-9;
}

// The cores to try after the one OpenBLAS loaded with: those this CPU runs.
std::vector<std::string> candidate_cores() {
  std::vector<std::string> cores;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) cores.emplace_back("Haswell");
  if (kernel_caps().avx512) cores.emplace_back("SkylakeX");
  return cores;
}

OpenBlas load() {
  OpenBlas blas;
  if (const char* coretype = std::getenv("OPENBLAS_CORETYPE")) blas.coretype = coretype;
  void* library = nullptr;
  for (const char* name : kLibraries) {
    library = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (library != nullptr) break;
  }
  if (library == nullptr) {
    throw Error(fmt::format("bench: cannot load OpenBLAS for the baseline ({}; expected {} from "
                            "Debian's libopenblas0)",
                            dlerror(), kLibraries[0]));
  }
  // The library stays loaded until the process ends: its thread pool must
  // not go while a baseline could still call it.
  blas.sgemm = symbol<decltype(&cblas_sgemm)>(library, "cblas_sgemm");
  symbol<void (*)(int)>(library, "openblas_set_num_threads")(1);
  const auto corename = symbol<char* (*)()>(library, "openblas_get_corename");
  blas.core = corename();

  const CoreSwitch change{
      .init = reinterpret_cast<void (*)()>(dlsym(library, "gotoblas_dynamic_init")),
      .quit = reinterpret_cast<void (*)()>(dlsym(library, "gotoblas_dynamic_quit")),
      .corename = corename};
  if (change.init == nullptr || change.quit == nullptr) return blas;  // one core only

  // The core it loaded with first, then each candidate that is another,
  // each checked once; then timed in alternating rounds (a shared machine's
  // load drifts), each core's best round counting.
  blas.trials.push_back({.core = blas.core});
  for (const std::string& name : candidate_cores()) {
    const std::string core = change.to(name);
    const bool seen = std::any_of(blas.trials.begin(), blas.trials.end(),
                                  [&](const OpenBlasCoreTrial& t) { return t.core == core; });
    if (!seen) blas.trials.push_back({.core = core});
  }
  constexpr int kRounds = 3;
  for (int round = 0; round < kRounds; ++round) {
    for (OpenBlasCoreTrial& trial : blas.trials) {
      change.to(trial.core);
      if (round == 0) trial.correct = sgemm_error(blas.sgemm) <= 1e-5;
      trial.gflops = std::max(trial.gflops, sgemm_gflops(blas.sgemm));
    }
  }
  const OpenBlasCoreTrial* best = nullptr;
  for (const OpenBlasCoreTrial& trial : blas.trials) {
    if (trial.correct && (best == nullptr || trial.gflops > best->gflops)) best = &trial;
  }
  // No correct core is the baseline's own failure, reported by its result
  // check; keep the one it loaded with.
  const std::string chosen = best != nullptr ? best->core : blas.trials.front().core;
  blas.core = change.to(chosen);
  // Leave the variable as it was for anything this process starts.
  if (blas.coretype) {
    setenv("OPENBLAS_CORETYPE", blas.coretype->c_str(), 1);
  } else {
    unsetenv("OPENBLAS_CORETYPE");
  }
  return blas;
}

}  // namespace

const OpenBlas& openblas() {
  static const OpenBlas blas = load();
  return blas;
}

std::string describe_trials(const OpenBlas& blas) {
  std::string text;
  for (const OpenBlasCoreTrial& trial : blas.trials) {
    text += fmt::format("{}{} {:.1f}{}", text.empty() ? "" : ", ", trial.core, trial.gflops,
                        trial.correct ? "" : " (wrong results)");
  }
  return text.empty() ? text : text + " GFLOP/s (sgemm, 1 thread)";
}

}  // namespace lookback::bench
