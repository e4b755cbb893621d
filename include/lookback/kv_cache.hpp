// KV caches for autoregressive decoding. The keys and values of past tokens
// never change, so they are computed once, stored, and reused: token i costs
// i + 1 dot products (or W + 1 with a window) instead of recomputing the
// prefix. Queries attend bottom-right aligned (DESIGN.md §2): the t new
// tokens of a step sit at positions length - t .. length - 1.
//
//   KvCache      one sequence, contiguous storage of a fixed capacity, or a
//                ring that keeps only what a window (and sink tokens) sees
//   PagedKvPool  many sequences in a pool of fixed-size blocks with a block
//                table per sequence (vLLM style), fork with copy-on-write
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "lookback/attention.hpp"
#include "lookback/context.hpp"
#include "lookback/dtype.hpp"
#include "lookback/tensor.hpp"

namespace lookback {

// Rotary position embedding applied on the way in: K rotated by its absolute
// position at append, Q at attend, so a model can hand raw projections to the
// cache.
struct RopeSpec {
  float theta = 10000.0f;    // base
  bool interleaved = false;  // false: NeoX half rotation (e, e + d/2); true: pairs (2e, 2e + 1)
};

struct CacheConfig {
  std::int64_t kv_heads = 1;
  std::int64_t head_dim = 64;  // 1 .. kMaxHeadDim
  // f32, f16, bf16, or 8 bits with a scale per row: int8, fp8e4m3, fp8e5m2
  // (docs/semantics.md).
  DType storage = DType::kF32;
  std::optional<RopeSpec> rope;
};

// How queries attend to a cache (the mask is always bottom-right).
struct DecodeOptions {
  std::optional<float> scale;                 // default 1 / sqrt(head_dim)
  float softcap = 0.0f;                       // 0 disables
  std::optional<std::int64_t> window_left;    // keys p - W .. p
  // StreamingLLM: keys 0 .. S-1 stay visible beside the window (S >= 0; S > 0
  // needs window_left). Positions stay absolute (docs/semantics.md).
  std::int64_t sink_tokens = 0;
  const float* maybe_alibi_slopes = nullptr;  // (heads,)
  // Learned sink logits (gpt-oss), (heads,), finite: one more term e^sink_h
  // in each row's softmax denominator, added once after the parts merge.
  const float* maybe_sink_logits = nullptr;
  // Split each sequence's key range into this many parts computed in
  // parallel and merged exactly through their LSEs (flash-decoding). 0 picks
  // a number from the context length and thread count; 1 disables.
  std::int64_t splits = 0;
};

// One sequence's step in a batched call: q holds the `tokens` newest tokens
// of the sequence (already appended), out and maybe_lse receive the result.
struct DecodeStep {
  TensorView q;                 // (tokens, heads, head_dim)
  MutableTensorView out;        // (tokens, heads, head_dim), f32
  MutableTensorView maybe_lse;  // (heads, tokens), f32; optional
};

// A KvCache run as a ring (sliding-window models, StreamingLLM): the first
// `sink_tokens` tokens stay for ever, and the other capacity - sink_tokens
// slots hold the newest tokens, each append overwriting the oldest. Decoding
// with a window W (and at most sink_tokens sink tokens) then runs without end
// in sink_tokens + W + chunk slots, chunk the most tokens appended per step.
struct RingSpec {
  std::int64_t sink_tokens = 0;  // 0 .. capacity - 1
};

// The slots such a ring needs: sink_tokens + window_left + chunk, saturating
// at the int64 maximum (a size no machine holds, refused by KvCache).
std::int64_t ring_slots(std::int64_t sink_tokens, std::int64_t window_left,
                        std::int64_t chunk) noexcept;

class KvCache {
 public:
  // Allocates K and V for `capacity` tokens without writing them: memory is
  // touched only as tokens are appended. Throws lookback::Error (kCapacity)
  // naming `capacity` and the bytes when they exceed this machine's physical
  // memory (before allocating) or cannot be allocated.
  KvCache(const CacheConfig& config, std::int64_t capacity);
  // A ring of `capacity` slots (see RingSpec): append never runs out of room
  // and length() counts every token appended (positions stay absolute, RoPE
  // included). attend throws lookback::Error when the step's window, new
  // tokens or sink tokens reach a token already overwritten: keep window +
  // tokens <= capacity - ring.sink_tokens and the step's sink tokens <=
  // ring.sink_tokens. A checkpoint of a ring (lookback/checkpoint.hpp) loads
  // as the same ring.
  KvCache(const CacheConfig& config, std::int64_t capacity, const RingSpec& ring);
  ~KvCache();
  KvCache(KvCache&&) noexcept;
  KvCache& operator=(KvCache&&) noexcept;

