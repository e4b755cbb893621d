// libFuzzer target: the KV-cache checkpoint codec (src/kv_cache/
// checkpoint_format) on untrusted bytes, from memory, without a disk.
//
// The first byte picks what is fuzzed; the rest is the input:
//   0: parse() of a whole file. Anything but lookback::Error is a finding,
//      and a file that parses must encode back to the same bytes.
//   1: parse_directory() of a file's head.
//   2, 3: parse_header() of a header section (contiguous, paged): behind
//      the CRCs, where whole-file mutations rarely reach.
//   4: parse_tables() of a tables section against a fixed paged header.
//   5: parse_header() of a ring header section.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

#include "kv_cache/checkpoint_format.hpp"
#include "lookback/error.hpp"

namespace {

using namespace lookback;
namespace format = lookback::checkpoint_format;

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "fuzz_checkpoint: %s\n", what);
  std::abort();
}

// A parsed file encodes back to exactly its bytes.
void check_round_trip(format::Bytes file) {
  const format::Parsed parsed = format::parse(file);
  auto writer = [](format::Bytes section) {
    return [section](const format::ByteSink& sink) { sink(section); };
  };
  std::vector<std::byte> encoded;
  format::encode(parsed.header, parsed.tables, writer(parsed.keys), writer(parsed.values),
                 [&](format::Bytes piece) { encoded.insert(encoded.end(), piece.begin(), piece.end()); });
  if (encoded.size() != file.size() ||
      (!encoded.empty() && std::memcmp(encoded.data(), file.data(), file.size()) != 0)) {
    finding("a checkpoint that parses does not encode back to its bytes");
  }
}

void run(std::uint8_t mode, format::Bytes input) {
  switch (mode % 6) {
    case 0:
      check_round_trip(input);
      return;
    case 1:
      format::parse_directory(input, static_cast<std::int64_t>(input.size()));
      return;
    case 2:
      format::parse_header(input, CheckpointKind::kContiguous);
      return;
    case 3:
      format::parse_header(input, CheckpointKind::kPaged);
      return;
    case 5:
      format::parse_header(input, CheckpointKind::kRing);
      return;
    default: {
      const format::Header header =
          format::paged_header({.kv_heads = 2, .head_dim = 4}, 2, 5, 3, 1, 1);
      format::parse_tables(input, header);
      return;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const format::Bytes input(reinterpret_cast<const std::byte*>(data) + 1, size - 1);
  try {
    run(data[0], input);
  } catch (const lookback::Error& error) {
    if (std::strlen(error.what()) == 0) finding("an error without a message");
    if (error.code() == ErrorCode::kInternal) finding(error.what());
  } catch (const std::exception& error) {
    finding(error.what());
  }
  return 0;
}
