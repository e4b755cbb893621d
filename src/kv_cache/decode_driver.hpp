// The decode driver: validates a batch of decode steps, prepares their
// queries, cuts each sequence's visible keys into parts (flash-decoding),
// runs the decode kernel over (sequence, kv head, part) tasks and merges the
// parts exactly through their LSEs. Used by the contiguous cache and the
// paged pool alike.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kernels/decode.hpp"
#include "lookback/kv_cache.hpp"
#include "lookback/mask.hpp"

namespace lookback::detail {

// One sequence as the decode driver sees it.
struct SequenceKv {
  std::vector<kernels::KvRun> runs;  // cover [0, length) in order, but for `overwritten`
  std::int64_t length = 0;
  // Keys a ring cache no longer holds (empty otherwise): a step whose mask
  // sees one of them is an error.
  KeyRange overwritten{0, 0};
};

// A sequence shorter than this many visible keys per part is not split.
inline constexpr std::int64_t kMinKeysPerPart = 1024;
// Most parts one sequence is cut into when the driver chooses.
inline constexpr std::int64_t kMaxAutoParts = 16;
// Below this many (sequence, kv head) tasks the driver splits the key range
// to give every thread work.
inline constexpr std::int64_t kFewTasks = 16;

// The parts of one sequence's visible key range: `splits` of them when the
// caller asks (0: the driver chooses: one part per kMinKeysPerPart keys, at
// most kMaxAutoParts, and only when there are fewer than kFewTasks
// sequence-head tasks), never more parts than keys, never fewer than one.
// Consecutive, in order, covering `visible`. A pure function of shapes, so
// results never depend on the thread count.
std::vector<KeyRange> plan_key_parts(KeyRange visible, std::int64_t splits,
                                     std::int64_t sequence_head_tasks);

// Validates every step and runs them (batched): steps[i] against sequences[i].
void run_decode(const CacheConfig& config, std::span<const SequenceKv> sequences,
                std::span<const DecodeStep> steps, const DecodeOptions& options, Context& context);

}  // namespace lookback::detail
