// NumPy .npy reading and writing (format versions 1.0, 2.0 and 3.0).
//
// File layout: the magic "\x93NUMPY", a major and a minor version byte, the
// header length (2 bytes little-endian in 1.0, 4 bytes in 2.0 and 3.0), the
// header (a Python dict literal, latin-1 in 1.0/2.0 and utf-8 in 3.0, padded
// with spaces and ended by '\n'), then the raw array data.
//
// Every header is untrusted input: each field is checked, each size is
// computed with overflow checks and compared with the bytes actually present
// before anything is allocated, so a hostile header costs at most the size of
// the file it came in.
#include "lookback/npy.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string_view>
#include <utility>

#include "core/file_io.hpp"
#include "core/little_endian.hpp"
#include "lookback/error.hpp"
#include "lookback/output_file.hpp"

namespace lookback {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr std::size_t kMagicSize = 6;
// Larger than any header NumPy writes for a sane array (NumPy itself refuses
// headers over 10 KB unless told otherwise); a bigger claim is a bad file.
constexpr std::size_t kMaxHeaderBytes = std::size_t{1} << 20;
// Magic, version and the longest header-length field (4 bytes, 2.0 and 3.0).
constexpr std::size_t kPreambleMaxBytes = kMagicSize + 2 + 4;
// NumPy 2's NPY_MAXDIMS. Bounds the shape vector a header can make us build.
constexpr std::size_t kMaxNpyRank = 64;
// NumPy aligns the start of the data to 64 bytes (numpy.lib.format.ARRAY_ALIGN).
constexpr std::size_t kArrayAlign = 64;
// NumPy leaves room in the header for the leading axis to grow to this many
// digits (GROWTH_AXIS_MAX_DIGITS) so a file can be appended to in place;
// matching it makes our files byte-identical to NumPy's.
constexpr std::size_t kGrowthAxisMaxDigits = 21;

[[noreturn]] void throw_format(std::string_view name, const std::string& what) {
  throw Error(ErrorCode::kFormat, std::string(name) + ": " + what);
}

// Python tuple spelling, as in the header: "()", "(5,)", "(2, 3)".
std::string tuple_string(std::span<const std::int64_t> shape) {
  std::string text = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(shape[i]);
  }
  if (shape.size() == 1) text += ",";
  return text + ")";
}

// Header text for error messages: printable, single-line, bounded length.
std::string quote_for_message(std::string_view text) {
  constexpr std::size_t kMaxShown = 80;
  while (!text.empty() && (text.back() == ' ' || text.back() == '\n')) text.remove_suffix(1);
  std::string quoted = "\"";
  for (std::size_t i = 0; i < text.size() && i < kMaxShown; ++i) {
    unsigned char c = static_cast<unsigned char>(text[i]);
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
      quoted += static_cast<char>(c);
    } else {
      char escaped[8];
      std::snprintf(escaped, sizeof escaped, "\\x%02x", c);
      quoted += escaped;
    }
  }
  if (text.size() > kMaxShown) quoted += "...";
  return quoted + "\"";
}

struct DtypeSpelling {
  DType dtype;
  std::string_view descr;
};
constexpr DtypeSpelling kDtypeSpellings[] = {
    {DType::kF32, "<f4"}, {DType::kF16, "<f2"}, {DType::kF64, "<f8"},
    {DType::kI32, "<i4"}, {DType::kI64, "<i8"}};  // integers only where a reader accepts them

std::optional<DType> dtype_from_descr(std::string_view descr) {
  for (const auto& spelling : kDtypeSpellings)
    if (spelling.descr == descr) return spelling.dtype;
  return std::nullopt;
}

std::optional<std::string_view> descr_from_dtype(DType dtype) {
  for (const auto& spelling : kDtypeSpellings)
    if (spelling.dtype == dtype) return spelling.descr;
  return std::nullopt;
}

constexpr DType kNpyDtypes[] = {DType::kF32, DType::kF16, DType::kF64};

// The accepted spellings for error messages: "'<f4', '<f2' or '<f8'".
std::string expected_dtypes(std::span<const DType> accepted) {
  std::string text;
  for (std::size_t i = 0; i < accepted.size(); ++i) {
    if (i > 0) text += i + 1 == accepted.size() ? " or " : ", ";
    text += '\'';
    text += descr_from_dtype(accepted[i]).value_or("?");
    text += '\'';
  }
  return text;
}

