// NumPy .npy files: format versions 1.0, 2.0 and 3.0, C order, little-endian
// <f4, <f2 or <f8. Headers are untrusted: every malformed, truncated or
// oversized file is a lookback::Error (code kFormat or kIo), never a crash or
// an allocation larger than the file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
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

// Serialises as format 1.0 (2.0 when the header needs it).
std::vector<std::byte> serialize_npy(DType dtype, std::span<const std::int64_t> shape,
                                     const void* data);
// Writes serialize_npy's bytes by the output-path rules of
// lookback/output_file.hpp: a regular file is replaced atomically (the path
// holds the old file or the complete new one, never half of it), "-" is
// standard output, a device or FIFO is written in place.
void write_npy(const std::string& path, DType dtype,
               std::span<const std::int64_t> shape, const void* data);

}  // namespace lookback
