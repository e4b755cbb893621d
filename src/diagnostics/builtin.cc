// The built-in leak check: lookback's own paths as implementations, and the
// plan that checks every path, storage dtype and mask configuration (window,
// sink tokens, learned sink logits; DESIGN.md §4).
#include <fmt/format.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lookback/attention.hpp"
#include "lookback/context.hpp"
#include "lookback/error.hpp"
#include "lookback/leakcheck.hpp"
#include "lookback/tensor.hpp"

namespace lookback::diagnostics {
namespace {

// The inputs as lookback's attention reads them; `out` holds
// (batch, seqlen, heads, head_dim) f32.
AttentionParams attention_params(const LeakInputs& inputs, float* out, MaskSpec mask,
                                 DType storage) {
  const LeakShape& s = inputs.shape;
  AttentionParams params;
  params.q = make_view(inputs.q.data(), DType::kF32, {s.batch, s.seqlen, s.heads, s.head_dim},
                       "q");
  params.k = make_view(inputs.k.data(), DType::kF32, {s.batch, s.seqlen, s.kv_heads, s.head_dim},
                       "k");
  params.v = make_view(inputs.v.data(), DType::kF32, {s.batch, s.seqlen, s.kv_heads, s.head_dim},
                       "v");
  params.out = make_mutable_view(out, DType::kF32, {s.batch, s.seqlen, s.heads, s.head_dim},
                                 "out");
  params.mask = mask;
  params.storage = storage;
  return params;
}

// Refuses, before any check runs, a shape or window no path can take (a
// head_dim past kMaxHeadDim, say): that is a bad argument, not a failed check.
void validate_builtin(const BuiltinOptions& options) {
  validate(options.shape);
  const LeakShape& s = options.shape;
  const auto kv_size = static_cast<std::size_t>(s.batch * s.seqlen * s.kv_heads * s.head_dim);
  const LeakInputs inputs{  // zeros: validation reads only the shapes
      .shape = s,
      .q = std::vector<float>(static_cast<std::size_t>(s.batch * s.seqlen * s.heads * s.head_dim)),
      .k = std::vector<float>(kv_size),
      .v = std::vector<float>(kv_size)};
  std::vector<float> out(inputs.q.size());  // (batch, seqlen, heads, head_dim)
  if (options.sink_tokens < 1) {
    throw Error(fmt::format("sink_tokens: {} (expected >= 1: the built-in plan checks paths with "
                            "sink tokens)",
                            options.sink_tokens));
  }
  const MaskSpec mask{.causal = Causal::kBottomRight, .window_left = options.window,
                      .sink_tokens = options.sink_tokens};
  validate(attention_params(inputs, out.data(), mask, DType::kF32));
}

// A check's mask: bottom-right (the alignment the cache paths use).
MaskSpec builtin_mask(const BuiltinCheck& check) {
  return MaskSpec{.causal = Causal::kBottomRight,
                  .window_left = check.window,
                  .sink_tokens = check.sink_tokens};
}

// The configurations of each path row: (window, sink tokens, sink logits).
struct BuiltinConfig {
  std::optional<std::int64_t> window;
  std::int64_t sink_tokens = 0;
  bool sink_logits = false;
};

std::string config_label(const BuiltinConfig& config) {
  std::string label = config.window ? fmt::format(", window {}", *config.window) : std::string();
  if (config.sink_tokens > 0) {
    label += fmt::format(", {} sink token{}", config.sink_tokens,
                         config.sink_tokens == 1 ? "" : "s");
  }
  if (config.sink_logits) label += ", sink logits";
  return label;
}

}  // namespace

float builtin_sink_logit(std::int64_t head) noexcept {
  return -1.0f + 0.75f * static_cast<float>(head % 5);
}

Implementation mode_implementation(const ModeOptions& mode, DType storage, MaskSpec mask,
                                   int jobs, std::vector<float> sink_logits) {
  if (jobs < 1) throw Error(fmt::format("jobs: {} (expected >= 1)", jobs));
  // A Context runs one call at a time; one per worker lets `jobs` runs overlap.
  auto contexts = std::make_shared<std::vector<std::unique_ptr<Context>>>();
  for (int worker = 0; worker < jobs; ++worker) {
    contexts->push_back(std::make_unique<Context>(1));
  }
  return [mode, storage, mask, contexts, sink_logits = std::move(sink_logits)](
             const LeakInputs& inputs, const RunInfo& run) {
    const LeakShape& s = inputs.shape;
    if (!sink_logits.empty() && static_cast<std::int64_t>(sink_logits.size()) != s.heads) {
      throw Error(fmt::format("sink_logits: {} logits (expected heads = {})", sink_logits.size(),
                              s.heads));
    }
    NpyArray out;
    out.dtype = DType::kF32;
    out.shape = {s.batch, s.seqlen, s.heads, s.head_dim};
    std::vector<float> values(inputs.q.size());  // (batch, seqlen, heads, head_dim)
    AttentionParams params = attention_params(inputs, values.data(), mask, storage);
    if (!sink_logits.empty()) params.maybe_sink_logits = sink_logits.data();
    attend_with_mode(params, mode, *contexts->at(static_cast<std::size_t>(run.worker)));
    out.data.resize(values.size() * sizeof(float));
    std::memcpy(out.data.data(), values.data(), out.data.size());
    return out;
  };
}

std::string_view verdict_name(Verdict verdict) noexcept {
  switch (verdict) {
    case Verdict::kCausal: return "causal";
    case Verdict::kLeak: return "leak";
    case Verdict::kError: return "error";
  }
  return "?";
}

std::string path_label(const ModeOptions& mode) {
  switch (mode.mode) {
    case Mode::kPrefill:
    case Mode::kDecode: return std::string(mode_name(mode.mode));
    case Mode::kChunked:
      return fmt::format("chunked (chunk {}){}", mode.chunk, mode.ring ? ", ring cache" : "");
    case Mode::kPaged: return fmt::format("paged (block {}, chunk {})", mode.block_size, mode.chunk);
    case Mode::kSplit: return fmt::format("split ({} parts)", mode.splits);
  }
  return std::string(mode_name(mode.mode));
}

std::vector<BuiltinCheck> builtin_plan(std::int64_t window, std::int64_t sink_tokens) {
  const BuiltinConfig configs[] = {
      {},
      {.window = window},
      {.window = window, .sink_tokens = sink_tokens},
      {.sink_logits = true},
  };
  std::vector<BuiltinCheck> checks;
  const auto add = [&checks](const ModeOptions& mode_options, const BuiltinConfig& config) {
    for (DType storage : {DType::kF32, DType::kBF16, DType::kF16, DType::kI8, DType::kFP8E4M3,
                          DType::kFP8E5M2}) {
      BuiltinCheck check;
      check.label = path_label(mode_options) + config_label(config);
      check.mode = mode_options;
      check.storage = storage;
      check.window = config.window;
      check.sink_tokens = config.sink_tokens;
      check.sink_logits = config.sink_logits;
      checks.push_back(std::move(check));
    }
  };
  for (Mode mode : all_modes()) {
    const ModeOptions mode_options{.mode = mode,
                                   .chunk = kBuiltinChunk,
                                   .block_size = kBuiltinBlockSize,
                                   .splits = kBuiltinSplits};
    for (const BuiltinConfig& config : configs) add(mode_options, config);
  }
  // The contiguous cache as a ring, which needs the window (and keeps the sinks).
  add({.mode = Mode::kChunked, .chunk = kBuiltinChunk, .ring = true},
      {.window = window, .sink_tokens = sink_tokens});
  return checks;
}

std::vector<BuiltinCheck> run_builtin_checks(const BuiltinOptions& options) {
  validate_builtin(options);
  std::vector<BuiltinCheck> checks = builtin_plan(options.window, options.sink_tokens);
  std::vector<float> sink_logits;  // (heads,), for the checks with learned sinks
  for (std::int64_t h = 0; h < options.shape.heads; ++h) {
    sink_logits.push_back(builtin_sink_logit(h));
  }
  const std::int64_t runs_per_check = leak_runs(options.shape);
  const std::int64_t total_runs = static_cast<std::int64_t>(checks.size()) * runs_per_check;
  std::int64_t runs_before = 0;
  for (BuiltinCheck& check : checks) {
    const MaskSpec mask = builtin_mask(check);
    LeakCheckOptions leak_options{.shape = options.shape, .mask = mask, .seed = options.seed,
                                  .jobs = options.jobs};
    if (options.progress) {
      leak_options.progress = [&](std::int64_t done, std::int64_t) {
        options.progress(runs_before + done, total_runs);
      };
    }
    try {
      check.report = check_leaks(
          mode_implementation(check.mode, check.storage, mask, options.jobs,
                              check.sink_logits ? sink_logits : std::vector<float>{}),
          leak_options);
      check.verdict = check.report->result.causal() ? Verdict::kCausal : Verdict::kLeak;
    } catch (const Error& e) {
      // Any error a path throws fails its check; the other checks still run.
      check.verdict = Verdict::kError;
      check.message = e.what();
    }
    runs_before += runs_per_check;
    if (options.progress) options.progress(runs_before, total_runs);
  }
  return checks;
}

}  // namespace lookback::diagnostics