// Bytes needed by `shape` of `itemsize`-byte elements, or nullopt when that
// overflows int64. Zero extents count as one, so a shape accepted here also
// has overflow-free contiguous strides even when it holds no elements.
std::optional<std::int64_t> checked_byte_count(std::span<const std::int64_t> shape,
                                               std::int64_t itemsize) {
  std::int64_t bound = itemsize;
  std::int64_t bytes = itemsize;
  for (std::int64_t extent : shape) {
    if (__builtin_mul_overflow(bound, std::max<std::int64_t>(extent, 1), &bound))
      return std::nullopt;
    bytes *= extent;  // |bytes| <= bound, so this cannot overflow
  }
  return bytes;
}

// The three keys NumPy writes, once each; anything else is an error.
struct HeaderFields {
  std::optional<std::string> descr;
  std::optional<bool> fortran_order;
  std::optional<std::vector<std::int64_t>> shape;
};

// A hand-written parser for the subset of Python literals a .npy header
// uses: a dict of string keys, a string, True/False and a tuple of ints.
// Keys may come in any order; whitespace and trailing commas are allowed as
// in Python. NumPy uses ast.literal_eval; we need no more than this.
class HeaderParser {
 public:
  HeaderParser(std::string_view text, std::string_view name, std::string_view expected_dtypes)
      : text_(text), name_(name), expected_dtypes_(expected_dtypes) {}

  HeaderFields parse() {
    HeaderFields header;
    skip_space();
    expect('{', "'{' starting the header dict");
    while (true) {
      skip_space();
      if (peek() == '}') break;
      const std::size_t key_position = position_;
      const std::string key = parse_string("a quoted key");
      skip_space();
      expect(':', "':' after the key");
      skip_space();
      if (key == "descr") {
        if (header.descr) fail_at(key_position, "duplicate key 'descr'");
        if (peek() == '[' || peek() == '(' || peek() == '{') {
          throw_format(name_, "structured dtypes are not supported (expected descr " +
                                  std::string(expected_dtypes_) + ")");
        }
        header.descr = parse_string("a quoted dtype string for 'descr'");
      } else if (key == "fortran_order") {
        if (header.fortran_order) fail_at(key_position, "duplicate key 'fortran_order'");
        header.fortran_order = parse_bool();
      } else if (key == "shape") {
        if (header.shape) fail_at(key_position, "duplicate key 'shape'");
        header.shape = parse_shape();
      } else {
        fail_at(key_position, "unexpected key '" + key +
                                  "' (expected only 'descr', 'fortran_order' and 'shape')");
      }
      skip_space();
      if (peek() == ',') {
        ++position_;
        continue;
      }
      if (peek() != '}') fail("expected ',' or '}' after the value of '" + key + "'");
    }
    ++position_;  // the '}'
    skip_space();
    if (position_ != text_.size()) fail("unexpected text after the header dict");
    return header;
  }

 private:
  static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
  static bool is_digit(char c) { return c >= '0' && c <= '9'; }

  // '\0' past the end never matches anything the grammar expects.
  char peek() const { return position_ < text_.size() ? text_[position_] : '\0'; }
  void skip_space() {
    while (position_ < text_.size() && is_space(text_[position_])) ++position_;
  }

  [[noreturn]] void fail_at(std::size_t position, const std::string& what) const {
    throw_format(name_, "malformed .npy header: " + what + " at character " +
                            std::to_string(position) + " of " + quote_for_message(text_));
  }
  [[noreturn]] void fail(const std::string& what) const { fail_at(position_, what); }

  void expect(char c, const char* what) {
    if (peek() != c) fail(std::string("expected ") + what);
    ++position_;
  }

  std::string parse_string(const char* what) {
    const char quote = peek();
    if (quote != '\'' && quote != '"') fail(std::string("expected ") + what);
    const std::size_t start = ++position_;
    while (position_ < text_.size() && text_[position_] != quote) {
      // No key or dtype NumPy writes needs an escape; refusing them keeps
      // the parser small and the comparison exact.
      if (text_[position_] == '\\') fail("escape sequences in strings are not supported");
      ++position_;
    }
    if (position_ == text_.size()) fail_at(start - 1, "unterminated string");
    return std::string(text_.substr(start, position_++ - start));
  }

