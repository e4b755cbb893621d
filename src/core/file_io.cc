#include "core/file_io.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <new>
#include <string>
#include <utility>

#include "lookback/error.hpp"
#include "lookback/output_file.hpp"

namespace lookback::detail {
namespace {

// Writes are buffered and reads streamed in pieces of this size, so a
// checkpoint of many small rows costs few system calls and no copy of the
// whole file.
constexpr std::size_t kChunkBytes = std::size_t{1} << 20;

// Linux's limit on symlinks followed in one path resolution (MAXSYMLINKS).
constexpr int kMaxSymlinkHops = 40;

// The process umask, without changing it (umask() both reads and sets, which
// would race with other threads creating files). Linux reports it in
// /proc/self/status; elsewhere assume the common 022.
mode_t current_umask() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("Umask:", 0) == 0)
      return static_cast<mode_t>(std::strtoul(line.c_str() + 6, nullptr, 8));
  }
  return 022;
}

// The folder part of `path` with its trailing slash ("" for a bare name).
std::string folder_of(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? std::string() : path.substr(0, slash + 1);
}

// Follows symlinks in the last component of `path` (the folders above may be
// links too; they need no resolving, the temporary sits in the same folder).
// A dangling link resolves to the missing file it names, which is then
// created, as a shell's `>` would.
std::string resolve_symlinks(const std::string& path) {
  std::string current = path;
  for (int hop = 0; hop < kMaxSymlinkHops; ++hop) {
    struct stat info;
    if (::lstat(current.c_str(), &info) != 0 || !S_ISLNK(info.st_mode)) return current;
    std::string link(static_cast<std::size_t>(std::max<off_t>(info.st_size, 255)) + 1, '\0');
    const ssize_t length = ::readlink(current.c_str(), link.data(), link.size());
    if (length < 0) throw_io(path, "cannot read the symbolic link", errno);
    if (static_cast<std::size_t>(length) == link.size()) {
      throw_io(path, "the symbolic link changed while it was read", 0);
    }
    link.resize(static_cast<std::size_t>(length));
    current = link.front() == '/' ? link : folder_of(current) + link;
  }
  throw_io(path, "cannot resolve the symbolic link", ELOOP);
}

bool written_in_place(mode_t mode) {
  return S_ISCHR(mode) || S_ISBLK(mode) || S_ISFIFO(mode) || S_ISSOCK(mode);
}

void write_all(int fd, std::span<const std::byte> bytes, const std::string& path) {
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t put = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (put < 0 && errno == EINTR) continue;
    if (put < 0) throw_io(path, "write failed", errno);
    done += static_cast<std::size_t>(put);
  }
}

}  // namespace

void throw_io(std::string_view path, const std::string& what, int err) {
  std::string message = std::string(path) + ": " + what;
  if (err != 0) message += std::string(": ") + std::strerror(err);
  throw Error(ErrorCode::kIo, message);
}

// ---- InputFile -------------------------------------------------------------

InputFile::InputFile(const std::string& path, std::string_view expected) : path_(path) {
  const auto not_regular = [&] {
    throw_io(path, "not a regular file (expected " + std::string(expected) + ")", 0);
  };
  // stat() first: open() of a FIFO blocks until a writer comes.
  struct stat info;
  if (::stat(path.c_str(), &info) != 0) throw_io(path, "cannot open for reading", errno);
  if (!S_ISREG(info.st_mode)) not_regular();
  // O_NONBLOCK in case the path was replaced by a FIFO since; cleared below.
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd_ < 0) throw_io(path, "cannot open for reading", errno);
  const int flags = ::fcntl(fd_, F_GETFL);
  if (::fstat(fd_, &info) != 0 || flags < 0 || ::fcntl(fd_, F_SETFL, flags & ~O_NONBLOCK) != 0) {
    const int err = errno;
    ::close(fd_);
    throw_io(path, "cannot stat", err);
  }
  if (!S_ISREG(info.st_mode)) {
    ::close(fd_);
    not_regular();
  }
  size_ = static_cast<std::int64_t>(info.st_size);
}

InputFile::~InputFile() { ::close(fd_); }

std::vector<std::byte> InputFile::read(std::int64_t offset, std::int64_t bytes) const {
  std::vector<std::byte> out;
  try {
    out.resize(static_cast<std::size_t>(bytes));
  } catch (const std::bad_alloc&) {
    throw Error(ErrorCode::kCapacity, path_ + ": out of memory allocating " +
                                          std::to_string(bytes) + " bytes to read it");
  }
  out.resize(read_into(offset, out.size(), out.data()));
  return out;
}

