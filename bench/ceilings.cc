#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "ceilings.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <chrono>
#include <cstdint>
#if defined(__linux__) && defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "ceilings.hpp"
#include "lookback/kernel_caps.hpp"

HWY_BEFORE_NAMESPACE();
namespace lookback::bench::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// 16 independent FMA chains: enough to cover FMA latency (4 cycles) on two
// ports. Returns the number of FLOPs done; `sink` defeats dead-code removal.
std::uint64_t FmaLoop(std::uint64_t iterations, float* sink) {
  const hn::ScalableTag<float> d;
  const auto b = hn::Set(d, 0.999999f);
  const auto c = hn::Set(d, 1e-7f);
  auto a0 = hn::Set(d, 0.1f), a1 = hn::Set(d, 0.2f), a2 = hn::Set(d, 0.3f), a3 = hn::Set(d, 0.4f);
  auto a4 = hn::Set(d, 0.5f), a5 = hn::Set(d, 0.6f), a6 = hn::Set(d, 0.7f), a7 = hn::Set(d, 0.8f);
  auto a8 = hn::Set(d, 0.9f), a9 = hn::Set(d, 1.0f), a10 = hn::Set(d, 1.1f), a11 = hn::Set(d, 1.2f);
  auto a12 = hn::Set(d, 1.3f), a13 = hn::Set(d, 1.4f), a14 = hn::Set(d, 1.5f), a15 = hn::Set(d, 1.6f);
  for (std::uint64_t i = 0; i < iterations; ++i) {
    a0 = hn::MulAdd(a0, b, c); a1 = hn::MulAdd(a1, b, c); a2 = hn::MulAdd(a2, b, c);
    a3 = hn::MulAdd(a3, b, c); a4 = hn::MulAdd(a4, b, c); a5 = hn::MulAdd(a5, b, c);
    a6 = hn::MulAdd(a6, b, c); a7 = hn::MulAdd(a7, b, c); a8 = hn::MulAdd(a8, b, c);
    a9 = hn::MulAdd(a9, b, c); a10 = hn::MulAdd(a10, b, c); a11 = hn::MulAdd(a11, b, c);
    a12 = hn::MulAdd(a12, b, c); a13 = hn::MulAdd(a13, b, c); a14 = hn::MulAdd(a14, b, c);
    a15 = hn::MulAdd(a15, b, c);
  }
  auto total = hn::Add(hn::Add(hn::Add(a0, a1), hn::Add(a2, a3)), hn::Add(hn::Add(a4, a5), hn::Add(a6, a7)));
  total = hn::Add(total, hn::Add(hn::Add(hn::Add(a8, a9), hn::Add(a10, a11)),
                                 hn::Add(hn::Add(a12, a13), hn::Add(a14, a15))));
  *sink = hn::GetLane(hn::SumOfLanes(d, total));
  return iterations * 16 * hn::Lanes(d) * 2;
}

// Sums `count` floats with four accumulators (vector loads only).
float SumArray(const float* data, std::size_t count) {
  const hn::ScalableTag<float> d;
  const std::size_t lanes = hn::Lanes(d);
  auto s0 = hn::Zero(d), s1 = hn::Zero(d), s2 = hn::Zero(d), s3 = hn::Zero(d);
  std::size_t i = 0;
  for (; i + 4 * lanes <= count; i += 4 * lanes) {
    s0 = hn::Add(s0, hn::LoadU(d, data + i));
    s1 = hn::Add(s1, hn::LoadU(d, data + i + lanes));
    s2 = hn::Add(s2, hn::LoadU(d, data + i + 2 * lanes));
    s3 = hn::Add(s3, hn::LoadU(d, data + i + 3 * lanes));
  }
  float total = hn::GetLane(hn::SumOfLanes(d, hn::Add(hn::Add(s0, s1), hn::Add(s2, s3))));
  for (; i < count; ++i) total += data[i];
  return total;
}

const char* Name() { return hwy::TargetName(HWY_TARGET); }

}  // namespace lookback::bench::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lookback::bench {

HWY_EXPORT(FmaLoop);
HWY_EXPORT(SumArray);
HWY_EXPORT(Name);

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Runs work(thread) on `threads` threads at once, three times, and returns
// the best total rate in GFLOP/s (work returns the FLOPs it did).
template <typename Work>
double best_gflops(int threads, Work&& work) {
  double best = 0.0;
  for (int run = 0; run < 3; ++run) {
    std::vector<std::uint64_t> flops(static_cast<std::size_t>(threads));
    const auto start = Clock::now();
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] { flops[static_cast<std::size_t>(t)] = work(t); });
    }
    for (auto& worker : workers) worker.join();
    const double elapsed = seconds_since(start);
    double total = 0;
    for (auto f : flops) total += static_cast<double>(f);
    best = std::max(best, total / elapsed * 1e-9);
  }
  return best;
}

}  // namespace

