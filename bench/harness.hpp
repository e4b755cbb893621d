// The benchmark harness shared by `lookback bench` and the programs in
// bench/: how a case is timed, its inputs filled and its output compared,
// and how times are printed (DESIGN.md §6).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

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

// Uniform values in [-1, 1) from splitmix64: the values do not change the
// work done, and a cheap generator keeps filling 64k-token caches quick.
void fill_uniform(std::vector<float>& values, std::uint64_t seed);

// ||ours - reference|| / ||reference|| in float64 (the plain norm of the
// difference when the reference is all zeros).
double rel_l2(const std::vector<float>& ours, const std::vector<float>& reference);

// Calls body(worker) for worker = 0 .. threads - 1, each on a thread of its
// own (worker 0 on the caller's), and returns when all have finished.
void on_threads(int threads, const std::function<void(int worker)>& body);

// "512,1024" -> {512, 1024}; empty items are skipped. Throws
// std::invalid_argument naming `option` on an item that is not a number.
std::vector<std::int64_t> parse_list(std::string_view text, std::string_view option);

}  // namespace lookback::bench
