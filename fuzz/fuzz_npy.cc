// Fuzzes the .npy parser (include/lookback/npy.hpp) on arbitrary bytes.
// Contract: any input either parses or throws lookback::Error (kFormat); never
// a crash, another exception, or data larger than the file. A parsed array
// must survive serialize_npy -> parse_npy unchanged, and serialising it again
// must give the same bytes (the writer is deterministic).
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <span>
#include <vector>

#include "fuzz_common.hpp"
#include "lookback/error.hpp"
#include "lookback/npy.hpp"

using lookback::fuzz::fail;

namespace {

bool same_array(const lookback::NpyArray& a, const lookback::NpyArray& b) {
  return a.dtype == b.dtype && a.shape == b.shape && a.data == b.data;
}

void check_parsed(const lookback::NpyArray& array, std::size_t file_bytes) {
  LOOKBACK_FUZZ_CHECK(array.dtype == lookback::DType::kF32 ||
                          array.dtype == lookback::DType::kF16 ||
                          array.dtype == lookback::DType::kF64,
                      "parsed dtype %d is not f32, f16 or f64", static_cast<int>(array.dtype));
  // The header promises never to allocate more than the file holds.
  LOOKBACK_FUZZ_CHECK(array.data.size() <= file_bytes, "data of %zu bytes from a %zu-byte file",
                      array.data.size(), file_bytes);
  LOOKBACK_FUZZ_CHECK(
      array.numel() * static_cast<std::int64_t>(lookback::dtype_size(array.dtype)) ==
          static_cast<std::int64_t>(array.data.size()),
      "numel %lld does not match %zu data bytes", static_cast<long long>(array.numel()),
      array.data.size());
  // view() accepts ranks 1..4 and must agree with the data; others are an Error.
  try {
    const lookback::TensorView view = array.view();
    LOOKBACK_FUZZ_CHECK(!array.shape.empty() && array.shape.size() <= 4, "view() accepted rank %zu",
                        array.shape.size());
    LOOKBACK_FUZZ_CHECK(view.numel() == array.numel(), "view numel differs from the array's");
  } catch (const lookback::Error&) {
    LOOKBACK_FUZZ_CHECK(array.shape.empty() || array.shape.size() > 4,
                        "view() rejected a rank-%zu array", array.shape.size());
  }

  const std::vector<std::byte> written =
      lookback::serialize_npy(array.dtype, array.shape, array.data.data());
  lookback::NpyArray again;
  try {
    again = lookback::parse_npy(written, "round trip");
  } catch (const lookback::Error& error) {
    fail("serialize_npy wrote a file parse_npy rejects: %s", error.what());
  }
  LOOKBACK_FUZZ_CHECK(same_array(array, again), "round trip changed the array");
  const std::vector<std::byte> rewritten =
      lookback::serialize_npy(again.dtype, again.shape, again.data.data());
  LOOKBACK_FUZZ_CHECK(rewritten == written, "serialize_npy is not deterministic");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Copied so that ASan sees the exact extent of the input (libFuzzer's own
  // buffer is exact too, but a span over a vector documents the contract).
  const std::vector<std::byte> bytes(reinterpret_cast<const std::byte*>(data),
                                     reinterpret_cast<const std::byte*>(data) + size);
  lookback::NpyArray array;
  try {
    array = lookback::parse_npy(std::span<const std::byte>(bytes), "fuzz");
  } catch (const lookback::Error& error) {
    LOOKBACK_FUZZ_CHECK(error.code() == lookback::ErrorCode::kFormat,
                        "parse_npy threw code %d (expected kFormat): %s",
                        static_cast<int>(error.code()), error.what());
    LOOKBACK_FUZZ_CHECK(std::strlen(error.what()) > 0, "empty error message");
    return 0;
  } catch (const std::exception& error) {
    fail("parse_npy threw a non-lookback exception: %s", error.what());
  }
  try {
    check_parsed(array, size);
  } catch (const std::exception& error) {
    fail("a parsed array failed to round-trip: %s", error.what());
  }
  return 0;
}