double measure_fma_peak_gflops(int threads) {
  // About 0.2 s per run.
  const std::uint64_t iterations = 20'000'000;
  std::vector<float> sinks(static_cast<std::size_t>(threads));
  return best_gflops(threads, [&](int t) {
    return HWY_DYNAMIC_DISPATCH(FmaLoop)(iterations, &sinks[static_cast<std::size_t>(t)]);
  });
}

#if defined(__linux__) && defined(__x86_64__)
namespace {

struct alignas(64) TileConfig {
  std::uint8_t palette = 1;
  std::uint8_t start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t bytes_per_row[16] = {};
  std::uint8_t rows[16] = {};
};

__attribute__((target("amx-tile,amx-bf16"))) std::uint64_t AmxLoop(std::uint64_t iterations) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = 16;
  }
  asm volatile("" : : "r"(&config) : "memory");  // LDTILECFG reads it
  _tile_loadconfig(&config);
  alignas(64) static const std::uint16_t ones[16 * 32] = {};
  alignas(64) float out[16 * 16];
  _tile_loadd(4, ones, 64);
  _tile_loadd(5, ones, 64);
  _tile_loadd(6, ones, 64);
  _tile_loadd(7, ones, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (std::uint64_t i = 0; i < iterations; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  _tile_release();
  return iterations * 4 * 16 * 16 * 32 * 2;
}

}  // namespace

__attribute__((target("avx512f,avx512bf16"))) std::uint64_t Bf16DotLoop(std::uint64_t iterations,
                                                                       float* sink) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(0.01f * static_cast<float>(i));
  const auto a = (__m512bh)_mm512_set1_epi32(0x3F803F80);  // (1, 1) in bf16
  const auto b = (__m512bh)_mm512_set1_epi32(0x33803380);  // tiny, so sums stay finite
  for (std::uint64_t i = 0; i < iterations; ++i) {
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
    asm volatile("" : "+v"(acc[0]), "+v"(acc[1]), "+v"(acc[2]), "+v"(acc[3]));
  }
  __m512 total = acc[0];
  for (int i = 1; i < 16; ++i) total = _mm512_add_ps(total, acc[i]);
  *sink = _mm512_reduce_add_ps(total);
  return iterations * 16 * 16 * 2 * 2;
}

double measure_bf16_dot_peak_gflops(int threads) {
  if (!kernel_caps().avx512_bf16) return 0.0;
  const std::uint64_t iterations = 10'000'000;
  std::vector<float> sinks(static_cast<std::size_t>(threads));
  return best_gflops(threads, [&](int t) {
    return Bf16DotLoop(iterations, &sinks[static_cast<std::size_t>(t)]);
  });
}

double measure_amx_peak_gflops(int threads) {
  if (!kernel_caps().amx_bf16) return 0.0;  // and Linux granted the tile state
  const std::uint64_t iterations = 2'000'000;
  return best_gflops(threads, [&](int) { return AmxLoop(iterations); });
}
#else
double measure_amx_peak_gflops(int) { return 0.0; }
double measure_bf16_dot_peak_gflops(int) { return 0.0; }
#endif

double measure_read_bandwidth_gbs(int threads, std::size_t bytes) {
  const std::size_t count = bytes / sizeof(float);
  std::vector<float> data(count, 1.0f);  // touched: pages are resident
  const std::size_t chunk = count / static_cast<std::size_t>(threads);
  double best = 0.0;
  for (int run = 0; run < 4; ++run) {
    std::vector<float> sinks(static_cast<std::size_t>(threads));
    const auto start = Clock::now();
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] {
        sinks[static_cast<std::size_t>(t)] =
            HWY_DYNAMIC_DISPATCH(SumArray)(data.data() + static_cast<std::size_t>(t) * chunk, chunk);
      });
    }
    for (auto& worker : workers) worker.join();
    const double elapsed = seconds_since(start);
    best = std::max(best, static_cast<double>(chunk * static_cast<std::size_t>(threads) * sizeof(float)) / elapsed * 1e-9);
  }
  return best;
}

std::string ceiling_target_name() { return HWY_DYNAMIC_DISPATCH(Name)(); }

}  // namespace lookback::bench
#endif
