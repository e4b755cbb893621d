// Causal prefill, FlashAttention-2 style: query tiles against streamed key
// tiles with an online softmax, never materialising the score matrix.
//
// Plan, then run (FlashInfer's plan()/run()): plan_prefill derives the path,
// the task order and the scratch layouts once from validated params; the
// run dispatches once to the SIMD target, packs K/V and walks the tasks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/dispatch.hpp"
#include "kernels/online_softmax.hpp"
#include "kernels/scratch.hpp"
#include "kernels/tiles.hpp"
#include "lookback/context.hpp"
#include "lookback/mask.hpp"
#include "lookback/shape.hpp"
#include "lookback/tensor.hpp"

namespace lookback::kernels {

// Everything a prefill kernel needs, already validated by lookback::validate;
// kernels trust it. Inputs only: what follows from them is in PrefillPlan.
struct PrefillParams {
  TensorView q;  // (batch, seqlen_q, heads, head_dim)
  TensorView k;  // (batch, seqlen_k, kv_heads, head_dim)
  TensorView v;  // (batch, seqlen_k, kv_heads, head_dim)
  MutableTensorView out;        // (batch, seqlen_q, heads, head_dim), f32
  MutableTensorView maybe_lse;  // (batch, heads, seqlen_q), f32; optional
  const float* maybe_alibi_slopes = nullptr;  // (heads,); optional
  // (heads,); optional. Added at finalisation: only for the whole key range
  // (split-KV parts leave it null and their merge adds it once).
  const float* maybe_sink_logits = nullptr;
  AttentionShape shape;
  float scale = 1.0f;
  float softcap = 0.0f;  // 0 disables
  MaskSpec mask;
  DType storage = DType::kF32;
  // Only keys in this range take part (split-KV: one part of the key range;
  // rows with no key in it get zeros and LSE -inf, to be merged).
  KeyRange keys{0, INT64_MAX};
};

// One unit of parallel work: a query tile of every head of one kv head's
// group.
// Query tiles [query_tile, query_tile + query_tiles) of one kv head's group.
struct PrefillTask {
  std::int64_t batch;
  std::int64_t kv_head;
  std::int64_t query_tile;
  std::int64_t query_tiles = 1;
};

// One worker's tile scratch. Regions a path does not use are empty.
struct PrefillScratchLayout {
  ScratchRegion<float> q;       // (group, kQueryTile, padded_dim): scaled, storage-rounded (f32)
  ScratchRegion<std::uint16_t> q_bf16;  // (group, kQueryTile, padded_dim): unscaled bf16 Q (AMX)
  ScratchRegion<float> acc;     // (group, kQueryTile, padded_dim): unnormalised output
  ScratchRegion<float> scores;  // (kQueryTile, span * kKeyTile): one step's S
  ScratchRegion<float> p;       // (kQueryTile, kF32Span * kKeyTile): a full span's P (f32)
  ScratchRegion<std::uint16_t> p_bf16;  // (kQueryTile, kAmxSpan * kKeyTile): a span's P (AMX)
  ScratchRegion<float> v_rows;  // (kKeyTile, padded_dim): a masked tile's V unpacked (AMX)
  ScratchRegion<float> alpha;   // (kQueryTile): accumulator factors of one step
  ScratchRegion<OnlineSoftmaxState> state;  // (group, kQueryTile)
  ScratchRegion<LocalRange> ranges;         // (kQueryTile): each row's visible columns
  std::size_t bytes = 0;
};
PrefillScratchLayout prefill_scratch_layout(PrefillPath path, std::int64_t group,
                                            std::int64_t padded_dim);

// K and V packed once per call, in the context's shared scratch, in the
// layouts the path streams. Regions a path does not use are empty.
struct PackedLayout {
  ScratchRegion<float> k_transposed;  // (batch, kv_heads, key_tiles, padded_dim, kKeyTile) (f32)
  ScratchRegion<float> v;             // (batch, kv_heads, key_tiles * kKeyTile, padded_dim) (f32)
  // Two bf16 per u32 (AMX): K as dims (2r, 2r+1) of a key,
  // (batch, kv_heads, key_tiles, padded_dim / 2, kKeyTile); V as keys
  // (2s, 2s+1) of a dim, (batch, kv_heads, key_tiles, kKeyTile / 2, padded_dim).
  ScratchRegion<std::uint32_t> k_pairs;
  ScratchRegion<std::uint32_t> v_pairs;
  std::size_t bytes = 0;
};
PackedLayout packed_layout(PrefillPath path, const AttentionShape& shape);

struct PrefillPlan {
  PrefillPath path = PrefillPath::kF32;
  std::int64_t group = 1;       // query heads per kv head
  std::int64_t padded_dim = 0;  // head_dim rounded up to kDimAlign
  std::int64_t key_tiles = 0;
  // Head by head, heaviest query tile first within a head.
  std::vector<PrefillTask> tasks;
  // Head tasks: each task is a whole kv head (every query tile), packs that
  // head's K/V into its worker's scratch (`packed` is one head's layout,
  // after the tile scratch) and reads them from its own L2. Chosen when one
  // head's packed K/V is small and the heads are many enough to share out;
  // otherwise K/V are packed for the whole call first, into shared scratch.
  bool pack_per_head = false;
  PackedLayout packed;
  PrefillScratchLayout scratch;  // per worker
};

// `threads`: the workers that will run it (the choice of head tasks).
PrefillPlan plan_prefill(const PrefillParams& params, int threads = 1);

void prefill(const PrefillParams& params, Context& context);

}  // namespace lookback::kernels
