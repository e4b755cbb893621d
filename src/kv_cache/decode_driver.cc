#include "kv_cache/decode_driver.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "kernels/online_softmax.hpp"
#include "kernels/pack.hpp"
#include "kv_cache/cache_common.hpp"
#include "lookback/error.hpp"

namespace lookback::detail {

namespace {

void validate_options(const DecodeOptions& options) {
  if (!(options.softcap >= 0.0f) || !std::isfinite(options.softcap)) {
    throw Error(fmt::format("softcap: {} (expected a finite number >= 0)", options.softcap));
  }
  if (options.window_left && *options.window_left < 0) {
    throw Error(fmt::format("window: {} (expected >= 0)", *options.window_left));
  }
  if (options.sink_tokens < 0) {
    throw Error(fmt::format("sink_tokens: {} (expected >= 0)", options.sink_tokens));
  }
  if (options.sink_tokens > 0 && !options.window_left) {
    throw Error(fmt::format("sink_tokens: {} without a window (expected a window with sink "
                            "tokens, or sink_tokens 0)",
                            options.sink_tokens));
  }
  if (options.scale && !std::isfinite(*options.scale)) {
    throw Error(fmt::format("scale: {} (expected a finite number)", *options.scale));
  }
  if (options.splits < 0) throw Error(fmt::format("splits: {} (expected >= 0)", options.splits));
}

// Checks step i against its sequence; `heads` is the first step's.
void validate_step(const CacheConfig& config, const DecodeStep& step, std::int64_t length,
                   std::size_t i, std::int64_t heads) {
  const std::string name = fmt::format("steps[{}].q", i);
  validate_view(step.q, 3, name);
  const std::int64_t tokens = step.q.shape[0];
  if (step.q.shape[1] != heads) {
    throw Error(fmt::format("{}: {} heads (expected {}, as in the first step)", name,
                            step.q.shape[1], heads));
  }
  if (step.q.shape[2] != config.head_dim) {
    throw Error(fmt::format("{}: head_dim {} (expected {}, the cache's)", name, step.q.shape[2],
                            config.head_dim));
  }
  if (tokens < 1 || tokens > length) {
    throw Error(fmt::format("{}: {} tokens (expected 1 to {}, the tokens in the cache: append "
                            "a token before attending it)",
                            name, tokens, length));
  }
  validate_view(step.out, 3, fmt::format("steps[{}].out", i));
  if (step.out.dtype != DType::kF32 || step.out.shape != step.q.shape) {
    throw Error(fmt::format("steps[{}].out: {} {} (expected f32 {})", i, dtype_name(step.out.dtype),
                            shape_string(step.out), shape_string(step.q)));
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

// A ring cache (KvCache with a RingSpec) holds keys [0, overwritten.begin)
// and [overwritten.end, length): the step's mask must see no other key.
void check_ring_keeps(const SequenceKv& sequence, std::int64_t tokens,
                      const DecodeOptions& options, std::size_t i) {
  const KeyRange lost = sequence.overwritten;
  if (lost.empty()) return;
  const std::int64_t length = sequence.length, kept_window = length - lost.end;
  const auto keeps = [&] {
    return fmt::format("this ring cache keeps keys 0..{} and {}..{}", lost.begin - 1, lost.end,
                       length - 1);
  };
  if (!options.window_left) {
    throw Error(fmt::format("steps[{}]: no window, but {} (expected a window W with W + tokens "
                            "<= {})",
                            i, keeps(), kept_window));
  }
  const Mask mask(tokens, length,
                  {.causal = Causal::kBottomRight,
                   .window_left = options.window_left,
                   .sink_tokens = options.sink_tokens});
  const KeyRange window = mask.key_range_of_rows(0, tokens);
  if (!window.empty() && window.begin < lost.end && window.end > lost.begin) {
    throw Error(fmt::format("steps[{}]: window {} with {} new tokens reaches key {}, but {} "
                            "(expected window + tokens <= {})",
                            i, *options.window_left, tokens, window.begin, keeps(), kept_window));
  }
  if (mask.effective_sink_tokens() > lost.begin) {
    throw Error(fmt::format("steps[{}]: {} sink tokens, but {} (expected at most {} sink tokens)",
                            i, options.sink_tokens, keeps(), lost.begin));
  }
}

// Validates everything; returns the query heads (0 when there is no step).
std::int64_t validate_steps(const CacheConfig& config, std::span<const SequenceKv> sequences,
                            std::span<const DecodeStep> steps, const DecodeOptions& options) {
  if (sequences.size() != steps.size()) {
    throw Error(fmt::format("steps: {} steps for {} sequences (expected one per sequence)",
                            steps.size(), sequences.size()));
  }
  validate_options(options);
  if (steps.empty()) return 0;
  validate_view(steps[0].q, 3, "steps[0].q");
  const std::int64_t heads = steps[0].q.shape[1];
  for (std::size_t i = 0; i < steps.size(); ++i) {
    validate_step(config, steps[i], sequences[i].length, i, heads);
    check_ring_keeps(sequences[i], steps[i].q.shape[0], options, i);
  }
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
  if (options.maybe_sink_logits != nullptr) {
    for (std::int64_t h = 0; h < heads; ++h) {
      if (!std::isfinite(options.maybe_sink_logits[h])) {
        throw Error(fmt::format("sink_logits: logit {} of head {} (expected finite)",
                                options.maybe_sink_logits[h], h));
      }
    }
  }
  return heads;
}

// A step's queries (tokens, heads, padded): converted, rounded to storage,
// rotated at the positions of the sequence's last `tokens` keys.
std::vector<float> prepare_queries(const CacheConfig& config, const DecodeStep& step,
                                   std::int64_t length, std::int64_t heads) {
  const std::int64_t padded = stored_padded_dim(config), tokens = step.q.shape[0];
  std::vector<float> q(static_cast<std::size_t>(tokens * heads * padded), 0.0f);
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t h = 0; h < heads; ++h) {
      float* row = q.data() + (t * heads + h) * padded;
      load_as_floats(step.q.data, step.q.dtype, step.q.offset(t, h, 0), step.q.strides[2],
                     config.head_dim, row);
      if (config.storage != DType::kF32) {
        for (std::int64_t e = 0; e < config.head_dim; ++e) {
          row[e] = kernels::round_to_storage(row[e], config.storage);
        }
      }
      if (!config.rope) continue;
      apply_rope(row, 1, 1, config.head_dim, length - tokens + t, *config.rope);
      for (std::int64_t e = 0; e < config.head_dim; ++e) {
        row[e] = kernels::round_to_storage(row[e], config.storage);
      }
    }
  }
  return q;
}

// One sequence's work: its queries, key parts and their partial results.
struct SequenceWork {
  std::vector<float> q;    // (tokens, heads, padded)
  std::vector<float> out;  // (parts, tokens, heads, padded)
  std::vector<float> lse;  // (parts, heads, tokens)
  std::vector<KeyRange> parts;
  // With sink tokens, parts[0] is the sinks [0, S), attended without the
  // window (plain causal); the other parts lie in [S, length), windowed.
  bool sink_part = false;
  std::int64_t tokens = 0;
  kernels::DecodePlan plan;
};

// Merges the parts in order (exact, through the LSEs) into the step's
// outputs, then adds the sink logit (if any) once per row.
void merge_parts(SequenceWork& w, const DecodeStep& step, std::int64_t heads,
                 std::int64_t head_dim, std::int64_t padded, const float* maybe_sink_logits) {
  auto* out = static_cast<float*>(step.out.data);
  auto* lse_out = static_cast<float*>(step.maybe_lse.data);
  const std::int64_t part_floats = w.tokens * heads * padded, part_lse = heads * w.tokens;
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
      if (maybe_sink_logits != nullptr) {
        kernels::add_sink(row, lse, maybe_sink_logits[h], static_cast<std::size_t>(padded));
      }
      const std::int64_t base = step.out.offset(t, h, 0);
      for (std::int64_t e = 0; e < head_dim; ++e) out[base + e * step.out.strides[2]] = row[e];
      if (lse_out != nullptr) lse_out[step.maybe_lse.offset(h, t)] = lse;
    }
  }
}

}  // namespace

