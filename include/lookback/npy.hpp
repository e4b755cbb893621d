// NumPy .npy files: format versions 1.0, 2.0 and 3.0, C order, little-endian
// <f4, <f2 or <f8. Headers are untrusted: every malformed, truncated or
// oversized file is a lookback::Error (code kFormat or kIo), never a crash or
// an allocation larger than the file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "lookback/dtype.hpp"
#include "lookback/tensor.hpp"

namespace lookback {

struct NpyArray {
  DType dtype = DType::kF32;        // kF32, kF16 or kF64
  std::vector<std::int64_t> shape;  // C order; empty for a 0-d array
  std::vector<std::byte> data;      // numel * dtype_size bytes, little-endian

  std::int64_t numel() const noexcept;
  // Contiguous view of the data; requires 1 <= rank <= 4.
  TensorView view(std::string_view argument = "array") const;
};

// What a .npy file's header says, checked as read_npy checks it (the file
// must hold exactly the bytes its shape needs) but without reading the data:
// to check every input of a call before reading any.
struct NpyHeader {
  DType dtype = DType::kF32;        // kF32, kF16 or kF64
  std::vector<std::int64_t> shape;  // C order; empty for a 0-d array

  std::int64_t numel() const noexcept;
  // A contiguous view with null data, for lookback::validate_shapes;
  // requires 1 <= rank <= 4.
  TensorView view(std::string_view argument = "array") const;
};
NpyHeader read_npy_header(const std::string& path);

// Parses a whole .npy file held in memory.
NpyArray parse_npy(std::span<const std::byte> bytes, std::string_view name = "npy");
NpyArray read_npy(const std::string& path);
// As read_npy, accepting only the dtypes in `accepted` (some of kF32, kF16,
// kF64, and kI32 / kI64 ('<i4', '<i8', which only such a call reads), in the
// order the error message lists them): any other dtype is a kFormat error
// naming exactly those.
NpyArray read_npy(const std::string& path, std::span<const DType> accepted);

// Memory for large arrays: page-aligned, never filled by the program before
// use (fresh pages come zeroed from the kernel) and, from 2 MiB up, advised
// for transparent huge pages, so that touching 64 MiB costs a few dozen page
// faults rather than 16,384. Move-only. A failed allocation is
// lookback::Error (kCapacity) naming `what`. Or (map_npy) a read-only
// mapping of part of a file.
class LargeBuffer {
 public:
  LargeBuffer() = default;
  LargeBuffer(std::size_t bytes, std::string_view what);
  // `bytes` of the file open as `fd` from `offset`, mapped read-only and
  // faulted in at once (MAP_POPULATE): the page cache's own pages, no copy.
  static LargeBuffer map_file(int fd, std::size_t offset, std::size_t bytes, std::string_view what);
  ~LargeBuffer();
  LargeBuffer(LargeBuffer&& other) noexcept;
  LargeBuffer& operator=(LargeBuffer&& other) noexcept;
  LargeBuffer(const LargeBuffer&) = delete;
  LargeBuffer& operator=(const LargeBuffer&) = delete;

  std::byte* data() noexcept { return data_; }
  const std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }

 private:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  void* mapping_ = nullptr;  // what munmap releases (data_ lies inside it)
  std::size_t mapped_ = 0;   // bytes mapped (0: nothing to unmap)
};

// An array read for computing on it (lookback attend): every check of
// read_npy, the data read once, straight from the file into a LargeBuffer
// (no zero-filled vector first, no second copy).
struct LoadedNpy {
  DType dtype = DType::kF32;        // kF32, kF16 or kF64
  std::vector<std::int64_t> shape;  // C order; empty for a 0-d array
  LargeBuffer data;                 // numel * dtype_size bytes, little-endian

  std::int64_t numel() const noexcept;
  // Contiguous view of the data; requires 1 <= rank <= 4.
  TensorView view(std::string_view argument = "array") const;
};
LoadedNpy load_npy(const std::string& path);
// As load_npy, but the data is the file itself, mapped read-only (no copy,
// no fresh memory: the fastest way to a large input that is in the page
// cache). The file must not shrink while the array lives: on Linux, reading
// a mapped page past a file's new end raises SIGBUS (lookback attend turns
// that into an error message).
LoadedNpy map_npy(const std::string& path);

// Serialises as format 1.0 (2.0 when the header needs it).
std::vector<std::byte> serialize_npy(DType dtype, std::span<const std::int64_t> shape,
                                     const void* data);
// Writes serialize_npy's bytes (the header, then `data` as it is, without a
// copy) by the output-path rules of
// lookback/output_file.hpp: a regular file is replaced atomically (the path
// holds the old file or the complete new one, never half of it), "-" is
// standard output, a device or FIFO is written in place.
void write_npy(const std::string& path, DType dtype,
               std::span<const std::int64_t> shape, const void* data);

}  // namespace lookback
