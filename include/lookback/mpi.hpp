// Context-parallel causal attention over MPI (library lookback::lookback_mpi,
// built when CMake finds MPI; the core library does not depend on it).
//
//   ring_attend       prefill of one sequence cut across the ranks of a
//                     communicator in a zigzag layout; K/V blocks travel
//                     around a ring while each rank computes, and partial
//                     results merge exactly through their LSEs.
//   ShardedKvCache    decode over a KV cache spread across the ranks by
//                     position; partial (output, LSE) pairs are combined by
//                     one reduction with a user-defined MPI operation.
//
// Every call here is collective: each rank of the communicator makes it, in
// the same order. MPI must be initialised (MPI_Init) by the caller, and only
// the thread that calls these functions calls MPI. Errors: arguments are
// checked on every rank and the outcome agreed on before any data moves, so a
// bad argument on one rank throws the same lookback::Error on every rank
// (its message says which rank, when not rank 0) rather than leaving the
// others waiting. A failure after that point (memory exhausted mid-ring)
// ends the job with MPI_Abort and exit code 2. Conventions are those of
// lookback::attend (docs/semantics.md); docs/distributed.md explains the
// layout, the schedule and the scaling model.
#pragma once

#include <mpi.h>

#include <array>
#include <cstdint>
#include <exception>
#include <new>
#include <optional>
#include <vector>

#include "lookback/attention.hpp"
#include "lookback/context.hpp"
#include "lookback/dtype.hpp"
#include "lookback/error.hpp"
#include "lookback/kv_cache.hpp"
#include "lookback/mask.hpp"
#include "lookback/tensor.hpp"

namespace lookback::mpi {

// ---------------------------------------------------------------------------
// The zigzag layout (pure; no communication).
//
// A sequence of `seqlen` tokens is cut into 2P chunks, chunk c holding
// positions [seqlen * c / 2P, seqlen * (c + 1) / 2P) (sizes differ by at most
// one; some are empty when seqlen < 2P). Rank r holds chunks r and 2P-1-r, in
// that order, so that every rank has the same causal work: an early chunk
// that sees few keys and a late one that sees many.
struct ZigzagLayout {
  std::int64_t seqlen = 0;
  int ranks = 1;

  KeyRange chunk(std::int64_t index) const noexcept;
  // The positions of rank r's two chunks: chunk r, then chunk 2P-1-r.
  std::array<KeyRange, 2> rank_chunks(int rank) const noexcept;
  // Rows rank r holds: the sizes of its two chunks together.
  std::int64_t local_seqlen(int rank) const noexcept;
};

// Rank r's rows of a (batch, seqlen, heads, head_dim) tensor, chunk r then
// chunk 2P-1-r, copied into `local` (batch, local_seqlen(r), heads, head_dim)
// as float32; and the inverse, writing local rows back into a full tensor.
// For front ends and tests that hold the whole sequence on every rank.
std::vector<float> gather_local_rows(const TensorView& full, const ZigzagLayout& layout, int rank);
void scatter_local_rows(const float* local, const ZigzagLayout& layout, int rank,
                        const MutableTensorView& full);

// The steps of the ring that do any work, in order. At step s rank r holds
// the K/V block of rank (r - s) mod P; step s is needed when some rank sees
// some key of the block it then holds. Step 0 (a rank's own block) is always
// listed. Without a window every step is needed; with a window of W keys
// only about 2W / (seqlen / 2P) + 1 are, and the ring jumps straight from one
// needed step to the next (a block is sent d ranks on when d steps are
// skipped), so a window shortens the ring. A pure function of the layout and
// the mask.
std::vector<int> ring_steps(const ZigzagLayout& layout, const MaskSpec& mask);

// The work of each ring step, for the scaling model (`lookback cost
// --ranks`). A pure function: visible (query, key) pairs counted by the mask,
// no data. kZigzag is the layout above; kContiguous gives rank r positions
// [r n / P, (r + 1) n / P), the plain ring, for comparison.
enum class RingLayout : std::uint8_t { kZigzag, kContiguous };
struct RingStepWork {
  int step = 0;
  std::int64_t slowest_pairs = 0;  // visible pairs of the busiest rank at this step
  std::int64_t total_pairs = 0;    // over all ranks
  std::int64_t largest_block_tokens = 0;  // tokens of the largest K/V block passed on after it
};
// The steps that do work, in order (step 0 first; with kZigzag the steps of
// ring_steps()).
std::vector<RingStepWork> ring_work(std::int64_t seqlen, int ranks, RingLayout layout,
                                    const MaskSpec& mask);

// ---------------------------------------------------------------------------
// Ring prefill.

struct RingParams {
  // This rank's rows of one sequence (ZigzagLayout over `seqlen` tokens and
  // the communicator's size): chunks r and 2P-1-r, concatenated.
  TensorView q;                 // (batch, local_seqlen, heads, head_dim); f32, f16, bf16 or f64
  TensorView k;                 // (batch, local_seqlen, kv_heads, head_dim)
  TensorView v;                 // (batch, local_seqlen, kv_heads, head_dim)
  MutableTensorView out;        // (batch, local_seqlen, heads, head_dim), f32
  MutableTensorView maybe_lse;  // (batch, heads, local_seqlen), f32; optional
  const float* maybe_alibi_slopes = nullptr;  // (heads,); optional, the same on every rank
  // Learned sink logits (gpt-oss): one more term e^sink_h in each row's
  // softmax denominator, added once to the merged rows after the last ring
  // step (never to the partial results of a step).
  const float* maybe_sink_logits = nullptr;  // (heads,), finite, the same on every rank; optional