std::vector<KeyRange> plan_key_parts(KeyRange visible, std::int64_t splits,
                                     std::int64_t sequence_head_tasks) {
  std::int64_t parts = splits;
  if (parts == 0) {
    parts = sequence_head_tasks < kFewTasks
                ? std::clamp<std::int64_t>(visible.size() / kMinKeysPerPart, 1, kMaxAutoParts)
                : 1;
  }
  parts = std::max<std::int64_t>(1, std::min(parts, std::max<std::int64_t>(visible.size(), 1)));
  std::vector<KeyRange> ranges;
  ranges.reserve(static_cast<std::size_t>(parts));
  for (std::int64_t p = 0; p < parts; ++p) {
    ranges.push_back({visible.begin + visible.size() * p / parts,
                      visible.begin + visible.size() * (p + 1) / parts});
  }
  return ranges;
}

void run_decode(const CacheConfig& config, std::span<const SequenceKv> sequences,
                std::span<const DecodeStep> steps, const DecodeOptions& options, Context& context) {
  const std::int64_t heads = validate_steps(config, sequences, steps, options);
  if (steps.empty()) return;
  const std::int64_t padded = stored_padded_dim(config);
  const float scale = options.scale.value_or(1.0f / std::sqrt(static_cast<float>(config.head_dim)));
  const auto sequence_head_tasks = static_cast<std::int64_t>(steps.size()) * config.kv_heads;

  struct Task {
    std::size_t sequence;
    std::int64_t kv_head;
    std::size_t part;
  };
  std::vector<SequenceWork> work(steps.size());
  std::vector<Task> tasks;
  for (std::size_t i = 0; i < steps.size(); ++i) {
    SequenceWork& w = work[i];
    const std::int64_t length = sequences[i].length;
    w.tokens = steps[i].q.shape[0];
    w.q = prepare_queries(config, steps[i], length, heads);
    const Mask mask(w.tokens, length,
                    {.causal = Causal::kBottomRight,
                     .window_left = options.window_left,
                     .sink_tokens = options.sink_tokens});
    const std::int64_t sinks = mask.effective_sink_tokens();
    KeyRange windowed = mask.key_range_of_rows(0, w.tokens);
    windowed.begin = std::max(windowed.begin, sinks);
    windowed.end = std::max(windowed.end, windowed.begin);
    w.parts = plan_key_parts(windowed, options.splits, sequence_head_tasks);
    if (sinks > 0) {
      w.sink_part = true;
      w.parts.insert(w.parts.begin(), KeyRange{0, sinks});
    }
    const auto parts = static_cast<std::int64_t>(w.parts.size());
    w.out.assign(static_cast<std::size_t>(parts * w.tokens * heads * padded), 0.0f);
    w.lse.assign(static_cast<std::size_t>(parts * heads * w.tokens), kernels::kMinusInf);
    for (std::int64_t kv_head = 0; kv_head < config.kv_heads; ++kv_head) {
      for (std::size_t p = 0; p < w.parts.size(); ++p) tasks.push_back({i, kv_head, p});
    }
  }

  auto params_for = [&](std::size_t i, std::size_t part) {
    SequenceWork& w = work[i];
    const auto index = static_cast<std::int64_t>(part);
    return kernels::DecodeParams{
        .q = w.q.data(),
        .tokens = w.tokens,
        .heads = heads,
        .kv_heads = config.kv_heads,
        .padded_dim = padded,
        .seqlen_k = sequences[i].length,
        .storage = config.storage,
        .runs = sequences[i].runs.data(),
        .run_count = static_cast<std::int64_t>(sequences[i].runs.size()),
        .scale = scale,
        .softcap = options.softcap,
        .window_left = w.sink_part && part == 0 ? std::nullopt : options.window_left,
        .maybe_alibi_slopes = options.maybe_alibi_slopes,
        .keys = w.parts[part],
        .out = w.out.data() + index * w.tokens * heads * padded,
        .lse = w.lse.data() + index * heads * w.tokens,
    };
  };
  for (std::size_t i = 0; i < steps.size(); ++i) work[i].plan = kernels::plan_decode(params_for(i, 0));
  context.parallel_for(static_cast<std::int64_t>(tasks.size()), [&](std::int64_t index, int worker) {
    const Task& task = tasks[static_cast<std::size_t>(index)];
    const kernels::DecodePlan& plan = work[task.sequence].plan;
    kernels::decode_kv_head(params_for(task.sequence, task.part), plan, task.kv_head,
                            context.scratch(worker, plan.scratch.bytes));
  });

  for (std::size_t i = 0; i < steps.size(); ++i) {
    merge_parts(work[i], steps[i], heads, config.head_dim, padded, options.maybe_sink_logits);
  }
}

}  // namespace lookback::detail
