// Sharded decode: the KV cache of one sequence spread over the ranks by
// position (ShardOwnership). Each step's queries are broadcast from the root,
// every rank attends the runs of positions it holds, and the partial
// (LSE, output) rows are combined by one MPI_Allreduce whose operation is the
// online-softmax merge, so every rank ends with the same result; learned sink
// logits join each merged row's denominator once, after the reduction.
#include <fmt/format.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/online_softmax.hpp"
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
    throw Error(fmt::format(
        "storage: {} (expected f32, f16 or bf16: a sharded cache stores no 8-bit K/V; "
        "ring_attend, KvCache and PagedKvPool do)",
        dtype_name(config.storage)));
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

// Who takes part in one step: the communicator, this rank, and the root that
// holds the queries.
struct StepRanks {
  MPI_Comm comm;
  int rank = 0;
  int root = 0;
};

// One step's queries as every rank knows them after the root's broadcast.
struct StepShape {
  std::int64_t tokens = 0;  // the newest positions of the sequence
  std::int64_t heads = 0;
  std::int64_t dim = 0;  // head_dim, the cache's
};

// Collective: throws the same lookback::Error on every rank unless every
// rank was given the same root and the same options (the sink logits' and
// slopes' presence; their values are the caller's to keep the same).
void check_same_step_settings(const DecodeOptions& options, const StepRanks& ranks) {
  detail::check_same_everywhere(
      ranks.comm,
      {{"root", ranks.root},
       {"window", options.window_left.value_or(-1)},
       {"softcap", detail::float_bits(options.softcap)},
       {"scale", options.scale ? detail::float_bits(*options.scale) : -1},
       {"alibi", options.maybe_alibi_slopes != nullptr ? 1 : 0},
       {"sink_logits", options.maybe_sink_logits != nullptr ? 1 : 0}});
}

// The root checks the queries (q: (tokens, heads, head_dim)) and tells every
// rank their shape.
StepShape broadcast_step_shape(const TensorView& q, std::int64_t dim, const StepRanks& ranks) {
  std::int64_t header[2] = {0, 0};  // tokens, heads
  checked_on_every_rank(ranks.comm, [&] {
    if (ranks.root < 0 || ranks.root >= size_of(ranks.comm)) {
      throw Error(fmt::format("root: {} (expected a rank, 0 to {})", ranks.root,
                              size_of(ranks.comm) - 1));
    }
    if (ranks.rank != ranks.root) return;
    validate_view(q, 3, "q");
    header[0] = q.shape[0];
    header[1] = q.shape[1];
    if (q.shape[2] != dim) {
      throw Error(fmt::format("q: head_dim {} (expected {}, the cache's)", q.shape[2], dim));
    }
  });
  MPI_Bcast(header, 2, MPI_INT64_T, ranks.root, ranks.comm);
  return {.tokens = header[0], .heads = header[1], .dim = dim};
}

// Checks the options (as lookback::validate_shapes would for the whole
// sequence of `length` tokens) and the step's outputs; run on every rank.
void check_step(const DecodeStep& step, const DecodeOptions& options, const CacheConfig& config,
                const StepShape& shape, std::int64_t length) {
  const std::int64_t tokens = shape.tokens;
  const std::int64_t heads = shape.heads;
  const std::int64_t dim = shape.dim;
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
  k_shape.shape = {1, length, config.kv_heads, dim};
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
                                  .maybe_sink_logits = options.maybe_sink_logits,
                                  .scale = options.scale,
                                  .softcap = options.softcap,
                                  .mask = {.window_left = options.window_left},
                                  .storage = config.storage});
  validate_view(step.out, 3, "out");
  if (step.out.dtype != DType::kF32 || step.out.shape[0] != tokens || step.out.shape[1] != heads ||
      step.out.shape[2] != dim) {
    throw Error(fmt::format("out: {} {} (expected f32 ({}, {}, {}))", dtype_name(step.out.dtype),
                            shape_string(step.out), tokens, heads, dim));
  }
  if (!step.maybe_lse.empty()) {
    validate_view(step.maybe_lse, 2, "lse");
    if (step.maybe_lse.dtype != DType::kF32 || step.maybe_lse.shape[0] != heads ||
        step.maybe_lse.shape[1] != tokens) {
      throw Error(fmt::format("lse: {} {} (expected f32 ({}, {}))",
                              dtype_name(step.maybe_lse.dtype), shape_string(step.maybe_lse), heads,
                              tokens));
    }
  }
}

