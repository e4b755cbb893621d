// OpenBLAS for the model's linear layers, loaded on first use (dlopen of
// Debian's libopenblas.so.0), never linked: loading it starts a thread pool
// that every other lookback command must not pay for (tests/cli/
// test_startup.py). The policy is bench/openblas.hpp's: on an AVX-512 CPU
// with OPENBLAS_CORETYPE unset, SkylakeX is named (OpenBLAS 0.3.21 falls back
// to a generic kernel on AVX-512 CPUs it does not know); and since lookback
// calls it from its own threads, OPENBLAS_NUM_THREADS=1 unless set.
#pragma once

#include <cblas.h>

#include <string>

namespace lookback::model::detail {

struct Blas {
  decltype(&cblas_sgemm) sgemm = nullptr;
  std::string core;  // the kernel OpenBLAS picked: "SkylakeX", "Haswell", ...
};

// Loads OpenBLAS once (thread-safe), set to one thread per call. Throws
// lookback::Error when the library or a symbol is missing.
const Blas& blas();

}  // namespace lookback::model::detail
