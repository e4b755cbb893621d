// A LLaMA-style decoder (Hugging Face's LlamaForCausalLM) running on
// lookback's attention and KV caches: the model that generates one token at a
// time, reusing the keys and values of the past.
//
// A model is a folder in the Hugging Face layout (docs/generate.md):
//   config.json        LlamaConfig keys: hidden_size, intermediate_size,
//                      num_hidden_layers, num_attention_heads,
//                      num_key_value_heads, vocab_size, rms_norm_eps,
//                      rope_theta, max_position_embeddings,
//                      tie_word_embeddings; optional head_dim, sliding_window
//   model.safetensors  HF tensor names, F32, F16 or BF16, memory-mapped
//                      (or model.safetensors.index.json and its shards)
//   tokenizer.model    optional SentencePiece model; otherwise byte-level
//
// Per layer: x += o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))));
// x += down(silu(gate(n2(x))) * up(n2(x))); logits = lm_head(norm(x)), with
// RMSNorm n(x) = x * rsqrt(mean(x^2) + eps) * w and the "rotate half" RoPE
// (element e pairs with e + head_dim/2, angle position * theta^(-2e/head_dim)).
// Every linear layer, norm and activation runs in float32.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "lookback/context.hpp"
#include "lookback/dtype.hpp"

namespace lookback::model {

struct ModelConfig {
  std::int64_t hidden_size = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t num_hidden_layers = 0;
  std::int64_t num_attention_heads = 0;
  std::int64_t num_key_value_heads = 0;
  std::int64_t head_dim = 0;  // default hidden_size / num_attention_heads
  std::int64_t vocab_size = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::int64_t max_position_embeddings = 0;
  bool tie_word_embeddings = false;
  // Keys visible to a query, itself included (Mistral); none when absent,
  // null, or "use_sliding_window": false (Qwen2).
  std::optional<std::int64_t> sliding_window;
  // Not a LlamaConfig key: how many future positions the attention mask the
  // model was trained with let each position see (0: causal). lookback runs
  // every model causally; models/forward.py honours it, to reproduce a leak.
  std::int64_t attention_lookahead = 0;
};

// Parses and checks config.json's text: every required key present with the
// right type and range, heads a multiple of kv heads, head_dim within
// lookback's limit. Throws lookback::Error (kFormat) naming `name` and the key.
ModelConfig parse_config(std::string_view json_text, std::string_view name = "config.json");

class Model {
 public:
  // Loads DIR/config.json and the weights (memory-mapped; F32 weights are used
  // in place, F16 and BF16 converted to F32 once). Every tensor's name, dtype
  // and shape is checked against the config: lookback::Error names the file
  // and the tensor.
  static Model load(const std::string& directory);
  ~Model();
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;

  const ModelConfig& config() const noexcept;
  const std::string& directory() const noexcept;
  std::int64_t parameters() const noexcept;  // elements of every weight

 private:
  Model();
  friend class Runner;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// What runs the linear layers, e.g. "OpenBLAS SkylakeX" (the core OpenBLAS
// picked for this CPU: check it, DESIGN.md §6).
std::string linear_backend();

// Where a runner keeps the keys and values of the past.
enum class CacheMode {
  kPaged,       // PagedKvPool, blocks of 16 tokens (default)
  kContiguous,  // KvCache
  kNone,        // no cache: every step recomputes the whole prefix (prefill)
  // KvCache rings (RingSpec) of sink_tokens + window + ring_chunk slots:
  // needs a window; memory stays bounded and generation goes on past
  // max_position_embeddings (positions keep counting, RoPE included).
  kRing,
};
std::string_view cache_mode_name(CacheMode mode) noexcept;  // "paged", ...
CacheMode parse_cache_mode(std::string_view text, std::string_view argument = "cache");

struct RunnerOptions {
  CacheMode cache = CacheMode::kPaged;
  DType kv_dtype = DType::kF32;  // storage of the cached keys and values: f32, bf16, f16
  std::int64_t block_size = 16;  // paged cache
  // Tokens of the sequence the runner must hold; default the model's
  // max_position_embeddings (kRing: unbounded, this is ignored).
  std::optional<std::int64_t> capacity;
  // Attention narrower than the model's own (StreamingLLM): a left window W
  // (keys p - W .. p; with a config sliding_window the narrower one counts)
  // and sink tokens S, keys 0 .. S-1 visible beside it (needs a window).
  std::optional<std::int64_t> window;
  std::int64_t sink_tokens = 0;
  // kRing: the most tokens one step appends; feed() cuts longer inputs.
  std::int64_t ring_chunk = 64;
};

// One sequence being generated: feed() appends tokens (a prompt in one call,
// then one token per step) and returns the logits that follow the last one.
// Results are bitwise identical for any thread count of the context.
class Runner {
 public:
  Runner(const Model& model, const RunnerOptions& options, Context& context);
  ~Runner();
  Runner(Runner&&) noexcept;

  std::int64_t length() const noexcept;  // tokens fed so far
  std::int64_t capacity() const noexcept;

  // Appends `tokens` (each in [0, vocab_size)) at positions length() ..
  // length() + n - 1 and returns the logits (vocab_size) after the last.
  // Past capacity() it throws lookback::Error (kCapacity) and appends nothing
  // (kRing never runs out: capacity() is the int64 maximum).
  std::vector<float> feed(std::span<const std::int32_t> tokens);

  // As feed(), but the logits of every fed position: (n, vocab_size).
  std::vector<float> feed_all(std::span<const std::int32_t> tokens);

  void reset();  // forgets every token

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Text to token ids and back: SentencePiece (DIR/tokenizer.model) when the
// model has one and lookback was built with it, else bytes (id = byte value).
class Tokenizer {
 public:
  static Tokenizer load(const std::string& directory, std::int64_t vocab_size);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;

  std::string_view kind() const noexcept;  // "bytes" or "sentencepiece"
  std::vector<std::int32_t> encode(std::string_view text) const;
  // The text of `token` given the tokens before it (SentencePiece pieces
  // depend on their neighbours, e.g. the leading space).
  std::string decode_next(std::span<const std::int32_t> previous, std::int32_t token) const;

 private:
  Tokenizer();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct SamplingOptions {
  float temperature = 1.0f;  // 0: greedy (the first largest logit)
  std::int64_t top_k = 0;    // 0: all
  float top_p = 1.0f;        // nucleus: the smallest set of tokens with this much probability
  std::uint64_t seed = 1;
};

// Picks tokens from logits; the same seed gives the same tokens on any machine
// (its random numbers are its own, not the standard library's).
class Sampler {
 public:
  explicit Sampler(const SamplingOptions& options);
  std::int32_t sample(std::span<const float> logits);

 private:
  SamplingOptions options_;
  std::uint64_t state_;
};

}  // namespace lookback::model