// The queries, read on the root and broadcast as f32 (tokens, heads, dim).
std::vector<float> broadcast_queries(const TensorView& q, const StepShape& shape,
                                     const StepRanks& ranks) {
  std::vector<float> queries(static_cast<std::size_t>(shape.tokens * shape.heads * shape.dim));
  if (ranks.rank == ranks.root) {
    std::int64_t index = 0;
    for (std::int64_t t = 0; t < shape.tokens; ++t) {
      for (std::int64_t h = 0; h < shape.heads; ++h) {
        load_as_floats(q.data, q.dtype, q.offset(t, h, 0), q.strides[2], shape.dim,
                       queries.data() + index);
        index += shape.dim;
      }
    }
  }
  MPI_Bcast(queries.data(), static_cast<int>(queries.size()), MPI_FLOAT, ranks.root, ranks.comm);
  return queries;
}

// Rows (t, h) packed as (lse, out[dim]), the reduction's elements, before
// any keys: lse -inf, out 0.
std::vector<float> empty_rows(const StepShape& shape) {
  const std::int64_t width = shape.dim + 1;
  std::vector<float> packed(static_cast<std::size_t>(shape.tokens * shape.heads * width), 0.0f);
  for (std::int64_t row = 0; row < shape.tokens * shape.heads; ++row) {
    packed[static_cast<std::size_t>(row * width)] = -std::numeric_limits<float>::infinity();
  }
  return packed;
}

// What every run of this rank's keys is attended with in one step.
struct ShardStep {
  const CacheConfig& config;
  const DecodeOptions& options;
  StepShape shape;
  std::int64_t first = 0;  // position of the step's first query
  TensorView q;            // (1, tokens, heads, head_dim), f32
};

// A run of keys this rank holds: positions [position, position + count),
// K and V rows each (count, kv_heads, head_dim) in the cache's storage.
struct KeyRun {
  std::int64_t position = 0;
  std::int64_t count = 0;
  const std::uint8_t* k = nullptr;
  const std::uint8_t* v = nullptr;
};

// One run's partial result: out (1, tokens, heads, head_dim), lse (1, heads, tokens).
struct PartialRows {
  std::vector<float> out, lse;
};

// Attends the step's queries to one run (unless the mask hides all of it)
// and merges the partial rows into `packed`.
void merge_run(const ShardStep& shard, const KeyRun& run, PartialRows& partial,
               std::vector<float>& packed, Context& context) {
  const std::int64_t tokens = shard.shape.tokens;
  const std::int64_t heads = shard.shape.heads;
  const std::int64_t dim = shard.shape.dim;
  const MaskSpec mask{.causal = Causal::kBottomRight,
                      .window_left = shard.options.window_left,
                      .query_offset = shard.first - run.position};
  if (Mask(tokens, run.count, mask).visible_total() == 0) return;
  TensorView k_view;
  k_view.data = run.k;
  k_view.dtype = shard.config.storage;
  k_view.rank = 4;
  k_view.shape = {1, run.count, shard.config.kv_heads, dim};
  k_view.strides = contiguous_strides(k_view.shape, 4);
  TensorView v_view = k_view;
  v_view.data = run.v;
  lookback::attend(
      {.q = shard.q,
       .k = k_view,
       .v = v_view,
       .out = make_mutable_view(partial.out.data(), DType::kF32, {1, tokens, heads, dim}, "out"),
       .maybe_lse = make_mutable_view(partial.lse.data(), DType::kF32, {1, heads, tokens}, "lse"),
       .maybe_alibi_slopes = shard.options.maybe_alibi_slopes,
       .scale = shard.options.scale,
       .softcap = shard.options.softcap,
       .mask = mask,
       .storage = shard.config.storage},
      context);
  const std::int64_t width = dim + 1;
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t h = 0; h < heads; ++h) {
      float* acc = packed.data() + (t * heads + h) * width;
      merge_attention(acc + 1, acc, partial.out.data() + (t * heads + h) * dim,
                      partial.lse.data() + h * tokens + t, 1, dim);
    }
  }
}

