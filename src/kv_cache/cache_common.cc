#include "kv_cache/cache_common.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/online_softmax.hpp"
#include "kernels/pack.hpp"
#include "kernels/tiles.hpp"
#include "lookback/error.hpp"

namespace lookback::detail {

std::int64_t stored_padded_dim(const CacheConfig& config) {
  return kernels::padded_head_dim(config.head_dim);
}

std::int64_t stored_token_bytes(const CacheConfig& config) {
  return config.kv_heads * stored_padded_dim(config) *
         static_cast<std::int64_t>(dtype_size(config.storage));
}

void validate_config(const CacheConfig& config) {
  if (config.kv_heads < 1) throw Error(fmt::format("kv_heads: {} (expected >= 1)", config.kv_heads));
  if (config.head_dim < 1 || config.head_dim > kMaxHeadDim) {
    throw Error(fmt::format("head_dim: {} (expected 1 to {})", config.head_dim, kMaxHeadDim));
  }
  if (config.storage != DType::kF32 && config.storage != DType::kF16 &&
      config.storage != DType::kBF16) {
    throw Error(fmt::format("storage: {} (expected f32, f16 or bf16)", dtype_name(config.storage)));
  }
  if (config.rope && !(config.rope->theta > 0.0f && std::isfinite(config.rope->theta))) {
    throw Error(fmt::format("rope theta: {} (expected a finite number > 0)", config.rope->theta));
  }
}

std::int64_t validate_kv(const CacheConfig& config, const TensorView& k, const TensorView& v) {
  validate_view(k, 3, "k");
  validate_view(v, 3, "v");
  const std::int64_t tokens = k.shape[0];
  if (k.shape[1] != config.kv_heads || k.shape[2] != config.head_dim) {
    throw Error(fmt::format("k: shape {} (expected (tokens, {}, {}) = (tokens, kv_heads, head_dim))",
                            shape_string(k), config.kv_heads, config.head_dim));
  }
  if (v.shape != k.shape) {
    throw Error(fmt::format("v: shape {} (expected {}, the shape of k)", shape_string(v),
                            shape_string(k)));
  }
  return tokens;
}

namespace {

void store_row(DType storage, const float* row, std::int64_t count, void* destination) {
  switch (storage) {
    case DType::kF32:
      std::memcpy(destination, row, static_cast<std::size_t>(count) * sizeof(float));
      return;
    case DType::kBF16: {
      auto* out = static_cast<std::uint16_t*>(destination);
      for (std::int64_t e = 0; e < count; ++e) out[e] = f32_to_bf16(row[e]);
      return;
    }
    case DType::kF16: {
      auto* out = static_cast<std::uint16_t*>(destination);
      for (std::int64_t e = 0; e < count; ++e) out[e] = f32_to_f16(row[e]);
      return;
    }
    default: return;
  }
}

}  // namespace

void store_tokens(const CacheConfig& config, const TensorView& source, std::int64_t begin,
                  std::int64_t end, std::int64_t first_position, bool rotate, void* destination,
                  std::int64_t head_stride) {
  const std::int64_t padded = stored_padded_dim(config);
  const std::int64_t row_floats = config.kv_heads * padded;
  std::vector<float> row(static_cast<std::size_t>(row_floats), 0.0f);  // zero padding
  auto* out = static_cast<std::byte*>(destination);
  const auto element = static_cast<std::int64_t>(dtype_size(config.storage));
  for (std::int64_t t = begin; t < end; ++t) {
    for (std::int64_t h = 0; h < config.kv_heads; ++h) {
      const std::int64_t base = source.offset(t, h, 0);
      for (std::int64_t e = 0; e < config.head_dim; ++e) {
        row[static_cast<std::size_t>(h * padded + e)] =
            load_as_float(source.data, source.dtype, base + e * source.strides[2]);
      }
    }
    if (rotate && config.rope) {
      // One token, kv_heads heads; padded layout: rotate each head's first head_dim.
      for (std::int64_t h = 0; h < config.kv_heads; ++h) {
        apply_rope(row.data() + h * padded, 1, 1, config.head_dim, first_position + (t - begin),
                   *config.rope);
      }
    }
    for (std::int64_t h = 0; h < config.kv_heads; ++h) {
      store_row(config.storage, row.data() + h * padded, padded,
                out + (h * head_stride + (t - begin) * padded) * element);
    }
  }
}

void run_decode(const CacheConfig& config, std::span<const SequenceKv> sequences,
                std::span<const DecodeStep> steps, const DecodeOptions& options, Context& context) {
  if (sequences.size() != steps.size()) {
    throw Error(fmt::format("steps: {} steps for {} sequences (expected one per sequence)",
                            steps.size(), sequences.size()));
  }
  if (!(options.softcap >= 0.0f) || !std::isfinite(options.softcap)) {
    throw Error(fmt::format("softcap: {} (expected a finite number >= 0)", options.softcap));
  }
  if (options.window_left && *options.window_left < 0) {
    throw Error(fmt::format("window: {} (expected >= 0)", *options.window_left));
  }
  if (options.scale && !std::isfinite(*options.scale)) {
    throw Error(fmt::format("scale: {} (expected a finite number)", *options.scale));
  }
  if (options.splits < 0) throw Error(fmt::format("splits: {} (expected >= 0)", options.splits));
  const std::int64_t padded = stored_padded_dim(config);
  std::int64_t heads = -1;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    const DecodeStep& step = steps[i];
    const std::string name = fmt::format("steps[{}].q", i);
    validate_view(step.q, 3, name);
    const std::int64_t tokens = step.q.shape[0];
    if (heads < 0) heads = step.q.shape[1];
    if (step.q.shape[1] != heads) {
      throw Error(fmt::format("{}: {} heads (expected {}, as in the first step)", name,
                              step.q.shape[1], heads));
    }
    if (step.q.shape[2] != config.head_dim) {
      throw Error(fmt::format("{}: head_dim {} (expected {}, the cache's)", name, step.q.shape[2],
                              config.head_dim));
    }
    if (tokens < 1 || tokens > sequences[i].length) {
      throw Error(fmt::format("{}: {} tokens (expected 1 to {}, the tokens in the cache: append "
                              "a token before attending it)",
                              name, tokens, sequences[i].length));
    }
    validate_view(step.out, 3, fmt::format("steps[{}].out", i));
    if (step.out.dtype != DType::kF32 || step.out.shape != step.q.shape) {
      throw Error(fmt::format("steps[{}].out: {} {} (expected f32 {})", i,
                              dtype_name(step.out.dtype), shape_string(step.out),
                              shape_string(step.q)));
    }
    if (!step.maybe_lse.empty()) {
      validate_view(step.maybe_lse, 2, fmt::format("steps[{}].lse", i));
      if (step.maybe_lse.dtype != DType::kF32 || step.maybe_lse.shape[0] != heads ||
          step.maybe_lse.shape[1] != tokens) {
        throw Error(fmt::format("steps[{}].lse: {} (expected f32 ({}, {}) = (heads, tokens))", i,
                                shape_string(step.maybe_lse), heads, tokens));
      }
    }
  }
  if (steps.empty()) return;
  if (heads < 1 || heads % config.kv_heads != 0) {
    throw Error(fmt::format("q: {} heads (expected a positive multiple of kv_heads {})", heads,
                            config.kv_heads));
  }
  if (options.maybe_alibi_slopes != nullptr) {
    for (std::int64_t h = 0; h < heads; ++h) {
      if (!std::isfinite(options.maybe_alibi_slopes[h])) {
        throw Error(fmt::format("alibi_slopes: slope {} of head {} (expected finite)",
                                options.maybe_alibi_slopes[h], h));
      }
    }
  }

