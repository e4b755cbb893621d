// `lookback leakcheck --exec-model` and `--model`: the leak check for whole
// models (token ids in, logits out), with the flags leakcheck.cc parses.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "output_format.hpp"

namespace lookback::cli {

struct ModelLeakcheckOptions {
  std::optional<std::string> exec_model;  // 'CMD {tokens} {logits}'
  std::optional<std::string> model;       // a model folder, run in-process
  std::optional<std::int64_t> len, vocab, batch;
  std::string causal = "bottom-right";
  std::string cache = "paged";  // --model: the runner's cache
  bool per_head = false;
  int jobs = 1;
  std::uint64_t seed = 1;
  OutputFormat format = OutputFormat::kText;
  std::string out;
  bool progress = false;
  std::optional<double> tolerance, timeout;
  bool allow_nan = false;
};

// Runs the check and prints the report; returns the exit code (0 causal,
// 1 leak). Errors are thrown as lookback::Error.
int run_model_leakcheck(const ModelLeakcheckOptions& options);

}  // namespace lookback::cli
