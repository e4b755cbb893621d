// Variable-length packed batches: validate the offsets once, then run each
// sequence through the prefill kernel as a batch of one over views into the
// packed tensors (no copies). Each call spreads its (kv head, query tile)
// tasks over every thread, heaviest first, so a long sequence next to many
// short ones keeps every thread busy; results do not depend on the order or
// the thread count.
#include "lookback/varlen.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <numeric>

#include "lookback/attention.hpp"
#include "lookback/error.hpp"

namespace lookback {

namespace {

// (n, heads, head_dim) as (1, n, heads, head_dim) over the same memory.
template <typename Pointer>
BasicTensorView<Pointer> as_batch_of_one(BasicTensorView<Pointer> view) {
  if (view.rank != 3) return view;  // validation names the rank
  for (int a = 3; a > 0; --a) {
    view.shape[a] = view.shape[a - 1];
    view.strides[a] = view.strides[a - 1];
  }
  view.shape[0] = 1;
  view.strides[0] = view.shape[1] * view.strides[1];
  view.rank = 4;
  return view;
}

// The batch-of-one attention params over the whole packed tensors, for the
// checks validate_shapes makes (dtypes, heads, head_dim, scores, window).
AttentionParams whole(const VarlenParams& params) {
  AttentionParams p;
  p.q = as_batch_of_one(params.q);
  p.k = as_batch_of_one(params.k);
  p.v = as_batch_of_one(params.v);
  p.maybe_alibi_slopes = params.maybe_alibi_slopes;
  p.maybe_sink_logits = params.maybe_sink_logits;
  p.scale = params.scale;
  p.softcap = params.softcap;
  p.mask = params.mask;
  p.storage = params.storage;
  return p;
}

std::vector<std::int64_t> read_offsets(const TensorView& view, const char* name,
                                       std::int64_t total, const char* total_name) {
  validate_view(view, 1, name);
  if (view.dtype != DType::kI32 && view.dtype != DType::kI64) {
    throw Error(fmt::format("{}: dtype {} (expected i32 or i64)", name, dtype_name(view.dtype)));
  }
  std::vector<std::int64_t> offsets;
  for (std::int64_t i = 0; i < view.shape[0]; ++i) {
    offsets.push_back(static_cast<std::int64_t>(load_as_double(view.data, view.dtype, i * view.strides[0])));
    const std::int64_t value = offsets.back();
    if (value < 0) {
      throw Error(fmt::format("{}: entry {} is {} (expected offsets >= 0)", name, i, value));
    }
    if (i > 0 && value < offsets[static_cast<std::size_t>(i - 1)]) {
      throw Error(fmt::format("{}: entry {} is {}, below entry {} = {} (expected ascending "
                              "offsets: a sequence's length is never negative)",
                              name, i, value, i - 1, offsets[static_cast<std::size_t>(i - 1)]));
    }
  }
  if (offsets.size() < 2) {
    throw Error(fmt::format("{}: {} entries (expected batch + 1 >= 2: 0, then the end of each "
                            "sequence)",
                            name, offsets.size()));
  }
  if (offsets.front() != 0) {
    throw Error(fmt::format("{}: starts at {} (expected 0)", name, offsets.front()));
  }
  if (offsets.back() != total) {
    throw Error(fmt::format("{}: ends at {} (expected {}, the {})", name, offsets.back(), total,
                            total_name));
  }
  return offsets;
}

}  // namespace

VarlenShape validate_varlen_shapes(const VarlenParams& params) {
  validate_view_layout(params.q, 3, "q");
  validate_view_layout(params.k, 3, "k");
  validate_view_layout(params.v, 3, "v");
  VarlenShape shape;
  shape.totals = validate_shapes(whole(params));
  shape.cu_q = read_offsets(params.cu_seqlens_q, "cu_seqlens_q", shape.totals.seqlen_q,
                            "total_q of q");
  shape.cu_k = read_offsets(params.cu_seqlens_k, "cu_seqlens_k", shape.totals.seqlen_k,
                            "total_k of k");
  if (shape.cu_q.size() != shape.cu_k.size()) {
    throw Error(fmt::format("cu_seqlens_k: {} entries (expected {}, as many as cu_seqlens_q: one "
                            "more than the sequences)",
                            shape.cu_k.size(), shape.cu_q.size()));
  }
  shape.totals.batch = static_cast<std::int64_t>(shape.cu_q.size()) - 1;
  // Each sequence's own mask (its window) must be valid too.
  for (std::size_t b = 0; b + 1 < shape.cu_q.size(); ++b) {
    Mask(shape.cu_q[b + 1] - shape.cu_q[b], shape.cu_k[b + 1] - shape.cu_k[b], params.mask);
  }
  return shape;
}

VarlenShape validate_varlen(const VarlenParams& params) {
  validate_view(params.q, 3, "q");
  validate_view(params.k, 3, "k");
  validate_view(params.v, 3, "v");
  VarlenShape shape = validate_varlen_shapes(params);
  validate_view(params.out, 3, "out");
  if (params.out.dtype != DType::kF32) {
    throw Error(fmt::format("out: dtype {} (expected f32)", dtype_name(params.out.dtype)));
  }
  if (params.out.shape != params.q.shape) {
    throw Error(fmt::format("out: shape {} (expected {}, the shape of q)",
                            shape_string(params.out), shape_string(params.q)));
  }
  if (!params.maybe_lse.empty()) {
    validate_view(params.maybe_lse, 2, "lse");
    if (params.maybe_lse.dtype != DType::kF32) {
      throw Error(fmt::format("lse: dtype {} (expected f32)", dtype_name(params.maybe_lse.dtype)));
    }
    if (params.maybe_lse.shape[0] != shape.totals.heads ||
        params.maybe_lse.shape[1] != shape.totals.seqlen_q) {
      throw Error(fmt::format("lse: shape {} (expected ({}, {}) = (heads, total_q))",
                              shape_string(params.maybe_lse), shape.totals.heads,
                              shape.totals.seqlen_q));
    }
  }
  return shape;
}

void attend_varlen(const VarlenParams& params, Context& context) {
  const VarlenShape shape = validate_varlen(params);
  const std::int64_t batch = shape.totals.batch;
  // Longest first: the order changes no result, and a long sequence's many
  // tasks start while there is the most to overlap with.
  std::vector<std::int64_t> order(static_cast<std::size_t>(batch));
  std::iota(order.begin(), order.end(), 0);
  auto work = [&](std::int64_t b) {
    const auto i = static_cast<std::size_t>(b);
    return (shape.cu_q[i + 1] - shape.cu_q[i]) * (shape.cu_k[i + 1] - shape.cu_k[i] + 1);
  };
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int64_t a, std::int64_t b) { return work(a) > work(b); });
  for (std::int64_t b : order) {
    const auto i = static_cast<std::size_t>(b);
    const std::int64_t q_begin = shape.cu_q[i], q_count = shape.cu_q[i + 1] - q_begin;
    const std::int64_t k_begin = shape.cu_k[i], k_count = shape.cu_k[i + 1] - k_begin;
    if (q_count == 0) continue;
    AttentionParams sequence = whole(params);
    sequence.q = as_batch_of_one(slice(params.q, 0, q_begin, q_count));
    sequence.k = as_batch_of_one(slice(params.k, 0, k_begin, k_count));
    sequence.v = as_batch_of_one(slice(params.v, 0, k_begin, k_count));
    sequence.out = as_batch_of_one(slice(params.out, 0, q_begin, q_count));
    if (!params.maybe_lse.empty()) {
      // (heads, q_count) of (heads, total_q) as (1, heads, q_count).
      MutableTensorView lse = slice(params.maybe_lse, 1, q_begin, q_count);
      lse.shape = {1, lse.shape[0], lse.shape[1], 0};
      lse.strides = {lse.shape[1] * lse.strides[0], lse.strides[0], lse.strides[1], 0};
      lse.rank = 3;
      sequence.maybe_lse = lse;
    }
    attend(sequence, context);
  }
}

}  // namespace lookback
