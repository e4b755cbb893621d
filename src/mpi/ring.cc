// Ring prefill in the zigzag layout (Ring Attention; zigzag/striped layouts
// for causal balance). Rank r holds chunks r and 2P-1-r of Q, K and V. At
// each needed step of ring_steps() it holds the K/V block of rank
// (r - step) mod P, computes its two query chunks against the block's two key
// chunks with the keys' absolute positions (MaskSpec::query_offset), skips the
// fully masked pairs, and merges the partial (output, LSE) pairs exactly;
// meanwhile the block travels on to the rank that needs it next (in the
// storage dtype, or f32 for 8-bit storage, which the kernels quantize on
// arrival). Learned sink logits join each row's denominator once, after the
// last step.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <new>

#include "kernels/online_softmax.hpp"
#include "lookback/merge.hpp"
#include "lookback/mpi.hpp"
#include "mpi/common.hpp"

namespace lookback::mpi {

namespace {

// This rank's share as one attention call would see it, for validate(): the
// sink logits are checked here, but the partial attends of the ring never get
// them (they join the denominator once, after the last merge).
AttentionParams local_params(const RingParams& params) {
  return {.q = params.q,
          .k = params.k,
          .v = params.v,
          .out = params.out,
          .maybe_lse = params.maybe_lse,
          .maybe_alibi_slopes = params.maybe_alibi_slopes,
          .maybe_sink_logits = params.maybe_sink_logits,
          .scale = params.scale,
          .softcap = params.softcap,
          .mask = params.mask,
          .storage = params.storage};
}

AttentionShape validate_ring(const RingParams& params, const ZigzagLayout& layout, int rank) {
  if (params.seqlen < 0) {
    throw Error(fmt::format("seqlen: {} (expected >= 0)", params.seqlen));
  }
  if (params.mask.query_offset) {
    throw Error(
        fmt::format("query_offset: {} (ring attention places the blocks itself: "
                    "expected none)",
                    *params.mask.query_offset));
  }
  if (params.mask.sink_tokens != 0) {
    throw Error(fmt::format("sink_tokens: {} (ring attention takes no sink tokens: expected 0)",
                            params.mask.sink_tokens));
  }
  const AttentionShape shape = validate(local_params(params));
  const std::int64_t expected = layout.local_seqlen(rank);
  if (shape.seqlen_q != expected || shape.seqlen_k != expected) {
    const auto chunks = layout.rank_chunks(rank);
    throw Error(fmt::format(
        "q: {} local rows on rank {} (expected {}: chunks [{}, {}) and [{}, {}) of {} tokens "
        "cut into {} in the zigzag layout)",
        shape.seqlen_q != expected ? shape.seqlen_q : shape.seqlen_k, rank, expected,
        chunks[0].begin, chunks[0].end, chunks[1].begin, chunks[1].end, params.seqlen,
        2 * layout.ranks));
  }
  return shape;
}

// One (batch, len, heads, head_dim) view over contiguous storage.
TensorView contiguous(const std::uint8_t* data, DType dtype, std::int64_t batch, std::int64_t rows,
                      std::int64_t heads, std::int64_t dim) {
  TensorView view;
  view.data = data;
  view.dtype = dtype;
  view.rank = 4;
  view.shape = {batch, rows, heads, dim};
  view.strides = contiguous_strides(view.shape, 4);
  return view;
}

double seconds() { return MPI_Wtime(); }

// Collective: throws the same lookback::Error on every rank unless every rank
// was given the same sequence, shape and attention settings.
void check_same_settings(const RingParams& params, const AttentionShape& shape, MPI_Comm comm) {
  detail::check_same_everywhere(
      comm, {{"seqlen", params.seqlen},
             {"batch", shape.batch},
             {"heads", shape.heads},
             {"kv_heads", shape.kv_heads},
             {"head_dim", shape.head_dim},
             {"storage", static_cast<std::int64_t>(params.storage)},
             {"causal", static_cast<std::int64_t>(params.mask.causal)},
             {"window", params.mask.window_left.value_or(-1)},
             {"softcap", detail::float_bits(params.softcap)},
             {"scale", params.scale ? detail::float_bits(*params.scale) : -1},
             {"alibi", params.maybe_alibi_slopes != nullptr ? 1 : 0},
             {"sink_logits", params.maybe_sink_logits != nullptr ? 1 : 0}});
}

// One ring_attend call on this rank, its arguments validated and agreed on:
// where the rank stands in the layout and which steps it runs.
struct Ring {
  const RingParams& params;
  MPI_Comm comm;
  Context& context;
  ZigzagLayout layout;
  int rank = 0;
  AttentionShape shape;
  std::vector<int> steps;  // ring_steps(): the steps that do any work

