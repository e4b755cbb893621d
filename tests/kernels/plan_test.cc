// The plans, on shapes alone: the decode driver's key-split planner and the
// scratch layouts, against the formulas docs/architecture.md states.
#include <gtest/gtest.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <vector>

#include "kernels/decode.hpp"
#include "kernels/prefill.hpp"
#include "kv_cache/decode_driver.hpp"
#include "lookback/attention.hpp"
#include "lookback/kernel_caps.hpp"
#include "lookback/mask.hpp"

namespace lookback {
namespace {

using detail::plan_key_parts;

void expect_cover(const std::vector<KeyRange>& parts, KeyRange visible) {
  ASSERT_FALSE(parts.empty());
  EXPECT_EQ(parts.front().begin, visible.begin);
  EXPECT_EQ(parts.back().end, std::max(visible.begin, visible.end));
  for (std::size_t p = 1; p < parts.size(); ++p) EXPECT_EQ(parts[p].begin, parts[p - 1].end);
  for (const KeyRange& part : parts) EXPECT_LE(part.begin, part.end);
}

TEST(KeyParts, TheDriverSplitsLongRangesWhenTasksAreFew) {
  EXPECT_EQ(plan_key_parts({0, 100}, 0, 1).size(), 1u);
  EXPECT_EQ(plan_key_parts({0, 5000}, 0, 1).size(), 4u);     // 5000 / 1024
  EXPECT_EQ(plan_key_parts({0, 100000}, 0, 1).size(), 16u);  // capped
  EXPECT_EQ(plan_key_parts({0, 100000}, 0, 16).size(), 1u);  // enough tasks already
  for (KeyRange visible : {KeyRange{0, 5000}, KeyRange{17, 70000}}) {
    expect_cover(plan_key_parts(visible, 0, 2), visible);
  }
}

TEST(KeyParts, RequestedSplitsAreClampedToTheKeys) {
  EXPECT_EQ(plan_key_parts({0, 300}, 3, 64).size(), 3u);
  const std::vector<KeyRange> single_keys = plan_key_parts({3, 10}, 1000, 1);
  ASSERT_EQ(single_keys.size(), 7u);
  for (const KeyRange& part : single_keys) EXPECT_EQ(part.size(), 1);
  expect_cover(single_keys, {3, 10});
  // Huge requests cost nothing: one part per key at most.
  EXPECT_EQ(plan_key_parts({0, 16}, INT64_MAX / 2, 1).size(), 16u);
  // No visible key: one empty part.
  const std::vector<KeyRange> empty = plan_key_parts({5, 5}, 4, 1);
  ASSERT_EQ(empty.size(), 1u);
  EXPECT_TRUE(empty[0].empty());
}

template <typename Layout, typename... Regions>
void expect_disjoint_and_aligned(const Layout& layout, const Regions&... regions) {
  std::size_t end = 0;
  auto check = [&](std::size_t offset, std::size_t bytes) {
    EXPECT_EQ(offset % kernels::kScratchAlign, 0u);
    EXPECT_GE(offset, end);  // listed in order
    end = offset + bytes;
  };
  (check(regions.offset, regions.count * sizeof(*regions.in(nullptr))), ...);
  EXPECT_LE(end, layout.bytes);
}

// docs/architecture.md, "Memory": with G query heads per kv head and D the
// padded head_dim, a worker's prefill scratch is, in bytes,
//   f32 path: 4*G*64*D (Q) + 4*G*64*D (acc) + 4*64*256 (S of a span) + 4*64*256 (P)
//             + 4*64 (alpha) + 8*G*64 (states) + 16*64 (row ranges)
//   AMX and bf16-dot paths: 2*G*64*D (bf16 Q) + 4*G*64*D (acc) + 4*64*256 (S of a span)
//             + 2*64*256 (bf16 P) + 4*64*D (a masked tile's V) + the same
//             alpha, states and ranges.
std::size_t documented_prefill_bytes(kernels::PrefillPath path, std::size_t g, std::size_t d) {
  const std::size_t shared = 4 * 64 + 8 * g * 64 + 16 * 64;
  if (path == kernels::PrefillPath::kF32) {
    return 4 * g * 64 * d + 4 * g * 64 * d + 4 * 64 * 256 + 4 * 64 * 256 + shared;
  }
  return 2 * g * 64 * d + 4 * g * 64 * d + 4 * 64 * 256 + 2 * 64 * 256 + 4 * 64 * d + shared;
}

TEST(ScratchLayout, PrefillMatchesTheDocumentedFormula) {
  for (kernels::PrefillPath path : {kernels::PrefillPath::kF32, kernels::PrefillPath::kAmx,
                                    kernels::PrefillPath::kBf16Dot}) {
    for (std::int64_t group : {1, 4, 7}) {
      for (std::int64_t dim : {16, 64, 128, 256}) {
        const kernels::PrefillScratchLayout s = kernels::prefill_scratch_layout(path, group, dim);
        EXPECT_EQ(s.bytes, documented_prefill_bytes(path, static_cast<std::size_t>(group),
                                                     static_cast<std::size_t>(dim)))
            << "group " << group << " dim " << dim;
        expect_disjoint_and_aligned(s, s.q, s.q_bf16, s.acc, s.scores, s.p, s.p_bf16, s.v_rows,
                                    s.alpha, s.state, s.ranges);
      }
    }
  }
}

TEST(ScratchLayout, DecodeRegionsAreDisjointAndAligned) {
  for (DType storage : {DType::kF32, DType::kBF16, DType::kF16}) {
    const kernels::DecodeParams params{.tokens = 3, .heads = 8, .kv_heads = 2, .padded_dim = 80,
                                       .storage = storage};
    const kernels::DecodePlan plan = kernels::plan_decode(params);
    const kernels::DecodeScratchLayout& s = plan.scratch;
    EXPECT_EQ(s.bf16_stride, 96);
    EXPECT_EQ(s.acc.count, 12u * 80u);
    EXPECT_EQ(plan.bf16_dots ? s.q_bf16.count : s.q.count, plan.bf16_dots ? 12u * 96u : 12u * 80u);
    expect_disjoint_and_aligned(s, s.q, s.q_bf16, s.acc, s.scores, s.alpha, s.k_row, s.state,
                                s.ranges, s.k_rows, s.v_rows);
  }
}

// The prefill tasks cover every (batch, kv head, query tile) exactly once,
// heaviest first; head tasks come in a multiple of the threads.
void expect_tasks_cover(const kernels::PrefillParams& params, int threads) {
  const AttentionShape& shape = params.shape;
  const kernels::PrefillPlan plan = kernels::plan_prefill(params, threads);
  const std::int64_t query_tiles = kernels::tiles_for(shape.seqlen_q, kernels::kQueryTile);
  std::vector<int> seen(static_cast<std::size_t>(shape.batch * shape.kv_heads * query_tiles), 0);
  const Mask mask(shape.seqlen_q, shape.seqlen_k, params.mask);
  std::int64_t last_cost = INT64_MAX;
  for (const kernels::PrefillTask& task : plan.tasks) {
    ASSERT_GE(task.query_tiles, 1);
    ASSERT_LE(task.query_tile + task.query_tiles, query_tiles);
    for (std::int64_t t = task.query_tile; t < task.query_tile + task.query_tiles; ++t) {
      ++seen[static_cast<std::size_t>((task.batch * shape.kv_heads + task.kv_head) * query_tiles + t)];
    }
    if (plan.pack_per_head) {  // across heads; the query tile lists order within a head
      const std::int64_t row = task.query_tile * kernels::kQueryTile;
      const std::int64_t cost =
          mask.visible_in_tile(row, row + task.query_tiles * kernels::kQueryTile, 0, shape.seqlen_k);
      EXPECT_LE(cost, last_cost);
      last_cost = cost;
    } else {
      EXPECT_EQ(task.query_tiles, 1);
    }
  }
  for (int count : seen) EXPECT_EQ(count, 1);
  if (plan.pack_per_head && threads > 1) {
    EXPECT_EQ(static_cast<std::int64_t>(plan.tasks.size()) % threads, 0);
  }
}

TEST(PrefillPlan, HeadTasksWhenHeadsAreManyEnough) {
  kernels::PrefillParams params{.shape = {.batch = 1, .seqlen_q = 512, .seqlen_k = 512,
                                          .heads = 32, .kv_heads = 32, .head_dim = 128}};
  params.mask.causal = Causal::kTopLeft;
  // 32 heads on 2 threads: one task per head, packed K/V one head's worth.
  kernels::PrefillPlan plan = kernels::plan_prefill(params, 2);
  EXPECT_TRUE(plan.pack_per_head);
  EXPECT_EQ(plan.tasks.size(), 32u);
  EXPECT_EQ(plan.packed.bytes, kernels::packed_layout(plan.path, {.batch = 1, .seqlen_q = 512,
                                                                   .seqlen_k = 512, .heads = 1,
                                                                   .kv_heads = 1, .head_dim = 128})
                                   .bytes);
  // 8 kv heads on 2 threads: each head in 2 runs of query tiles.
  params.shape.kv_heads = 8;
  plan = kernels::plan_prefill(params, 2);
  EXPECT_TRUE(plan.pack_per_head);
  EXPECT_EQ(plan.tasks.size(), 16u);
  // 1 kv head on 2 threads: K/V packed for the call, a task per query tile.
  params.shape.kv_heads = 1;
  plan = kernels::plan_prefill(params, 2);
  EXPECT_FALSE(plan.pack_per_head);
  EXPECT_EQ(plan.tasks.size(), 8u);
  // One thread takes every head whole.
  EXPECT_TRUE(kernels::plan_prefill(params, 1).pack_per_head);
  EXPECT_EQ(kernels::plan_prefill(params, 1).tasks.size(), 1u);

  for (std::int64_t kv_heads : {1, 2, 3, 5, 8}) {
    for (std::int64_t seqlen : {1, 64, 65, 300, 1000}) {
      for (const std::optional<std::int64_t> window : {std::optional<std::int64_t>{}, std::optional<std::int64_t>{100}}) {
        for (int threads : {1, 2, 3, 4, 7}) {
          params.shape = {.batch = 2, .seqlen_q = seqlen, .seqlen_k = seqlen + 7,
                          .heads = 2 * kv_heads, .kv_heads = kv_heads, .head_dim = 64};
          params.mask.window_left = window;
          SCOPED_TRACE(::testing::Message() << kv_heads << " kv heads, seqlen " << seqlen
                                            << ", window " << window.value_or(-1) << ", " << threads
                                            << " threads");
          expect_tasks_cover(params, threads);
        }
      }
    }
  }
}

TEST(KernelCaps, PathsFollowTheDispatchedTarget) {
  for (const std::string& target : simd_targets()) {
    force_simd_target(target);
    const KernelCaps caps = kernel_caps();
    EXPECT_EQ(caps.target, target);
    EXPECT_EQ(caps.targets, simd_targets());
    const bool avx512_target = target == "AVX3" || target == "AVX3_DL";
    if (!avx512_target) {
      EXPECT_FALSE(caps.amx_prefill) << target;
      EXPECT_FALSE(caps.bf16_decode_dots) << target;
    }
    EXPECT_EQ(caps.amx_prefill, caps.amx_bf16 && avx512_target);
    EXPECT_EQ(caps.bf16_decode_dots, caps.avx512_bf16 && avx512_target);
    // The prefill plan takes the path the capabilities name (head_dim 128
    // pads to whole AMX rows; 80 does not).
    kernels::PrefillParams params{.shape = {.batch = 1, .seqlen_q = 9, .seqlen_k = 9, .heads = 2,
                                            .kv_heads = 1, .head_dim = 128},
                                  .storage = DType::kBF16};
    EXPECT_EQ(kernels::plan_prefill(params).path == kernels::PrefillPath::kAmx, caps.amx_prefill);
    EXPECT_EQ(kernels::plan_prefill(params).path == kernels::PrefillPath::kBf16Dot,
              caps.bf16_dot_prefill);
    if (!caps.avx512_bf16 || !avx512_target || caps.amx_prefill) EXPECT_FALSE(caps.bf16_dot_prefill);
    if (caps.avx512_bf16 && avx512_target) {
      // With AMX off and the dot-product path asked for, any AVX512-BF16 CPU
      // takes it (by default only those where it beats the f32 path do).
      kernels::force_amx_off(true);
      kernels::force_bf16_dot_prefill(true);
      EXPECT_TRUE(kernel_caps().bf16_dot_prefill);
      EXPECT_FALSE(kernel_caps().amx_prefill);
      EXPECT_EQ(kernels::plan_prefill(params).path, kernels::PrefillPath::kBf16Dot);
      kernels::force_bf16_dot_prefill(false);
      kernels::force_amx_off(false);
    }
    params.shape.head_dim = 80;
    EXPECT_EQ(kernels::plan_prefill(params).path, kernels::PrefillPath::kF32);
    params.storage = DType::kF32;
    params.shape.head_dim = 128;
    EXPECT_EQ(kernels::plan_prefill(params).path, kernels::PrefillPath::kF32);
  }
  force_simd_target("");
}

}  // namespace
}  // namespace lookback
