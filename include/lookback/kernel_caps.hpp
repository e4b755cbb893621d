// What the kernels can use on this CPU and which paths they take, computed
// once per process (CPUID, Linux's grant of the AMX tile state, the
// LOOKBACK_SIMD and LOOKBACK_DISABLE_AMX policy) and read by the kernels,
// describe_kernels(), `lookback --version` and the benchmarks alike.
#pragma once

#include <string>
#include <vector>

namespace lookback {

struct KernelCaps {
  // The Highway target the kernels dispatch to now, e.g. "AVX3" (capped by
  // LOOKBACK_SIMD, or by force_simd_target), and every target this build
  // can run on this CPU under that cap, best first.
  std::string target;
  std::vector<std::string> targets;
  // LOOKBACK_SIMD as set in the environment ("" when unset).
  std::string simd_cap;

  // CPU features. avx512: the CPU runs Highway's AVX3 target (AVX-512 F,
  // BW, DQ, VL), whatever the cap; the others go beyond Highway's targets.
  bool avx512 = false;
  bool avx512_bf16 = false;  // VDPBF16PS, VCVTNEPS2BF16
  bool amx_bf16 = false;     // AMX-TILE and AMX-BF16, and Linux granted the tile state
  bool amx_disabled = false;  // LOOKBACK_DISABLE_AMX is set (amx_bf16 is then false)

  // The paths that follow from the above and the dispatched target: bf16
  // prefill on the AMX tiles, or else by VDPBF16PS dot products, and bf16
  // decode scores by VDPBF16PS. All need the AVX-512 kernels to be the ones
  // dispatched.
  bool amx_prefill = false;
  bool bf16_dot_prefill = false;
  bool bf16_decode_dots = false;
};

// The capabilities and paths as of this call (the target follows
// force_simd_target; the CPU features are read once).
KernelCaps kernel_caps();

}  // namespace lookback
