#include "output_format.hpp"

#include "common.hpp"

#include <fmt/format.h>

#include <optional>
#include <utility>

namespace lookback::cli {
namespace {

constexpr std::pair<OutputFormat, std::string_view> kFormats[] = {
    {OutputFormat::kText, "text"},
    {OutputFormat::kMatrix, "matrix"},
    {OutputFormat::kJson, "json"},
    {OutputFormat::kSvg, "svg"},
};

// "text, json or svg"; with `mark_default`, "text (default), json or svg".
std::string list_formats(const std::vector<OutputFormat>& formats, bool mark_default) {
  std::string text;
  for (std::size_t f = 0; f < formats.size(); ++f) {
    text += f == 0 ? "" : f + 1 == formats.size() ? " or " : ", ";
    text += format_name(formats[f]);
    if (f == 0 && mark_default) text += " (default)";
  }
  return text;
}

}  // namespace

std::string_view format_name(OutputFormat format) noexcept {
  for (const auto& [value, name] : kFormats) {
    if (value == format) return name;
  }
  return "?";
}

CLI::Option* add_format_option(CLI::App& command, OutputFormat& format,
                               const std::vector<OutputFormat>& allowed) {
  const auto find = [allowed](const std::string& text) -> std::optional<OutputFormat> {
    for (OutputFormat f : allowed) {
      if (format_name(f) == text) return f;
    }
    return std::nullopt;
  };
  const std::string expected = list_formats(allowed, false);
  // The help's "TEXT:{text,json,svg}", as CLI::IsMember writes it.
  std::string type_name = "TEXT:{";
  for (OutputFormat f : allowed) type_name += std::string(format_name(f)) + ",";
  type_name.back() = '}';
  const CLI::Validator known(
      [find, expected](std::string& text) -> std::string {
        if (find(text)) return {};
        return fmt::format("unknown format '{}' (expected {})", text, expected);
      },
      "");
  return command
      .add_option_function<std::string>(
          "--format", [&format, find](const std::string& text) { format = *find(text); },
          list_formats(allowed, true))
      ->check(known)
      ->type_name(type_name);
}

CLI::Option* add_out_option(CLI::App& command, std::string& path) {
  return command.add_option("--out", path, "write to this file instead of stdout (- is stdout)")
      ->check(kOutputPath);
}

}  // namespace lookback::cli