  bool parse_word(std::string_view word) {
    if (text_.substr(position_, word.size()) != word) return false;
    const std::size_t end = position_ + word.size();
    if (end < text_.size()) {
      const char next = text_[end];
      const char lower = static_cast<char>(next | 0x20);
      if (next == '_' || is_digit(next) || (lower >= 'a' && lower <= 'z')) return false;
    }
    position_ = end;
    return true;
  }

  bool parse_bool() {
    if (parse_word("True")) return true;
    if (parse_word("False")) return false;
    fail("expected True or False for 'fortran_order'");
  }

  std::int64_t parse_extent() {
    const std::size_t start = position_;
    if (peek() == '-') {
      throw_format(name_, "shape has a negative dimension at character " +
                              std::to_string(start) + " of the header " +
                              quote_for_message(text_) + " (expected sizes >= 0)");
    }
    if (!is_digit(peek())) fail("expected a non-negative integer in 'shape'");
    std::int64_t value = 0;
    while (is_digit(peek())) {
      if (__builtin_mul_overflow(value, 10, &value) ||
          __builtin_add_overflow(value, peek() - '0', &value)) {
        fail_at(start, "dimension does not fit in a 64-bit integer");
      }
      ++position_;
    }
    if (peek() == 'L' || peek() == 'l') ++position_;  // Python 2 longs, e.g. (3L, 4L)
    return value;
  }

  std::vector<std::int64_t> parse_shape() {
    expect('(', "a tuple such as (2, 3) for 'shape'");
    std::vector<std::int64_t> shape;
    skip_space();
    bool had_comma = false;
    while (peek() != ')') {
      if (shape.size() == kMaxNpyRank) {
        fail("'shape' has more than " + std::to_string(kMaxNpyRank) + " dimensions");
      }
      shape.push_back(parse_extent());
      skip_space();
      had_comma = peek() == ',';
      if (had_comma) {
        ++position_;
        skip_space();
      } else if (peek() != ')') {
        fail("expected ',' or ')' in 'shape'");
      }
    }
    // In Python "(5)" is the integer 5, not a tuple.
    if (shape.size() == 1 && !had_comma) fail("expected a 1-tuple such as (5,) for 'shape'");
    ++position_;  // the ')'
    return shape;
  }

  std::string_view text_;
  std::string_view name_;
  std::string_view expected_dtypes_;  // "'<f4' or '<f8'", for messages
  std::size_t position_ = 0;
};

// What the header says about the array, with the data's place in the file.
struct NpyLayout {
  DType dtype;
  std::vector<std::int64_t> shape;
  std::size_t data_offset;
  std::size_t data_bytes;
};

// The preamble (magic, version, header length): where the header text lies.
struct HeaderPlace {
  std::size_t offset;
  std::size_t bytes;
};

// `bytes` starts the file (at least its first kPreambleMaxBytes, or all of a
// shorter file); `file_size` is the whole file's.
HeaderPlace parse_preamble(std::span<const std::byte> bytes, std::uint64_t file_size,
                           std::string_view name) {
  if (bytes.empty()) {
    throw_format(name, "file is empty (expected a .npy file starting with \\x93NUMPY)");
  }
  if (bytes.size() < kMagicSize ||
      std::memcmp(bytes.data(), kMagic, kMagicSize) != 0) {
    throw_format(name, "not a .npy file: bad magic string (expected \\x93NUMPY)");
  }
  if (bytes.size() < kMagicSize + 2) {
    throw_format(name, "file ends inside the .npy preamble (" +
                           std::to_string(bytes.size()) + " bytes)");
  }
  const int major = std::to_integer<int>(bytes[kMagicSize]);
  const int minor = std::to_integer<int>(bytes[kMagicSize + 1]);
  if (major < 1 || major > 3 || minor != 0) {
    throw_format(name, "unsupported .npy format version " + std::to_string(major) + "." +
                           std::to_string(minor) + " (expected 1.0, 2.0 or 3.0)");
  }
  const int length_width = major == 1 ? 2 : 4;
  const std::size_t header_offset = kMagicSize + 2 + length_width;
  if (bytes.size() < header_offset) {
    throw_format(name, "file ends inside the .npy preamble (" +
                           std::to_string(bytes.size()) + " bytes)");
  }
  const auto header_bytes =
      static_cast<std::size_t>(detail::get_le(bytes.data() + kMagicSize + 2, length_width));
  if (header_bytes > kMaxHeaderBytes) {
    throw_format(name, "header length " + std::to_string(header_bytes) +
                           " is absurd (expected at most " +
                           std::to_string(kMaxHeaderBytes) + " bytes)");
  }
  if (header_bytes > file_size - header_offset) {
    throw_format(name, "header length " + std::to_string(header_bytes) +
                           " runs past the end of the file (" + std::to_string(file_size) +
                           " bytes in all)");
  }
  return {header_offset, header_bytes};
}

