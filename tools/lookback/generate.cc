// lookback generate: text from a LLaMA-style model (Hugging Face layout) on
// lookback's attention and KV caches. The model, the runner, the tokenizer
// and the sampler live in the library (include/lookback/model.hpp); this
// file holds the flags, the loop and the printing.
#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common.hpp"
#include "lookback/error.hpp"
#include "lookback/model.hpp"
#include "lookback/npy.hpp"
#include "output_format.hpp"

namespace lookback::cli {
namespace {

struct GenerateOptions {
  std::string model;
  std::optional<std::string> prompt;
  std::optional<std::string> prompt_ids;
  std::int64_t tokens = 64;
  float temperature = 0.8f;
  std::int64_t top_k = 0;
  float top_p = 0.95f;
  std::uint64_t seed = 1;
  int threads = 0;
  std::string kv_dtype = "f32";
  std::string cache = "paged";
  std::int64_t prefill_chunk = 512;
  std::optional<std::int64_t> window;  // StreamingLLM: narrower attention
  std::int64_t sink_tokens = 0;
  std::optional<std::string> dump_logits;
  OutputFormat format = OutputFormat::kText;
};

std::vector<std::int32_t> parse_ids(const std::string& text) {
  std::vector<std::int32_t> ids;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t comma = text.find(',', start);
    const std::string item =
        text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    try {
      std::size_t used = 0;
      const long long value = std::stoll(item, &used);
      if (used != item.size() || value < 0 || value > INT32_MAX) throw std::invalid_argument("");
      ids.push_back(static_cast<std::int32_t>(value));
    } catch (const std::exception&) {
      throw Error(fmt::format("--prompt-ids: '{}' (expected token ids >= 0 separated by commas, "
                              "e.g. 1,2,3)", item));
    }
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return ids;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

std::string rate(std::int64_t tokens, double seconds) {
  return seconds > 0 ? fmt::format("{:.1f} tokens/s", tokens / seconds) : "-";
}

// The prompt as token ids, checked against the model: ids below vocab_size,
// and (but for a ring, which never runs out of room) the prompt and the
// tokens fed back within max_position_embeddings. Notes on stderr what the
// model or the positions will meet.
std::vector<std::int32_t> checked_prompt(const GenerateOptions& options,
                                         const model::ModelConfig& config,
                                         const model::Tokenizer& tokenizer, bool ring) {
  const std::vector<std::int32_t> prompt =
      options.prompt ? tokenizer.encode(*options.prompt) : parse_ids(*options.prompt_ids);
  if (prompt.empty()) throw Error("--prompt: empty (expected at least one token)");
  const auto n_prompt = static_cast<std::int64_t>(prompt.size());
  const std::int64_t positions = config.max_position_embeddings;
  if (!ring && n_prompt > positions) {
    throw Error(fmt::format("--prompt: {} tokens (expected at most max_position_embeddings {})",
                            n_prompt, positions));
  }
  if (!ring && options.tokens - 1 > positions - n_prompt) {
    throw Error(fmt::format("--tokens: {} after a prompt of {} tokens (expected at most {}: "
                            "the prompt and the tokens fed back must fit in "
                            "max_position_embeddings {})",
                            options.tokens, n_prompt, positions - n_prompt + 1, positions));
  }
  for (std::int32_t id : prompt) {
    if (id >= config.vocab_size) {
      throw Error(fmt::format("--prompt-ids: {} (expected ids below vocab_size {})", id,
                              config.vocab_size));
    }
  }
  if (config.attention_lookahead > 0) {
    fmt::print(stderr,
               "lookback: note: {} was trained with an attention mask that let each position "
               "see {} future position(s) (config.json attention_lookahead); it runs causally "
               "here, as generation must (docs/leakage.md)\n",
               options.model, config.attention_lookahead);
  }
  if (ring && n_prompt + options.tokens - 1 > positions) {
    fmt::print(stderr,
               "lookback: note: {} positions pass max_position_embeddings {}: positions stay "
               "absolute, so RoPE turns past the angles the model was trained on\n",
               n_prompt + options.tokens - 1, positions);
  }
  return prompt;
}

struct Generation {
  std::vector<std::int32_t> tokens;
  std::string text;
  std::vector<float> dumped;  // (tokens, vocab) with --dump-logits
  double prefill_seconds = 0, decode_seconds = 0;
};

// Prefills the prompt in chunks, then samples --tokens tokens, feeding each
// back but the last; with text output each piece is printed as it comes.
Generation generate_tokens(const GenerateOptions& options, const std::vector<std::int32_t>& prompt,
                           const model::Tokenizer& tokenizer, model::Runner& runner) {
  model::Sampler sampler({.temperature = options.temperature,
                          .top_k = options.top_k,
                          .top_p = options.top_p,
                          .seed = options.seed});
  const bool text = options.format == OutputFormat::kText;
  const auto n_prompt = static_cast<std::int64_t>(prompt.size());
  Generation g;
  const auto prefill_start = std::chrono::steady_clock::now();
  std::vector<float> logits;
  for (std::int64_t begin = 0; begin < n_prompt; begin += options.prefill_chunk) {
    const std::int64_t count = std::min(options.prefill_chunk, n_prompt - begin);
    logits = runner.feed(std::span<const std::int32_t>(prompt).subspan(begin, count));
  }
  g.prefill_seconds = seconds_since(prefill_start);

  const auto decode_start = std::chrono::steady_clock::now();
  std::vector<std::int32_t> sequence = prompt;
  for (std::int64_t t = 0; t < options.tokens; ++t) {
    if (options.dump_logits) g.dumped.insert(g.dumped.end(), logits.begin(), logits.end());
    const std::int32_t token = sampler.sample(logits);
    const std::string piece = tokenizer.decode_next(sequence, token);
    g.tokens.push_back(token);
    sequence.push_back(token);
    g.text += piece;
    if (text) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
    if (t + 1 < options.tokens) logits = runner.feed(std::span<const std::int32_t>(&token, 1));
  }
  g.decode_seconds = seconds_since(decode_start);
  return g;
}

int run_generate(const GenerateOptions& options) {
  if (options.prompt.has_value() == options.prompt_ids.has_value()) {
    throw Error("--prompt or --prompt-ids: expected exactly one of them");
  }
  const model::CacheMode cache = model::parse_cache_mode(options.cache, "--cache");
  const DType kv_dtype = parse_dtype(options.kv_dtype, "--kv-dtype");
  if (kv_dtype == DType::kF64) throw Error("--kv-dtype: f64 (expected f32, bf16 or f16)");
  const model::Sampler sampler_check({.temperature = options.temperature,
                                      .top_k = options.top_k,
                                      .top_p = options.top_p,
                                      .seed = options.seed});
  (void)sampler_check;

  const model::Model model = model::Model::load(options.model);
  const model::ModelConfig& config = model.config();
  const model::Tokenizer tokenizer = model::Tokenizer::load(options.model, config.vocab_size);
  const std::vector<std::int32_t> prompt =
      checked_prompt(options, config, tokenizer, cache == model::CacheMode::kRing);
  const auto n_prompt = static_cast<std::int64_t>(prompt.size());

  Context context(options.threads);
  model::Runner runner(model,
                       {.cache = cache,
                        .kv_dtype = kv_dtype,
                        .window = options.window,
                        .sink_tokens = options.sink_tokens,
                        .ring_chunk = std::min<std::int64_t>(options.prefill_chunk, 512)},
                       context);
  const bool text = options.format == OutputFormat::kText;
  if (text && options.prompt) {
    std::fwrite(options.prompt->data(), 1, options.prompt->size(), stdout);
    std::fflush(stdout);
  }
  const Generation g = generate_tokens(options, prompt, tokenizer, runner);
  const std::int64_t decoded = std::max<std::int64_t>(options.tokens - 1, 0);  // steps run

  if (options.dump_logits) {
    const std::int64_t shape[] = {options.tokens, config.vocab_size};
    write_npy(*options.dump_logits, DType::kF32, shape, g.dumped.data());
  }
  if (text) {
    std::fputs("\n", stdout);
    std::fflush(stdout);  // before the rates on stderr, when both go to one file
  } else {
    nlohmann::ordered_json json{
        {"model", options.model},
        {"tokenizer", tokenizer.kind()},
        {"cache", options.cache},
        {"window", options.window ? nlohmann::ordered_json(*options.window) : nullptr},
        {"sink_tokens", options.sink_tokens},
        {"kv_dtype", options.kv_dtype},
        {"linear", model::linear_backend()},
        {"prompt_tokens", prompt},
        {"tokens", g.tokens},
        {"text", g.text},
        {"prefill_seconds", g.prefill_seconds},
        {"decode_seconds", g.decode_seconds},
        {"prompt_tokens_per_second", g.prefill_seconds > 0 ? n_prompt / g.prefill_seconds : 0.0},
        {"generated_tokens_per_second", g.decode_seconds > 0 ? decoded / g.decode_seconds : 0.0}};
    write_output("-", json.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
  }
  fmt::print(stderr,
             "lookback: prompt {} tokens in {:.3f} s ({}); generated {} tokens, {} decode steps "
             "in {:.3f} s ({}); cache {}, kv {}, {} thread{}, linear layers {}\n",
             n_prompt, g.prefill_seconds, rate(n_prompt, g.prefill_seconds), g.tokens.size(),
             decoded, g.decode_seconds, rate(decoded, g.decode_seconds), options.cache,
             options.kv_dtype, context.threads(), context.threads() == 1 ? "" : "s",
             model::linear_backend());
  return kExitOk;
}

}  // namespace

void add_generate_command(CLI::App& app, Runner& runner) {
  auto options = std::make_shared<GenerateOptions>();
  CLI::App* command = add_command(
      app, "generate", "Generate text with a LLaMA-style model through lookback's KV cache.",
      "The model is a folder in the Hugging Face layout: config.json (LlamaConfig keys),\n"
      "model.safetensors (F32, F16 or BF16; or model.safetensors.index.json and its shards) and\n"
      "optionally tokenizer.model (SentencePiece; without it tokens are bytes). The prompt is\n"
      "prefilled in chunks of --prefill-chunk tokens, then each token is decoded through the\n"
      "cache: token i attends to i + 1 cached keys. --cache none recomputes the whole prefix for\n"
      "every token instead (what a cache saves). Rates go to stderr.\n"
      "\n"
      "StreamingLLM: --window W --sink-tokens S lets each token see the first S tokens and the\n"
      "last W + 1; --cache ring then keeps only those (S + W + a step's tokens per layer), so\n"
      "memory stays flat and generation may pass max_position_embeddings.\n"
      "\n"
      "--temperature 0 is greedy. Same seed, same text, for any --threads.\n"
      "--dump-logits FILE.npy writes <f4 (tokens, vocab): row 0 the logits after the prompt,\n"
      "row t those after the t-th generated token.\n"
      "\n"
      "Examples:\n"
      "  lookback generate --model models/kjv-tiny --prompt 'In the beginning' --tokens 200\n"
      "  lookback generate --model models/kjv-tiny --prompt-ids 65,110,100 --temperature 0 \\\n"
      "      --tokens 20 --dump-logits logits.npy --format json\n"
      "  lookback generate --model models/kjv-tiny --prompt 'And God said' --tokens 2000 \\\n"
      "      --cache ring --window 128 --sink-tokens 4\n"
      "More: docs/generate.md.");
  command->add_option("--model", options->model, "model folder (config.json, model.safetensors)")
      ->required();
  command->add_option("--prompt", options->prompt, "prompt text");
  command->add_option("--prompt-ids", options->prompt_ids, "prompt as token ids: 1,2,3");
  command->add_option("--tokens", options->tokens, "tokens to generate (default 64)")
      ->check(kPositive);
  command->add_option("--temperature", options->temperature,
                      "sampling temperature, 0 greedy (default 0.8)")
      ->check(kNonNegativeFloat);
  command->add_option("--top-k", options->top_k, "sample from the K likeliest (default 0: all)")
      ->check(kNonNegative);
  command->add_option("--top-p", options->top_p, "nucleus sampling mass, 0 < P <= 1 (default 0.95)")
      ->check(kNonNegativeFloat);
  command->add_option("--seed", options->seed, "sampling seed (default 1)");
  command->add_option("--threads", options->threads, "threads (default: every core)")
      ->check(kNonNegative);
  command->add_option("--kv-dtype", options->kv_dtype, "KV storage: f32 (default), bf16, f16")
      ->check(CLI::IsMember({"f32", "bf16", "f16"}));
  command->add_option("--cache", options->cache,
                      "paged (default), contiguous, none, or ring (needs a window: keeps only "
                      "the sink tokens and the window, so generation runs without end)")
      ->check(CLI::IsMember({"paged", "contiguous", "none", "ring"}));
  command->add_option("--window", options->window,
                      "attend only keys p-W..p (StreamingLLM; with a model sliding_window, the "
                      "narrower counts)")
      ->check(kNonNegative);
  command->add_option("--sink-tokens", options->sink_tokens,
                      "StreamingLLM sink tokens S (with a window): keys 0..S-1 stay visible")
      ->check(kNonNegative);
  command->add_option("--prefill-chunk", options->prefill_chunk,
                      "prompt tokens per prefill call (default 512)")
      ->check(kPositive);
  command->add_option("--dump-logits", options->dump_logits,
                      "write the logits of every step to FILE.npy, <f4 (tokens, vocab)")
      ->check(kOutputPath);
  add_format_option(*command, options->format, {OutputFormat::kText, OutputFormat::kJson});
  command->callback([options, &runner] { runner = [options] { return run_generate(*options); }; });
}

}  // namespace lookback::cli
