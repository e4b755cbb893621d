// The library's one exception type. Every message names the argument at fault
// and the value that was expected, so a user can fix the call without reading
// the source. See docs/semantics.md, "Errors".
#pragma once

#include <stdexcept>
#include <string>

namespace lookback {

enum class ErrorCode : int {
  kInvalidArgument = 1,  // a shape, dtype, option or value is not acceptable
  kIo = 2,               // a file could not be read or written
  kFormat = 3,           // a file is malformed (e.g. a .npy header)
  kCapacity = 4,         // a cache or pool has no room for what was asked
  kInternal = 5,         // a bug in lookback: please report it
};

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message)
      : std::runtime_error(message), code_(code) {}
  explicit Error(const std::string& message)
      : Error(ErrorCode::kInvalidArgument, message) {}

  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace lookback
