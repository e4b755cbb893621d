// The leak check for whole models: token ids in, logits out, run through the
// experiment of check_leaks (include/lookback/leakcheck.hpp).
#include <fmt/format.h>

#include "lookback/error.hpp"
#include "lookback/leakcheck.hpp"

namespace lookback::diagnostics {
namespace {

// SplitMix64 of (seed, index): the same tokens on every machine.
std::uint64_t mix(std::uint64_t seed, std::uint64_t index) {
  std::uint64_t z = seed * 0x9E3779B97F4A7C15ull + index + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

LeakShape model_leak_shape(std::int64_t batch, std::int64_t seqlen, std::int64_t vocab) {
  if (vocab < 2) throw Error(fmt::format("vocab: {} (expected >= 2)", vocab));
  const LeakShape shape{.batch = batch, .seqlen = seqlen, .heads = 1, .kv_heads = 1,
                        .head_dim = vocab};
  validate(shape);
  return shape;
}

std::vector<std::int32_t> leak_tokens(const LeakShape& shape, std::uint64_t seed,
                                      std::int64_t position) {
  const std::int64_t vocab = shape.head_dim;
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(shape.batch * shape.seqlen));
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = static_cast<std::int32_t>(mix(seed, i) % static_cast<std::uint64_t>(vocab));
  }
  if (position >= 0) {
    for (std::int64_t b = 0; b < shape.batch; ++b) {
      std::int32_t& token = tokens[static_cast<std::size_t>(b * shape.seqlen + position)];
      // Another id: an offset of 1 .. vocab - 1.
      const std::uint64_t offset =
          1 + mix(~seed, static_cast<std::uint64_t>(b * shape.seqlen + position)) %
                  static_cast<std::uint64_t>(vocab - 1);
      token = static_cast<std::int32_t>((token + offset) % static_cast<std::uint64_t>(vocab));
    }
  }
  return tokens;
}

Implementation token_implementation(TokenModel model, std::uint64_t seed) {
  return [model = std::move(model), seed](const LeakInputs& inputs, const RunInfo& run) {
    const LeakShape& s = inputs.shape;
    NpyArray logits = model(leak_tokens(s, seed, run.position), s, run);
    const std::vector<std::int64_t> expected{s.batch, s.seqlen, s.head_dim};
    if (logits.shape != expected) {
      throw Error(fmt::format("logits of {}: shape ({}) (expected (batch, seqlen, vocab) = "
                              "({}, {}, {}))",
                              run_name(run), fmt::join(logits.shape, ", "), s.batch, s.seqlen,
                              s.head_dim));
    }
    logits.shape = {s.batch, s.seqlen, 1, s.head_dim};  // one "head" whose row is the logits
    return logits;
  };
}

}  // namespace lookback::diagnostics
