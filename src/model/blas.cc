#include "model/blas.hpp"

#include <dlfcn.h>
#include <fmt/format.h>

#include <cstdlib>

#include "lookback/error.hpp"
#include "lookback/kernel_caps.hpp"

namespace lookback::model::detail {
namespace {

// Debian's soname first (the alternatives system picks the pthread, openmp
// or serial build behind it), then a plain development link.
constexpr const char* kLibraries[] = {"libopenblas.so.0", "libopenblas.so"};

void* find_symbol(void* library, const char* name) {
  void* address = dlsym(library, name);
  if (address == nullptr) {
    throw Error(fmt::format("model: OpenBLAS has no symbol {} (expected OpenBLAS 0.3)", name));
  }
  return address;
}

Blas load() {
  if (kernel_caps().avx512 && std::getenv("OPENBLAS_CORETYPE") == nullptr) {
    setenv("OPENBLAS_CORETYPE", "SkylakeX", 1);
  }
  if (std::getenv("OPENBLAS_NUM_THREADS") == nullptr) setenv("OPENBLAS_NUM_THREADS", "1", 1);
  void* library = nullptr;
  for (const char* name : kLibraries) {
    library = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (library != nullptr) break;
  }
  if (library == nullptr) {
    throw Error(fmt::format("model: cannot load OpenBLAS for the linear layers ({}; expected {} "
                            "from Debian's libopenblas0)",
                            dlerror(), kLibraries[0]));
  }
  // Loaded for the life of the process: a runner may call it until the end.
  Blas blas;
  blas.sgemm = reinterpret_cast<decltype(&cblas_sgemm)>(find_symbol(library, "cblas_sgemm"));
  reinterpret_cast<void (*)(int)>(find_symbol(library, "openblas_set_num_threads"))(1);
  blas.core = reinterpret_cast<char* (*)()>(find_symbol(library, "openblas_get_corename"))();
  return blas;
}

}  // namespace

const Blas& blas() {
  static const Blas loaded = load();
  return loaded;
}

}  // namespace lookback::model::detail