  const CacheConfig& config() const noexcept;
  std::int64_t length() const noexcept;    // tokens appended so far
  std::int64_t capacity() const noexcept;  // slots
  std::optional<RingSpec> ring() const noexcept;
  // The oldest token still stored above the ring's sink tokens (0 for a
  // cache that is not a ring, or before the ring wraps).
  std::int64_t first_kept() const noexcept;

  // Appends 1 or more tokens: k and v are (tokens, kv_heads, head_dim), any
  // input dtype. Throws lookback::Error (kCapacity) past the capacity (for a
  // ring: more than capacity - sink_tokens tokens at once), in which case
  // nothing is appended.
  void append(const TensorView& k, const TensorView& v);

  // Attends the step's q to every visible cached key (see DecodeStep).
  void attend(const DecodeStep& step, const DecodeOptions& options, Context& context) const;

  // Forgets every token (capacity unchanged).
  void clear() noexcept;

 private:
  friend struct CacheState;  // checkpoints (src/kv_cache)
  friend void attend_batch(std::span<const KvCache* const> caches,
                           std::span<const DecodeStep> steps, const DecodeOptions& options,
                           Context& context);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

using SequenceId = std::int64_t;

class PagedKvPool {
 public:
  // A pool of `num_blocks` blocks of `block_size` tokens (K and V for every kv
  // head). block_size >= 1: any size works. Memory is touched block by block
  // as blocks are handed out; sizes beyond this machine's physical memory, or
  // that cannot be allocated, are lookback::Error (kCapacity) naming
  // block_size or num_blocks and the bytes.
  PagedKvPool(const CacheConfig& config, std::int64_t block_size, std::int64_t num_blocks);
  ~PagedKvPool();
  PagedKvPool(PagedKvPool&&) noexcept;
  PagedKvPool& operator=(PagedKvPool&&) noexcept;

  const CacheConfig& config() const noexcept;
  std::int64_t block_size() const noexcept;
  std::int64_t num_blocks() const noexcept;
  std::int64_t free_blocks() const noexcept;

  SequenceId create();
  // A new sequence sharing every block of `parent` (no copy). Appending to a
  // shared, partly filled last block copies it first (copy-on-write).
  SequenceId fork(SequenceId parent);
  // Returns the sequence's blocks to the pool (shared ones when their last
  // user lets go). Unknown ids are an error.
  void release(SequenceId sequence);

  std::int64_t length(SequenceId sequence) const;
  std::vector<std::int64_t> block_table(SequenceId sequence) const;
  std::vector<SequenceId> sequences() const;

  // Appends tokens (k, v: (tokens, kv_heads, head_dim)). All or nothing: when
  // the pool has too few free blocks it throws lookback::Error (kCapacity) and
  // every sequence is left as it was.
  void append(SequenceId sequence, const TensorView& k, const TensorView& v);

  void attend(SequenceId sequence, const DecodeStep& step, const DecodeOptions& options,
              Context& context) const;

  // Batched decode: one step for each of many sequences of different lengths,
  // in one call (work spread over sequences, heads and key splits).
  void attend_batch(std::span<const SequenceId> sequences, std::span<const DecodeStep> steps,
                    const DecodeOptions& options, Context& context) const;

  // For tests and tools: replaces the block ids of the pool with a random
  // permutation, moving the data, so that block tables are not the identity.
  void shuffle_blocks(std::uint64_t seed);

 private:
  friend struct CacheState;  // checkpoints (src/kv_cache)
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Batched decode over contiguous caches: steps[i] attends caches[i].
void attend_batch(std::span<const KvCache* const> caches, std::span<const DecodeStep> steps,
                  const DecodeOptions& options, Context& context);

// Rotates x (tokens, heads, head_dim) in place, token t at position
// first_position + t (used by the caches; exposed for tests and users).
void apply_rope(float* x, std::int64_t tokens, std::int64_t heads, std::int64_t head_dim,
                std::int64_t first_position, const RopeSpec& rope);

}  // namespace lookback
