// The machine's measured ceilings (DESIGN.md §6): what a benchmark's rates
// are divided by. Measured in the same run, at the same thread count.
#pragma once

#include <string>

namespace lookback::bench {

// Peak float32 FMA rate in GFLOP/s: a register-only loop of independent
// fused multiply-adds on the widest vector unit the dispatcher picks, run on
// `threads` threads at once.
double measure_fma_peak_gflops(int threads);

// Read bandwidth in GB/s: `threads` threads summing arrays far larger than the
// last-level cache.
double measure_read_bandwidth_gbs(int threads, std::size_t bytes = std::size_t{1} << 30);

// Peak bf16 rate of the AMX tile unit in GFLOP/s (TDPBF16PS on tiles held in
// registers, 4 independent accumulators per thread), or 0 when the CPU or the
// OS offers no AMX.
double measure_amx_peak_gflops(int threads);

// Peak bf16 rate of AVX512-BF16 dot products in GFLOP/s (VDPBF16PS on
// 512-bit registers, 16 independent accumulators per thread: each
// instruction 32 bf16 products), or 0 when the CPU has no AVX512-BF16.
double measure_bf16_dot_peak_gflops(int threads);

// The Highway target the ceilings loop ran on.
std::string ceiling_target_name();

}  // namespace lookback::bench
