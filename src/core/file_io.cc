#include "core/file_io.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "lookback/error.hpp"

namespace lookback::detail {

void throw_io(std::string_view path, const std::string& what, int err) {
  std::string message = std::string(path) + ": " + what;
  if (err != 0) message += std::string(": ") + std::strerror(err);
  throw Error(ErrorCode::kIo, message);
}

void commit_temporary(int fd, const std::string& temp_path, const std::string& path) {
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    ::unlink(temp_path.c_str());
    throw_io(path, "fsync failed", err);
  }
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(temp_path.c_str());
    throw_io(path, "close failed", err);
  }
  if (::rename(temp_path.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(temp_path.c_str());
    throw_io(path, "cannot rename the temporary file over it", err);
  }
  // Make the rename itself durable. Not every file system can fsync a
  // folder, and the data is already safe, so failures are ignored.
  const std::size_t slash = path.find_last_of('/');
  const std::string folder = slash == std::string::npos ? "." : path.substr(0, slash + 1);
  const int folder_fd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (folder_fd >= 0) {
    ::fsync(folder_fd);
    ::close(folder_fd);
  }
}

}  // namespace lookback::detail
