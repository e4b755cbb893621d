// The one CPU-capabilities module: CPU features read once, the SIMD policy
// (LOOKBACK_SIMD caps Highway's dispatch, LOOKBACK_DISABLE_AMX keeps bf16
// off the AMX tiles), and the per-path decisions every kernel reads. Nothing
// else in lookback runs CPUID or compares target names.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "lookback/dtype.hpp"
#include "lookback/kernel_caps.hpp"

namespace lookback::kernels {

// Applies LOOKBACK_SIMD once, before the first dispatch; throws
// lookback::Error for an unknown name. Every kernel entry point calls it.
void apply_simd_policy();

// Restricts dispatch to one available target ("" restores the policy's).
void force_target(std::string_view name);

// The Highway target (its HWY_* bit) that HWY_DYNAMIC_DISPATCH picks now.
std::int64_t dispatched_target();

// Whether the dispatched target is one of the AVX-512 targets, the only ones
// compiled with the AMX and AVX512-BF16 kernels (amx-inl.h, bf16-inl.h).
bool avx512_kernels_dispatched();

// The paths (see KernelCaps): bf16 storage on the AMX tiles, or by
// VDPBF16PS where AMX is off, needs head_dim padded to a multiple of the
// pair layouts' 32 bf16 per row.
enum class PrefillPath : std::uint8_t {
  kF32,  // f32 FMA micro-kernels on storage-rounded values
  kAmx,  // bf16 storage: Q K^T and P V on the AMX tiles
  kBf16Dot,  // bf16 storage, no AMX: Q K^T and P V by AVX512-BF16 VDPBF16PS
};
PrefillPath prefill_path(DType storage, std::int64_t padded_dim);
bool use_bf16_decode_dots(DType storage);

// Keeps bf16 prefill off the AMX tiles while `off` (as LOOKBACK_DISABLE_AMX
// does for a whole process), so that tests and benchmarks can run the
// bf16-dot path of CPUs without AMX on one that has it. Process-wide: call
// it while no attention call is running.
void force_amx_off(bool off);
// Takes bf16 prefill without AMX to the VDPBF16PS path even on a CPU where
// the f32 path is faster (Intel's AVX512-BF16), as LOOKBACK_BF16_DOT_PREFILL=1
// does for a whole process, so that its tests run there. Process-wide, as
// force_amx_off.
void force_bf16_dot_prefill(bool on);

}  // namespace lookback::kernels
