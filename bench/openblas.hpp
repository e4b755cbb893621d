// OpenBLAS for the prefill baseline, loaded on demand (dlopen of Debian's
// libopenblas.so.0) rather than linked: loading it starts its thread pool,
// which only a benchmark that runs the baseline should pay for (a linked
// OpenBLAS made every `lookback` command, --version included, start and
// tear down that pool, and spin at exit under a tight address-space limit).
#pragma once

#include <cblas.h>

#include <optional>
#include <string>

namespace lookback::bench {

struct OpenBlas {
  decltype(&cblas_sgemm) sgemm = nullptr;
  std::string core;                      // the kernel it picked: "SkylakeX", "Haswell", ...
  std::optional<std::string> coretype;  // OPENBLAS_CORETYPE when it loaded; nullopt when unset
};

// Loads OpenBLAS once (thread-safe) and returns it, set to one thread per
// call (the baselines split heads across threads of their own). First the
// core choice: OpenBLAS 0.3.21 does not recognise recent AVX-512 CPUs and
// falls back to a generic kernel unless OPENBLAS_CORETYPE names one, read
// when the library loads; on an AVX-512 CPU with the variable unset, it is
// set to SkylakeX. A value the user set is never replaced. Throws
// lookback::Error when the library or a symbol is missing.
const OpenBlas& openblas();

}  // namespace lookback::bench