  std::int64_t seqlen = 0;  // tokens in the whole sequence (queries and keys alike)
  std::optional<float> scale;
  float softcap = 0.0f;
  // Self-attention over one sequence: causal (bottom-right and top-left are
  // the same mask here) with an optional window, or kNone. No query_offset,
  // no sink tokens (MaskSpec::sink_tokens; sink logits are above).
  MaskSpec mask;
  // What the kernels hold K/V in: f32, f16, bf16, or 8 bits with an f32
  // scale per (token, kv head) row (int8, fp8e4m3, fp8e5m2). Blocks travel in
  // ring_block_dtype(storage).
  DType storage = DType::kF32;
};

// What K/V blocks travel in between the ranks: the storage dtype, or f32 for
// 8-bit storage. Each rank quantizes the f32 rows it receives per (token, kv
// head) row, exactly as single-process attention quantizes them, so the
// codes and scales are the same (codes and scales would travel in about a
// quarter of the bytes, to the same result).
constexpr DType ring_block_dtype(DType storage) noexcept {
  return is_quantized(storage) ? DType::kF32 : storage;
}

// What one ring_attend call did on this rank, for the scaling measurements.
struct RingStats {
  int steps = 0;                    // ring steps run (ring_steps().size())
  std::int64_t pairs_computed = 0;  // (query chunk, key chunk) attention calls
  std::int64_t pairs_skipped = 0;   // fully masked pairs skipped without a call
  std::int64_t bytes_sent = 0;      // K/V bytes this rank sent, in ring_block_dtype(storage)
  double compute_seconds = 0.0;     // in the attention kernel and the merge
  double wait_seconds = 0.0;        // waiting for the next block beyond the compute
};

// Computes params.out (and maybe_lse) for this rank's rows. Equal to
// lookback::attend on the whole sequence (with the same storage and sink
// logits) within float32 rounding, for any number of ranks; an output row
// never changes, bit for bit, when a later token changes, on any rank.
RingStats ring_attend(const RingParams& params, MPI_Comm comm, Context& context);

// ---------------------------------------------------------------------------
// Sharded decode.

// Which rank owns each position of a sharded sequence: positions come in
// segments of `segment` tokens; each new segment goes to the rank holding the
// fewest tokens (ties to the lowest rank), so the newest token goes to the
// rank with the fewest at segment granularity and every rank's share is a
// few contiguous runs. A pure function of the length, the segment size and
// the number of ranks.
class ShardOwnership {
 public:
  ShardOwnership(int ranks, std::int64_t segment);
  void grow(std::int64_t tokens);  // appends positions [length, length + tokens)
  std::int64_t length() const noexcept { return length_; }
  int owner(std::int64_t position) const noexcept;
  std::int64_t tokens_of(int rank) const noexcept {
    return counts_[static_cast<std::size_t>(rank)];
  }

 private:
  int ranks_;
  std::int64_t segment_;
  std::int64_t length_ = 0;
  std::vector<int> segment_owner_;
  std::vector<std::int64_t> counts_;
};

// A KV cache of one long sequence spread over the ranks of a communicator.
class ShardedKvCache {
 public:
  // config.rope must be empty (rotate before appending); config.storage is
  // f32, f16 or bf16 (the shards are plain rows, not KvCaches: no 8-bit
  // storage). segment >= 1.
  ShardedKvCache(const CacheConfig& config, std::int64_t segment, MPI_Comm comm);

  std::int64_t length() const noexcept;        // tokens of the sequence
  std::int64_t local_length() const noexcept;  // tokens held by this rank
  const ShardOwnership& ownership() const noexcept;

  // Collective. k, v: (tokens, kv_heads, head_dim), any input dtype, the
  // same tokens on every rank; each rank keeps the positions it owns.
  void append(const TensorView& k, const TensorView& v);

  // Collective. The step's queries (q: (tokens, heads, head_dim), the newest
  // `tokens` positions, already appended) are read on `root` and broadcast;
  // every rank attends its shard, and one MPI_Allreduce with the online-
  // softmax merge gives every rank the same out (tokens, heads, head_dim)
  // and maybe_lse (heads, tokens). q may be empty on the other ranks.
  // options as KvCache::attend takes them, the same on every rank (window,
  // softcap, scale and whether slopes and sink logits are given are checked;
  // sink_tokens must be 0, splits is not used); learned sink logits join
  // each row's denominator once, after the reduction.
  void attend(const DecodeStep& step, const DecodeOptions& options, Context& context,
              int root = 0) const;

 private:
  struct Run {  // positions [position, position + count) at local rows [local, local + count)
    std::int64_t position;
    std::int64_t local;
    std::int64_t count;
  };
  CacheConfig config_;
  MPI_Comm comm_;
  int rank_ = 0;
  ShardOwnership ownership_;
  std::vector<std::uint8_t> k_, v_;  // (local_length, kv_heads, head_dim) in config_.storage
  std::vector<Run> runs_;
  std::int64_t local_length_ = 0;
};

// ---------------------------------------------------------------------------
// Agreement on errors.

// Collective: every rank passes what went wrong locally (or nothing). When
// any rank failed, every rank throws the same lookback::Error: the lowest
// failing rank's code and message (prefixed "rank N: " unless N is 0).
void agree(MPI_Comm comm, const std::optional<Error>& local_error);

// Runs `check` on every rank and agrees on the outcome (see agree()).
template <typename Check>
void checked_on_every_rank(MPI_Comm comm, Check&& check) {
  std::optional<Error> local;
  try {
    check();
  } catch (const Error& error) {
    local = error;
  } catch (const std::bad_alloc&) {
    local = Error(ErrorCode::kCapacity, "out of memory");
  } catch (const std::exception& other) {
    local = Error(ErrorCode::kInternal, other.what());
  }
  agree(comm, local);
}

}  // namespace lookback::mpi
