#include "openblas.hpp"

#include <dlfcn.h>
#include <fmt/format.h>

#include <cstdlib>

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

OpenBlas load() {
  if (kernel_caps().avx512 && std::getenv("OPENBLAS_CORETYPE") == nullptr) {
    setenv("OPENBLAS_CORETYPE", "SkylakeX", 1);
  }
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
  OpenBlas blas;
  blas.sgemm = symbol<decltype(&cblas_sgemm)>(library, "cblas_sgemm");
  symbol<void (*)(int)>(library, "openblas_set_num_threads")(1);
  blas.core = symbol<char* (*)()>(library, "openblas_get_corename")();
  if (const char* coretype = std::getenv("OPENBLAS_CORETYPE")) blas.coretype = coretype;
  return blas;
}

}  // namespace

const OpenBlas& openblas() {
  static const OpenBlas blas = load();
  return blas;
}

}  // namespace lookback::bench