std::size_t InputFile::read_into(std::int64_t offset, std::size_t bytes,
                                 std::byte* destination) const {
  std::size_t filled = 0;
  while (filled < bytes) {
    const ssize_t got = ::pread(fd_, destination + filled, bytes - filled,
                                static_cast<off_t>(offset + static_cast<std::int64_t>(filled)));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw_io(path_, "read failed", errno);
    if (got == 0) break;  // the file shrank while we read it
    filled += static_cast<std::size_t>(got);
  }
  return filled;
}

bool InputFile::stream(std::int64_t offset, std::int64_t bytes, const ByteSink& consume) const {
  std::vector<std::byte> chunk(std::min<std::size_t>(kChunkBytes, static_cast<std::size_t>(bytes)));
  while (bytes > 0) {
    const auto want = std::min<std::int64_t>(bytes, static_cast<std::int64_t>(chunk.size()));
    const ssize_t got =
        ::pread(fd_, chunk.data(), static_cast<std::size_t>(want), static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw_io(path_, "read failed", errno);
    if (got == 0) return false;
    consume(std::span(chunk).first(static_cast<std::size_t>(got)));
    offset += got;
    bytes -= got;
  }
  return true;
}

// ---- OutputFile ------------------------------------------------------------

OutputFile::OutputFile(const std::string& path) : path_(path) {
  if (path.empty()) {
    throw Error(ErrorCode::kInvalidArgument,
                "output path: empty (expected a file name, or - for standard output)");
  }
  buffer_.reserve(kChunkBytes);
  if (path == "-") {
    std::fflush(stdout);  // what the program printed before comes first
    fd_ = STDOUT_FILENO;
    close_fd_ = false;
    return;
  }
  target_ = resolve_symlinks(path);
  struct stat existing;
  const bool exists = ::stat(target_.c_str(), &existing) == 0;
  if (exists && written_in_place(existing.st_mode)) {
    // No O_TRUNC and no temporary: a device or FIFO is never replaced.
    fd_ = ::open(target_.c_str(), O_WRONLY | O_CLOEXEC | O_NOCTTY);
    if (fd_ < 0) throw_io(path, "cannot open for writing", errno);
    return;
  }
  // The temporary lives in the target's folder so that rename() is atomic
  // (same file system) and a failure never leaves a half-written target.
  temp_ = target_ + ".tmp.XXXXXX";
  fd_ = ::mkstemp(temp_.data());
  if (fd_ < 0) throw_io(path, "cannot create a temporary file next to it", errno);
  // mkstemp makes the file 0600; give it the mode a plain open() would
  // (0666 less the umask), or keep the mode of the file being replaced.
  const mode_t mode = exists ? (existing.st_mode & 07777) : (0666 & ~current_umask());
  if (::fchmod(fd_, mode) != 0) {
    // No destructor runs for a constructor that throws: clean up here.
    const int err = errno;
    ::close(std::exchange(fd_, -1));
    ::unlink(temp_.c_str());
    throw_io(path, "cannot set the permissions of the temporary file", err);
  }
}

OutputFile::~OutputFile() {
  if (fd_ < 0) return;
  if (close_fd_) ::close(fd_);
  if (!temp_.empty()) ::unlink(temp_.c_str());
}

void OutputFile::write(std::span<const std::byte> bytes) {
  if (buffer_.size() + bytes.size() > kChunkBytes) flush();
  if (bytes.size() >= kChunkBytes) {
    write_all(fd_, bytes, path_);
  } else {
    buffer_.insert(buffer_.end(), bytes.begin(), bytes.end());
  }
}

void OutputFile::flush() {
  write_all(fd_, buffer_, path_);
  buffer_.clear();
}

void OutputFile::commit() {
  flush();
  if (temp_.empty()) {
    const int fd = std::exchange(fd_, -1);
    if (close_fd_ && ::close(fd) != 0) throw_io(path_, "close failed", errno);
    return;
  }
  // From here on the destructor has nothing to do: every failure below
  // cleans up itself.
  const int fd = std::exchange(fd_, -1);
  const auto fail = [&](const char* what, int err) {
    ::unlink(temp_.c_str());
    throw_io(path_, what, err);
  };
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    fail("fsync failed", err);
  }
  if (::close(fd) != 0) fail("close failed", errno);
  if (::rename(temp_.c_str(), target_.c_str()) != 0) {
    fail("cannot rename the temporary file over it", errno);
  }
  // Make the rename itself durable. Not every file system can fsync a
  // folder, and the data is already safe, so failures are ignored.
  const std::string folder = folder_of(target_);
  const int folder_fd =
      ::open(folder.empty() ? "." : folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (folder_fd >= 0) {
    ::fsync(folder_fd);
    ::close(folder_fd);
  }
}

}  // namespace lookback::detail

namespace lookback {

void write_output(const std::string& path, std::span<const std::byte> bytes) {
  detail::OutputFile file(path);
  file.write(bytes);
  file.commit();
}

}  // namespace lookback
