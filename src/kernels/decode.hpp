// Decode: a few query tokens (the newest of a sequence) against keys and
// values held in a cache, contiguous or paged. Memory-bound: each K and V row
// is read once per kv head and used by every query head of its group.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

#include "kernels/online_softmax.hpp"
#include "kernels/scratch.hpp"
#include "kernels/tiles.hpp"
#include "lookback/dtype.hpp"
#include "lookback/mask.hpp"

namespace lookback::kernels {

// Consecutive keys stored together, head-major: key first_key + t of kv head
// h is at k + h * head_stride + t * padded_dim elements of the storage dtype
// (same for v). One head's keys are contiguous, so they stream through the
// hardware prefetchers.
struct KvRun {
  const void* k = nullptr;
  const void* v = nullptr;
  std::int64_t first_key = 0;
  std::int64_t count = 0;
  std::int64_t head_stride = 0;  // elements between kv heads
  // 8-bit storage (core/quant.hpp): the rows' f32 scales, key first_key + t
  // of kv head h at k_scales + h * scale_head_stride + t (same for v); null
  // for other storage.
  const float* k_scales = nullptr;
  const float* v_scales = nullptr;
  std::int64_t scale_head_stride = 0;
};

// How far ahead of the current key the decode kernel prefetches K and V
// rows into L1: about 3 KiB of each (6 keys of f32 at head_dim 128, 12 of
// bf16, 16 of 8-bit codes). Farther L1 prefetches hold the core's line-fill
// buffers on DRAM misses and stall the loads, and a second prefetch into L2
// twice as far slowed 64k-token decode (both measured in
// docs/PERFORMANCE.md); the hardware prefetchers stop at every 4 KiB page
// and cannot follow scattered paged blocks.
inline constexpr std::int64_t kPrefetchBytes = 3072;
inline constexpr std::int64_t kMaxPrefetchKeys = 16;

struct DecodeParams {
  const float* q = nullptr;  // (tokens, heads, padded_dim), f32, rotated, zero-padded, unscaled
  std::int64_t tokens = 0;   // the last `tokens` keys of the sequence are these queries' own
  std::int64_t heads = 0;
  std::int64_t kv_heads = 0;
  std::int64_t padded_dim = 0;  // head_dim rounded up to kDimAlign (zeros past it)
  std::int64_t seqlen_k = 0;    // keys in the sequence, the new tokens included
  DType storage = DType::kF32;
  const KvRun* runs = nullptr;  // cover keys [0, seqlen_k) in order
  std::int64_t run_count = 0;
  float scale = 1.0f;
  float softcap = 0.0f;
  std::optional<std::int64_t> window_left;
  const float* maybe_alibi_slopes = nullptr;  // (heads,)
  KeyRange keys;  // the part of the key range this call covers (split-KV)
  float* out = nullptr;  // (tokens, heads, padded_dim): normalised partial output
  float* lse = nullptr;  // (heads, tokens): its natural-log LSE (-inf: no key)
};

// One task's scratch (rows = tokens * group query rows). Regions a path
// does not use are empty.
struct DecodeScratchLayout {
  ScratchRegion<float> q;              // (rows, padded_dim): scaled f32 queries
  ScratchRegion<std::uint16_t> q_bf16;  // (rows, bf16_stride): unscaled bf16 queries (bf16 dots)
  ScratchRegion<float> acc;            // (rows, padded_dim)
  ScratchRegion<float> scores;         // (rows, kKeyTile)
  ScratchRegion<float> probs;          // (rows, kKeyTile): P of the tile (8-bit: times V's scales)
  ScratchRegion<float> alpha;          // (rows)
  ScratchRegion<float> k_row;          // (padded_dim): one key row converted to f32 (f16/bf16)
  ScratchRegion<OnlineSoftmaxState> state;  // (rows)
  ScratchRegion<LocalRange> ranges;         // (rows)
  ScratchRegion<const void*> k_rows;   // (2 kKeyTile): the tile's rows and those ahead (up to the next tile)
  ScratchRegion<const void*> v_rows;   // (2 kKeyTile)
  ScratchRegion<float> k_scales;       // (2 kKeyTile): the tile's K scales (8-bit)
  ScratchRegion<float> v_scales;       // (2 kKeyTile): the tile's V scales (8-bit)
  std::int64_t bf16_stride = 0;        // padded_dim rounded up to one VDPBF16PS vector (32)
  std::size_t bytes = 0;
};

// What one decode call derives from its params, once.
struct DecodePlan {
  // bf16 caches on CPUs with AVX512-BF16: scores by VDPBF16PS on the stored
  // rows, the queries rounded to bf16 (the storage dtype, as prefill holds
  // them) and the scale applied to the scores.
  bool bf16_dots = false;
  DecodeScratchLayout scratch;
};

DecodePlan plan_decode(const DecodeParams& params);

// Computes the rows of every query head that reads `kv_head`, over
// params.keys, into params.out and params.lse; `scratch` holds
// plan.scratch.bytes, 64-byte aligned.
void decode_kv_head(const DecodeParams& params, const DecodePlan& plan, std::int64_t kv_head,
                    void* scratch);

}  // namespace lookback::kernels
