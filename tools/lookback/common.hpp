// Shared pieces of the lookback command-line tool. Each subcommand lives in
// its own file and registers itself through one function declared here.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>

namespace lookback::cli {

// Exit codes shared by every subcommand.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;  // e.g. a leak was found, a check failed
inline constexpr int kExitUsage = 2;    // bad arguments, bad input files, errors

// A subcommand's body; returns the process exit code. Errors are thrown as
// lookback::Error (or CLI::Error) and turned into one stderr line by main().
using Runner = std::function<int()>;

// Each subcommand adds itself to `app` and sets `runner` to run when chosen.
void add_pattern_command(CLI::App& app, Runner& runner);
void add_attend_command(CLI::App& app, Runner& runner);
void add_cost_command(CLI::App& app, Runner& runner);
void add_leakcheck_command(CLI::App& app, Runner& runner);
void add_cache_command(CLI::App& app, Runner& runner);
void add_bench_command(CLI::App& app, Runner& runner);
void add_generate_command(CLI::App& app, Runner& runner);

// Adds the subcommand `name` to `app`: `description` is its line in
// `lookback --help`, `footer` ends its own --help.
inline CLI::App* add_command(CLI::App& app, const std::string& name,
                             const std::string& description, const std::string& footer) {
  CLI::App* command = app.add_subcommand(name, description);
  command->footer(footer);
  return command;
}

// Writes `text` to the output `path` (lookback::write_output's rules in
// lookback/output_file.hpp: "-" is stdout, a regular file is replaced
// atomically, a device or FIFO is written in place); an empty path (an
// --out that was not given) is stdout too.
void write_output(const std::string& path, const std::string& text);

// Validator for output-path options (--out, --lse): not empty.
extern const CLI::Validator kOutputPath;

// Validator for options that must be >= 1.
extern const CLI::Validator kPositive;
// Validator for options that must be >= 0.
extern const CLI::Validator kNonNegative;

// Validators for float options: a number that float32 holds, quoted back when
// it does not (e.g. "'1e39' is out of float range"), and >= 0. CLI11's own
// range validators print DBL_MAX in 309 digits.
extern const CLI::Validator kFloat;
extern const CLI::Validator kNonNegativeFloat;

}  // namespace lookback::cli
