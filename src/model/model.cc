// The LLaMA forward pass on lookback's attention and caches (model.hpp).
//
// A step feeds T tokens. Every buffer is row-major float32:
//   x      (T, hidden)                 the residual stream
//   y      (T, hidden)                 a normed copy of x
//   q      (T, heads, head_dim)        k, v (T, kv_heads, head_dim)
//   attn   (T, heads, head_dim)
//   gate, up (T, intermediate)
// Linear layers are OpenBLAS sgemm calls (loaded when a model loads,
// blas.hpp; single-threaded inside), one per fixed slice of output features,
// the slices spread over the context's threads: an output's value never
// depends on the thread count.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "lookback/attention.hpp"
#include "lookback/error.hpp"
#include "lookback/kv_cache.hpp"
#include "lookback/model.hpp"
#include "model/blas.hpp"
#include "model/weights.hpp"

namespace lookback::model {

struct Model::Impl {
  std::string directory;
  ModelConfig config;
  detail::Weights weights;
};

Model::Model() : impl_(std::make_unique<Impl>()) {}
Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;

const ModelConfig& Model::config() const noexcept { return impl_->config; }
const std::string& Model::directory() const noexcept { return impl_->directory; }
std::int64_t Model::parameters() const noexcept { return impl_->weights.parameters; }

Model Model::load(const std::string& directory) {
  namespace fs = std::filesystem;
  const std::string config_path = (fs::path(directory) / "config.json").string();
  std::ifstream in(config_path, std::ios::binary);
  if (!in) {
    throw Error(ErrorCode::kIo, fmt::format("{}: cannot open (expected a model folder with "
                                            "config.json and model.safetensors)", config_path));
  }
  std::ostringstream text;
  text << in.rdbuf();
  Model model;
  model.impl_->directory = directory;
  model.impl_->config = parse_config(text.str(), config_path);
  model.impl_->weights = detail::load_weights(directory, model.impl_->config);
  // Loaded here, so that a missing OpenBLAS is a load error, not a surprise
  // at the first token.
  (void)detail::blas();
  return model;
}

std::string linear_backend() {
  return fmt::format("OpenBLAS {}", detail::blas().core);
}

std::string_view cache_mode_name(CacheMode mode) noexcept {
  switch (mode) {
    case CacheMode::kPaged: return "paged";
    case CacheMode::kContiguous: return "contiguous";
    case CacheMode::kNone: return "none";
    case CacheMode::kRing: return "ring";
  }
  return "?";
}

CacheMode parse_cache_mode(std::string_view text, std::string_view argument) {
  for (CacheMode mode :
       {CacheMode::kPaged, CacheMode::kContiguous, CacheMode::kNone, CacheMode::kRing}) {
    if (text == cache_mode_name(mode)) return mode;
  }
  throw Error(fmt::format("{}: '{}' (expected paged, contiguous, none or ring)", argument, text));
}

namespace {

// Output features per sgemm task: large enough that a call amortises its
// overhead, small enough that a 256-wide layer still splits across 2 threads.
constexpr std::int64_t kFeaturesPerTask = 128;

// y (rows, out) = x (rows, in) @ w (out, in)^T
void linear(const float* x, const float* w, float* y, std::int64_t rows, std::int64_t in,
            std::int64_t out, Context& context) {
  const std::int64_t tasks = (out + kFeaturesPerTask - 1) / kFeaturesPerTask;
  const auto sgemm = detail::blas().sgemm;
  context.parallel_for(tasks, [&](std::int64_t task, int) {
    const std::int64_t begin = task * kFeaturesPerTask;
    const std::int64_t count = std::min(kFeaturesPerTask, out - begin);
    sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows),
                static_cast<int>(count), static_cast<int>(in), 1.0f, x, static_cast<int>(in),
                w + begin * in, static_cast<int>(in), 0.0f, y + begin, static_cast<int>(out));
  });
}