// `bytes` starts the file and holds at least its header; `file_size` is the
// whole file's, which must be exactly what the header's shape needs.
NpyLayout parse_layout(std::span<const std::byte> bytes, std::uint64_t file_size,
                       std::string_view name, std::span<const DType> accepted = kNpyDtypes) {
  const std::string expected = expected_dtypes(accepted);
  const auto [header_offset, header_bytes] = parse_preamble(bytes, file_size, name);
  if (bytes.size() < header_offset + header_bytes) {
    throw_format(name, "file ends inside the .npy header (it shrank while being read)");
  }
  // Latin-1 (1.0, 2.0) and utf-8 (3.0) agree on the ASCII that matters; any
  // other byte can only appear inside a string and then fails the dtype check.
  const std::string_view text(reinterpret_cast<const char*>(bytes.data()) + header_offset,
                              header_bytes);
  HeaderFields header = HeaderParser(text, name, expected).parse();

  if (!header.descr || !header.fortran_order || !header.shape) {
    const char* missing = !header.descr ? "descr" : !header.fortran_order ? "fortran_order"
                                                                          : "shape";
    throw_format(name, std::string("header has no '") + missing +
                           "' key (expected 'descr', 'fortran_order' and 'shape')");
  }
  const std::string& descr = *header.descr;
  std::optional<DType> dtype = dtype_from_descr(descr);
  if (dtype && std::find(accepted.begin(), accepted.end(), *dtype) == accepted.end()) {
    dtype.reset();
  }
  if (!dtype) {
    std::optional<DType> swapped;  // a big-endian spelling of one we read
    if (descr.size() == 3 && descr[0] == '>') {
      std::string little = descr;
      little[0] = '<';
      swapped = dtype_from_descr(little);
    }
    if (swapped && std::find(accepted.begin(), accepted.end(), *swapped) != accepted.end()) {
      throw_format(name, "big-endian dtype '" + descr +
                             "' is not supported (expected little-endian " + expected +
                             "; convert with a.astype('<" + descr.substr(1) + "'))");
    }
    std::string message = "unsupported dtype '";
    message.append(descr).append("' (expected ").append(expected).append(")");
    throw_format(name, message);
  }
  if (*header.fortran_order) {
    throw_format(name, "Fortran-order arrays are not supported (expected fortran_order "
                       "False; save numpy.ascontiguousarray(a) instead)");
  }
  std::vector<std::int64_t>& shape = *header.shape;
  const auto itemsize = static_cast<std::int64_t>(dtype_size(*dtype));
  const std::optional<std::int64_t> needed = checked_byte_count(shape, itemsize);
  if (!needed) {
    throw_format(name, "shape " + tuple_string(shape) + " of '" + descr +
                           "' overflows a 64-bit byte count");
  }
  const std::size_t data_offset = header_offset + header_bytes;
  const std::uint64_t present = file_size - data_offset;
  const auto needed_bytes = static_cast<std::uint64_t>(*needed);
  if (present < needed_bytes) {
    throw_format(name, "data is truncated: shape " + tuple_string(shape) + " of '" + descr +
                           "' needs " + std::to_string(needed_bytes) +
                           " bytes but the file holds " + std::to_string(present) +
                           " after the header");
  }
  if (present > needed_bytes) {
    throw_format(name, "file has " + std::to_string(present - needed_bytes) +
                           " bytes of trailing data after the array (shape " +
                           tuple_string(shape) + " of '" + descr + "' needs " +
                           std::to_string(needed_bytes) + " bytes)");
  }
  return {*dtype, std::move(shape), data_offset, static_cast<std::size_t>(needed_bytes)};
}

