// OpenBLAS for the prefill baseline, loaded on demand (dlopen of Debian's
// libopenblas.so.0) rather than linked: loading it starts its thread pool,
// which only a benchmark that runs the baseline should pay for (a linked
// OpenBLAS made every `lookback` command, --version included, start and
// tear down that pool, and spin at exit under a tight address-space limit).
#pragma once

#include <cblas.h>

#include <optional>
#include <string>
#include <vector>

namespace lookback::bench {

// One OpenBLAS core measured on this CPU.
struct OpenBlasCoreTrial {
  std::string core;      // as OpenBLAS names it: "SkylakeX", "Haswell", ...
  double gflops = 0;     // sgemm, one thread, the baseline's two shapes
  bool correct = false;  // agreed with a float64 product
};

struct OpenBlas {
  decltype(&cblas_sgemm) sgemm = nullptr;
  std::string core;                      // the kernel the baseline runs: "SkylakeX", "Haswell", ...
  std::optional<std::string> coretype;  // OPENBLAS_CORETYPE when it loaded; nullopt when unset
  // Every core measured, in the order tried; empty when this OpenBLAS cannot
  // switch cores (not a DYNAMIC_ARCH build), and then `core` is its own pick.
  std::vector<OpenBlasCoreTrial> trials;
};

// Loads OpenBLAS once (thread-safe) and returns it, set to one thread per
// call (the baselines split heads across threads of their own), on the
// strongest core that computes correctly here: a baseline on a handicapped
// kernel would flatter lookback. OpenBLAS picks its core when it loads
// (OPENBLAS_CORETYPE if set, else its own detection, which in 0.3.21 falls
// back to a generic kernel on CPUs it does not know); that core and those
// this CPU can run (Haswell with AVX2 and FMA, SkylakeX with AVX-512) are
// each checked against a float64 product and timed on the baseline's sgemm
// shapes, and the fastest correct one is kept. Throws lookback::Error when
// the library or a symbol is missing.
const OpenBlas& openblas();

// "SkylakeX 95.2, Haswell 41.3 GFLOP/s (sgemm, 1 thread)": the trials, for
// the benchmarks' output; "" when there were none.
std::string describe_trials(const OpenBlas& blas);

}  // namespace lookback::bench
