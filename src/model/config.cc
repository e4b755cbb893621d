// config.json: the LlamaConfig keys lookback reads, each checked.
#include <fmt/format.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "lookback/error.hpp"
#include "lookback/model.hpp"
#include "lookback/shape.hpp"

namespace lookback::model {
namespace {

// Sizes beyond this are refused as nonsense before anything is allocated.
constexpr std::int64_t kMaxDimension = std::int64_t{1} << 24;

[[noreturn]] void fail(std::string_view name, const std::string& what) {
  throw Error(ErrorCode::kFormat, fmt::format("{}: {}", name, what));
}

std::int64_t integer(const nlohmann::json& json, std::string_view name, const char* key,
                     std::int64_t low, std::int64_t high) {
  const auto it = json.find(key);
  if (it == json.end()) fail(name, fmt::format("{} missing (expected an integer)", key));
  if (!it->is_number_integer()) fail(name, fmt::format("{}: {} (expected an integer)", key, it->dump()));
  const std::int64_t value = it->get<std::int64_t>();
  if (it->is_number_unsigned() && it->get<std::uint64_t>() > static_cast<std::uint64_t>(high)) {
    fail(name, fmt::format("{}: {} (expected {} .. {})", key, it->dump(), low, high));
  }
  if (value < low || value > high) {
    fail(name, fmt::format("{}: {} (expected {} .. {})", key, value, low, high));
  }
  return value;
}

double number(const nlohmann::json& json, std::string_view name, const char* key,
              std::optional<double> fallback) {
  const auto it = json.find(key);
  if (it == json.end()) {
    if (fallback) return *fallback;
    fail(name, fmt::format("{} missing (expected a number)", key));
  }
  if (!it->is_number()) fail(name, fmt::format("{}: {} (expected a number)", key, it->dump()));
  const double value = it->get<double>();
  if (!std::isfinite(value) || value <= 0) {
    fail(name, fmt::format("{}: {} (expected a finite number > 0)", key, it->dump()));
  }
  return value;
}

}  // namespace

ModelConfig parse_config(std::string_view json_text, std::string_view name) {
  const nlohmann::json json = nlohmann::json::parse(json_text, nullptr, false);
  if (json.is_discarded()) fail(name, "not valid JSON");
  if (!json.is_object()) fail(name, "not a JSON object");

  ModelConfig config;
  config.hidden_size = integer(json, name, "hidden_size", 1, kMaxDimension);
  config.intermediate_size = integer(json, name, "intermediate_size", 1, kMaxDimension);
  config.num_hidden_layers = integer(json, name, "num_hidden_layers", 1, 4096);
  config.num_attention_heads = integer(json, name, "num_attention_heads", 1, 4096);
  // Absent in older LLaMA configs: then every head has its own keys and values.
  config.num_key_value_heads = json.contains("num_key_value_heads")
                                   ? integer(json, name, "num_key_value_heads", 1, 4096)
                                   : config.num_attention_heads;
  config.vocab_size = integer(json, name, "vocab_size", 1, kMaxDimension);
  config.rms_norm_eps = number(json, name, "rms_norm_eps", std::nullopt);
  config.rope_theta = number(json, name, "rope_theta", 10000.0);
  config.max_position_embeddings =
      integer(json, name, "max_position_embeddings", 1, std::int64_t{1} << 30);
  if (const auto tie = json.find("tie_word_embeddings"); tie != json.end()) {
    if (!tie->is_boolean()) fail(name, fmt::format("tie_word_embeddings: {} (expected true or false)", tie->dump()));
    config.tie_word_embeddings = tie->get<bool>();
  }
  if (json.contains("head_dim") && !json["head_dim"].is_null()) {
    config.head_dim = integer(json, name, "head_dim", 1, kMaxHeadDim);
  } else {
    if (config.hidden_size % config.num_attention_heads != 0) {
      fail(name, fmt::format("hidden_size {} is not a multiple of num_attention_heads {} "
                             "(expected one, or an explicit head_dim)",
                             config.hidden_size, config.num_attention_heads));
    }
    config.head_dim = config.hidden_size / config.num_attention_heads;
  }
  if (config.head_dim > kMaxHeadDim) {
    fail(name, fmt::format("head_dim {} (expected at most {}, lookback's limit)", config.head_dim,
                           kMaxHeadDim));
  }
  if (config.head_dim % 2 != 0) {
    fail(name, fmt::format("head_dim {} (expected an even number: rotary embeddings pair "
                           "dimensions)", config.head_dim));
  }
  if (config.num_attention_heads % config.num_key_value_heads != 0) {
    fail(name, fmt::format("num_attention_heads {} is not a multiple of num_key_value_heads {}",
                           config.num_attention_heads, config.num_key_value_heads));
  }
  if (const auto act = json.find("hidden_act"); act != json.end()) {
    if (!act->is_string() || act->get<std::string>() != "silu") {
      fail(name, fmt::format("hidden_act: {} (expected \"silu\")", act->dump()));
    }
  }
  if (const auto scaling = json.find("rope_scaling"); scaling != json.end() && !scaling->is_null()) {
    fail(name, "rope_scaling is not supported (expected null or absent)");
  }
  const auto window = json.find("sliding_window");
  const auto use_window = json.find("use_sliding_window");
  const bool window_off = use_window != json.end() && use_window->is_boolean() && !use_window->get<bool>();
  if (window != json.end() && !window->is_null() && !window_off) {
    config.sliding_window = integer(json, name, "sliding_window", 1, std::int64_t{1} << 40);
  }
  if (json.contains("attention_lookahead")) {
    config.attention_lookahead = integer(json, name, "attention_lookahead", 0, 1 << 20);
  }
  return config;
}

}  // namespace lookback::model
