// Ring prefill in the zigzag layout (Ring Attention; zigzag/striped layouts
// for causal balance). Rank r holds chunks r and 2P-1-r of Q, K and V. At
// each needed step of ring_steps() it holds the K/V block of rank
// (r - step) mod P, computes its two query chunks against the block's two key
// chunks with the keys' absolute positions (MaskSpec::query_offset), skips the
// fully masked pairs, and merges the partial (output, LSE) pairs exactly;
// meanwhile the block travels on to the rank that needs it next.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>

#include "lookback/merge.hpp"
#include "lookback/mpi.hpp"
#include "mpi/common.hpp"

namespace lookback::mpi {

namespace {

AttentionParams local_params(const RingParams& params) {
  return {.q = params.q,
          .k = params.k,
          .v = params.v,
          .out = params.out,
          .maybe_lse = params.maybe_lse,
          .maybe_alibi_slopes = params.maybe_alibi_slopes,
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
  if (params.storage != DType::kF32 && params.storage != DType::kF16 &&
      params.storage != DType::kBF16) {
    throw Error(fmt::format("storage: {} (expected f32, f16 or bf16)", dtype_name(params.storage)));
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

std::int64_t float_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
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

}  // namespace

RingStats ring_attend(const RingParams& params, MPI_Comm comm, Context& context) {
  int rank = 0;
  int ranks = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &ranks);
  const ZigzagLayout layout{.seqlen = params.seqlen, .ranks = ranks};

  AttentionShape shape;
  checked_on_every_rank(comm, [&] { shape = validate_ring(params, layout, rank); });
  detail::check_same_everywhere(comm, {{"seqlen", params.seqlen},
                                       {"batch", shape.batch},
                                       {"heads", shape.heads},
                                       {"kv_heads", shape.kv_heads},
                                       {"head_dim", shape.head_dim},
                                       {"storage", static_cast<std::int64_t>(params.storage)},
                                       {"causal", static_cast<std::int64_t>(params.mask.causal)},
                                       {"window", params.mask.window_left.value_or(-1)},
                                       {"softcap", float_bits(params.softcap)},
                                       {"scale", params.scale ? float_bits(*params.scale) : -1},
                                       {"alibi", params.maybe_alibi_slopes != nullptr ? 1 : 0}});

  const std::int64_t batch = shape.batch;
  const std::int64_t heads = shape.heads;
  const std::int64_t kv_heads = shape.kv_heads;
  const std::int64_t dim = shape.head_dim;
  const std::int64_t local = layout.local_seqlen(rank);
  const std::size_t element = dtype_size(params.storage);
  // K then V of a rank's block, each (batch, local_seqlen(origin), kv_heads, dim).
  auto block_bytes = [&](int origin) {
    return 2 * batch * layout.local_seqlen(origin) * kv_heads * dim *
           static_cast<std::int64_t>(element);
  };
  std::int64_t largest_block = 0;
  for (int origin = 0; origin < ranks; ++origin) {
    largest_block = std::max(largest_block, block_bytes(origin));
  }
  const std::vector<int> steps = ring_steps(layout, params.mask);

  // Buffers, allocated before any data moves so that running out of memory
  // is agreed on like any other error.
  std::vector<std::uint8_t> current, incoming;
  std::vector<float> acc_out, acc_lse;    // (batch, heads, local, dim), (batch, heads, local)
  std::vector<float> part_out, part_lse;  // (batch, heads, chunk, dim), (batch, heads, chunk)
  checked_on_every_rank(comm, [&] {
    const std::int64_t chunk_rows = layout.chunk(0).size() + 1;
    current.resize(static_cast<std::size_t>(largest_block));
    incoming.resize(steps.size() > 1 ? static_cast<std::size_t>(largest_block) : 0);
    acc_out.assign(static_cast<std::size_t>(batch * heads * local * dim), 0.0f);
    acc_lse.assign(static_cast<std::size_t>(batch * heads * local),
                   -std::numeric_limits<float>::infinity());
    part_out.resize(static_cast<std::size_t>(batch * heads * chunk_rows * dim));
    part_lse.resize(static_cast<std::size_t>(batch * heads * chunk_rows));
  });

  RingStats stats;
  stats.steps = static_cast<int>(steps.size());
  try {
    // This rank's own block: K then V in the storage dtype, rows in local order.
    const std::int64_t half = block_bytes(rank) / 2;
    detail::pack_rows(params.k, 0, local, params.storage, current.data());
    detail::pack_rows(params.v, 0, local, params.storage, current.data() + half);

    const auto my_chunks = layout.rank_chunks(rank);
    for (std::size_t t = 0; t < steps.size(); ++t) {
      const int origin = (rank - steps[t] + ranks) % ranks;
      std::vector<MPI_Request> requests;
      if (t + 1 < steps.size()) {
        // Pass the block on to the rank that needs it at the next needed step.
        const int distance = steps[t + 1] - steps[t];
        const int destination = (rank + distance) % ranks;
        const int source = (rank - distance + ranks) % ranks;
        const int next_origin = (rank - steps[t + 1] + ranks) % ranks;
        detail::irecv_bytes(incoming.data(), block_bytes(next_origin), source, comm, requests);
        detail::isend_bytes(current.data(), block_bytes(origin), destination, comm, requests);
        stats.bytes_sent += block_bytes(origin);
      }

      const double compute_start = seconds();
      const auto block_chunks = layout.rank_chunks(origin);
      const std::int64_t block_rows = layout.local_seqlen(origin);
      const TensorView block_k =
          contiguous(current.data(), params.storage, batch, block_rows, kv_heads, dim);
      const TensorView block_v = contiguous(current.data() + block_bytes(origin) / 2,
                                            params.storage, batch, block_rows, kv_heads, dim);
      std::int64_t query_row = 0;
      for (const KeyRange& queries : my_chunks) {
        std::int64_t key_row = 0;
        for (const KeyRange& keys : block_chunks) {
          const MaskSpec mask{.causal = params.mask.causal,
                              .window_left = params.mask.window_left,
                              .query_offset = queries.begin - keys.begin};
          const bool empty = queries.empty() || keys.empty();
          if (empty || Mask(queries.size(), keys.size(), mask).visible_total() == 0) {
            if (!empty) ++stats.pairs_skipped;
            key_row += keys.size();
            continue;
          }
          const std::int64_t rows = queries.size();
          // The partial output as (batch, rows, heads, dim) over (batch, heads, rows, dim)
          // storage, so that each (batch, head)'s rows lie together as merge_attention wants.
          MutableTensorView out;
          out.data = part_out.data();
          out.dtype = DType::kF32;
          out.rank = 4;
          out.shape = {batch, rows, heads, dim};
          out.strides = {heads * rows * dim, dim, rows * dim, 1};
          MutableTensorView lse;
          lse.data = part_lse.data();
          lse.dtype = DType::kF32;
          lse.rank = 3;
          lse.shape = {batch, heads, rows, 0};
          lse.strides = {heads * rows, rows, 1, 0};
          lookback::attend({.q = slice(params.q, 1, query_row, rows),
                            .k = slice(block_k, 1, key_row, keys.size()),
                            .v = slice(block_v, 1, key_row, keys.size()),
                            .out = out,
                            .maybe_lse = lse,
                            .maybe_alibi_slopes = params.maybe_alibi_slopes,
                            .scale = params.scale,
                            .softcap = params.softcap,
                            .mask = mask,
                            .storage = params.storage},
                           context);
          for (std::int64_t bh = 0; bh < batch * heads; ++bh) {
            merge_attention(acc_out.data() + (bh * local + query_row) * dim,
                            acc_lse.data() + bh * local + query_row,
                            part_out.data() + bh * rows * dim, part_lse.data() + bh * rows, rows,
                            dim);
          }
          ++stats.pairs_computed;
          key_row += keys.size();
        }
        query_row += queries.size();
      }
      const double wait_start = seconds();
      stats.compute_seconds += wait_start - compute_start;
      if (!requests.empty()) {
        MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE);
        std::swap(current, incoming);
      }
      stats.wait_seconds += seconds() - wait_start;
    }
  } catch (const std::exception& error) {
    detail::abort_job(comm, error.what());
  }

  // Write the merged rows to the caller's (strided) outputs.
  auto* out = static_cast<float*>(params.out.data);
  auto* lse = static_cast<float*>(params.maybe_lse.data);
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t h = 0; h < heads; ++h) {
      const std::int64_t bh = b * heads + h;
      for (std::int64_t i = 0; i < local; ++i) {
        const float* row = acc_out.data() + (bh * local + i) * dim;
        const std::int64_t base = params.out.offset(b, i, h, 0);
        for (std::int64_t e = 0; e < dim; ++e) out[base + e * params.out.strides[3]] = row[e];
        if (lse != nullptr) lse[params.maybe_lse.offset(b, h, i)] = acc_lse[bh * local + i];
      }
    }
  }
  return stats;
}

}  // namespace lookback::mpi
