// The execution context: worker threads and their scratch memory, created once
// and passed by reference to every call. Nothing in lookback is a singleton.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

namespace lookback {

class Context {
 public:
  // threads == 0 picks every core the process may run on. More than
  // max_threads() is an Error (kInvalidArgument); a thread the system
  // refuses to start is an Error (kCapacity), with every started one joined.
  explicit Context(int threads = 0);
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  int threads() const noexcept;

  // The most threads a context accepts: 4 per online core (at least
  // kThreadFloor), never more than kThreadLimit.
  static constexpr int kThreadFloor = 16;
  static constexpr int kThreadLimit = 1024;
  static int max_threads() noexcept;

  // Runs task(index, worker) for index in [0, count), on every worker thread
  // (the calling thread is worker 0). Tasks are claimed in index order, so
  // callers put the heaviest first. Blocks until all have run; the first
  // exception thrown by a task is rethrown here. Not reentrant: one
  // parallel_for per context at a time (calls from several threads serialise).
  void parallel_for(std::int64_t count,
                    const std::function<void(std::int64_t index, int worker)>& task);

  // Per-worker scratch of at least `bytes`, 64-byte aligned, reused between
  // calls. Valid until the next scratch() call by the same worker.
  void* scratch(int worker, std::size_t bytes);

  // Scratch shared by all workers during one call (e.g. packed K/V), at least
  // `bytes`, 64-byte aligned, reused between calls. Call it outside
  // parallel_for while holding lock_for_call(); valid until the lock is
  // released.
  void* shared_scratch(std::size_t bytes);

  // Reserves the context for one call made of several phases (several
  // parallel_for calls sharing shared_scratch), so that calls from other
  // threads through the same context wait instead of reusing its scratch.
  [[nodiscard]] std::unique_lock<std::mutex> lock_for_call();

 private:
  void stop_workers() noexcept;

  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lookback
