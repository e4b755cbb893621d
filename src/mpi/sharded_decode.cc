// Sharded decode: the KV cache of one sequence spread over the ranks by
// position (ShardOwnership). Each step's queries are broadcast from the root,
// every rank attends the runs of positions it holds, and the partial
// (LSE, output) rows are combined by one MPI_Allreduce whose operation is the
// online-softmax merge, so every rank ends with the same result.
#include <fmt/format.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "lookback/merge.hpp"
#include "lookback/mpi.hpp"
#include "mpi/common.hpp"

namespace lookback::mpi {

namespace {

// The reduction: each element is one query row packed as (lse, out[dim]);
// `in` is merged into `inout` exactly (lookback::merge_attention).
void merge_rows(void* in, void* inout, int* count, MPI_Datatype* type) {
  int bytes = 0;
  MPI_Type_size(*type, &bytes);
  const std::int64_t width = bytes / static_cast<int>(sizeof(float));
  auto* other = static_cast<float*>(in);
  auto* acc = static_cast<float*>(inout);
  for (std::int64_t row = 0; row < *count; ++row) {
    float* a = acc + row * width;
    const float* o = other + row * width;
    merge_attention(a + 1, a, o + 1, o, 1, width - 1);
  }
}

void check_config(const CacheConfig& config) {
  if (config.kv_heads < 1)
    throw Error(fmt::format("kv_heads: {} (expected >= 1)", config.kv_heads));
  if (config.head_dim < 1 || config.head_dim > kMaxHeadDim) {
    throw Error(fmt::format("head_dim: {} (expected 1 to {})", config.head_dim, kMaxHeadDim));
  }
  if (config.storage != DType::kF32 && config.storage != DType::kF16 &&
      config.storage != DType::kBF16) {
    throw Error(fmt::format("storage: {} (expected f32, f16 or bf16)", dtype_name(config.storage)));
  }
  if (config.rope) {
    throw Error("rope: a sharded cache takes keys already rotated (expected no rope)");
  }
}

int rank_of(MPI_Comm comm) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  return rank;
}

int size_of(MPI_Comm comm) {
  int size = 1;
  MPI_Comm_size(comm, &size);
  return size;
}

}  // namespace

ShardedKvCache::ShardedKvCache(const CacheConfig& config, std::int64_t segment, MPI_Comm comm)
    : config_(config), comm_(comm), rank_(rank_of(comm)), ownership_(size_of(comm), segment) {
  checked_on_every_rank(comm, [&] { check_config(config); });
  detail::check_same_everywhere(comm, {{"kv_heads", config.kv_heads},
                                       {"head_dim", config.head_dim},
                                       {"storage", static_cast<std::int64_t>(config.storage)},
                                       {"segment", segment}});
}

std::int64_t ShardedKvCache::length() const noexcept { return ownership_.length(); }
std::int64_t ShardedKvCache::local_length() const noexcept { return local_length_; }
const ShardOwnership& ShardedKvCache::ownership() const noexcept { return ownership_; }

void ShardedKvCache::append(const TensorView& k, const TensorView& v) {
  const std::int64_t row_elements = config_.kv_heads * config_.head_dim;
  const std::size_t element = dtype_size(config_.storage);
  std::int64_t tokens = 0;
  ShardOwnership grown = ownership_;
  std::int64_t mine = 0;
  checked_on_every_rank(comm_, [&] {
    validate_view(k, 3, "k");
    validate_view(v, 3, "v");
    if (k.shape[1] != config_.kv_heads || k.shape[2] != config_.head_dim) {
      throw Error(fmt::format("k: shape {} (expected (tokens, {}, {}))", shape_string(k),
                              config_.kv_heads, config_.head_dim));
    }
    if (v.shape != k.shape) {
      throw Error(fmt::format("v: shape {} (expected {}, the shape of k)", shape_string(v),
                              shape_string(k)));
    }
    tokens = k.shape[0];
    grown.grow(tokens);
    for (std::int64_t t = 0; t < tokens; ++t) mine += grown.owner(length() + t) == rank_;
    const auto bytes = static_cast<std::size_t>((local_length_ + mine) * row_elements) * element;
    k_.resize(bytes);
    v_.resize(bytes);
  });
  detail::check_same_everywhere(comm_, {{"k tokens", tokens}});

  // Expand 3-d (tokens, kv_heads, dim) views to the 4-d rows pack_rows copies.
  auto as_rows = [](TensorView view) {
    view.rank = 4;
    view.shape = {1, view.shape[0], view.shape[1], view.shape[2]};
    view.strides = {0, view.strides[0], view.strides[1], view.strides[2]};
    return view;
  };
  const TensorView k_rows = as_rows(k);
  const TensorView v_rows = as_rows(v);
  const std::int64_t row_bytes = row_elements * static_cast<std::int64_t>(element);
  for (std::int64_t t = 0; t < tokens; ++t) {
    const std::int64_t position = length() + t;
    if (grown.owner(position) != rank_) continue;
    detail::pack_rows(k_rows, t, 1, config_.storage, k_.data() + local_length_ * row_bytes);
    detail::pack_rows(v_rows, t, 1, config_.storage, v_.data() + local_length_ * row_bytes);
    if (!runs_.empty() && runs_.back().position + runs_.back().count == position) {
      ++runs_.back().count;
    } else {
      runs_.push_back({.position = position, .local = local_length_, .count = 1});
    }
    ++local_length_;
  }
  ownership_ = grown;
}

