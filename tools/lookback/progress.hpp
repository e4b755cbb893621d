// Progress on stderr, the one reporter every command uses. stdout carries
// only the command's output, so scripts can pipe it while a person watches.
//
// Two shapes of report:
//   counts, for many equal runs (leakcheck): "lookback leakcheck: run 17/65",
//     rewritten in place on a terminal, else one line at most once a second;
//   steps, for a few long ones (bench): "[3/12] prefill n=2048 ... 176.0 ms".
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>

namespace lookback::cli {

class Progress {
 public:
  // Shows progress when `requested` or when stderr is a terminal: tests and
  // scripts that did not ask see a quiet stderr.
  static bool wanted(bool requested);

  // `name` starts count lines ("lookback leakcheck"); nothing is printed
  // unless `shown`. `steps` is the total of start_step calls.
  Progress(std::string name, bool shown, int steps = 0);
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;
  ~Progress();

  // `done` of `total` runs finished; thread-safe.
  void count(std::int64_t done, std::int64_t total);

  // "[k/steps] what ... ", then finish_step's "result" on the same line.
  void start_step(std::string_view what);
  void finish_step(std::string_view result);

  // Clears a count rewritten in place, so what follows starts on a clean
  // line. Call it before printing; the destructor calls it when an error
  // ends the command.
  void finish();

 private:
  std::string name_;
  bool shown_;
  bool terminal_;
  int steps_;
  int step_ = 0;
  bool line_open_ = false;  // a count is on the terminal line
  std::mutex mutex_;
  std::chrono::steady_clock::time_point last_{};
};

}  // namespace lookback::cli