// y = x * rsqrt(mean(x^2) + eps) * w, row by row; x, y (rows, width)
void rms_norm(const float* x, const float* w, float* y, std::int64_t rows, std::int64_t width,
              double eps) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * width;
    double sum = 0;
    for (std::int64_t i = 0; i < width; ++i) sum += static_cast<double>(row[i]) * row[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(sum / static_cast<double>(width) + eps));
    for (std::int64_t i = 0; i < width; ++i) y[r * width + i] = row[i] * inv * w[i];
  }
}

}  // namespace

struct Runner::Impl {
  const Model::Impl& model;
  RunnerOptions options;
  Context& context;
  std::int64_t capacity = 0;
  std::int64_t length = 0;

  std::vector<KvCache> caches;             // kContiguous: one per layer
  std::vector<PagedKvPool> pools;          // kPaged: one per layer
  std::vector<SequenceId> sequences;       // kPaged: the sequence in each pool
  std::vector<std::int32_t> history;       // kNone: every token fed so far

  Impl(const Model::Impl& m, const RunnerOptions& o, Context& c)
      : model(m), options(o), context(c) {
    const ModelConfig& config = model.config;
    capacity = options.capacity.value_or(config.max_position_embeddings);
    if (capacity < 1) throw Error(fmt::format("capacity: {} (expected >= 1)", capacity));
    if (options.kv_dtype == DType::kF64) throw Error("kv dtype: f64 (expected f32, bf16 or f16)");
    validate_attention_options();
    if (options.cache == CacheMode::kRing) capacity = std::numeric_limits<std::int64_t>::max();
    reset();
  }

  CacheConfig cache_config() const {
    const ModelConfig& config = model.config;
    return CacheConfig{.kv_heads = config.num_key_value_heads,
                       .head_dim = config.head_dim,
                       .storage = options.kv_dtype,
                       .rope = RopeSpec{.theta = static_cast<float>(config.rope_theta)}};
  }

  void reset() {
    length = 0;
    history.clear();
    caches.clear();
    pools.clear();
    sequences.clear();
    const std::int64_t layers = model.config.num_hidden_layers;
    if (options.cache == CacheMode::kContiguous) {
      for (std::int64_t l = 0; l < layers; ++l) caches.emplace_back(cache_config(), capacity);
    } else if (options.cache == CacheMode::kRing) {
      for (std::int64_t l = 0; l < layers; ++l) {
        caches.emplace_back(cache_config(),
                            ring_slots(options.sink_tokens, *window_left(), options.ring_chunk),
                            RingSpec{.sink_tokens = options.sink_tokens});
      }
    } else if (options.cache == CacheMode::kPaged) {
      if (options.block_size < 1) {
        throw Error(fmt::format("block size: {} (expected >= 1)", options.block_size));
      }
      const std::int64_t blocks = (capacity + options.block_size - 1) / options.block_size;
      for (std::int64_t l = 0; l < layers; ++l) {
        pools.emplace_back(cache_config(), options.block_size, blocks);
        sequences.push_back(pools.back().create());
      }
    }
  }

  void validate_attention_options() const {
    if (options.window && *options.window < 0) {
      throw Error(fmt::format("window: {} (expected >= 0)", *options.window));
    }
    if (options.sink_tokens < 0) {
      throw Error(fmt::format("sink tokens: {} (expected >= 0)", options.sink_tokens));
    }
    if (options.sink_tokens > 0 && !window_left()) {
      throw Error(fmt::format("sink tokens: {} without a window (expected a window, from the "
                              "options or the model's sliding_window)",
                              options.sink_tokens));
    }
    if (options.cache == CacheMode::kRing) {
      if (!window_left()) {
        throw Error("cache ring: without a window (expected a window, from the options or the "
                    "model's sliding_window: a ring keeps the sink tokens and the window)");
      }
      if (options.ring_chunk < 1) {
        throw Error(fmt::format("ring chunk: {} (expected >= 1)", options.ring_chunk));
      }
    }
  }