// One reduction: the online-softmax merge as a user-defined operation.
// Declared non-commutative so that MPI combines the ranks in rank order,
// whatever the algorithm, and every rank receives the same bits.
void merge_across_ranks(std::vector<float>& packed, const StepShape& shape, MPI_Comm comm) {
  MPI_Datatype row_type;
  MPI_Type_contiguous(static_cast<int>(shape.dim + 1), MPI_FLOAT, &row_type);
  MPI_Type_commit(&row_type);
  MPI_Op merge_op;
  MPI_Op_create(&merge_rows, /*commute=*/0, &merge_op);
  MPI_Allreduce(MPI_IN_PLACE, packed.data(), static_cast<int>(shape.tokens * shape.heads),
                row_type, merge_op, comm);
  MPI_Op_free(&merge_op);
  MPI_Type_free(&row_type);
}

// The learned sink logits, added once to each row merged across the ranks
// (the same arithmetic on every rank, so every rank keeps the same bits).
void add_sink_logits(std::vector<float>& packed, const StepShape& shape, const float* sinks) {
  if (sinks == nullptr) return;
  const std::int64_t width = shape.dim + 1;
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    for (std::int64_t h = 0; h < shape.heads; ++h) {
      float* row = packed.data() + (t * shape.heads + h) * width;
      kernels::add_sink(row + 1, row[0], sinks[h], static_cast<std::size_t>(shape.dim));
    }
  }
}

// Writes the merged rows to the step's (strided) out and maybe_lse.
void write_step(const std::vector<float>& packed, const StepShape& shape, const DecodeStep& step) {
  const std::int64_t width = shape.dim + 1;
  auto* out = static_cast<float*>(step.out.data);
  auto* lse = static_cast<float*>(step.maybe_lse.data);
  for (std::int64_t t = 0; t < shape.tokens; ++t) {
    for (std::int64_t h = 0; h < shape.heads; ++h) {
      const float* row = packed.data() + (t * shape.heads + h) * width;
      const std::int64_t base = step.out.offset(t, h, 0);
      for (std::int64_t e = 0; e < shape.dim; ++e) out[base + e * step.out.strides[2]] = row[1 + e];
      if (lse != nullptr) lse[step.maybe_lse.offset(h, t)] = row[0];
    }
  }
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
  const StepRanks ranks{.comm = comm_, .rank = rank_, .root = root};
  check_same_step_settings(options, ranks);
  const StepShape shape = broadcast_step_shape(step.q, config_.head_dim, ranks);
  const std::int64_t length = this->length();
  checked_on_every_rank(comm_, [&] { check_step(step, options, config_, shape, length); });
  const std::vector<float> q = broadcast_queries(step.q, shape, ranks);

  std::vector<float> packed = empty_rows(shape);
  try {
    const std::int64_t tokens = shape.tokens;
    const std::int64_t heads = shape.heads;
    const std::int64_t dim = shape.dim;
    PartialRows partial{.out = std::vector<float>(static_cast<std::size_t>(tokens * heads * dim)),
                        .lse = std::vector<float>(static_cast<std::size_t>(heads * tokens))};
    const ShardStep shard{
        .config = config_,
        .options = options,
        .shape = shape,
        .first = length - tokens,
        .q = make_view(q.data(), DType::kF32, {1, tokens, heads, dim}, "q")};
    const std::int64_t row_bytes =
        config_.kv_heads * dim * static_cast<std::int64_t>(dtype_size(config_.storage));
    for (const Run& run : runs_) {
      merge_run(shard,
                {.position = run.position,
                 .count = run.count,
                 .k = k_.data() + run.local * row_bytes,
                 .v = v_.data() + run.local * row_bytes},
                partial, packed, context);
    }
  } catch (const std::exception& error) {
    detail::abort_job(comm_, error.what());
  }

  merge_across_ranks(packed, shape, comm_);
  add_sink_logits(packed, shape, options.maybe_sink_logits);
  write_step(packed, shape, step);
}

}  // namespace lookback::mpi
