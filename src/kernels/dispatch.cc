// CPU features, the SIMD policy and the kernels' path decisions (dispatch.hpp).

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/dispatch.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace lookback::kernels::HWY_NAMESPACE {

std::int64_t Target() { return HWY_TARGET; }

}  // namespace lookback::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <atomic>
#include <cstdlib>
#include <string>
#include <string_view>

#if defined(__linux__) && defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels/dispatch.hpp"
#include "kernels/tiles.hpp"
#include "lookback/error.hpp"

namespace lookback::kernels {

HWY_EXPORT(Target);

namespace {

struct CpuFeatures {
  bool avx512_bf16 = false;
  bool amx_bf16 = false;  // and the tile state granted
  bool amx_disabled = false;
  // VDPBF16PS does two bf16 products per f32 lane at the FMA's rate on AMD
  // (Zen 4, Zen 5); Intel's AVX512-BF16 cores run it at about a fifth of the
  // FMA instruction rate, where bf16 prefill is faster on the f32 path
  // (docs/PERFORMANCE.md, round two).
  bool fast_bf16_dots = false;
  bool bf16_dot_prefill_requested = false;  // LOOKBACK_BF16_DOT_PREFILL=1
};

// Read once per process.
const CpuFeatures& cpu_features() {
  static const CpuFeatures features = [] {
    CpuFeatures f;
    f.amx_disabled = std::getenv("LOOKBACK_DISABLE_AMX") != nullptr;
    const char* dots = std::getenv("LOOKBACK_BF16_DOT_PREFILL");
    f.bf16_dot_prefill_requested = dots != nullptr && std::string_view(dots) == "1";
#if defined(__linux__) && defined(__x86_64__)
    f.avx512_bf16 = __builtin_cpu_supports("avx512bf16");
    f.fast_bf16_dots = __builtin_cpu_is("amd");
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE (clang 14's
    // __builtin_cpu_supports does not know "amx-bf16").
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool amx = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) != 0 &&
                     ((edx >> 22) & 1u) != 0 && ((edx >> 24) & 1u) != 0;
    if (amx && f.avx512_bf16 && !f.amx_disabled) {
      // AMX tile data is off until the process asks Linux for it.
      constexpr long kArchRequestXcompPerm = 0x1023;
      constexpr long kXfeatureXtiledata = 18;
      f.amx_bf16 = syscall(SYS_arch_prctl, kArchRequestXcompPerm, kXfeatureXtiledata) == 0;
    }
#endif
    return f;
  }();
  return features;
}

// Every target compiled in and supported by this CPU, best first.
const std::vector<std::int64_t>& all_targets() {
  static const std::vector<std::int64_t> targets = [] {
    hwy::SetSupportedTargetsForTest(0);
    return hwy::SupportedAndGeneratedTargets();
  }();
  return targets;
}

const char* simd_cap_setting() {
  const char* name = std::getenv("LOOKBACK_SIMD");
  return name == nullptr ? "" : name;
}

// LOOKBACK_SIMD=NAME caps dispatch at that target (and those below it), e.g.
// LOOKBACK_SIMD=AVX2 runs an AVX-512 machine as an AVX2-only one. Returns
// the mask of allowed targets, 0 for no cap.
std::int64_t environment_cap() {
  static const std::int64_t cap = []() -> std::int64_t {
    const std::string_view name = simd_cap_setting();
    if (name.empty()) return 0;
    std::int64_t mask = 0;
    bool found = false;
    std::string known;
    for (std::int64_t target : all_targets()) {  // best (lowest bit) first
      found = found || name == hwy::TargetName(target);
      if (found) mask |= target;
      known += (known.empty() ? "" : ", ") + std::string(hwy::TargetName(target));
    }
    if (!found) {
      throw Error("LOOKBACK_SIMD: '" + std::string(name) + "' is not available (expected one of " +
                  known + ")");
    }
    return mask;
  }();
  return cap;
}

const std::vector<std::int64_t>& allowed_targets() {
  static const std::vector<std::int64_t> targets = [] {
    const std::int64_t cap = environment_cap();
    std::vector<std::int64_t> allowed;
    for (std::int64_t target : all_targets()) {
      if (cap == 0 || (target & cap) != 0) allowed.push_back(target);
    }
    hwy::SetSupportedTargetsForTest(cap);
    return allowed;
  }();
  return targets;
}

}  // namespace

void apply_simd_policy() { allowed_targets(); }

void force_target(std::string_view name) {
  const std::vector<std::int64_t>& targets = allowed_targets();
  if (name.empty()) {
    hwy::SetSupportedTargetsForTest(environment_cap());
    return;
  }
  std::string known;
  for (std::int64_t target : targets) {
    if (name == hwy::TargetName(target)) {
      hwy::SetSupportedTargetsForTest(target);
      return;
    }
    known += (known.empty() ? "" : ", ") + std::string(hwy::TargetName(target));
  }
  throw Error("simd target: '" + std::string(name) + "' is not available (expected one of " +
              known + ")");
}

std::int64_t dispatched_target() {
  apply_simd_policy();
  return HWY_DYNAMIC_DISPATCH(Target)();
}

bool avx512_kernels_dispatched() {
#if HWY_ARCH_X86
  const std::int64_t target = dispatched_target();
  return target == HWY_AVX3 || target == HWY_AVX3_DL;
#else
  return false;
#endif
}

namespace {

std::atomic<bool> amx_forced_off{false};
std::atomic<bool> bf16_dot_prefill_forced{false};

// The paths as KernelCaps names them, for any bf16 call.
bool amx_prefill_enabled() {
  return cpu_features().amx_bf16 && !amx_forced_off.load(std::memory_order_relaxed) &&
         avx512_kernels_dispatched();
}
bool bf16_dots_enabled() { return cpu_features().avx512_bf16 && avx512_kernels_dispatched(); }
bool bf16_dot_prefill_enabled() {
  const CpuFeatures& cpu = cpu_features();
  return bf16_dots_enabled() &&
         (cpu.fast_bf16_dots || cpu.bf16_dot_prefill_requested ||
          bf16_dot_prefill_forced.load(std::memory_order_relaxed));
}

}  // namespace

PrefillPath prefill_path(DType storage, std::int64_t padded_dim) {
  if (storage != DType::kBF16 || padded_dim % kAmxPairDims != 0) return PrefillPath::kF32;
  if (amx_prefill_enabled()) return PrefillPath::kAmx;
  return bf16_dot_prefill_enabled() ? PrefillPath::kBf16Dot : PrefillPath::kF32;
}

void force_amx_off(bool off) { amx_forced_off.store(off, std::memory_order_relaxed); }

void force_bf16_dot_prefill(bool on) { bf16_dot_prefill_forced.store(on, std::memory_order_relaxed); }

bool use_bf16_decode_dots(DType storage) {
  return storage == DType::kBF16 && bf16_dots_enabled();
}

}  // namespace lookback::kernels

namespace lookback {

KernelCaps kernel_caps() {
  const kernels::CpuFeatures& cpu = kernels::cpu_features();
  KernelCaps caps;
  caps.target = hwy::TargetName(kernels::dispatched_target());
  for (std::int64_t target : kernels::allowed_targets()) caps.targets.emplace_back(hwy::TargetName(target));
  caps.simd_cap = kernels::simd_cap_setting();
#if HWY_ARCH_X86
  for (std::int64_t target : kernels::all_targets()) {
    caps.avx512 = caps.avx512 || target == HWY_AVX3 || target == HWY_AVX3_DL;
  }
#endif
  caps.avx512_bf16 = cpu.avx512_bf16;
  caps.amx_bf16 = cpu.amx_bf16;
  caps.amx_disabled = cpu.amx_disabled;
  caps.amx_prefill = kernels::amx_prefill_enabled();
  caps.bf16_dot_prefill = kernels::bf16_dot_prefill_enabled() && !caps.amx_prefill;
  caps.bf16_decode_dots = kernels::bf16_dots_enabled();
  return caps;
}

}  // namespace lookback
#endif  // HWY_ONCE
