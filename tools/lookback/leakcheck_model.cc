// `lookback leakcheck --exec-model CMD` and `--model DIR`: the leak check of
// whole models. The experiment is the library's (check_leaks with a
// TokenModel, include/lookback/leakcheck.hpp); the report is printed as for
// attention (leak_report.cc), with one "head" whose row is the logits.
#include "leakcheck_model.hpp"

#include <fmt/format.h>

#include <cstdio>
#include <memory>

#include "common.hpp"
#include "leak_report.hpp"
#include "lookback/error.hpp"
#include "lookback/leakcheck.hpp"
#include "lookback/mask.hpp"
#include "lookback/model.hpp"
#include "progress.hpp"

namespace lookback::cli {
namespace {

// Token-by-token decoding for the first rows, then chunks: the in-process
// check covers both ways a prompt reaches the cache (an odd chunk, so the
// last one is partial).
constexpr std::int64_t kModelCheckChunk = 5;

// lookback's own runner as a TokenModel: every run a fresh single-threaded
// context and runner (runs go in parallel), the model shared read-only.
diagnostics::TokenModel runner_model(std::shared_ptr<const model::Model> model,
                                     model::CacheMode cache) {
  return [model, cache](const std::vector<std::int32_t>& tokens,
                        const diagnostics::LeakShape& s, const diagnostics::RunInfo&) {
    Context context(1);
    model::Runner runner(*model, {.cache = cache}, context);
    NpyArray logits{.dtype = DType::kF32, .shape = {s.batch, s.seqlen, s.head_dim}, .data = {}};
    logits.data.resize(static_cast<std::size_t>(s.batch * s.seqlen * s.head_dim) * sizeof(float));
    float* out = reinterpret_cast<float*>(logits.data.data());
    for (std::int64_t b = 0; b < s.batch; ++b) {
      runner.reset();
      const std::span<const std::int32_t> row(tokens.data() + b * s.seqlen,
                                              static_cast<std::size_t>(s.seqlen));
      for (std::int64_t begin = 0; begin < s.seqlen;) {
        const std::int64_t count = begin < 2 ? 1 : std::min(kModelCheckChunk, s.seqlen - begin);
        const std::vector<float> chunk = runner.feed_all(row.subspan(begin, count));
        std::copy(chunk.begin(), chunk.end(), out + (b * s.seqlen + begin) * s.head_dim);
        begin += count;
      }
    }
    return logits;
  };
}

}  // namespace

int run_model_leakcheck(const ModelLeakcheckOptions& options) {
  if (!options.len) throw Error("--len: required with --exec-model or --model (the tokens N)");
  std::int64_t vocab = 0;
  diagnostics::TokenModel token_model;
  std::string subject;
  if (options.model) {
    auto model = std::make_shared<const model::Model>(model::Model::load(*options.model));
    const model::ModelConfig& config = model->config();
    if (options.vocab && *options.vocab != config.vocab_size) {
      throw Error(fmt::format("--vocab: {} (expected {} from {}/config.json, or none)",
                              *options.vocab, config.vocab_size, *options.model));
    }
    if (*options.len > config.max_position_embeddings) {
      throw Error(fmt::format("--len: {} (expected at most max_position_embeddings {})",
                              *options.len, config.max_position_embeddings));
    }
    vocab = config.vocab_size;
    token_model = runner_model(model, model::parse_cache_mode(options.cache, "--cache"));
    subject = fmt::format("lookback's runner on {} (cache {})", *options.model, options.cache);
  } else {
    diagnostics::check_model_command_template(*options.exec_model);
    if (!options.vocab) throw Error("--vocab: required with --exec-model (the logits per row)");
    vocab = *options.vocab;
    diagnostics::CommandOptions runner;
    if (options.timeout) runner.timeout_seconds = *options.timeout;
    token_model = diagnostics::model_command(*options.exec_model, runner);
    subject = fmt::format("the command '{}'", *options.exec_model);
  }
  const diagnostics::LeakShape shape =
      diagnostics::model_leak_shape(options.batch.value_or(1), *options.len, vocab);
  const MaskSpec mask{.causal = parse_causal(options.causal, "--causal")};

  Progress progress("lookback leakcheck", Progress::wanted(options.progress));
  const diagnostics::LeakCheckOptions check{
      .shape = shape,
      .mask = mask,
      .seed = options.seed,
      .jobs = options.jobs,
      .progress = [&progress](std::int64_t done, std::int64_t total) {
        progress.count(done, total);
      },
      .output_name = options.model ? "--model: logits" : "--exec-model: logits",
      .tolerance = options.tolerance.value_or(0.0),
      .allow_nan = options.allow_nan};
  const diagnostics::SignalCleanup cleanup;
  std::optional<diagnostics::LeakReport> checked;
  try {
    checked = diagnostics::check_leaks(diagnostics::token_implementation(token_model, options.seed),
                                       check);
  } catch (const Error& e) {
    if (cleanup.received() != 0) {
      fmt::print(stderr, "lookback: {}\n", e.what());
      std::fflush(stderr);
      cleanup.reraise();
    }
    throw;
  }
  cleanup.reraise();
  const diagnostics::LeakReport& report = *checked;
  progress.finish();

  std::string output;
  switch (options.format) {
    case OutputFormat::kSvg: output = render_report_svg(report); break;
    case OutputFormat::kJson: output = render_report_json(report, options.per_head); break;
    default:
      // Which model, and how to read the shape line (dim = the vocabulary).
      output = fmt::format("model check: {}; each row is the logits of a position (dim = vocab "
                           "{}), each run changes one token\n",
                           subject, vocab) +
               render_report_text(report, options.per_head);
      // The renderer speaks of attention; here a perturbed position is a token.
      if (const auto at = output.find("(q, k and v rows)"); at != std::string::npos) {
        output.replace(at, 17, "(its token)");
      }
      break;
  }
  write_output(options.out, output);
  return report.result.causal() ? kExitOk : kExitFailure;
}

}  // namespace lookback::cli
