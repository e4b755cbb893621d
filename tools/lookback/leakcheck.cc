// `lookback leakcheck`: finds information leaking from the future in any
// attention implementation, by experiment (docs/leakage.md).
//
// With --exec, the implementation is a user's command: it reads Q, K, V from
// .npy files and writes O, twice on base inputs and once per perturbed position
// (N + 2 runs). Without --exec, every path of lookback itself is checked
// in-process. The experiment, the command runner and the built-in plan live
// in the library (include/lookback/leakcheck.hpp); the reports are printed by
// leak_report.cc. This file holds the flags and the glue.
#include <fmt/format.h>

#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "common.hpp"
#include "leak_report.hpp"
#include "leakcheck_model.hpp"
#include "lookback/error.hpp"
#include "lookback/leakcheck.hpp"
#include "lookback/mask.hpp"
#include "output_format.hpp"
#include "progress.hpp"

namespace lookback::cli {
namespace {

using diagnostics::LeakShape;

// text and json print every cell (N^2); svg draws a run of cells per class
// and row, which a noisy leak can make N^2 too. Past these the output is too
// large to read, and N + 2 runs of the command would take very long anyway.
constexpr std::int64_t kMaxPrintedLen = 4096;
constexpr std::int64_t kMaxSvgLen = 1024;

struct LeakcheckOptions {
  std::optional<std::string> exec;
  std::optional<std::int64_t> len, heads, kv_heads, dim, batch, window;
  std::optional<std::int64_t> sink_tokens;  // StreamingLLM, with --window
  std::optional<std::string> causal;
  bool per_head = false;
  int jobs = 0;  // 0: one per core
  std::uint64_t seed = 1;
  OutputFormat format = OutputFormat::kText;
  std::string out;
  bool progress = false;
  std::optional<double> tolerance, timeout;  // --exec only
  bool allow_nan = false;                    // --exec only
  // Whole models (leakcheck_model.cc): --exec-model CMD or --model DIR.
  std::optional<std::string> exec_model, model;
  std::optional<std::int64_t> vocab;
  std::optional<std::string> cache;
};

int jobs_of(const LeakcheckOptions& options) {
  if (options.jobs > 0) return options.jobs;
  const unsigned cores = std::thread::hardware_concurrency();
  return cores == 0 ? 1 : static_cast<int>(cores);
}

// The flags a model check uses, handed to leakcheck_model.cc; those it cannot
// use are refused.
int run_models(const LeakcheckOptions& options) {
  if (options.exec_model && options.model) {
    throw Error("--exec-model and --model: expected one of them");
  }
  if (options.exec) throw Error("--exec: not with --exec-model or --model (expected one check)");
  const std::pair<bool, const char*> unused[] = {{options.heads.has_value(), "--heads"},
                                                 {options.kv_heads.has_value(), "--kv-heads"},
                                                 {options.dim.has_value(), "--dim"},
                                                 {options.window.has_value(), "--window"},
                                                 {options.sink_tokens.has_value(), "--sink-tokens"}};
  for (const auto& [given, name] : unused) {
    if (given) {
      throw Error(fmt::format("{}: not with --exec-model or --model (a model's check has one "
                              "row of logits per position; expected --len, --vocab, --batch)",
                              name));
    }
  }
  if (options.cache && !options.model) throw Error("--cache: only with --model");
  return run_model_leakcheck({.exec_model = options.exec_model,
                              .model = options.model,
                              .len = options.len,
                              .vocab = options.vocab,
                              .batch = options.batch,
                              .causal = options.causal.value_or("bottom-right"),
                              .cache = options.cache.value_or("paged"),
                              .per_head = options.per_head,
                              .jobs = jobs_of(options),
                              .seed = options.seed,
                              .format = options.format,
                              .out = options.out,
                              .progress = options.progress,
                              .tolerance = options.tolerance,
                              .timeout = options.timeout,
                              .allow_nan = options.allow_nan});
}

void check_head_groups(const LeakShape& shape) {
  if (shape.heads % shape.kv_heads != 0) {
    throw Error(fmt::format("--heads: {} (expected a multiple of --kv-heads {})", shape.heads,
                            shape.kv_heads));
  }
  diagnostics::validate(shape);
}

std::int64_t required(const std::optional<std::int64_t>& value, const char* option,
                      const char* meaning) {
  if (!value) throw Error(fmt::format("{}: required with --exec ({})", option, meaning));
  return *value;
}

int run_black_box(const LeakcheckOptions& options) {
  const std::string& command = *options.exec;
  diagnostics::check_command_template(command);
  LeakShape shape;
  shape.seqlen = required(options.len, "--len", "the sequence length N");
  shape.heads = required(options.heads, "--heads", "the number of query heads");
  shape.head_dim = required(options.dim, "--dim", "the head dimension");
  shape.kv_heads = options.kv_heads.value_or(shape.heads);
  shape.batch = options.batch.value_or(1);
  check_head_groups(shape);
  const std::int64_t print_limit =
      options.format == OutputFormat::kSvg ? kMaxSvgLen : kMaxPrintedLen;
  if (shape.seqlen > print_limit) {
    throw Error(fmt::format("--len: {} (expected at most {} for --format {})", shape.seqlen,
                            print_limit, format_name(options.format)));
  }
  const std::int64_t sink_tokens = options.sink_tokens.value_or(0);
  if (sink_tokens > 0 && !options.window) {
    throw Error(fmt::format("--sink-tokens: {} without --window (expected --window W with sink "
                            "tokens)",
                            sink_tokens));
  }
  MaskSpec mask{.causal = parse_causal(options.causal.value_or("bottom-right"), "--causal"),
                .window_left = options.window,
                .sink_tokens = sink_tokens};
  (void)Mask(shape.seqlen, shape.seqlen, mask);  // refuses a window without a causal mask

  Progress progress("lookback leakcheck", Progress::wanted(options.progress));
  const diagnostics::LeakCheckOptions check{
      .shape = shape,
      .mask = mask,
      .seed = options.seed,
      .jobs = jobs_of(options),
      .progress = [&progress](std::int64_t done, std::int64_t total) {
        progress.count(done, total);
      },
      .output_name = "--exec: output",
      .tolerance = options.tolerance.value_or(0.0),
      .allow_nan = options.allow_nan};
  diagnostics::CommandOptions runner;
  if (options.timeout) runner.timeout_seconds = *options.timeout;
  // A signal kills the runs' process groups and stops the check; the
  // temporary folder goes with the implementation, then the signal ends us.
  const diagnostics::SignalCleanup cleanup;
  std::optional<diagnostics::LeakReport> checked;
  try {
    checked = diagnostics::check_leaks(diagnostics::command_implementation(command, runner), check);
  } catch (const Error& e) {
    if (cleanup.received() != 0) {  // say which run it stopped, then end by the signal
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
    default: output = render_report_text(report, options.per_head); break;
  }
  write_output(options.out, output);
  return report.result.causal() ? kExitOk : kExitFailure;
}

int run_builtin(const LeakcheckOptions& options) {
  if (options.causal) {
    throw Error(
        "--causal: only with --exec (built-in mode checks bottom-right alignment, the one the "
        "cache paths use)");
  }
  const std::pair<bool, const char*> exec_only[] = {{options.per_head, "--per-head"},
                                                    {options.tolerance.has_value(), "--tolerance"},
                                                    {options.timeout.has_value(), "--timeout"},
                                                    {options.allow_nan, "--allow-nan"}};
  for (const auto& [given, name] : exec_only) {
    if (given) throw Error(fmt::format("{}: only with --exec (expected --exec 'CMD')", name));
  }
  if (options.format == OutputFormat::kSvg) {
    throw Error("--format: svg needs --exec (built-in mode prints a table; expected text or json)");
  }
  diagnostics::BuiltinOptions builtin;
  LeakShape& shape = builtin.shape;
  shape.seqlen = options.len.value_or(shape.seqlen);
  shape.heads = options.heads.value_or(shape.heads);
  shape.kv_heads = options.kv_heads.value_or(options.heads ? shape.heads : shape.kv_heads);
  shape.head_dim = options.dim.value_or(shape.head_dim);
  shape.batch = options.batch.value_or(shape.batch);
  check_head_groups(shape);
  builtin.window = options.window.value_or(diagnostics::kBuiltinWindow);
  builtin.sink_tokens = options.sink_tokens.value_or(diagnostics::kBuiltinSinkTokens);
  if (builtin.sink_tokens < 1) {
    throw Error(fmt::format("--sink-tokens: {} (expected >= 1 in built-in mode: it sets the sink "
                            "tokens of the checks that have them)",
                            builtin.sink_tokens));
  }
  builtin.seed = options.seed;
  builtin.jobs = jobs_of(options);
  Progress progress("lookback leakcheck", Progress::wanted(options.progress));
  builtin.progress = [&progress](std::int64_t done, std::int64_t total) {
    progress.count(done, total);
  };
  const std::vector<diagnostics::BuiltinCheck> checks = diagnostics::run_builtin_checks(builtin);
  progress.finish();

  write_output(options.out, options.format == OutputFormat::kJson
                                ? render_builtin_json(checks, shape)
                                : render_builtin_text(checks, shape));
  return all_causal(checks) ? kExitOk : kExitFailure;
}

// The footer of `lookback leakcheck --help`.
constexpr const char* kLeakcheckFooter =
    "Black-box mode (--exec): CMD runs through /bin/sh with {q} {k} {v} {out} replaced by .npy\n"
    "paths: Q (batch, len, heads, dim), K and V (batch, len, kv_heads, dim), <f4; CMD writes\n"
    "O (batch, len, heads, dim) as <f4 or <f8 at {out}. It runs twice on random inputs, then\n"
    "once per position j with the q, k and v rows at j changed: len + 2 runs. Output row i\n"
    "depends on j when any bit of it changed. A leak is a dependency on a position the mask\n"
    "hides from row i (--causal, --window, --sink-tokens; docs/semantics.md). With\n"
    "--sink-tokens S (StreamingLLM, needs --window) positions 0..S-1 stay visible to every\n"
    "later row: depending on them is no leak, and not depending on them is a '.' warning.\n"
    "\n"
    "Matrix (text): S allowed and observed, . allowed but not observed (a warning), X leak,\n"
    "blank masked and clean. json: {len, verdict, leaks, missing, dependency, ...}.\n"
    "\n"
    "Built-in mode (no --exec): checks every lookback path and storage dtype in-process, in\n"
    "four configurations: no window, --window W (default 6), W with --sink-tokens S sink\n"
    "tokens (default 2), and learned sink logits; prints a table.\n"
    "\n"
    "CMD should be deterministic: the base run is run twice, and when identical inputs give\n"
    "different outputs leakcheck says so ('nondeterministic: ...') and exits 2; for an\n"
    "implementation nondeterministic by design, --tolerance T counts a change only when it\n"
    "exceeds T relative to the output row. The inputs hold no NaN, so NaN in an output is a\n"
    "finding of its own: exit 2 (cannot judge) unless --allow-nan. Each run may take\n"
    "--timeout seconds (default 300); past it, or on SIGINT, SIGTERM or SIGHUP, the run's\n"
    "process group is killed and the temporary files removed.\n"
    "\n"
    "Exit codes: 0 no leak, 1 leak found, 2 usage error, CMD failed, timed out, wrote a wrong\n"
    "output, was nondeterministic or wrote NaN.\n"
    "\n"
    "Examples:\n"
    "  lookback leakcheck --exec 'python3 attn.py {q} {k} {v} {out}' --len 8 --heads 2 --dim 16\n"
    "  lookback leakcheck --exec './attn {q} {k} {v} {out}' --len 64 --heads 8 --kv-heads 2 \\\n"
    "      --dim 64 --jobs 8 --format json --out leaks.json\n"
    "  lookback leakcheck --exec './streaming {q} {k} {v} {out}' --len 16 --heads 2 --dim 16 \\\n"
    "      --window 4 --sink-tokens 2\n"
    "  lookback leakcheck\n"
    "\n"
    "Whole models (--exec-model 'CMD {tokens} {logits}' --len N --vocab V, or --model DIR):\n"
    "CMD reads token ids <i4 (batch, len) at {tokens} and writes logits (batch, len, V), <f4\n"
    "or <f8, at {logits}; each run changes the token at one position j, and row i depends on j\n"
    "when its logits changed. --model runs lookback's own model runner in-process.\n"
    "  lookback leakcheck --exec-model '/usr/bin/python3 models/forward.py models/kjv-tiny \\\n"
    "      {tokens} {logits}' --len 16 --vocab 256\n"
    "  lookback leakcheck --model models/kjv-tiny --len 32\n"
    "More: docs/leakage.md.";

// What is checked: a command (--exec), a whole model (--exec-model, --model),
// or, with none of them, lookback's own paths.
void add_implementation_options(CLI::App& command, LeakcheckOptions& options) {
  command.add_option("--exec", options.exec,
                     "command to check, with {q} {k} {v} {out} (omit: check lookback's own paths)");
  command.add_option("--exec-model", options.exec_model,
                     "model command to check, with {tokens} {logits} (docs/leakage.md)");
  command.add_option("--model", options.model,
                     "check lookback's own runner on this model folder, in-process");
  command.add_option("--vocab", options.vocab, "vocabulary size V of --exec-model")
      ->check(kPositive);
  command.add_option("--cache", options.cache,
                     "--model: the runner's cache: paged, contiguous, none")
      ->check(CLI::IsMember({"paged", "contiguous", "none"}));
}

// The attention checked: its shape and its mask.
void add_shape_options(CLI::App& command, LeakcheckOptions& options) {
  command.add_option("--len", options.len, "sequence length N (>= 1)")->check(kPositive);
  command.add_option("--heads", options.heads, "query heads H (>= 1)")->check(kPositive);
  command.add_option("--kv-heads", options.kv_heads, "key/value heads HK (default: --heads)")
      ->check(kPositive);
  command.add_option("--dim", options.dim, "head dimension D (>= 1)")->check(kPositive);
  command.add_option("--batch", options.batch, "batch size B (default 1)")->check(kPositive);
  command.add_option("--causal", options.causal,
                     "what may be seen: bottom-right (default), top-left, none")
      ->check(CLI::IsMember({"bottom-right", "top-left", "none"}));
  command.add_option("--window", options.window,
                     "left window W >= 0: row i may see positions i-W..i")
      ->check(kNonNegative);
  command.add_option("--sink-tokens", options.sink_tokens,
                     "StreamingLLM sink tokens S (with --window): positions 0..S-1 stay visible; "
                     "built-in mode: the sinks of its sink-token checks (default 2)")
      ->check(kNonNegative);
}

// How the check runs and what it prints.
void add_run_options(CLI::App& command, LeakcheckOptions& options) {
  command.add_flag("--per-head", options.per_head, "also report the matrix of each head");
  command.add_option("--jobs", options.jobs, "runs in parallel (default: one per core)")
      ->check(kPositive);
  command.add_option("--seed", options.seed, "seed of the random inputs (default 1)");
  command.add_option("--tolerance", options.tolerance,
                     "count a change only past T relative to the row (default 0: any bit)")
      ->check(CLI::NonNegativeNumber);
  command.add_option("--timeout", options.timeout,
                     "seconds each run may take (default 300); then its processes are killed")
      ->check(CLI::PositiveNumber);
  command.add_flag("--allow-nan", options.allow_nan,
                   "check outputs that hold NaN instead of refusing them (exit 2)");
  add_format_option(command, options.format,
                    {OutputFormat::kText, OutputFormat::kJson, OutputFormat::kSvg});
  add_out_option(command, options.out);
  command.add_flag("--progress", options.progress,
                   "show 'run i/n' on stderr (default: only when stderr is a terminal)");
}

}  // namespace

void add_leakcheck_command(CLI::App& app, Runner& runner) {
  auto options = std::make_shared<LeakcheckOptions>();
  CLI::App* command = add_command(
      app, "leakcheck",
      "Find future tokens leaking into past outputs of any attention implementation.",
      kLeakcheckFooter);
  add_implementation_options(*command, *options);
  add_shape_options(*command, *options);
  add_run_options(*command, *options);
  command->callback([options, &runner] {
    runner = [options] {
      if (options->exec_model || options->model) return run_models(*options);
      return options->exec ? run_black_box(*options) : run_builtin(*options);
    };
  });
}

}  // namespace lookback::cli
