#include "common.hpp"

#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <limits>
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

// A float option (>= 0 when `non_negative`), checked on the text the user
// typed, before CLI11 converts it: a value float32 cannot hold would become
// inf or 0 and be reported as such.
CLI::Validator float_option(bool non_negative) {
  return CLI::Validator(
      [non_negative](std::string& input) -> std::string {
        const char* text = input.c_str();
        char* end = nullptr;
        const double value = std::strtod(text, &end);
        if (end == text || *end != '\0' || std::isnan(value)) {
          return "expected a number, got '" + input + "'";
        }
        if (std::isinf(value) || std::fabs(value) > std::numeric_limits<float>::max()) {
          return "'" + input + "' is out of float range (expected a magnitude of at most 3.4e38)";
        }
        if (value != 0 && static_cast<float>(value) == 0.0f) {
          return "'" + input + "' rounds to 0 in float (expected 0, or a magnitude of at least "
                 "1.4e-45)";
        }
        if (non_negative && value < 0) return "expected a number >= 0, got '" + input + "'";
        return {};
      },
      non_negative ? "FLOAT>=0" : "FLOAT");
}

}  // namespace

const CLI::Validator kOutputPath(
    [](std::string& input) -> std::string {
      return input.empty() ? "empty path (expected a file name, or - for standard output)" : "";
    },
    "");
const CLI::Validator kPositive = integer_at_least(1);
const CLI::Validator kNonNegative = integer_at_least(0);
const CLI::Validator kFloat = float_option(false);
const CLI::Validator kNonNegativeFloat = float_option(true);

}  // namespace lookback::cli
