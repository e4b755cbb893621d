#include "common.hpp"

#include <cstddef>
#include <iostream>
#include <span>

#include "lookback/npy.hpp"

namespace lookback::cli {

void write_output(const std::string& path, const std::string& text) {
  if (path.empty() || path == "-") {
    std::cout << text << std::flush;
    return;
  }
  write_file_atomically(path, std::as_bytes(std::span(text.data(), text.size())));
}

const CLI::Validator kPositive(
    [](std::string& input) -> std::string {
      try {
        std::size_t used = 0;
        const long long value = std::stoll(input, &used);
        if (used != input.size() || value < 1) return "expected an integer >= 1, got '" + input + "'";
      } catch (const std::exception&) {
        return "expected an integer >= 1, got '" + input + "'";
      }
      return {};
    },
    "INT>=1");

const CLI::Validator kNonNegative(
    [](std::string& input) -> std::string {
      try {
        std::size_t used = 0;
        const long long value = std::stoll(input, &used);
        if (used != input.size() || value < 0) return "expected an integer >= 0, got '" + input + "'";
      } catch (const std::exception&) {
        return "expected an integer >= 0, got '" + input + "'";
      }
      return {};
    },
    "INT>=0");

}  // namespace lookback::cli
