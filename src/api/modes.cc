#include "lookback/modes.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>

#include "kernels/prefill.hpp"
#include "lookback/error.hpp"
#include "lookback/kv_cache.hpp"
#include "lookback/merge.hpp"

namespace lookback {

std::string_view mode_name(Mode mode) noexcept {
  switch (mode) {
    case Mode::kPrefill: return "prefill";
    case Mode::kDecode: return "decode";
    case Mode::kChunked: return "chunked";
    case Mode::kPaged: return "paged";
    case Mode::kSplit: return "split";
  }
  return "?";
}

Mode parse_mode(std::string_view text, std::string_view argument) {
  for (Mode mode : all_modes()) {
    if (text == mode_name(mode)) return mode;
  }
  throw Error(fmt::format("{}: unknown mode '{}' (expected prefill, decode, chunked, paged or split)",
                          argument, text));
}

std::vector<Mode> all_modes() {
  return {Mode::kPrefill, Mode::kDecode, Mode::kChunked, Mode::kPaged, Mode::kSplit};
}

namespace {

// The rows [begin, begin + count) of batch element b of a 4-d view, as a
// 3-d view (rows, heads, head_dim) over the same memory.
template <typename Pointer>
BasicTensorView<Pointer> rows_of(const BasicTensorView<Pointer>& view, std::int64_t b,
                                 std::int64_t begin, std::int64_t count) {
  return select(slice(view, 1, begin, count), 0, b);
}

// (heads, count) of the LSE (batch, heads, seqlen_q), or empty.
MutableTensorView lse_of(const MutableTensorView& lse, std::int64_t b, std::int64_t begin,
                         std::int64_t count) {
  if (lse.empty()) return {};
  return select(slice(lse, 2, begin, count), 0, b);
}

// How run_through_cache feeds the cache.
struct CacheRun {
  std::int64_t chunk = 1;         // query tokens appended and attended per step
  bool paged = false;             // a paged pool instead of one contiguous cache per sequence
  std::int64_t block_size = 16;   // tokens per block of the paged pool
  bool ring = false;              // contiguous caches as rings of sinks + window + chunk slots
};

// decode / chunked / paged: fill a cache per batch element with the first
// seqlen_k - seqlen_q tokens, then append and attend `chunk` tokens at a time.
void run_through_cache(const AttentionParams& params, const AttentionShape& shape,
                       const CacheRun& run, Context& context) {
  const std::int64_t chunk = run.chunk, block_size = run.block_size;
  const bool paged = run.paged;
  const CacheConfig config{.kv_heads = shape.kv_heads,
                           .head_dim = shape.head_dim,
                           .storage = params.storage,
                           .rope = std::nullopt};
  const DecodeOptions options{.scale = params.scale,
                              .softcap = params.softcap,
                              .window_left = params.mask.window_left,
                              .sink_tokens = params.mask.sink_tokens,
                              .maybe_alibi_slopes = params.maybe_alibi_slopes,
                              .maybe_sink_logits = params.maybe_sink_logits};
  const std::int64_t prompt = shape.seqlen_k - shape.seqlen_q;
  std::vector<KvCache> caches;
  std::optional<PagedKvPool> pool;
  std::vector<SequenceId> ids;
  if (paged) {
    const std::int64_t blocks_per_sequence = (shape.seqlen_k + block_size - 1) / block_size;
    pool.emplace(config, block_size, shape.batch * blocks_per_sequence);
    // Allocation order follows the block ids: shuffle them so that block
    // tables are never the identity.
    pool->shuffle_blocks(0x5eed);
    for (std::int64_t b = 0; b < shape.batch; ++b) ids.push_back(pool->create());
  } else if (run.ring) {
    // The sinks, the window and a step's tokens, but never more than the
    // sequence (the ring then never wraps).
    const std::int64_t slots = std::max(
        std::min(ring_slots(params.mask.sink_tokens, *params.mask.window_left, chunk),
                 shape.seqlen_k),
        params.mask.sink_tokens + 1);
    for (std::int64_t b = 0; b < shape.batch; ++b) {
      caches.emplace_back(config, slots, RingSpec{.sink_tokens = params.mask.sink_tokens});
    }
  } else {
    for (std::int64_t b = 0; b < shape.batch; ++b) caches.emplace_back(config, shape.seqlen_k);
  }
  auto append = [&](std::int64_t b, std::int64_t begin, std::int64_t count) {
    if (count == 0) return;
    if (paged) {
      pool->append(ids[static_cast<std::size_t>(b)], rows_of(params.k, b, begin, count),
                   rows_of(params.v, b, begin, count));
      return;
    }
    KvCache& cache = caches[static_cast<std::size_t>(b)];
    // A ring takes at most its window slots at once (the prompt in pieces).
    const std::int64_t most = cache.ring() ? cache.capacity() - cache.ring()->sink_tokens : count;
    for (std::int64_t done = 0; done < count; done += most) {
      const std::int64_t piece = std::min(most, count - done);
      cache.append(rows_of(params.k, b, begin + done, piece), rows_of(params.v, b, begin + done, piece));
    }
  };
  for (std::int64_t b = 0; b < shape.batch; ++b) append(b, 0, prompt);
  std::vector<DecodeStep> steps(static_cast<std::size_t>(shape.batch));
  std::vector<const KvCache*> cache_pointers;
  for (const KvCache& cache : caches) cache_pointers.push_back(&cache);
  for (std::int64_t t = 0; t < shape.seqlen_q; t += chunk) {
    const std::int64_t count = std::min(chunk, shape.seqlen_q - t);
    for (std::int64_t b = 0; b < shape.batch; ++b) {
      append(b, prompt + t, count);
      steps[static_cast<std::size_t>(b)] = {.q = rows_of(params.q, b, t, count),
                                            .out = rows_of(params.out, b, t, count),
                                            .maybe_lse = lse_of(params.maybe_lse, b, t, count)};
    }
    if (paged) {
      pool->attend_batch(ids, steps, options, context);
    } else {
      attend_batch(cache_pointers, steps, options, context);
    }
  }
}

// One part of a split prefill: a range of keys and the mask it is attended under.
struct SplitPart {
  MaskSpec mask;
  KeyRange keys;
};

// The parts: with sink tokens, first the sinks [0, S) under a plain causal
// mask at the same positions (query_offset), then `splits` parts of
// [S, seqlen_k) under the window. The kernels never see sink tokens.
std::vector<SplitPart> split_parts(const AttentionParams& params, const AttentionShape& shape,
                                   std::int64_t splits) {
  const Mask mask(shape.seqlen_q, shape.seqlen_k, params.mask);
  const std::int64_t sinks = mask.effective_sink_tokens();
  std::vector<SplitPart> parts;
  MaskSpec window_mask = params.mask;
  window_mask.sink_tokens = 0;
  if (sinks > 0) {
    parts.push_back({.mask = {.causal = params.mask.causal, .query_offset = mask.position(0)},
                     .keys = {0, sinks}});
  }
  const std::int64_t window_keys = shape.seqlen_k - sinks;
  for (std::int64_t part = 0; part < splits; ++part) {
    parts.push_back({.mask = window_mask,
                     .keys = {sinks + window_keys * part / splits,
                              sinks + window_keys * (part + 1) / splits}});
  }
  return parts;
}

// Rows r = (b, i, h) of a split prefill: out (batch, seqlen_q, heads, head_dim)
// and lse (batch, seqlen_q, heads).
struct SplitRows {
  std::vector<float> out, lse;
};

// Points the prefill's outputs at `rows`.
void bind_rows(kernels::PrefillParams& prefill, const AttentionShape& shape, SplitRows& rows) {
  prefill.out =
      make_mutable_view(rows.out.data(), DType::kF32,
                        {shape.batch, shape.seqlen_q, shape.heads, shape.head_dim}, "out");
  MutableTensorView lse_view;
  lse_view.data = rows.lse.data();
  lse_view.dtype = DType::kF32;
  lse_view.rank = 3;
  lse_view.shape = {shape.batch, shape.heads, shape.seqlen_q, 0};
  lse_view.strides = {shape.seqlen_q * shape.heads, 1, shape.heads, 0};
  prefill.maybe_lse = lse_view;
}

// Prefills each part, merging every later part into the first through the LSEs.
SplitRows attend_parts(const AttentionParams& params, const AttentionShape& shape,
                       const std::vector<SplitPart>& parts, Context& context) {
  const std::int64_t rows = shape.batch * shape.seqlen_q * shape.heads;
  const std::int64_t dim = shape.head_dim;
  SplitRows merged{.out = std::vector<float>(static_cast<std::size_t>(rows * dim)),
                   .lse = std::vector<float>(static_cast<std::size_t>(rows))};
  SplitRows part_rows{.out = std::vector<float>(merged.out.size()),
                      .lse = std::vector<float>(merged.lse.size())};
  kernels::PrefillParams prefill{
      .q = params.q,
      .k = params.k,
      .v = params.v,
      .out = {},
      .maybe_lse = {},
      .maybe_alibi_slopes = params.maybe_alibi_slopes,
      .shape = shape,
      .scale = params.scale.value_or(1.0f / std::sqrt(static_cast<float>(dim))),
      .softcap = params.softcap,
      .mask = {},
      .storage = params.storage,
  };
  for (std::size_t part = 0; part < parts.size(); ++part) {
    prefill.mask = parts[part].mask;
    prefill.keys = parts[part].keys;
    if (part == 0) {
      bind_rows(prefill, shape, merged);
      kernels::prefill(prefill, context);
    } else {
      bind_rows(prefill, shape, part_rows);
      kernels::prefill(prefill, context);
      merge_attention(merged.out.data(), merged.lse.data(), part_rows.out.data(),
                      part_rows.lse.data(), rows, dim);
    }
  }
  return merged;
}

// The learned sink logits, added once to each merged row.
void add_sink_logits(const AttentionParams& params, const AttentionShape& shape, SplitRows& rows) {
  const std::int64_t count = shape.batch * shape.seqlen_q * shape.heads;
  const std::int64_t dim = shape.head_dim;
  for (std::int64_t row = 0; row < count; ++row) {
    kernels::add_sink(rows.out.data() + row * dim, rows.lse[static_cast<std::size_t>(row)],
                      params.maybe_sink_logits[row % shape.heads], static_cast<std::size_t>(dim));
  }
}

// Writes the merged rows to the caller's (strided) out and maybe_lse.
void write_rows(const AttentionParams& params, const AttentionShape& shape, const SplitRows& rows) {
  const std::int64_t dim = shape.head_dim;
  auto* destination = static_cast<float*>(params.out.data);
  auto* lse_destination = static_cast<float*>(params.maybe_lse.data);
  for (std::int64_t b = 0; b < shape.batch; ++b) {
    for (std::int64_t i = 0; i < shape.seqlen_q; ++i) {
      for (std::int64_t h = 0; h < shape.heads; ++h) {
        const std::int64_t row = (b * shape.seqlen_q + i) * shape.heads + h;
        const std::int64_t base = params.out.offset(b, i, h, 0);
        for (std::int64_t e = 0; e < dim; ++e) {
          destination[base + e * params.out.strides[3]] =
              rows.out[static_cast<std::size_t>(row * dim + e)];
        }
        if (lse_destination != nullptr) {
          lse_destination[params.maybe_lse.offset(b, h, i)] =
              rows.lse[static_cast<std::size_t>(row)];
        }
      }
    }
  }
}

// split: prefill over `splits` parts of the key range, merged through LSEs.
void run_split(const AttentionParams& params, const AttentionShape& shape, std::int64_t splits,
               Context& context) {
  const std::vector<SplitPart> parts = split_parts(params, shape, splits);
  SplitRows rows = attend_parts(params, shape, parts, context);
  if (shape.seqlen_k == 0) {  // no part ran
    std::fill(rows.out.begin(), rows.out.end(), 0.0f);
    std::fill(rows.lse.begin(), rows.lse.end(), -std::numeric_limits<float>::infinity());
  }
  // The parts left the sink out (prefill.maybe_sink_logits is null): it is
  // added once, to the merged rows.
  if (params.maybe_sink_logits != nullptr) add_sink_logits(params, shape, rows);
  write_rows(params, shape, rows);
}

// The mode's own rules, on top of validate_shapes().
void validate_mode(const AttentionParams& params, const AttentionShape& shape,
                   const ModeOptions& options) {
  if (options.chunk < 1) throw Error(fmt::format("chunk: {} (expected >= 1)", options.chunk));
  if (options.block_size < 1) {
    throw Error(fmt::format("block_size: {} (expected >= 1)", options.block_size));
  }
  if (options.splits < 1) throw Error(fmt::format("splits: {} (expected >= 1)", options.splits));
  const bool uses_cache = options.mode == Mode::kDecode || options.mode == Mode::kChunked ||
                          options.mode == Mode::kPaged;
  if (options.ring && options.mode != Mode::kDecode && options.mode != Mode::kChunked) {
    throw Error(fmt::format("ring: with mode {} (expected mode decode or chunked, whose "
                            "contiguous caches can run as rings)",
                            mode_name(options.mode)));
  }
  if (options.ring && !params.mask.window_left) {
    throw Error("ring: without a window (expected a window: a ring keeps the sink tokens and the "
                "window's keys)");
  }
  if (uses_cache) {
    if (params.mask.causal != Causal::kBottomRight) {
      throw Error(fmt::format("causal: {} (mode {} keeps a KV cache, which needs bottom-right "
                              "alignment: new tokens come after the cached ones)",
                              causal_name(params.mask.causal), mode_name(options.mode)));
    }
    if (params.mask.query_offset) {
      throw Error(fmt::format("query_offset: {} (mode {} keeps a KV cache, whose new tokens are "
                              "its last keys: expected no query_offset)",
                              *params.mask.query_offset, mode_name(options.mode)));
    }
    if (shape.seqlen_q > shape.seqlen_k) {
      throw Error(fmt::format("q: seqlen_q {} > seqlen_k {} (mode {} appends each query's own "
                              "key, so expected seqlen_q <= seqlen_k)",
                              shape.seqlen_q, shape.seqlen_k, mode_name(options.mode)));
    }
  }
}

}  // namespace

AttentionShape validate_shapes(const AttentionParams& params, const ModeOptions& options) {
  const AttentionShape shape = validate_shapes(params);
  validate_mode(params, shape, options);
  return shape;
}

void attend_with_mode(const AttentionParams& params, const ModeOptions& options,
                      Context& context) {
  const AttentionShape shape = validate(params);
  validate_mode(params, shape, options);
  if (shape.batch == 0 || shape.seqlen_q == 0) return;
  switch (options.mode) {
    case Mode::kPrefill: attend(params, context); return;
    case Mode::kDecode:
      run_through_cache(params, shape, {.chunk = 1, .ring = options.ring}, context);
      return;
    case Mode::kChunked:
      run_through_cache(params, shape, {.chunk = options.chunk, .ring = options.ring}, context);
      return;
    case Mode::kPaged:
      run_through_cache(params, shape,
                        {.chunk = options.chunk, .paged = true, .block_size = options.block_size},
                        context);
      return;
    case Mode::kSplit:
      // More parts than keys would only add empty parts: one key per part at most.
      run_split(params, shape, std::min(options.splits, std::max<std::int64_t>(shape.seqlen_k, 1)),
                context);
      return;
  }
}

}  // namespace lookback
