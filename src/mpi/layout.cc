// The zigzag layout, the ring's schedule and the shard ownership: pure
// functions of sizes, shared by the ring, the sharded cache, the tests and
// the cost model.
#include <fmt/format.h>

#include <algorithm>

#include "lookback/error.hpp"
#include "lookback/mpi.hpp"

namespace lookback::mpi {

KeyRange ZigzagLayout::chunk(std::int64_t index) const noexcept {
  const std::int64_t chunks = 2 * static_cast<std::int64_t>(ranks);
  // seqlen * index fits: seqlen is a tensor extent (< 2^52 elements) and
  // index < 2P <= 2^31.
  return {seqlen * index / chunks, seqlen * (index + 1) / chunks};
}

std::array<KeyRange, 2> ZigzagLayout::rank_chunks(int rank) const noexcept {
  return {chunk(rank), chunk(2 * static_cast<std::int64_t>(ranks) - 1 - rank)};
}

std::int64_t ZigzagLayout::local_seqlen(int rank) const noexcept {
  const auto chunks = rank_chunks(rank);
  return chunks[0].size() + chunks[1].size();
}

std::vector<float> gather_local_rows(const TensorView& full, const ZigzagLayout& layout, int rank) {
  validate_view(full, 4, "tensor");
  if (full.shape[1] != layout.seqlen) {
    throw Error(
        fmt::format("tensor: seqlen {} (expected {}, the layout's)", full.shape[1], layout.seqlen));
  }
  const std::int64_t batch = full.shape[0];
  const std::int64_t heads = full.shape[2];
  const std::int64_t dim = full.shape[3];
  std::vector<float> local(
      static_cast<std::size_t>(batch * layout.local_seqlen(rank) * heads * dim));
  std::size_t index = 0;
  for (std::int64_t b = 0; b < batch; ++b) {
    for (const KeyRange& chunk : layout.rank_chunks(rank)) {
      for (std::int64_t i = chunk.begin; i < chunk.end; ++i) {
        for (std::int64_t h = 0; h < heads; ++h) {
          load_as_floats(full.data, full.dtype, full.offset(b, i, h, 0), full.strides[3], dim,
                         local.data() + index);
          index += static_cast<std::size_t>(dim);
        }
      }
    }
  }
  return local;
}

void scatter_local_rows(const float* local, const ZigzagLayout& layout, int rank,
                        const MutableTensorView& full) {
  validate_view(full, 4, "tensor");
  if (full.dtype != DType::kF32 || full.shape[1] != layout.seqlen) {
    throw Error(fmt::format("tensor: {} {} (expected f32 with seqlen {})", dtype_name(full.dtype),
                            shape_string(full), layout.seqlen));
  }
  auto* data = static_cast<float*>(full.data);
  std::size_t index = 0;
  for (std::int64_t b = 0; b < full.shape[0]; ++b) {
    for (const KeyRange& chunk : layout.rank_chunks(rank)) {
      for (std::int64_t i = chunk.begin; i < chunk.end; ++i) {
        for (std::int64_t h = 0; h < full.shape[2]; ++h) {
          const std::int64_t base = full.offset(b, i, h, 0);
          for (std::int64_t e = 0; e < full.shape[3]; ++e) {
            data[base + e * full.strides[3]] = local[index++];
          }
        }
      }
    }
  }
}

namespace {

// Whether any query of chunk `queries` sees any key of chunk `keys`.
bool chunks_see(const KeyRange& queries, const KeyRange& keys, const MaskSpec& spec) {
  if (queries.empty() || keys.empty()) return false;
  const Mask mask(queries.size(), keys.size(),
                  {.causal = spec.causal,
                   .window_left = spec.window_left,
                   .query_offset = queries.begin - keys.begin});
  return mask.visible_total() > 0;
}

}  // namespace

std::vector<int> ring_steps(const ZigzagLayout& layout, const MaskSpec& mask) {
  std::vector<int> steps{0};
  const int ranks = layout.ranks;
  for (int step = 1; step < ranks; ++step) {
    bool needed = false;
    for (int rank = 0; rank < ranks && !needed; ++rank) {
      const int origin = (rank - step + ranks) % ranks;
      for (const KeyRange& queries : layout.rank_chunks(rank)) {
        for (const KeyRange& keys : layout.rank_chunks(origin)) {
          needed = needed || chunks_see(queries, keys, mask);
        }
      }
    }
    if (needed) steps.push_back(step);
  }
  return steps;
}

std::vector<RingStepWork> ring_work(std::int64_t seqlen, int ranks, RingLayout layout,
                                    const MaskSpec& mask) {
  if (ranks < 1) throw Error(fmt::format("ranks: {} (expected >= 1)", ranks));
  const ZigzagLayout zigzag{.seqlen = seqlen, .ranks = ranks};
  // A rank's blocks of positions in either layout.
  auto blocks_of = [&](int rank) -> std::vector<KeyRange> {
    if (layout == RingLayout::kZigzag) {
      const auto chunks = zigzag.rank_chunks(rank);
      return {chunks[0], chunks[1]};
    }
    return {{seqlen * rank / ranks, seqlen * (rank + 1) / ranks}};
  };
  auto pairs = [&](const KeyRange& queries, const KeyRange& keys) -> std::int64_t {
    if (queries.empty() || keys.empty()) return 0;
    return Mask(queries.size(), keys.size(),
                {.causal = mask.causal,
                 .window_left = mask.window_left,
                 .query_offset = queries.begin - keys.begin})
        .visible_total();
  };
  std::vector<RingStepWork> steps;
  for (int step = 0; step < ranks; ++step) {
    RingStepWork work{.step = step};
    for (int rank = 0; rank < ranks; ++rank) {
      const int origin = (rank - step + ranks) % ranks;
      std::int64_t mine = 0;
      std::int64_t block_tokens = 0;
      for (const KeyRange& keys : blocks_of(origin)) block_tokens += keys.size();
      for (const KeyRange& queries : blocks_of(rank)) {
        for (const KeyRange& keys : blocks_of(origin)) mine += pairs(queries, keys);
      }
      work.slowest_pairs = std::max(work.slowest_pairs, mine);
      work.total_pairs += mine;
      work.largest_block_tokens = std::max(work.largest_block_tokens, block_tokens);
    }
    if (step == 0 || work.total_pairs > 0) steps.push_back(work);
  }
  // Only blocks that travel on count: the last step passes nothing.
  if (!steps.empty()) steps.back().largest_block_tokens = 0;
  return steps;
}

ShardOwnership::ShardOwnership(int ranks, std::int64_t segment)
    : ranks_(ranks), segment_(segment), counts_(static_cast<std::size_t>(ranks), 0) {
  if (ranks < 1) throw Error(fmt::format("ranks: {} (expected >= 1)", ranks));
  if (segment < 1) throw Error(fmt::format("segment: {} (expected >= 1)", segment));
}

void ShardOwnership::grow(std::int64_t tokens) {
  for (std::int64_t t = 0; t < tokens; ++t) {
    const std::int64_t position = length_ + t;
    if (position % segment_ == 0) {
      // A new segment: to the rank with the fewest tokens, ties to the lowest.
      const auto fewest = std::min_element(counts_.begin(), counts_.end());
      segment_owner_.push_back(static_cast<int>(fewest - counts_.begin()));
    }
    ++counts_[static_cast<std::size_t>(segment_owner_.back())];
  }
  length_ += tokens;
}

int ShardOwnership::owner(std::int64_t position) const noexcept {
  return segment_owner_[static_cast<std::size_t>(position / segment_)];
}

}  // namespace lookback::mpi