  // The window in lookback's terms (keys p - W .. p): the model's
  // sliding_window of W + 1 keys, itself included, or the options', the
  // narrower when both are set.
  std::optional<std::int64_t> window_left() const {
    std::optional<std::int64_t> window = options.window;
    if (model.config.sliding_window) {
      const std::int64_t own = *model.config.sliding_window - 1;
      window = window ? std::min(*window, own) : own;
    }
    return window;
  }


  // Attention of one layer for the `rows` newest positions. q (rows, heads,
  // head_dim), k and v (rows, kv_heads, head_dim), unrotated; cached modes
  // take every row as new; kNone gets the whole sequence and attends all of it.
  void attention(std::int64_t layer, float* q, float* k, float* v, float* out, std::int64_t rows) {
    const ModelConfig& c = model.config;
    const std::int64_t heads = c.num_attention_heads, kv_heads = c.num_key_value_heads,
                       dim = c.head_dim;
    const TensorView k_view = make_view(k, DType::kF32, {rows, kv_heads, dim}, "k");
    const TensorView v_view = make_view(v, DType::kF32, {rows, kv_heads, dim}, "v");
    const DecodeStep step{.q = make_view(q, DType::kF32, {rows, heads, dim}, "q"),
                          .out = make_mutable_view(out, DType::kF32, {rows, heads, dim}, "out")};
    const DecodeOptions decode{
        .window_left = window_left(), .sink_tokens = options.sink_tokens, .splits = 1};
    if (options.cache == CacheMode::kContiguous || options.cache == CacheMode::kRing) {
      caches[layer].append(k_view, v_view);
      caches[layer].attend(step, decode, context);
    } else if (options.cache == CacheMode::kPaged) {
      pools[layer].append(sequences[layer], k_view, v_view);
      pools[layer].attend(sequences[layer], step, decode, context);
    } else {
      const RopeSpec rope{.theta = static_cast<float>(c.rope_theta)};
      apply_rope(q, rows, heads, dim, 0, rope);
      apply_rope(k, rows, kv_heads, dim, 0, rope);
      const AttentionParams params{
          .q = make_view(q, DType::kF32, {1, rows, heads, dim}, "q"),
          .k = make_view(k, DType::kF32, {1, rows, kv_heads, dim}, "k"),
          .v = make_view(v, DType::kF32, {1, rows, kv_heads, dim}, "v"),
          .out = make_mutable_view(out, DType::kF32, {1, rows, heads, dim}, "out"),
          .mask = MaskSpec{.window_left = window_left(), .sink_tokens = options.sink_tokens},
          .storage = options.kv_dtype};
      attend(params, context);
    }
  }

