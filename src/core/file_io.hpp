// The bottom layer of lookback's file I/O (gemma.cpp's io -> blob_store ->
// fields): files and descriptors, and nothing about any format.
//
//   core/file_io         InputFile, OutputFile (this file)
//   core/npy.cc,         pure codecs over bytes (.npy; checkpoint_format for
//   kv_cache/checkpoint_format   KV-cache checkpoints): no descriptors, fuzzable
//   write_npy, kv_cache/checkpoint.cc   the few lines that join the two
//
// Every output of the library (write_npy, save_checkpoint, write_output) goes
// through OutputFile, so the output-path rules of lookback/output_file.hpp
// hold for all of them. Byte order: core/little_endian.hpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace lookback::detail {

// Throws lookback::Error(kIo) "<path>: <what>[: strerror(err)]".
[[noreturn]] void throw_io(std::string_view path, const std::string& what, int err);

using ByteSink = std::function<void(std::span<const std::byte>)>;

// A regular file opened for reading. Anything else (a folder, a FIFO, a
// device) is refused with "not a regular file (expected <expected>)" before
// it can block: the type is checked with stat() first and the file opened
// with O_NONBLOCK, so a FIFO with no writer never hangs open().
class InputFile {
 public:
  InputFile(const std::string& path, std::string_view expected);
  ~InputFile();
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;

  // The size fstat() reported at open: allocations are bounded by it, never
  // by a size the file's contents claim.
  std::int64_t size() const noexcept { return size_; }
  int descriptor() const noexcept { return fd_; }

  // Up to `bytes` from `offset`; fewer if the file shrank meanwhile. Callers
  // pass ranges inside size(), so the allocation is one the file holds; when
  // memory runs out it is lookback::Error (kCapacity) naming the path.
  std::vector<std::byte> read(std::int64_t offset, std::int64_t bytes) const;
  std::vector<std::byte> read_all() const { return read(0, size_); }
  // Up to `bytes` from `offset` into `destination` (which holds them); the
  // count read, fewer if the file shrank meanwhile.
  std::size_t read_into(std::int64_t offset, std::size_t bytes, std::byte* destination) const;

  // Feeds [offset, offset + bytes) to `consume` in chunks of at most 1 MiB
  // (to checksum a section without holding it); false when the file ends
  // first.
  bool stream(std::int64_t offset, std::int64_t bytes, const ByteSink& consume) const;

 private:
  std::string path_;
  int fd_ = -1;
  std::int64_t size_ = 0;
};

// An output path opened by the rules of lookback/output_file.hpp: "-" is
// standard output; a device node or FIFO (or a symlink to one) is written in
// place; anything else gets a temporary file beside the (symlink-resolved)
// target, named TARGET.tmp.XXXXXX, renamed over it by commit(). Writes are
// buffered. Destroyed without commit(), the temporary is deleted and the
// path is left as it was (an in-place output keeps what was written).
class OutputFile {
 public:
  explicit OutputFile(const std::string& path);
  ~OutputFile();
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;

  void write(std::span<const std::byte> bytes);
  // Flushes; for a temporary also fsync, close, rename over the target and
  // fsync of its folder, so the target holds its old contents or all the
  // new ones.
  void commit();

 private:
  void flush();

  std::string path_;    // as given, for messages
  std::string target_;  // what the temporary replaces (symlinks resolved)
  std::string temp_;    // empty when written in place
  int fd_ = -1;
  bool close_fd_ = true;  // false for standard output
  std::vector<std::byte> buffer_;
};

}  // namespace lookback::detail