std::int64_t product(std::span<const std::int64_t> shape) noexcept {
  std::int64_t count = 1;
  for (std::int64_t extent : shape) count *= extent;
  return count;
}

// A contiguous view of `shape` over `data` (null for a header's description).
TensorView contiguous_view(const void* data, DType dtype, std::span<const std::int64_t> shape,
                           std::string_view argument) {
  const int rank = static_cast<int>(shape.size());
  if (rank < 1 || rank > kMaxRank) {
    throw Error(ErrorCode::kInvalidArgument,
                std::string(argument) + ": expected 1 to " + std::to_string(kMaxRank) +
                    " dimensions, got " + std::to_string(rank) + " (shape " +
                    tuple_string(shape) + ")");
  }
  TensorView result;
  result.data = data;
  result.dtype = dtype;
  result.rank = rank;
  for (int axis = 0; axis < rank; ++axis) result.shape[axis] = shape[axis];
  result.strides = contiguous_strides(result.shape, rank);
  return result;
}

}  // namespace

std::int64_t NpyArray::numel() const noexcept { return product(shape); }
std::int64_t NpyHeader::numel() const noexcept { return product(shape); }

TensorView NpyHeader::view(std::string_view argument) const {
  return contiguous_view(nullptr, dtype, shape, argument);
}

TensorView NpyArray::view(std::string_view argument) const {
  const TensorView result = contiguous_view(data.data(), dtype, shape, argument);
  // An NpyArray may be built by hand, so check that the data covers the
  // shape rather than trusting it: a view must never read out of bounds.
  const std::optional<std::int64_t> needed =
      std::any_of(shape.begin(), shape.end(), [](std::int64_t e) { return e < 0; })
          ? std::nullopt
          : checked_byte_count(shape, static_cast<std::int64_t>(dtype_size(dtype)));
  if (!needed || static_cast<std::uint64_t>(*needed) != data.size()) {
    throw Error(ErrorCode::kInvalidArgument,
                std::string(argument) + ": shape " + tuple_string(shape) + " of " +
                    std::string(dtype_name(dtype)) + " does not match its " +
                    std::to_string(data.size()) + " data bytes");
  }
  return result;
}

NpyArray parse_npy(std::span<const std::byte> bytes, std::string_view name) {
  NpyLayout layout = parse_layout(bytes, bytes.size(), name);
  NpyArray array;
  array.dtype = layout.dtype;
  array.shape = std::move(layout.shape);
  const auto data = bytes.subspan(layout.data_offset, layout.data_bytes);
  array.data.assign(data.begin(), data.end());
  return array;
}

NpyArray read_npy(const std::string& path) { return read_npy(path, kNpyDtypes); }

NpyArray read_npy(const std::string& path, std::span<const DType> accepted) {
  std::vector<std::byte> bytes = detail::InputFile(path, "a .npy file").read_all();

  // Parse in place and keep the buffer: dropping the header with erase()
  // avoids holding two copies of a large array.
  NpyLayout layout = parse_layout(bytes, bytes.size(), path, accepted);
  bytes.erase(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(layout.data_offset));
  NpyArray array;
  array.dtype = layout.dtype;
  array.shape = std::move(layout.shape);
  array.data = std::move(bytes);
  return array;
}

NpyHeader read_npy_header(const std::string& path) {
  const detail::InputFile file(path, "a .npy file");
  const auto file_size = static_cast<std::uint64_t>(file.size());
  const std::vector<std::byte> preamble =
      file.read(0, std::min<std::int64_t>(file.size(), kPreambleMaxBytes));
  const HeaderPlace place = parse_preamble(preamble, file_size, path);
  // At most kMaxHeaderBytes past the preamble, and inside the file.
  const std::vector<std::byte> head =
      file.read(0, static_cast<std::int64_t>(place.offset + place.bytes));
  NpyLayout layout = parse_layout(head, file_size, path);
  return {.dtype = layout.dtype, .shape = std::move(layout.shape)};
}