  // Runs the layers over `tokens` (all new in cached modes, the whole
  // sequence in kNone) and returns the logits of the last `logit_rows` rows.
  std::vector<float> forward(std::span<const std::int32_t> tokens, std::int64_t logit_rows) {
    const ModelConfig& c = model.config;
    const detail::Weights& w = model.weights;
    const std::int64_t rows = static_cast<std::int64_t>(tokens.size());
    const std::int64_t hidden = c.hidden_size, inner = c.intermediate_size;
    const std::int64_t q_width = c.num_attention_heads * c.head_dim;
    const std::int64_t kv_width = c.num_key_value_heads * c.head_dim;

    std::vector<float> x(rows * hidden), y(rows * hidden), q(rows * q_width),
        k(rows * kv_width), v(rows * kv_width), attn(rows * q_width), proj(rows * hidden),
        gate(rows * inner), up(rows * inner);
    for (std::int64_t t = 0; t < rows; ++t) {
      std::copy_n(w.embed + static_cast<std::int64_t>(tokens[t]) * hidden, hidden,
                  x.data() + t * hidden);
    }
    for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const detail::LayerWeights& layer = w.layers[l];
      rms_norm(x.data(), layer.input_norm, y.data(), rows, hidden, c.rms_norm_eps);
      linear(y.data(), layer.q, q.data(), rows, hidden, q_width, context);
      linear(y.data(), layer.k, k.data(), rows, hidden, kv_width, context);
      linear(y.data(), layer.v, v.data(), rows, hidden, kv_width, context);
      attention(l, q.data(), k.data(), v.data(), attn.data(), rows);
      linear(attn.data(), layer.o, proj.data(), rows, q_width, hidden, context);
      for (std::int64_t i = 0; i < rows * hidden; ++i) x[i] += proj[i];

      rms_norm(x.data(), layer.post_norm, y.data(), rows, hidden, c.rms_norm_eps);
      linear(y.data(), layer.gate, gate.data(), rows, hidden, inner, context);
      linear(y.data(), layer.up, up.data(), rows, hidden, inner, context);
      for (std::int64_t i = 0; i < rows * inner; ++i) {
        const float g = gate[i];
        gate[i] = g / (1.0f + std::exp(-g)) * up[i];  // silu(gate) * up
      }
      linear(gate.data(), layer.down, proj.data(), rows, inner, hidden, context);
      for (std::int64_t i = 0; i < rows * hidden; ++i) x[i] += proj[i];
    }
    const float* last = x.data() + (rows - logit_rows) * hidden;
    rms_norm(last, w.norm, y.data(), logit_rows, hidden, c.rms_norm_eps);
    std::vector<float> logits(logit_rows * c.vocab_size);
    linear(y.data(), w.lm_head, logits.data(), logit_rows, hidden, c.vocab_size, context);
    return logits;
  }

  std::vector<float> feed(std::span<const std::int32_t> tokens, bool all_rows) {
    const ModelConfig& c = model.config;
    const std::int64_t n = static_cast<std::int64_t>(tokens.size());
    if (n == 0) throw Error("tokens: none (expected at least 1 token to feed)");
    if (n > capacity - length) {
      throw Error(ErrorCode::kCapacity,
                  fmt::format("tokens: {} more after {} exceed the capacity of {} positions "
                              "(max_position_embeddings {})",
                              n, length, capacity, c.max_position_embeddings));
    }
    for (std::int64_t t = 0; t < n; ++t) {
      if (tokens[t] < 0 || tokens[t] >= c.vocab_size) {
        throw Error(fmt::format("token {}: id {} (expected 0 .. {}, the vocabulary)", length + t,
                                tokens[t], c.vocab_size - 1));
      }
    }
    std::vector<float> logits;
    if (options.cache == CacheMode::kNone) {
      history.insert(history.end(), tokens.begin(), tokens.end());
      try {
        logits = forward(history, all_rows ? n : 1);
      } catch (...) {
        history.resize(history.size() - n);
        throw;
      }
    } else if (options.cache == CacheMode::kRing) {
      // A ring takes ring_chunk tokens per step at most.
      for (std::int64_t begin = 0; begin < n; begin += options.ring_chunk) {
        const std::int64_t count = std::min(options.ring_chunk, n - begin);
        std::vector<float> piece = forward(tokens.subspan(begin, count), all_rows ? count : 1);
        length += count;  // in the caches now, whatever follows
        if (all_rows) {
          logits.insert(logits.end(), piece.begin(), piece.end());
        } else {
          logits = std::move(piece);
        }
      }
      return logits;
    } else {
      logits = forward(tokens, all_rows ? n : 1);
    }
    length += n;
    return logits;
  }
};

Runner::Runner(const Model& model, const RunnerOptions& options, Context& context)
    : impl_(std::make_unique<Impl>(*model.impl_, options, context)) {}
Runner::~Runner() = default;
Runner::Runner(Runner&&) noexcept = default;

std::int64_t Runner::length() const noexcept { return impl_->length; }
std::int64_t Runner::capacity() const noexcept { return impl_->capacity; }
std::vector<float> Runner::feed(std::span<const std::int32_t> tokens) {
  return impl_->feed(tokens, false);
}
std::vector<float> Runner::feed_all(std::span<const std::int32_t> tokens) {
  return impl_->feed(tokens, true);
}
void Runner::reset() { impl_->reset(); }

}  // namespace lookback::model
