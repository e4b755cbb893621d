#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "lookback/context.hpp"
#include "lookback/error.hpp"

namespace lookback {
namespace {

TEST(Context, RunsEveryTaskOnce) {
  for (int threads : {1, 2, 3, 5}) {
    Context context(threads);
    EXPECT_EQ(context.threads(), threads);
    std::vector<std::atomic<int>> hits(1000);
    context.parallel_for(1000, [&](std::int64_t index, int worker) {
      ASSERT_GE(worker, 0);
      ASSERT_LT(worker, threads);
      hits[static_cast<std::size_t>(index)].fetch_add(1);
    });
    for (auto& hit : hits) EXPECT_EQ(hit.load(), 1);
  }
}

TEST(Context, RethrowsTaskErrors) {
  Context context(2);
  EXPECT_THROW(context.parallel_for(100,
                                    [](std::int64_t index, int) {
                                      if (index == 37) throw std::runtime_error("task 37");
                                    }),
               std::runtime_error);
  // Still usable afterwards.
  std::atomic<int> count{0};
  context.parallel_for(10, [&](std::int64_t, int) { count.fetch_add(1); });
  EXPECT_EQ(count.load(), 10);
}

TEST(Context, ScratchIsAlignedAndPerWorker) {
  Context context(2);
  void* first = context.scratch(0, 100);
  void* second = context.scratch(1, 100);
  EXPECT_NE(first, second);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(first) % 64, 0u);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(context.shared_scratch(1000)) % 64, 0u);
  EXPECT_THROW(Context(-1), Error);
  EXPECT_GE(Context(0).threads(), 1);
}

}  // namespace
}  // namespace lookback
