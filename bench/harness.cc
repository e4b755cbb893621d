#include "harness.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <thread>

#include <sys/mman.h>

namespace lookback::bench {
namespace {

double seconds_of(const std::function<void()>& body) {
  const auto start = std::chrono::steady_clock::now();
  body();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

Timing time_it(int reps, const std::function<void()>& body) {
  const double warmup = seconds_of(body);
  if (warmup > 1.0) reps = std::min(reps, 2);
  std::vector<double> seconds;
  for (int r = 0; r < reps; ++r) seconds.push_back(seconds_of(body));
  std::sort(seconds.begin(), seconds.end());
  const std::size_t mid = seconds.size() / 2;
  return {.median = seconds.size() % 2 ? seconds[mid] : (seconds[mid - 1] + seconds[mid]) / 2,
          .min = seconds.front(),
          .max = seconds.back(),
          .reps = reps};
}

std::string ms(double seconds) {
  const double value = seconds * 1e3;
  return value < 1 ? fmt::format("{:.3f}", value)
         : value < 100 ? fmt::format("{:.2f}", value)
                       : fmt::format("{:.1f}", value);
}

std::string ms_text(const Timing& timing) {
  return fmt::format("{} ({}-{})", ms(timing.median), ms(timing.min), ms(timing.max));
}

void fill_uniform(std::span<float> values, std::uint64_t seed) {
  std::uint64_t state = seed;
  for (float& x : values) {
    state += 0x9E3779B97F4A7C15ull;
    std::uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    x = static_cast<float>(static_cast<double>(z >> 40) * 0x1.0p-23 - 1.0);
  }
}

TensorView storage_input(std::span<const float> values, DType storage, Halves& halves,
                         std::initializer_list<std::int64_t> shape, std::string_view name) {
  if (storage != DType::kBF16 && storage != DType::kF16) {
    halves.clear();
    return make_view(values.data(), DType::kF32, shape, name);
  }
  halves.resize(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) {
    halves[i] = storage == DType::kBF16 ? f32_to_bf16(values[i]) : f32_to_f16(values[i]);
  }
  return make_view(halves.data(), storage, shape, name);
}

double rel_l2(std::span<const float> ours, std::span<const float> reference) {
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < ours.size(); ++i) {
    const double d = static_cast<double>(ours[i]) - static_cast<double>(reference[i]);
    diff += d * d;
    norm += static_cast<double>(reference[i]) * static_cast<double>(reference[i]);
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

void* allocate_input(std::size_t bytes) {
  constexpr std::size_t kHugePage = std::size_t{2} << 20;
  const std::size_t align = bytes >= kHugePage ? kHugePage : 64;
  const std::size_t rounded = (std::max<std::size_t>(bytes, 1) + align - 1) / align * align;
  void* pointer = std::aligned_alloc(align, rounded);
  if (pointer == nullptr) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  if (align == kHugePage) ::madvise(pointer, rounded, MADV_HUGEPAGE);  // advice only
#endif
  return pointer;
}

void free_input(void* pointer) noexcept { std::free(pointer); }

void on_threads(int threads, const std::function<void(int worker)>& body) {
  std::vector<std::thread> workers;
  for (int t = 1; t < threads; ++t) workers.emplace_back(body, t);
  body(0);
  for (auto& worker : workers) worker.join();
}

std::vector<std::int64_t> parse_list(std::string_view text, std::string_view option) {
  std::vector<std::int64_t> values;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t comma = std::min(text.find(',', start), text.size());
    const std::string item(text.substr(start, comma - start));
    if (!item.empty()) {
      std::size_t used = 0;
      try {
        values.push_back(std::stoll(item, &used));
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != item.size()) {
        throw std::invalid_argument(fmt::format("{}: '{}' is not a number", option, item));
      }
    }
    start = comma + 1;
  }
  return values;
}

}  // namespace lookback::bench