namespace {

// The bytes before the data (magic, version, header length, header text)
// and the data's byte count, after checking dtype, shape and data.
std::vector<std::byte> npy_preamble(DType dtype, std::span<const std::int64_t> shape,
                                    const void* data, std::size_t& data_bytes_out) {
  const std::optional<std::string_view> descr = descr_from_dtype(dtype);
  if (!descr) {
    // Only bfloat16 gets here: NumPy has no such type.
    throw Error(ErrorCode::kInvalidArgument,
                "dtype: .npy has no bfloat16 type (expected f32, f16 or f64; got " +
                    std::string(dtype_name(dtype)) + ", convert before writing)");
  }
  if (shape.size() > kMaxNpyRank) {
    throw Error(ErrorCode::kInvalidArgument,
                "shape: " + std::to_string(shape.size()) + " dimensions (expected at most " +
                    std::to_string(kMaxNpyRank) + ")");
  }
  for (std::int64_t extent : shape) {
    if (extent < 0) {
      throw Error(ErrorCode::kInvalidArgument, "shape: " + tuple_string(shape) +
                                                   " has a negative dimension (expected >= 0)");
    }
  }
  const std::optional<std::int64_t> data_bytes =
      checked_byte_count(shape, static_cast<std::int64_t>(dtype_size(dtype)));
  if (!data_bytes) {
    throw Error(ErrorCode::kInvalidArgument,
                "shape: " + tuple_string(shape) + " overflows a 64-bit byte count");
  }
  if (data == nullptr && *data_bytes > 0) {
    throw Error(ErrorCode::kInvalidArgument, "data: null pointer for a non-empty array");
  }

  // Same text, key order and padding as numpy.lib.format.write_array, so
  // the files are byte-identical to NumPy's.
  std::string header = "{'descr': '" + std::string(*descr) +
                       "', 'fortran_order': False, 'shape': " + tuple_string(shape) + ", }";
  if (!shape.empty()) {
    const std::size_t digits = std::to_string(shape[0]).size();
    header.append(kGrowthAxisMaxDigits - std::min(digits, kGrowthAxisMaxDigits), ' ');
  }
  // Version 1.0 stores the header length in 2 bytes; 2.0 only when it must.
  // (With at most 64 dimensions the header stays far below 64 KiB.)
  int length_width = 2;
  std::size_t padded = 0;
  for (int major : {1, 2}) {
    length_width = major == 1 ? 2 : 4;
    const std::size_t unpadded = header.size() + 1;  // + '\n'
    const std::size_t padding =
        kArrayAlign - (kMagicSize + 2 + length_width + unpadded) % kArrayAlign;
    padded = unpadded + padding;
    if (major == 2 || padded <= 0xffff) break;
  }
  header.append(padded - header.size() - 1, ' ');
  header += '\n';

  std::vector<std::byte> bytes;
  data_bytes_out = static_cast<std::size_t>(*data_bytes);
  bytes.reserve(kMagicSize + 2 + length_width + header.size());
  for (std::size_t i = 0; i < kMagicSize; ++i) bytes.push_back(static_cast<std::byte>(kMagic[i]));
  bytes.push_back(static_cast<std::byte>(length_width == 2 ? 1 : 2));
  bytes.push_back(std::byte{0});
  detail::put_le(bytes, header.size(), length_width);
  for (char c : header) bytes.push_back(static_cast<std::byte>(c));
  return bytes;
}

}  // namespace

std::vector<std::byte> serialize_npy(DType dtype, std::span<const std::int64_t> shape,
                                     const void* data) {
  std::size_t data_bytes = 0;
  std::vector<std::byte> bytes = npy_preamble(dtype, shape, data, data_bytes);
  const auto* first = static_cast<const std::byte*>(data);
  if (data_bytes > 0) bytes.insert(bytes.end(), first, first + data_bytes);
  return bytes;
}

void write_npy(const std::string& path, DType dtype, std::span<const std::int64_t> shape,
               const void* data) {
  // The header and the caller's data go to the file as they are: no
  // serialised copy of a large array.
  std::size_t data_bytes = 0;
  const std::vector<std::byte> preamble = npy_preamble(dtype, shape, data, data_bytes);
  detail::OutputFile file(path);
  file.write(preamble);
  if (data_bytes > 0) file.write({static_cast<const std::byte*>(data), data_bytes});
  file.commit();
}

// ---- LargeBuffer and load_npy ----------------------------------------------

