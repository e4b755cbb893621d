#include "progress.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>
#include <utility>

namespace lookback::cli {

bool Progress::wanted(bool requested) { return requested || isatty(STDERR_FILENO) == 1; }

Progress::Progress(std::string name, bool shown, int steps)
    : name_(std::move(name)), shown_(shown), terminal_(isatty(STDERR_FILENO) == 1), steps_(steps) {}

Progress::~Progress() { finish(); }

void Progress::count(std::int64_t done, std::int64_t total) {
  if (!shown_) return;
  const std::lock_guard lock(mutex_);
  const auto now = std::chrono::steady_clock::now();
  // A few updates a second at most: a terminal line is cheap, a log line not.
  if (done != total && now - last_ < std::chrono::milliseconds(terminal_ ? 100 : 1000)) return;
  last_ = now;
  fmt::print(stderr, "{}{}: run {}/{}{}", terminal_ ? "\r" : "", name_, done, total,
             terminal_ ? "" : "\n");
  std::fflush(stderr);
  line_open_ = terminal_;
}

void Progress::start_step(std::string_view what) {
  if (!shown_) return;
  fmt::print(stderr, "[{}/{}] {} ... ", ++step_, steps_, what);
  std::fflush(stderr);
}

void Progress::finish_step(std::string_view result) {
  if (!shown_) return;
  fmt::print(stderr, "{}\n", result);
  std::fflush(stderr);
}

void Progress::finish() {
  const std::lock_guard lock(mutex_);
  if (line_open_) fmt::print(stderr, "\r\033[K");
  std::fflush(stderr);
  line_open_ = false;
}

}  // namespace lookback::cli