void ShardedKvCache::attend(const DecodeStep& step, const DecodeOptions& options, Context& context,
                            int root) const {
  const std::int64_t dim = config_.head_dim;
  // The root checks the queries and tells every rank their shape.
  std::int64_t header[2] = {0, 0};  // tokens, heads
  checked_on_every_rank(comm_, [&] {
    if (root < 0 || root >= size_of(comm_)) {
      throw Error(fmt::format("root: {} (expected a rank, 0 to {})", root, size_of(comm_) - 1));
    }
    if (rank_ != root) return;
    validate_view(step.q, 3, "q");
    header[0] = step.q.shape[0];
    header[1] = step.q.shape[1];
    if (step.q.shape[2] != dim) {
      throw Error(fmt::format("q: head_dim {} (expected {}, the cache's)", step.q.shape[2], dim));
    }
  });
  detail::check_same_everywhere(comm_, {{"root", root}});
  MPI_Bcast(header, 2, MPI_INT64_T, root, comm_);
  const std::int64_t tokens = header[0];
  const std::int64_t heads = header[1];
  const std::int64_t length = this->length();
  const std::int64_t first = length - tokens;  // position of the step's first query

  // Every rank checks the options (as lookback::validate_shapes would for the
  // whole sequence) and its outputs.
  checked_on_every_rank(comm_, [&] {
    if (tokens < 1 || tokens > length) {
      throw Error(
          fmt::format("q: {} tokens (expected 1 to {}, the newest tokens of the "
                      "sequence, already appended)",
                      tokens, length));
    }
    TensorView q_shape;
    q_shape.rank = 4;
    q_shape.shape = {1, tokens, heads, dim};
    q_shape.strides = contiguous_strides(q_shape.shape, 4);
    TensorView k_shape = q_shape;
    k_shape.shape = {1, length, config_.kv_heads, dim};
    k_shape.strides = contiguous_strides(k_shape.shape, 4);
    if (options.sink_tokens != 0) {
      throw Error(fmt::format("sink_tokens: {} (the sharded cache takes no sink tokens: "
                              "expected 0)",
                              options.sink_tokens));
    }
    validate_shapes(AttentionParams{.q = q_shape,
                                    .k = k_shape,
                                    .v = k_shape,
                                    .maybe_alibi_slopes = options.maybe_alibi_slopes,
                                    .scale = options.scale,
                                    .softcap = options.softcap,
                                    .mask = {.window_left = options.window_left},
                                    .storage = config_.storage});
    validate_view(step.out, 3, "out");
    if (step.out.dtype != DType::kF32 || step.out.shape[0] != tokens ||
        step.out.shape[1] != heads || step.out.shape[2] != dim) {
      throw Error(fmt::format("out: {} {} (expected f32 ({}, {}, {}))", dtype_name(step.out.dtype),
                              shape_string(step.out), tokens, heads, dim));
    }
    if (!step.maybe_lse.empty()) {
      validate_view(step.maybe_lse, 2, "lse");
      if (step.maybe_lse.dtype != DType::kF32 || step.maybe_lse.shape[0] != heads ||
          step.maybe_lse.shape[1] != tokens) {
        throw Error(fmt::format("lse: {} {} (expected f32 ({}, {}))",
                                dtype_name(step.maybe_lse.dtype), shape_string(step.maybe_lse),
                                heads, tokens));
      }
    }
  });

  // The queries, broadcast as f32 (tokens, heads, dim).
  std::vector<float> q(static_cast<std::size_t>(tokens * heads * dim));
  if (rank_ == root) {
    std::int64_t index = 0;
    for (std::int64_t t = 0; t < tokens; ++t) {
      for (std::int64_t h = 0; h < heads; ++h) {
        const std::int64_t base = step.q.offset(t, h, 0);
        for (std::int64_t e = 0; e < dim; ++e) {
          q[static_cast<std::size_t>(index++)] =
              load_as_float(step.q.data, step.q.dtype, base + e * step.q.strides[2]);
        }
      }
    }
  }
  MPI_Bcast(q.data(), static_cast<int>(q.size()), MPI_FLOAT, root, comm_);

  // Rows (t, h) packed as (lse, out[dim]): the reduction's elements.
  const std::int64_t width = dim + 1;
  std::vector<float> packed(static_cast<std::size_t>(tokens * heads * width), 0.0f);
  for (std::int64_t row = 0; row < tokens * heads; ++row) {
    packed[static_cast<std::size_t>(row * width)] = -std::numeric_limits<float>::infinity();
  }
  try {
    std::vector<float> part_out(static_cast<std::size_t>(tokens * heads * dim));
    std::vector<float> part_lse(static_cast<std::size_t>(heads * tokens));
    const TensorView q_view = make_view(q.data(), DType::kF32, {1, tokens, heads, dim}, "q");
    const std::int64_t row_bytes =
        config_.kv_heads * dim * static_cast<std::int64_t>(dtype_size(config_.storage));
    for (const Run& run : runs_) {
      const MaskSpec mask{.causal = Causal::kBottomRight,
                          .window_left = options.window_left,
                          .query_offset = first - run.position};
      if (Mask(tokens, run.count, mask).visible_total() == 0) continue;
      TensorView k_view;
      k_view.data = k_.data() + run.local * row_bytes;
      k_view.dtype = config_.storage;
      k_view.rank = 4;
      k_view.shape = {1, run.count, config_.kv_heads, dim};
      k_view.strides = contiguous_strides(k_view.shape, 4);
      TensorView v_view = k_view;
      v_view.data = v_.data() + run.local * row_bytes;
      lookback::attend(
          {.q = q_view,
           .k = k_view,
           .v = v_view,
           .out = make_mutable_view(part_out.data(), DType::kF32, {1, tokens, heads, dim}, "out"),
           .maybe_lse = make_mutable_view(part_lse.data(), DType::kF32, {1, heads, tokens}, "lse"),
           .maybe_alibi_slopes = options.maybe_alibi_slopes,
           .scale = options.scale,
           .softcap = options.softcap,
           .mask = mask,
           .storage = config_.storage},
          context);
      for (std::int64_t t = 0; t < tokens; ++t) {
        for (std::int64_t h = 0; h < heads; ++h) {
          float* acc = packed.data() + (t * heads + h) * width;
          merge_attention(acc + 1, acc, part_out.data() + (t * heads + h) * dim,
                          part_lse.data() + h * tokens + t, 1, dim);
        }
      }
    }
  } catch (const std::exception& error) {
    detail::abort_job(comm_, error.what());
  }

  // One reduction: the online-softmax merge as a user-defined operation.
  // Declared non-commutative so that MPI combines the ranks in rank order,
  // whatever the algorithm, and every rank receives the same bits.
  MPI_Datatype row_type;
  MPI_Type_contiguous(static_cast<int>(width), MPI_FLOAT, &row_type);
  MPI_Type_commit(&row_type);
  MPI_Op merge_op;
  MPI_Op_create(&merge_rows, /*commute=*/0, &merge_op);
  MPI_Allreduce(MPI_IN_PLACE, packed.data(), static_cast<int>(tokens * heads), row_type, merge_op,
                comm_);
  MPI_Op_free(&merge_op);
  MPI_Type_free(&row_type);

  auto* out = static_cast<float*>(step.out.data);
  auto* lse = static_cast<float*>(step.maybe_lse.data);
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t h = 0; h < heads; ++h) {
      const float* row = packed.data() + (t * heads + h) * width;
      const std::int64_t base = step.out.offset(t, h, 0);
      for (std::int64_t e = 0; e < dim; ++e) out[base + e * step.out.strides[2]] = row[1 + e];
      if (lse != nullptr) lse[step.maybe_lse.offset(h, t)] = row[0];
    }
  }
}

}  // namespace lookback::mpi
