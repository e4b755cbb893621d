// Fuzzes the safetensors header parser (src/model/safetensors.hpp) on
// arbitrary bytes, from memory. Contract: any input either parses or throws
// lookback::Error (kFormat); never a crash or another exception. A parsed
// header must keep its promises: every tensor inside the data, its byte count
// that of its dtype and shape, no two tensors overlapping; and the tensors,
// written again by serialize_safetensors, must parse to the same entries.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <span>
#include <vector>

#include "fuzz_common.hpp"
#include "lookback/error.hpp"
#include "model/safetensors.hpp"

using lookback::fuzz::fail;
using lookback::model::SafetensorsEntry;
using lookback::model::SafetensorsHeader;

namespace {

void check_parsed(const SafetensorsHeader& header, std::span<const std::byte> file) {
  LOOKBACK_FUZZ_CHECK(header.data_offset + header.data_bytes == file.size(),
                      "data offset %llu + %llu bytes != file size %zu",
                      static_cast<unsigned long long>(header.data_offset),
                      static_cast<unsigned long long>(header.data_bytes), file.size());
  std::vector<std::pair<SafetensorsEntry, std::span<const std::byte>>> tensors;
  for (std::size_t i = 0; i < header.tensors.size(); ++i) {
    const SafetensorsEntry& entry = header.tensors[i];
    LOOKBACK_FUZZ_CHECK(entry.begin <= entry.end && entry.end <= header.data_bytes,
                        "tensor %zu outside the data", i);
    unsigned long long bytes = lookback::model::safe_dtype_size(entry.dtype);
    for (std::int64_t extent : entry.shape) bytes *= static_cast<unsigned long long>(extent);
    LOOKBACK_FUZZ_CHECK(bytes == entry.end - entry.begin, "tensor %zu: %llu bytes for its shape",
                        i, bytes);
    if (i > 0 && entry.begin != entry.end) {
      const SafetensorsEntry& previous = header.tensors[i - 1];
      LOOKBACK_FUZZ_CHECK(previous.begin == previous.end || previous.end <= entry.begin,
                          "tensors %zu and %zu overlap", i - 1, i);
    }
    tensors.emplace_back(entry, file.subspan(header.data_offset + entry.begin,
                                             entry.end - entry.begin));
  }
  const std::vector<std::byte> written = lookback::model::serialize_safetensors(tensors);
  SafetensorsHeader again;
  try {
    again = lookback::model::parse_safetensors(written, "round trip");
  } catch (const lookback::Error& error) {
    fail("serialize_safetensors wrote a file the parser rejects: %s", error.what());
  }
  LOOKBACK_FUZZ_CHECK(again.tensors.size() == header.tensors.size(), "round trip lost tensors");
  for (const SafetensorsEntry& entry : header.tensors) {
    const SafetensorsEntry* found = again.find(entry.name);
    LOOKBACK_FUZZ_CHECK(found != nullptr && found->dtype == entry.dtype &&
                            found->shape == entry.shape &&
                            found->end - found->begin == entry.end - entry.begin,
                        "round trip changed a tensor");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::vector<std::byte> bytes(reinterpret_cast<const std::byte*>(data),
                                     reinterpret_cast<const std::byte*>(data) + size);
  SafetensorsHeader header;
  try {
    header = lookback::model::parse_safetensors(std::span<const std::byte>(bytes), "fuzz");
  } catch (const lookback::Error& error) {
    LOOKBACK_FUZZ_CHECK(error.code() == lookback::ErrorCode::kFormat,
                        "parse_safetensors threw code %d (expected kFormat): %s",
                        static_cast<int>(error.code()), error.what());
    LOOKBACK_FUZZ_CHECK(std::strlen(error.what()) > 0, "empty error message");
    return 0;
  } catch (const std::exception& error) {
    fail("parse_safetensors threw a non-lookback exception: %s", error.what());
  }
  try {
    check_parsed(header, bytes);
  } catch (const std::exception& error) {
    fail("a parsed header failed its checks: %s", error.what());
  }
  return 0;
}
