#include "common.hpp"

#include <cstddef>
#include <span>

#include "lookback/output_file.hpp"

namespace lookback::cli {

void write_output(const std::string& path, const std::string& text) {
  lookback::write_output(path.empty() ? "-" : path,
                         std::as_bytes(std::span(text.data(), text.size())));
}

namespace {

// An integer option of at least `minimum`, with the project's message.
CLI::Validator integer_at_least(long long minimum) {
  const std::string expected = "expected an integer >= " + std::to_string(minimum);
  return CLI::Validator(
      [minimum, expected](std::string& input) -> std::string {
        try {
          std::size_t used = 0;
          const long long value = std::stoll(input, &used);
          if (used == input.size() && value >= minimum) return {};
        } catch (const std::exception&) {
        }
        return expected + ", got '" + input + "'";
      },
      "INT>=" + std::to_string(minimum));
}

}  // namespace

const CLI::Validator kOutputPath(
    [](std::string& input) -> std::string {
      return input.empty() ? "empty path (expected a file name, or - for standard output)" : "";
    },
    "");
const CLI::Validator kPositive = integer_at_least(1);
const CLI::Validator kNonNegative = integer_at_least(0);

}  // namespace lookback::cli
