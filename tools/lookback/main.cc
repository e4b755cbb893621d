// lookback: causal attention on NumPy files, from the command line.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <iostream>
#include <new>

#include "common.hpp"
#include "lookback/attention.hpp"
#include "lookback/error.hpp"
#include "lookback/version.hpp"

int main(int argc, char** argv) {
  CLI::App app{
      "lookback: causal self-attention for autoregressive models.\n"
      "Query i is scored against keys 0..i only; this tool computes such attention on\n"
      "NumPy .npy files and shows which query-key pairs a mask lets through."};
  app.name("lookback");
  app.require_subcommand(1);
  app.set_version_flag("--version", [] {
    return fmt::format("lookback {}\nkernels on this CPU: {}", lookback::kVersion,
                       lookback::describe_kernels());
  });
  app.footer("Run 'lookback COMMAND --help' for a command's options. Exit codes: 0 ok, 1 check "
             "failed, 2 usage or input error (out of memory included).");

  lookback::cli::Runner runner;
  lookback::cli::add_pattern_command(app, runner);
  lookback::cli::add_attend_command(app, runner);
  lookback::cli::add_cost_command(app, runner);
  lookback::cli::add_leakcheck_command(app, runner);
  lookback::cli::add_cache_command(app, runner);
  lookback::cli::add_bench_command(app, runner);
  lookback::cli::add_generate_command(app, runner);

  // Every error, from parsing or from the command, out of memory included, is
  // one line on stderr and exit code 2 (help and --version exit 0 through CLI11).
  try {
    app.parse(argc, argv);
    return runner ? runner() : lookback::cli::kExitUsage;
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const std::bad_alloc&) {
    // The library names what it allocates (kCapacity); anything else that
    // runs out of memory ends here, with no more than this to say.
    std::cerr << "lookback: out of memory: an allocation failed (expected inputs and options "
                 "whose buffers fit in this machine's memory)\n";
    return lookback::cli::kExitUsage;
  } catch (const std::exception& e) {  // CLI::Error, lookback::Error, the rest
    std::cerr << "lookback: " << e.what() << "\n";
    return lookback::cli::kExitUsage;
  }
}