LargeBuffer::LargeBuffer(std::size_t bytes, std::string_view what) {
  if (bytes == 0) return;
  // Anonymous pages: the kernel zeroes them as they are first touched; the
  // program writes nothing before the data.
  void* address = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (address == MAP_FAILED) {
    throw Error(ErrorCode::kCapacity, std::string(what) + ": out of memory allocating " +
                                          std::to_string(bytes) + " bytes");
  }
#ifdef MADV_HUGEPAGE
  constexpr std::size_t kHugePage = std::size_t{2} << 20;
  if (bytes >= kHugePage) ::madvise(address, bytes, MADV_HUGEPAGE);  // advice only
#endif
  data_ = static_cast<std::byte*>(address);
  size_ = bytes;
  mapping_ = address;
  mapped_ = bytes;
}

LargeBuffer LargeBuffer::map_file(int fd, std::size_t offset, std::size_t bytes,
                                  std::string_view what) {
  LargeBuffer buffer;
  if (bytes == 0) return buffer;
  // mmap's offset must be page-aligned: map from the page the data starts in.
  const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  const std::size_t start = offset / page * page;
  const std::size_t length = offset - start + bytes;
  void* address = ::mmap(nullptr, length, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd,
                         static_cast<off_t>(start));
  if (address == MAP_FAILED && errno == ENOMEM) {
    throw Error(ErrorCode::kCapacity, std::string(what) + ": out of memory allocating " +
                                          std::to_string(bytes) + " bytes (of address space, to map it)");
  }
  if (address == MAP_FAILED) detail::throw_io(what, "cannot map the file for reading", errno);
  buffer.data_ = static_cast<std::byte*>(address) + (offset - start);
  buffer.size_ = bytes;
  buffer.mapping_ = address;
  buffer.mapped_ = length;
  return buffer;
}

LargeBuffer::~LargeBuffer() {
  if (mapped_ != 0) ::munmap(mapping_, mapped_);
}

LargeBuffer::LargeBuffer(LargeBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      mapping_(std::exchange(other.mapping_, nullptr)),
      mapped_(std::exchange(other.mapped_, 0)) {}

LargeBuffer& LargeBuffer::operator=(LargeBuffer&& other) noexcept {
  if (this != &other) {
    if (mapped_ != 0) ::munmap(mapping_, mapped_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    mapping_ = std::exchange(other.mapping_, nullptr);
    mapped_ = std::exchange(other.mapped_, 0);
  }
  return *this;
}

std::int64_t LoadedNpy::numel() const noexcept { return product(shape); }

TensorView LoadedNpy::view(std::string_view argument) const {
  return contiguous_view(data.data(), dtype, shape, argument);
}

namespace {

// The layout of an open .npy file, by every check of read_npy, against the
// size fstat() reported: a buffer of data_bytes is one the file holds.
NpyLayout checked_layout(const detail::InputFile& file, const std::string& path) {
  const auto file_size = static_cast<std::uint64_t>(file.size());
  const std::vector<std::byte> preamble =
      file.read(0, std::min<std::int64_t>(file.size(), kPreambleMaxBytes));
  const HeaderPlace place = parse_preamble(preamble, file_size, path);
  const std::vector<std::byte> head =
      file.read(0, static_cast<std::int64_t>(place.offset + place.bytes));
  return parse_layout(head, file_size, path);
}

}  // namespace

LoadedNpy map_npy(const std::string& path) {
  const detail::InputFile file(path, "a .npy file");
  NpyLayout layout = checked_layout(file, path);
  LoadedNpy array;
  array.dtype = layout.dtype;
  array.shape = std::move(layout.shape);
  // The mapping outlives the descriptor.
  array.data = LargeBuffer::map_file(file.descriptor(), layout.data_offset, layout.data_bytes, path);
  return array;
}

LoadedNpy load_npy(const std::string& path) {
  const detail::InputFile file(path, "a .npy file");
  NpyLayout layout = checked_layout(file, path);
  LoadedNpy array;
  array.dtype = layout.dtype;
  array.shape = std::move(layout.shape);
  array.data = LargeBuffer(layout.data_bytes, path);
  const std::size_t got = file.read_into(static_cast<std::int64_t>(layout.data_offset),
                                         layout.data_bytes, array.data.data());
  if (got != layout.data_bytes) {
    throw Error(ErrorCode::kIo, path + ": the file shrank while it was read (" +
                                    std::to_string(got) + " of " +
                                    std::to_string(layout.data_bytes) + " data bytes)");
  }
  return array;
}

}  // namespace lookback
