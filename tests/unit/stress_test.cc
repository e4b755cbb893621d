// Several threads, each driving its own caches and prefill calls through ONE
// shared Context, and contexts created and destroyed over and over. Run under
// ThreadSanitizer by `make test-tsan`; here also checked for results.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "lookback/kv_cache.hpp"
#include "lookback/modes.hpp"
#include "testing/testing.hpp"

namespace lookback {
namespace {

TEST(Stress, ThreadsShareOneContext) {
  Context shared(2);
  std::atomic<int> failures{0};
  auto worker = [&](int id) {
    for (int iteration = 0; iteration < 4; ++iteration) {
      testing::ProblemSpec spec;
      spec.seqlen_q = 20 + id;
      spec.seqlen_k = 45 + 3 * iteration;
      spec.head_dim = 16;
      spec.heads = 4;
      spec.kv_heads = 2;
      testing::Problem problem = testing::make_problem(spec, 1000 * id + iteration);
      const ReferenceResult reference = reference_attention(problem.params());
      const ModeOptions options[] = {{.mode = Mode::kPrefill},
                                     {.mode = Mode::kPaged, .chunk = 4, .block_size = 8},
                                     {.mode = Mode::kChunked, .chunk = 7},
                                     {.mode = Mode::kSplit, .splits = 3}};
      const ModeOptions& chosen = options[(id + iteration) % 4];
      attend_with_mode(problem.params(), chosen, shared);
      const testing::Comparison result = testing::compare(problem, reference);
      if (!(result.relative_l2 <= testing::kF32Tolerance) || !result.finite) failures.fetch_add(1);
    }
  };
  std::vector<std::thread> threads;
  for (int id = 0; id < 3; ++id) threads.emplace_back(worker, id);
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST(Stress, ContextsCreatedAndDestroyed) {
  for (int round = 0; round < 40; ++round) {
    Context context(1 + round % 3);
    std::atomic<std::int64_t> sum{0};
    context.parallel_for(17, [&](std::int64_t index, int) { sum.fetch_add(index); });
    ASSERT_EQ(sum.load(), 17 * 16 / 2);
  }
  // Destroyed without ever running anything.
  for (int round = 0; round < 20; ++round) Context idle(3);
}

}  // namespace
}  // namespace lookback
