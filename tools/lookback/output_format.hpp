// The options every command shares for its output: --format (one enum for
// every command) and --out.
#pragma once

#include <CLI/CLI.hpp>

#include <string>
#include <string_view>
#include <vector>

namespace lookback::cli {

enum class OutputFormat { kText, kMatrix, kJson, kSvg };

std::string_view format_name(OutputFormat format) noexcept;

// Adds --format to `command`: one of `allowed`, in the order the help lists
// them; the first is the default, which `format` must already hold. An
// unknown name is a usage error: "--format: unknown format 'png' (expected
// text, json or svg)".
CLI::Option* add_format_option(CLI::App& command, OutputFormat& format,
                               const std::vector<OutputFormat>& allowed);

// Adds --out FILE: the output goes there, written atomically, instead of to
// stdout (see write_output in common.hpp).
CLI::Option* add_out_option(CLI::App& command, std::string& path);

}  // namespace lookback::cli
