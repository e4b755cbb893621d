// The benchmark harness shared by `lookback bench` and the programs in
// bench/: how a case is timed, its inputs filled and its output compared,
// and how times are printed (DESIGN.md §6).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "lookback/dtype.hpp"
#include "lookback/tensor.hpp"

namespace lookback::bench {

struct Timing {
  double median = 0, min = 0, max = 0;  // seconds
  int reps = 0;                         // timed runs after the warm-up
};

// One warm-up run (page faults, caches, thread start), then `reps` timed
// runs. A case slower than a second per run gets at most 2: its spread is
// small next to its length, and a full suite must stay under ten minutes.
Timing time_it(int reps, const std::function<void()>& body);

// Milliseconds with about four significant digits ("0.289", "22.50",
// "365.2"): decode steps take fractions of a millisecond, prefill at n = 4096
// hundreds.
std::string ms(double seconds);
// "22.50 (22.39-22.62)": the median and, in brackets, min-max.
std::string ms_text(const Timing& timing);

// Memory for the benchmarks' inputs and outputs as lookback's CLI reads
// .npy files into it (and NumPy allocates large arrays): 64-byte aligned,
// and from 2 MiB up aligned to 2 MiB and advised for transparent huge
// pages. The kernels read rows of one head 16 KiB apart, each on a page of
// its own with 4 KiB pages; docs/PERFORMANCE.md (round six) measures both.
void* allocate_input(std::size_t bytes);
void free_input(void* pointer) noexcept;

template <class T>
struct InputAllocator {
  using value_type = T;
  InputAllocator() = default;
  template <class U>
  InputAllocator(const InputAllocator<U>&) noexcept {}
  T* allocate(std::size_t count) { return static_cast<T*>(allocate_input(count * sizeof(T))); }
  void deallocate(T* pointer, std::size_t) noexcept { free_input(pointer); }
  template <class U>
  bool operator==(const InputAllocator<U>&) const noexcept { return true; }
};

using Floats = std::vector<float, InputAllocator<float>>;

// Arrays of 16-bit floats (bf16 or f16 bits) in the same memory.
using Halves = std::vector<std::uint16_t, InputAllocator<std::uint16_t>>;

// An input as the kernels get it under `storage`: for bf16 and f16 the
// values rounded to that dtype (to nearest even) into `halves`, as a model
// that keeps its tensors in it passes them; for any other storage the f32
// values themselves. The view reads `values` or `halves`, which must outlive it.
TensorView storage_input(std::span<const float> values, DType storage, Halves& halves,
                         std::initializer_list<std::int64_t> shape, std::string_view name);

// Uniform values in [-1, 1) from splitmix64: the values do not change the
// work done, and a cheap generator keeps filling 64k-token caches quick.
void fill_uniform(std::span<float> values, std::uint64_t seed);

// ||ours - reference|| / ||reference|| in float64 (the plain norm of the
// difference when the reference is all zeros).
double rel_l2(std::span<const float> ours, std::span<const float> reference);

// Calls body(worker) for worker = 0 .. threads - 1, each on a thread of its
// own (worker 0 on the caller's), and returns when all have finished.
void on_threads(int threads, const std::function<void(int worker)>& body);

// "512,1024" -> {512, 1024}; empty items are skipped. Throws
// std::invalid_argument naming `option` on an item that is not a number.
std::vector<std::int64_t> parse_list(std::string_view text, std::string_view option);

}  // namespace lookback::bench