  // Per sequence: queries converted, rounded to storage, rotated; key parts.
  struct Work {
    std::vector<float> q;    // (tokens, heads, padded)
    std::vector<float> out;  // (parts, tokens, heads, padded)
    std::vector<float> lse;  // (parts, heads, tokens)
    std::vector<KeyRange> parts;
    std::int64_t tokens = 0;
  };
  std::vector<Work> work(steps.size());
  struct Task {
    std::size_t sequence;
    std::int64_t kv_head;
    std::size_t part;
  };
  std::vector<Task> tasks;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    Work& w = work[i];
    const DecodeStep& step = steps[i];
    const std::int64_t length = sequences[i].length;
    w.tokens = step.q.shape[0];
    w.q.assign(static_cast<std::size_t>(w.tokens * heads * padded), 0.0f);
    for (std::int64_t t = 0; t < w.tokens; ++t) {
      for (std::int64_t h = 0; h < heads; ++h) {
        float* row = w.q.data() + (t * heads + h) * padded;
        const std::int64_t base = step.q.offset(t, h, 0);
        for (std::int64_t e = 0; e < config.head_dim; ++e) {
          row[e] = kernels::round_to_storage(
              load_as_float(step.q.data, step.q.dtype, base + e * step.q.strides[2]), config.storage);
        }
        if (config.rope) {
          apply_rope(row, 1, 1, config.head_dim, length - w.tokens + t, *config.rope);
          for (std::int64_t e = 0; e < config.head_dim; ++e) {
            row[e] = kernels::round_to_storage(row[e], config.storage);
          }
        }
      }
    }
    // Split the visible key range into parts of at least 1024 keys. The count
    // depends on shapes only, never on the thread count, so results are the
    // same bits on any machine size.
    const Mask mask(w.tokens, length,
                    {.causal = Causal::kBottomRight, .window_left = options.window_left});
    const KeyRange visible = mask.key_range_of_rows(0, w.tokens);
    std::int64_t parts = options.splits;
    if (parts == 0) {
      const bool few_tasks = static_cast<std::int64_t>(steps.size()) * config.kv_heads < 16;
      parts = few_tasks ? std::clamp<std::int64_t>(visible.size() / 1024, 1, 16) : 1;
    }
    parts = std::max<std::int64_t>(1, std::min(parts, std::max<std::int64_t>(visible.size(), 1)));
    for (std::int64_t p = 0; p < parts; ++p) {
      w.parts.push_back({visible.begin + visible.size() * p / parts,
                         visible.begin + visible.size() * (p + 1) / parts});
    }
    w.out.assign(static_cast<std::size_t>(parts * w.tokens * heads * padded), 0.0f);
    w.lse.assign(static_cast<std::size_t>(parts * heads * w.tokens), kernels::kMinusInf);
    for (std::int64_t kv_head = 0; kv_head < config.kv_heads; ++kv_head) {
      for (std::size_t p = 0; p < w.parts.size(); ++p) tasks.push_back({i, kv_head, p});
    }
  }

  const float scale = options.scale.value_or(1.0f / std::sqrt(static_cast<float>(config.head_dim)));
  auto params_for = [&](const Task& task) {
    const Work& w = work[task.sequence];
    kernels::DecodeParams p;
    p.q = w.q.data();
    p.tokens = w.tokens;
    p.heads = heads;
    p.kv_heads = config.kv_heads;
    p.padded_dim = padded;
    p.seqlen_k = sequences[task.sequence].length;
    p.storage = config.storage;
    p.runs = sequences[task.sequence].runs.data();
    p.run_count = static_cast<std::int64_t>(sequences[task.sequence].runs.size());
    p.scale = scale;
    p.softcap = options.softcap;
    p.window_left = options.window_left;
    p.maybe_alibi_slopes = options.maybe_alibi_slopes;
    p.keys = w.parts[task.part];
    const auto part = static_cast<std::int64_t>(task.part);
    p.out = const_cast<float*>(w.out.data()) + part * w.tokens * heads * padded;
    p.lse = const_cast<float*>(w.lse.data()) + part * heads * w.tokens;
    return p;
  };
  context.parallel_for(static_cast<std::int64_t>(tasks.size()), [&](std::int64_t index, int worker) {
    const kernels::DecodeParams p = params_for(tasks[static_cast<std::size_t>(index)]);
    void* scratch = context.scratch(worker, kernels::decode_scratch_bytes(p));
    kernels::decode_kv_head(p, tasks[static_cast<std::size_t>(index)].kv_head, scratch);
  });

  // Merge the parts in order (exact, through the LSEs) and write the outputs.
  for (std::size_t i = 0; i < steps.size(); ++i) {
    Work& w = work[i];
    const DecodeStep& step = steps[i];
    auto* out = static_cast<float*>(step.out.data);
    auto* lse_out = static_cast<float*>(step.maybe_lse.data);
    const std::int64_t part_floats = w.tokens * heads * padded;
    const std::int64_t part_lse = heads * w.tokens;
    for (std::int64_t t = 0; t < w.tokens; ++t) {
      for (std::int64_t h = 0; h < heads; ++h) {
        float* row = w.out.data() + (t * heads + h) * padded;
        float lse = w.lse[static_cast<std::size_t>(h * w.tokens + t)];
        for (std::size_t p = 1; p < w.parts.size(); ++p) {
          const auto part = static_cast<std::int64_t>(p);
          kernels::merge_normalized(row, lse, row + part * part_floats,
                                    w.lse[static_cast<std::size_t>(part * part_lse + h * w.tokens + t)],
                                    static_cast<std::size_t>(padded));
        }
        const std::int64_t base = step.out.offset(t, h, 0);
        for (std::int64_t e = 0; e < config.head_dim; ++e) out[base + e * step.out.strides[2]] = row[e];
        if (lse_out != nullptr) lse_out[step.maybe_lse.offset(h, t)] = lse;
      }
    }
  }
}

}  // namespace lookback::detail
