// Tokenizers (bytes, or SentencePiece when built with it) and the sampler.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numeric>

#include "lookback/error.hpp"
#include "lookback/model.hpp"

#ifdef LOOKBACK_HAVE_SENTENCEPIECE
#include <sentencepiece_processor.h>
#endif

namespace lookback::model {

struct Tokenizer::Impl {
  std::int64_t vocab_size = 256;
#ifdef LOOKBACK_HAVE_SENTENCEPIECE
  std::unique_ptr<sentencepiece::SentencePieceProcessor> pieces;
#endif
};

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;

Tokenizer Tokenizer::load(const std::string& directory, std::int64_t vocab_size) {
  Tokenizer tokenizer;
  tokenizer.impl_->vocab_size = vocab_size;
  const std::string path = (std::filesystem::path(directory) / "tokenizer.model").string();
  if (std::filesystem::exists(path)) {
#ifdef LOOKBACK_HAVE_SENTENCEPIECE
    auto processor = std::make_unique<sentencepiece::SentencePieceProcessor>();
    const auto status = processor->Load(path);
    if (!status.ok()) {
      throw Error(ErrorCode::kFormat, fmt::format("{}: {}", path, status.ToString()));
    }
    if (processor->GetPieceSize() > vocab_size) {
      throw Error(ErrorCode::kFormat,
                  fmt::format("{}: {} pieces (expected at most vocab_size {})", path,
                              processor->GetPieceSize(), vocab_size));
    }
    tokenizer.impl_->pieces = std::move(processor);
    return tokenizer;
#else
    throw Error(ErrorCode::kFormat,
                fmt::format("{}: this lookback was built without SentencePiece "
                            "(libsentencepiece-dev); use --prompt-ids", path));
#endif
  }
  if (vocab_size < 256) {
    throw Error(ErrorCode::kFormat,
                fmt::format("{}: vocab_size {} and no tokenizer.model (expected a "
                            "tokenizer.model, or vocab_size >= 256 for bytes)",
                            directory, vocab_size));
  }
  return tokenizer;
}

std::string_view Tokenizer::kind() const noexcept {
#ifdef LOOKBACK_HAVE_SENTENCEPIECE
  if (impl_->pieces) return "sentencepiece";
#endif
  return "bytes";
}

std::vector<std::int32_t> Tokenizer::encode(std::string_view text) const {
#ifdef LOOKBACK_HAVE_SENTENCEPIECE
  if (impl_->pieces) {
    std::vector<int> ids;
    const auto status = impl_->pieces->Encode(text, &ids);
    if (!status.ok()) throw Error(fmt::format("prompt: {}", status.ToString()));
    std::vector<std::int32_t> tokens;
    const int bos = impl_->pieces->bos_id();
    if (bos >= 0) tokens.push_back(bos);  // LLaMA's prompts start with <s>
    tokens.insert(tokens.end(), ids.begin(), ids.end());
    return tokens;
  }
#endif
  std::vector<std::int32_t> tokens;
  for (char c : text) tokens.push_back(static_cast<unsigned char>(c));
  return tokens;
}

std::string Tokenizer::decode_next(std::span<const std::int32_t> previous,
                                   std::int32_t token) const {
#ifdef LOOKBACK_HAVE_SENTENCEPIECE
  if (impl_->pieces) {
    // The text of previous + token minus that of previous: pieces such as
    // "▁the" decode to " the" only after another piece.
    if (token < 0 || token >= impl_->pieces->GetPieceSize()) return "";
    std::vector<int> ids(previous.begin(), previous.end());
    const int keep = static_cast<int>(std::min<std::size_t>(ids.size(), 8));
    ids.erase(ids.begin(), ids.end() - keep);
    std::string before, after;
    (void)impl_->pieces->Decode(ids, &before);
    ids.push_back(token);
    (void)impl_->pieces->Decode(ids, &after);
    return after.size() >= before.size() && after.compare(0, before.size(), before) == 0
               ? after.substr(before.size())
               : after;
  }
#endif
  (void)previous;
  if (token < 0 || token > 255) return "";  // ids past the bytes have no text
  return std::string(1, static_cast<char>(token));
}

// ---- sampling ---------------------------------------------------------------

namespace {

// SplitMix64: tiny, and the same numbers on every platform.
std::uint64_t next_random(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

Sampler::Sampler(const SamplingOptions& options) : options_(options), state_(options.seed) {
  if (!(options.temperature >= 0) || !std::isfinite(options.temperature)) {
    throw Error(fmt::format("temperature: {} (expected a finite number >= 0)", options.temperature));
  }
  if (options.top_k < 0) throw Error(fmt::format("top-k: {} (expected >= 0)", options.top_k));
  if (!(options.top_p > 0 && options.top_p <= 1)) {
    throw Error(fmt::format("top-p: {} (expected 0 < p <= 1)", options.top_p));
  }
}

std::int32_t Sampler::sample(std::span<const float> logits) {
  if (logits.empty()) throw Error("logits: empty");
  for (float value : logits) {
    if (std::isnan(value)) throw Error("logits: NaN (the model's output is not a number)");
  }
  const auto greedy = [&] {
    return static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) -
                                     logits.begin());
  };
  if (options_.temperature == 0) return greedy();

  // Candidates by decreasing logit (ties by id), cut to top-k.
  std::vector<std::int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int32_t a, std::int32_t b) { return logits[a] > logits[b]; });
  if (options_.top_k > 0 && static_cast<std::size_t>(options_.top_k) < order.size()) {
    order.resize(options_.top_k);
  }
  std::vector<double> probability(order.size());
  const double top = logits[order.front()];
  double sum = 0;
  for (std::size_t i = 0; i < order.size(); ++i) {
    probability[i] = std::exp((logits[order[i]] - top) / options_.temperature);
    sum += probability[i];
  }
  // Nucleus: the smallest prefix whose probability reaches top_p.
  std::size_t keep = order.size();
  if (options_.top_p < 1) {
    double cumulative = 0;
    for (std::size_t i = 0; i < order.size(); ++i) {
      cumulative += probability[i] / sum;
      if (cumulative >= options_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double kept = 0;
  for (std::size_t i = 0; i < keep; ++i) kept += probability[i];
  const double u = static_cast<double>(next_random(state_) >> 11) * 0x1.0p-53 * kept;
  double cumulative = 0;
  for (std::size_t i = 0; i < keep; ++i) {
    cumulative += probability[i];
    if (u < cumulative) return order[i];
  }
  return order[keep - 1];
}

}  // namespace lookback::model
