#include "lookback/context.hpp"

#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <string>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include "lookback/error.hpp"

namespace lookback {

namespace {

int available_cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    const int count = CPU_COUNT(&set);
    if (count > 0) return count;
  }
  const unsigned hardware = std::thread::hardware_concurrency();
  return hardware > 0 ? static_cast<int>(hardware) : 1;
}

// Asks for transparent huge pages on the whole 2 MiB pages inside a large
// buffer: the packed K/V of a prefill call (128 MiB at n = 4096, 32 heads,
// head_dim 128) is first touched in 64 faults instead of 32,768. Advice
// only: ignored where THP is off.
void advise_huge_pages(void* data, std::size_t bytes) {
#ifdef MADV_HUGEPAGE
  constexpr std::uintptr_t kHugePage = std::uintptr_t{2} << 20;
  const auto begin = (reinterpret_cast<std::uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const auto end = (reinterpret_cast<std::uintptr_t>(data) + bytes) & ~(kHugePage - 1);
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// A grow-only, 64-byte aligned buffer.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { release(); }

  void* reserve(std::size_t bytes) {
    if (bytes > capacity_) {
      release();
      const std::size_t rounded = (bytes + 63) / 64 * 64;
      data_ = ::operator new(rounded, std::align_val_t{64});
      capacity_ = rounded;
      advise_huge_pages(data_, rounded);
    }
    return data_;
  }

 private:
  void release() {
    if (data_ != nullptr) ::operator delete(data_, std::align_val_t{64});
    data_ = nullptr;
    capacity_ = 0;
  }
  void* data_ = nullptr;
  std::size_t capacity_ = 0;
};

}  // namespace

struct Context::Impl {
  int threads = 1;
  std::vector<std::thread> workers;             // threads - 1 helpers
  std::vector<AlignedBuffer> scratch;           // one per worker
  AlignedBuffer shared;

  std::mutex call_mutex;     // one parallel_for at a time
  std::mutex session_mutex;  // one multi-phase call at a time (lock_for_call)

  // The job being run, published under `mutex`.
  std::mutex mutex;
  std::condition_variable wake;
  std::condition_variable done;
  std::uint64_t generation = 0;
  bool stopping = false;
  const std::function<void(std::int64_t, int)>* task = nullptr;
  std::int64_t count = 0;
  std::atomic<std::int64_t> next{0};
  int busy = 0;  // helpers still working on the current generation
  std::exception_ptr error;
  std::mutex error_mutex;

  void run_tasks(int worker) {
    for (;;) {
      const std::int64_t index = next.fetch_add(1, std::memory_order_relaxed);
      if (index >= count) return;
      try {
        (*task)(index, worker);
      } catch (...) {
        std::lock_guard lock(error_mutex);
        if (!error) error = std::current_exception();
        next.store(count, std::memory_order_relaxed);  // stop handing out work
      }
    }
  }

  void helper_loop(int worker) {
    std::uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock lock(mutex);
        wake.wait(lock, [&] { return stopping || generation != seen; });
        if (stopping) return;
        seen = generation;
      }
      run_tasks(worker);
      {
        std::lock_guard lock(mutex);
        if (--busy == 0) done.notify_one();
      }
    }
  }
};

int Context::max_threads() noexcept {
  const long online = sysconf(_SC_NPROCESSORS_ONLN);
  const long cores = online > 0 ? online : available_cores();
  return static_cast<int>(std::min<long>(kThreadLimit, std::max<long>(kThreadFloor, 4 * cores)));
}

Context::Context(int threads) : impl_(std::make_unique<Impl>()) {
  if (threads < 0 || threads > max_threads()) {
    throw Error("threads: " + std::to_string(threads) + " (expected 1.." +
                std::to_string(max_threads()) +
                ", at most 4 threads per online core and never over 1024, or 0 for all cores)");
  }
  impl_->threads = threads == 0 ? available_cores() : threads;
  try {
    impl_->scratch = std::vector<AlignedBuffer>(static_cast<std::size_t>(impl_->threads));
    impl_->workers.reserve(static_cast<std::size_t>(impl_->threads - 1));
    for (int worker = 1; worker < impl_->threads; ++worker) {
      impl_->workers.emplace_back([this, worker] { impl_->helper_loop(worker); });
    }
  } catch (const std::exception& error) {
    // The system refused a thread (or its memory): join those already
    // started, so that none is left waiting on a destroyed condition variable.
    const std::size_t started = impl_->workers.size();
    stop_workers();
    throw Error(ErrorCode::kCapacity,
                "threads: " + std::to_string(impl_->threads) + " requested, but only " +
                    std::to_string(started + 1) + " could be started (" + error.what() + ")");
  }
}

Context::~Context() { stop_workers(); }

void Context::stop_workers() noexcept {
  {
    std::lock_guard lock(impl_->mutex);
    impl_->stopping = true;
  }
  impl_->wake.notify_all();
  for (auto& worker : impl_->workers) worker.join();
  impl_->workers.clear();
}

int Context::threads() const noexcept { return impl_->threads; }

void Context::parallel_for(std::int64_t count,
                           const std::function<void(std::int64_t, int)>& task) {
  if (count <= 0) return;
  std::lock_guard call_lock(impl_->call_mutex);
  Impl& impl = *impl_;
  impl.error = nullptr;
  if (impl.threads == 1 || count == 1) {
    for (std::int64_t index = 0; index < count; ++index) task(index, 0);
    return;
  }
  {
    std::lock_guard lock(impl.mutex);
    impl.task = &task;
    impl.count = count;
    impl.next.store(0, std::memory_order_relaxed);
    impl.busy = impl.threads - 1;
    ++impl.generation;
  }
  impl.wake.notify_all();
  impl.run_tasks(0);
  {
    std::unique_lock lock(impl.mutex);
    impl.done.wait(lock, [&] { return impl.busy == 0; });
    impl.task = nullptr;
  }
  if (impl.error) std::rethrow_exception(impl.error);
}

void* Context::scratch(int worker, std::size_t bytes) {
  return impl_->scratch.at(static_cast<std::size_t>(worker)).reserve(bytes);
}

void* Context::shared_scratch(std::size_t bytes) { return impl_->shared.reserve(bytes); }

std::unique_lock<std::mutex> Context::lock_for_call() {
  return std::unique_lock<std::mutex>(impl_->session_mutex);
}

}  // namespace lookback
