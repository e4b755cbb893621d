// What every atomic file write in lookback shares (.npy output, KV-cache
// checkpoints): the I/O error and the commit of a temporary file.
#pragma once

#include <string>
#include <string_view>

namespace lookback::detail {

// Throws lookback::Error(kIo) "<path>: <what>[: strerror(err)]".
[[noreturn]] void throw_io(std::string_view path, const std::string& what, int err);

// Makes the temporary file written through `fd` durable (fsync, close),
// renames it over `path` and fsyncs the folder, so that `path` holds either
// its old contents or the complete new ones. On failure the temporary is
// removed and lookback::Error(kIo) names `path`.
void commit_temporary(int fd, const std::string& temp_path, const std::string& path);

}  // namespace lookback::detail