  // What the blocks travel in: the storage dtype, f32 for 8-bit storage.
  DType block_dtype() const { return ring_block_dtype(params.storage); }
  // K then V of rank `origin`'s block, each (batch, local_seqlen(origin), kv_heads, head_dim).
  std::int64_t block_bytes(int origin) const {
    return 2 * shape.batch * layout.local_seqlen(origin) * shape.kv_heads * shape.head_dim *
           static_cast<std::int64_t>(dtype_size(block_dtype()));
  }
  // The rank whose block this rank holds at steps[t].
  int origin(std::size_t t) const { return (rank - steps[t] + layout.ranks) % layout.ranks; }
  std::int64_t local() const { return layout.local_seqlen(rank); }
};

// What a rank holds while the ring runs.
struct RingBuffers {
  std::vector<std::uint8_t> current;   // the K/V block computed on now (Ring::block_bytes)
  std::vector<std::uint8_t> incoming;  // the block arriving for the next needed step
  std::vector<float> acc_out, acc_lse;    // (batch, heads, local, dim), (batch, heads, local)
  std::vector<float> part_out, part_lse;  // (batch, heads, chunk, dim), (batch, heads, chunk)
};

// Allocated before any data moves so that running out of memory is agreed on
// like any other error.
RingBuffers allocate_buffers(const Ring& ring) {
  const std::int64_t batch = ring.shape.batch;
  const std::int64_t heads = ring.shape.heads;
  const std::int64_t dim = ring.shape.head_dim;
  const std::int64_t local = ring.local();
  std::int64_t largest_block = 0;
  for (int origin = 0; origin < ring.layout.ranks; ++origin) {
    largest_block = std::max(largest_block, ring.block_bytes(origin));
  }
  RingBuffers buffers;
  const std::int64_t chunk_rows = ring.layout.chunk(0).size() + 1;
  buffers.current.resize(static_cast<std::size_t>(largest_block));
  buffers.incoming.resize(ring.steps.size() > 1 ? static_cast<std::size_t>(largest_block) : 0);
  buffers.acc_out.assign(static_cast<std::size_t>(batch * heads * local * dim), 0.0f);
  buffers.acc_lse.assign(static_cast<std::size_t>(batch * heads * local),
                         -std::numeric_limits<float>::infinity());
  buffers.part_out.resize(static_cast<std::size_t>(batch * heads * chunk_rows * dim));
  buffers.part_lse.resize(static_cast<std::size_t>(batch * heads * chunk_rows));
  return buffers;
}

// This rank's own block: K then V in the block dtype, rows in local order.
void pack_own_block(const Ring& ring, std::vector<std::uint8_t>& block) {
  const std::int64_t half = ring.block_bytes(ring.rank) / 2;
  detail::pack_rows(ring.params.k, 0, ring.local(), ring.block_dtype(), block.data());
  detail::pack_rows(ring.params.v, 0, ring.local(), ring.block_dtype(), block.data() + half);
}

// Starts passing the block held at steps[t] on to the rank that needs it at
// the next needed step, and receiving the one this rank needs then.
std::vector<MPI_Request> pass_block_on(const Ring& ring, std::size_t t, RingBuffers& buffers) {
  const int ranks = ring.layout.ranks;
  const int distance = ring.steps[t + 1] - ring.steps[t];
  const int destination = (ring.rank + distance) % ranks;
  const int source = (ring.rank - distance + ranks) % ranks;
  std::vector<MPI_Request> requests;
  detail::irecv_bytes(buffers.incoming.data(), ring.block_bytes(ring.origin(t + 1)), source,
                      ring.comm, requests);
  detail::isend_bytes(buffers.current.data(), ring.block_bytes(ring.origin(t)), destination,
                      ring.comm, requests);
  return requests;
}

// K and V of the block held now, each (batch, local_seqlen(origin), kv_heads, head_dim).
struct KvBlock {
  TensorView k, v;
};

// One query chunk of this rank against one key chunk of the block: their
// positions, their first rows in the local queries and in the block, and the
// mask that places the keys at their absolute positions.
struct ChunkPair {
  KeyRange queries, keys;
  std::int64_t query_row = 0, key_row = 0;
  MaskSpec mask;
};

// Attends one chunk pair into the partial buffers and merges it into the
// accumulators through the LSEs.
void attend_pair(const Ring& ring, const KvBlock& block, const ChunkPair& pair,
                 RingBuffers& buffers) {
  const RingParams& params = ring.params;
  const std::int64_t batch = ring.shape.batch;
  const std::int64_t heads = ring.shape.heads;
  const std::int64_t dim = ring.shape.head_dim;
  const std::int64_t rows = pair.queries.size();
  // The partial output as (batch, rows, heads, dim) over (batch, heads, rows, dim)
  // storage, so that each (batch, head)'s rows lie together as merge_attention wants.
  MutableTensorView out;
  out.data = buffers.part_out.data();
  out.dtype = DType::kF32;
  out.rank = 4;
  out.shape = {batch, rows, heads, dim};
  out.strides = {heads * rows * dim, dim, rows * dim, 1};
  MutableTensorView lse;
  lse.data = buffers.part_lse.data();
  lse.dtype = DType::kF32;
  lse.rank = 3;
  lse.shape = {batch, heads, rows, 0};
  lse.strides = {heads * rows, rows, 1, 0};
  lookback::attend({.q = slice(params.q, 1, pair.query_row, rows),
                    .k = slice(block.k, 1, pair.key_row, pair.keys.size()),
                    .v = slice(block.v, 1, pair.key_row, pair.keys.size()),
                    .out = out,
                    .maybe_lse = lse,
                    .maybe_alibi_slopes = params.maybe_alibi_slopes,
                    .scale = params.scale,
                    .softcap = params.softcap,
                    .mask = pair.mask,
                    .storage = params.storage},
                   ring.context);
  const std::int64_t local = ring.local();
  for (std::int64_t bh = 0; bh < batch * heads; ++bh) {
    merge_attention(buffers.acc_out.data() + (bh * local + pair.query_row) * dim,
                    buffers.acc_lse.data() + bh * local + pair.query_row,
                    buffers.part_out.data() + bh * rows * dim, buffers.part_lse.data() + bh * rows,
                    rows, dim);
  }
}

// This rank's two query chunks against the two key chunks of rank `origin`'s
// block (in buffers.current); fully masked pairs are skipped.
void attend_block(const Ring& ring, int origin, RingBuffers& buffers, RingStats& stats) {
  const AttentionShape& shape = ring.shape;
  const std::int64_t block_rows = ring.layout.local_seqlen(origin);
  const KvBlock block{
      .k = contiguous(buffers.current.data(), ring.block_dtype(), shape.batch, block_rows,
                      shape.kv_heads, shape.head_dim),
      .v = contiguous(buffers.current.data() + ring.block_bytes(origin) / 2, ring.block_dtype(),
                      shape.batch, block_rows, shape.kv_heads, shape.head_dim)};
  std::int64_t query_row = 0;
  for (const KeyRange& queries : ring.layout.rank_chunks(ring.rank)) {
    std::int64_t key_row = 0;
    for (const KeyRange& keys : ring.layout.rank_chunks(origin)) {
      const ChunkPair pair{.queries = queries,
                           .keys = keys,
                           .query_row = query_row,
                           .key_row = key_row,
                           .mask = {.causal = ring.params.mask.causal,
                                    .window_left = ring.params.mask.window_left,
                                    .query_offset = queries.begin - keys.begin}};
      const bool empty = queries.empty() || keys.empty();
      if (empty || Mask(queries.size(), keys.size(), pair.mask).visible_total() == 0) {
        if (!empty) ++stats.pairs_skipped;
      } else {
        attend_pair(ring, block, pair, buffers);
        ++stats.pairs_computed;
      }
      key_row += keys.size();
    }
    query_row += queries.size();
  }
}

// Step steps[t]: the block moves on while this rank computes on it, then
// the next one is waited for.
void run_step(const Ring& ring, std::size_t t, RingBuffers& buffers, RingStats& stats) {
  const int origin = ring.origin(t);
  std::vector<MPI_Request> requests;
  if (t + 1 < ring.steps.size()) {
    requests = pass_block_on(ring, t, buffers);
    stats.bytes_sent += ring.block_bytes(origin);
  }
  const double compute_start = seconds();
  attend_block(ring, origin, buffers, stats);
  const double wait_start = seconds();
  stats.compute_seconds += wait_start - compute_start;
  if (!requests.empty()) {
    MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE);
    std::swap(buffers.current, buffers.incoming);
  }
  stats.wait_seconds += seconds() - wait_start;
}

// The learned sink logits, added once to each merged row (rows (batch, head,
// local) of the accumulators), after every ring step.
void add_sink_logits(const Ring& ring, RingBuffers& buffers) {
  const float* sinks = ring.params.maybe_sink_logits;
  if (sinks == nullptr) return;
  const std::int64_t heads = ring.shape.heads;
  const std::int64_t dim = ring.shape.head_dim;
  const std::int64_t local = ring.local();
  for (std::int64_t bh = 0; bh < ring.shape.batch * heads; ++bh) {
    for (std::int64_t i = 0; i < local; ++i) {
      const auto row = static_cast<std::size_t>(bh * local + i);
      kernels::add_sink(buffers.acc_out.data() + row * static_cast<std::size_t>(dim),
                        buffers.acc_lse[row], sinks[bh % heads], static_cast<std::size_t>(dim));
    }
  }
}

// Writes the merged rows to the caller's (strided) outputs.
void write_outputs(const Ring& ring, const RingBuffers& buffers) {
  const RingParams& params = ring.params;
  const std::int64_t heads = ring.shape.heads;
  const std::int64_t dim = ring.shape.head_dim;
  const std::int64_t local = ring.local();
  auto* out = static_cast<float*>(params.out.data);
  auto* lse = static_cast<float*>(params.maybe_lse.data);
  for (std::int64_t b = 0; b < ring.shape.batch; ++b) {
    for (std::int64_t h = 0; h < heads; ++h) {
      const std::int64_t bh = b * heads + h;
      for (std::int64_t i = 0; i < local; ++i) {
        const float* row = buffers.acc_out.data() + (bh * local + i) * dim;
        const std::int64_t base = params.out.offset(b, i, h, 0);
        for (std::int64_t e = 0; e < dim; ++e) out[base + e * params.out.strides[3]] = row[e];
        if (lse != nullptr) lse[params.maybe_lse.offset(b, h, i)] = buffers.acc_lse[bh * local + i];
      }
    }
  }
}

}  // namespace

RingStats ring_attend(const RingParams& params, MPI_Comm comm, Context& context) {
  int rank = 0;
  int ranks = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &ranks);
  const ZigzagLayout layout{.seqlen = params.seqlen, .ranks = ranks};

  AttentionShape shape;
  checked_on_every_rank(comm, [&] { shape = validate_ring(params, layout, rank); });
  check_same_settings(params, shape, comm);
  const Ring ring{.params = params,
                  .comm = comm,
                  .context = context,
                  .layout = layout,
                  .rank = rank,
                  .shape = shape,
                  .steps = ring_steps(layout, params.mask)};

  RingBuffers buffers;
  checked_on_every_rank(comm, [&] { buffers = allocate_buffers(ring); });

  RingStats stats;
  stats.steps = static_cast<int>(ring.steps.size());
  try {
    pack_own_block(ring, buffers.current);
    for (std::size_t t = 0; t < ring.steps.size(); ++t) run_step(ring, t, buffers, stats);
  } catch (const std::exception& error) {
    detail::abort_job(comm, error.what());
  }

  add_sink_logits(ring, buffers);
  write_outputs(ring, buffers);
  return stats;
}

}  // namespace lookback::mpi
