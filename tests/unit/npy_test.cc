// .npy reading and writing: round trips, files written by NumPy itself
// (tests/fixtures, made by make_fixtures.py), every kind of malformed file,
// the atomic write and the output-path rules.
#include "lookback/npy.hpp"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "lookback/error.hpp"
#include "lookback/output_file.hpp"
#include "testing/testing.hpp"

namespace lookback {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;
using testing::throws_error;

// Located from this file so the tests need no build-system help.
fs::path fixture(std::string_view name) {
  return fs::path(__FILE__).parent_path() / "../fixtures" / name;
}

std::vector<std::byte> file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> bytes(chars.size());
  std::memcpy(bytes.data(), chars.data(), chars.size());
  return bytes;
}

std::vector<std::byte> to_bytes(std::string_view text) {
  std::vector<std::byte> bytes(text.size());
  std::memcpy(bytes.data(), text.data(), text.size());
  return bytes;
}

template <typename T>
std::vector<T> values_of(const NpyArray& array) {
  std::vector<T> values(array.data.size() / sizeof(T));
  std::memcpy(values.data(), array.data.data(), values.size() * sizeof(T));
  return values;
}

// A .npy file with a hand-written header (no padding) and raw data bytes.
std::vector<std::byte> handmade_npy(std::string_view header, std::size_t data_bytes,
                                    int major = 1) {
  std::string file = "\x93NUMPY";
  file += static_cast<char>(major);
  file += '\0';
  const std::size_t length = header.size() + 1;
  file += static_cast<char>(length & 0xff);
  file += static_cast<char>((length >> 8) & 0xff);
  if (major != 1) {
    file += static_cast<char>((length >> 16) & 0xff);
    file += static_cast<char>((length >> 24) & 0xff);
  }
  file += header;
  file += '\n';
  file.append(data_bytes, '\x11');
  return to_bytes(file);
}

std::string dict(std::string_view descr, std::string_view fortran, std::string_view shape) {
  return "{'descr': '" + std::string(descr) + "', 'fortran_order': " + std::string(fortran) +
         ", 'shape': " + std::string(shape) + ", }";
}

// ---------------------------------------------------------------- round trips

TEST(NpyTest, RoundTripsEveryDtypeAndRank) {
  const std::vector<std::vector<std::int64_t>> shapes = {
      {}, {5}, {2, 3}, {2, 1, 3}, {1, 2, 3, 2}, {0, 3}};
  for (DType dtype : {DType::kF32, DType::kF16, DType::kF64}) {
    for (const auto& shape : shapes) {
      SCOPED_TRACE(::testing::Message() << "dtype " << dtype_name(dtype) << " rank "
                                        << shape.size());
      std::int64_t numel = 1;
      for (std::int64_t extent : shape) numel *= extent;
      std::vector<std::byte> data(static_cast<std::size_t>(numel) * dtype_size(dtype));
      for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>(i * 37 + 5);

      const std::vector<std::byte> file = serialize_npy(dtype, shape, data.data());
      // NumPy's alignment: the data starts at a multiple of 64 bytes.
      EXPECT_EQ((file.size() - data.size()) % 64, 0u);
      EXPECT_EQ(std::to_integer<int>(file[6]), 1);  // format version 1.0

      const NpyArray array = parse_npy(file, "roundtrip.npy");
      EXPECT_EQ(array.dtype, dtype);
      EXPECT_EQ(array.shape, shape);
      EXPECT_EQ(array.numel(), numel);
      EXPECT_EQ(array.data, data);
    }
  }
}

TEST(NpyTest, WriteThenReadFile) {
  TempDir dir;
  const std::string path = (dir.path() / "x.npy").string();
  const std::vector<double> values = {1.5, -2.25, 3e300, 0.0, -0.0, 1e-300};
  const std::vector<std::int64_t> shape = {3, 2};
  write_npy(path, DType::kF64, shape, values.data());
  const NpyArray array = read_npy(path);
  EXPECT_EQ(array.dtype, DType::kF64);
  EXPECT_EQ(array.shape, shape);
  EXPECT_EQ(values_of<double>(array), values);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"x.npy"});  // no temporary left
}

// Our writer produces exactly NumPy's bytes (same header text and padding).
TEST(NpyTest, SerializeMatchesNumpyBytes) {
  for (const char* name : {"f4_2x3_v1.npy", "f2_4_v1.npy", "f4_scalar_v1.npy",
                           "q_1x7x2x8.npy", "k_1x7x1x8.npy"}) {
    SCOPED_TRACE(name);
    const std::vector<std::byte> expected = file_bytes(fixture(name));
    ASSERT_FALSE(expected.empty());
    const NpyArray array = parse_npy(expected, name);
    EXPECT_EQ(serialize_npy(array.dtype, array.shape, array.data.data()), expected);
  }
}

TEST(NpyTest, SerializeRejectsBfloat16AndBadShapes) {
  const float data[4] = {};
  const std::int64_t shape[] = {4};
  EXPECT_TRUE(throws_error([&] { serialize_npy(DType::kBF16, shape, data); },
                           ErrorCode::kInvalidArgument, ".npy has no bfloat16"));
  const std::int64_t negative[] = {2, -1};
  EXPECT_TRUE(throws_error([&] { serialize_npy(DType::kF32, negative, data); },
                           ErrorCode::kInvalidArgument, "negative dimension"));
  const std::int64_t huge[] = {std::int64_t{1} << 62, 4};
  EXPECT_TRUE(throws_error([&] { serialize_npy(DType::kF32, huge, data); },
                           ErrorCode::kInvalidArgument, "overflows"));
  EXPECT_TRUE(throws_error([&] { serialize_npy(DType::kF32, shape, nullptr); },
                           ErrorCode::kInvalidArgument, "data: null pointer"));
}

// ------------------------------------------------------- files NumPy wrote

TEST(NpyTest, ReadsNumpyVersion1Float32) {
  const NpyArray array = read_npy(fixture("f4_2x3_v1.npy").string());
  EXPECT_EQ(array.dtype, DType::kF32);
  EXPECT_EQ(array.shape, (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ(values_of<float>(array), (std::vector<float>{-1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 1.5f}));
}

TEST(NpyTest, ReadsNumpyVersion1Float16) {
  const NpyArray array = read_npy(fixture("f2_4_v1.npy").string());
  EXPECT_EQ(array.dtype, DType::kF16);
  EXPECT_EQ(array.shape, (std::vector<std::int64_t>{4}));
  // 1, -2, 0.5, 65504 as IEEE half-precision bit patterns.
  EXPECT_EQ(values_of<std::uint16_t>(array),
            (std::vector<std::uint16_t>{0x3C00, 0xC000, 0x3800, 0x7BFF}));
}

TEST(NpyTest, ReadsNumpyVersion2Float64) {
  const NpyArray array = read_npy(fixture("f8_2x2x2_v2.npy").string());
  EXPECT_EQ(array.dtype, DType::kF64);
  EXPECT_EQ(array.shape, (std::vector<std::int64_t>{2, 2, 2}));
  std::vector<double> expected;
  for (int i = 0; i < 8; ++i) expected.push_back(i / 8.0 + 0.1);  // NumPy's arange(8) / 8 + 0.1
  EXPECT_EQ(values_of<double>(array), expected);
}

TEST(NpyTest, ReadsNumpyVersion3) {
  const NpyArray array = read_npy(fixture("f4_3_v3.npy").string());
  EXPECT_EQ(array.dtype, DType::kF32);
  EXPECT_EQ(array.shape, (std::vector<std::int64_t>{3}));
  EXPECT_EQ(values_of<float>(array), (std::vector<float>{3.25f, -7.5f, 1e-3f}));
}

TEST(NpyTest, ReadsNumpyScalar) {
  const NpyArray array = read_npy(fixture("f4_scalar_v1.npy").string());
  EXPECT_TRUE(array.shape.empty());
  EXPECT_EQ(array.numel(), 1);
  EXPECT_EQ(values_of<float>(array), std::vector<float>{2.5f});
}

TEST(NpyTest, ReadsAttentionExample) {
  const NpyArray q = read_npy(fixture("q_1x7x2x8.npy").string());
  const NpyArray k = read_npy(fixture("k_1x7x1x8.npy").string());
  const NpyArray v = read_npy(fixture("v_1x7x1x8.npy").string());
  EXPECT_EQ(q.shape, (std::vector<std::int64_t>{1, 7, 2, 8}));
  EXPECT_EQ(k.shape, (std::vector<std::int64_t>{1, 7, 1, 8}));
  EXPECT_EQ(v.shape, (std::vector<std::int64_t>{1, 7, 1, 8}));
  // Spot values printed by NumPy (shortest float32 round-trip spelling).
  const std::vector<float> q_values = values_of<float>(q);
  ASSERT_EQ(q_values.size(), 112u);
  EXPECT_EQ(q_values[0], -0.08552002f);
  EXPECT_EQ(q_values[1], -0.42878574f);
  EXPECT_EQ(q_values[111], 0.70757f);
  EXPECT_EQ(values_of<float>(k)[0], -0.06835786f);
  EXPECT_EQ(values_of<float>(v)[0], 1.0447209f);
}

// --------------------------------------------------------------- views

TEST(NpyTest, ViewIsContiguous) {
  const NpyArray q = read_npy(fixture("q_1x7x2x8.npy").string());
  const TensorView view = q.view("Q");
  EXPECT_EQ(view.data, q.data.data());
  EXPECT_EQ(view.dtype, DType::kF32);
  EXPECT_EQ(view.rank, 4);
  EXPECT_EQ(view.dim(0), 1);
  EXPECT_EQ(view.dim(1), 7);
  EXPECT_EQ(view.dim(2), 2);
  EXPECT_EQ(view.dim(3), 8);
  EXPECT_EQ(view.stride(0), 112);
  EXPECT_EQ(view.stride(1), 16);
  EXPECT_EQ(view.stride(2), 8);
  EXPECT_EQ(view.stride(3), 1);
}

TEST(NpyTest, ViewRejectsRanksOutside1To4AndMismatchedData) {
  const NpyArray scalar = read_npy(fixture("f4_scalar_v1.npy").string());
  EXPECT_TRUE(throws_error([&] { scalar.view("Q"); }, ErrorCode::kInvalidArgument,
                           "Q: expected 1 to 4 dimensions, got 0"));
  NpyArray rank5;
  rank5.shape = {1, 1, 1, 1, 2};
  rank5.data.resize(8);
  EXPECT_TRUE(throws_error([&] { rank5.view("K"); }, ErrorCode::kInvalidArgument,
                           "K: expected 1 to 4 dimensions, got 5"));
  NpyArray short_data;
  short_data.shape = {2, 3};
  short_data.data.resize(20);
  EXPECT_TRUE(throws_error([&] { short_data.view("V"); }, ErrorCode::kInvalidArgument,
                           "V: shape (2, 3)"));
}

// -------------------------------------------------- what the parser accepts

TEST(NpyTest, ParsesHeaderVariants) {
  struct Case {
    const char* header;
    std::vector<std::int64_t> shape;
  };
  const Case cases[] = {
      {"{'shape': (2, 3), 'fortran_order': False, 'descr': '<f4'}", {2, 3}},
      {"{ 'descr' : '<f4' ,\t'fortran_order':False,'shape':(2,3) , }  ", {2, 3}},
      {"{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (6,)}", {6}},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': ( 6 , ), }", {6}},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (), }", {}},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (3L, 2L), }", {3, 2}},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 6, 1, 1), }", {1, 1, 6, 1, 1}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.header);
    std::int64_t numel = 1;
    for (std::int64_t extent : c.shape) numel *= extent;
    const NpyArray array =
        parse_npy(handmade_npy(c.header, static_cast<std::size_t>(numel) * 4), "h.npy");
    EXPECT_EQ(array.dtype, DType::kF32);
    EXPECT_EQ(array.shape, c.shape);
  }
}

// ------------------------------------------------------ malformed files

TEST(NpyTest, RejectsBadMagic) {
  std::vector<std::byte> file = handmade_npy(dict("<f4", "False", "(2,)"), 8);
  file[5] = std::byte{'Z'};
  EXPECT_TRUE(throws_error([&] { parse_npy(file, "Q.npy"); }, ErrorCode::kFormat,
                           "Q.npy: not a .npy file: bad magic string"));
  EXPECT_TRUE(throws_error([&] { parse_npy(to_bytes("PK\x03\x04"), "Q.npy"); },
                           ErrorCode::kFormat, "bad magic string"));
}

TEST(NpyTest, RejectsUnknownVersion) {
  std::vector<std::byte> file = handmade_npy(dict("<f4", "False", "(2,)"), 8);
  file[6] = std::byte{4};
  EXPECT_TRUE(throws_error([&] { parse_npy(file, "Q.npy"); }, ErrorCode::kFormat,
                           "unsupported .npy format version 4.0 (expected 1.0, 2.0 or 3.0)"));
  file[6] = std::byte{1};
  file[7] = std::byte{1};
  EXPECT_TRUE(throws_error([&] { parse_npy(file, "Q.npy"); }, ErrorCode::kFormat,
                           "version 1.1"));
}

TEST(NpyTest, RejectsFortranOrder) {
  EXPECT_TRUE(throws_error(
      [&] { parse_npy(handmade_npy(dict("<f4", "True", "(2, 3)"), 24), "Q.npy"); },
      ErrorCode::kFormat, "Q.npy: Fortran-order arrays are not supported"));
}

TEST(NpyTest, RejectsBigEndian) {
  EXPECT_TRUE(throws_error(
      [&] { parse_npy(handmade_npy(dict(">f4", "False", "(2,)"), 8), "Q.npy"); },
      ErrorCode::kFormat, "Q.npy: big-endian dtype '>f4' is not supported"));
  EXPECT_TRUE(throws_error(
      [&] { parse_npy(handmade_npy(dict(">f8", "False", "(2,)"), 16), "Q.npy"); },
      ErrorCode::kFormat, "expected little-endian '<f4', '<f2' or '<f8'"));
}

TEST(NpyTest, RejectsOtherDtypes) {
  for (const char* descr : {"<i4", "<f16", "|u1", "|f4", "<c8", "<U4", "|b1", "O"}) {
    SCOPED_TRACE(descr);
    EXPECT_TRUE(throws_error(
        [&] { parse_npy(handmade_npy(dict(descr, "False", "(2,)"), 8), "Q.npy"); },
        ErrorCode::kFormat,
        "Q.npy: unsupported dtype '" + std::string(descr) +
            "' (expected '<f4', '<f2' or '<f8')"));
  }
  EXPECT_TRUE(throws_error(
      [&] {
        parse_npy(handmade_npy("{'descr': [('a', '<f4')], 'fortran_order': False, "
                               "'shape': (2,), }",
                               8),
                  "Q.npy");
      },
      ErrorCode::kFormat, "structured dtypes are not supported"));
}

TEST(NpyTest, RejectsHeaderLengthBeyondFile) {
  std::vector<std::byte> file = handmade_npy(dict("<f4", "False", "(2,)"), 8);
  file[8] = std::byte{0xff};
  file[9] = std::byte{0xff};  // 65535 header bytes claimed, ~70 present
  EXPECT_TRUE(throws_error([&] { parse_npy(file, "Q.npy"); }, ErrorCode::kFormat,
                           "header length 65535 runs past the end of the file"));
  // Version 2.0 can claim up to 4 GiB: refused before looking at the file size.
  std::vector<std::byte> v2 = handmade_npy(dict("<f4", "False", "(2,)"), 8, 2);
  v2[8] = v2[9] = v2[10] = std::byte{0xff};
  v2[11] = std::byte{0x7f};
  EXPECT_TRUE(throws_error([&] { parse_npy(v2, "Q.npy"); }, ErrorCode::kFormat,
                           "header length 2147483647 is absurd"));
}

TEST(NpyTest, RejectsTruncatedData) {
  EXPECT_TRUE(throws_error(
      [&] { parse_npy(handmade_npy(dict("<f4", "False", "(2, 3)"), 20), "Q.npy"); },
      ErrorCode::kFormat,
      "Q.npy: data is truncated: shape (2, 3) of '<f4' needs 24 bytes but the file holds 20"));
  // A NumPy file cut short by one byte.
  std::vector<std::byte> file = file_bytes(fixture("f8_2x2x2_v2.npy"));
  file.pop_back();
  EXPECT_TRUE(throws_error([&] { parse_npy(file, "Q.npy"); }, ErrorCode::kFormat,
                           "data is truncated"));
}

TEST(NpyTest, RejectsTrailingData) {
  EXPECT_TRUE(throws_error(
      [&] { parse_npy(handmade_npy(dict("<f4", "False", "(2, 3)"), 28), "Q.npy"); },
      ErrorCode::kFormat, "Q.npy: file has 4 bytes of trailing data after the array"));
}

TEST(NpyTest, RejectsOverflowingShape) {
  // 2^62 * 4 elements: the element count alone overflows int64.
  EXPECT_TRUE(throws_error(
      [&] {
        parse_npy(handmade_npy(dict("<f4", "False", "(4611686018427387904, 4)"), 0), "Q.npy");
      },
      ErrorCode::kFormat, "shape (4611686018427387904, 4) of '<f4' overflows"));
  // 2^61 elements fit, their 2^64 bytes do not.
  EXPECT_TRUE(throws_error(
      [&] {
        parse_npy(handmade_npy(dict("<f8", "False", "(2305843009213693952,)"), 0), "Q.npy");
      },
      ErrorCode::kFormat, "overflows"));
  // No elements, but strides over the other extents would still overflow.
  EXPECT_TRUE(throws_error(
      [&] {
        parse_npy(handmade_npy(dict("<f4", "False", "(0, 4611686018427387904, 4)"), 0),
                  "Q.npy");
      },
      ErrorCode::kFormat, "overflows"));
  // Not even an int64.
  EXPECT_TRUE(throws_error(
      [&] {
        parse_npy(handmade_npy(dict("<f4", "False", "(99999999999999999999,)"), 0), "Q.npy");
      },
      ErrorCode::kFormat, "does not fit in a 64-bit integer"));
}

TEST(NpyTest, RejectsNegativeDimension) {
  EXPECT_TRUE(throws_error(
      [&] { parse_npy(handmade_npy(dict("<f4", "False", "(2, -3)"), 0), "Q.npy"); },
      ErrorCode::kFormat, "Q.npy: shape has a negative dimension"));
}

TEST(NpyTest, RejectsGarbageHeaders) {
  const char* headers[] = {
      "hello",
      "",
      "{",
      "{'descr': '<f4'",
      "{'descr' '<f4', 'fortran_order': False, 'shape': (2,), }",
      "{'descr': <f4, 'fortran_order': False, 'shape': (2,), }",
      "{'descr': '<f4, 'fortran_order': False, 'shape': (2,), }",
      "{'descr': '<f4' 'fortran_order': False, 'shape': (2,), }",
      "{'descr': '<f4', 'fortran_order': false, 'shape': (2,), }",
      "{'descr': '<f4', 'fortran_order': Falsey, 'shape': (2,), }",
      "{'descr': '<f4', 'fortran_order': False, 'shape': [2], }",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2), }",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2 3), }",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2,,), }",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2.0,), }",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), } extra",
      "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'extra': 1, }",
      "{'descr': '<\\x66\\x34', 'fortran_order': False, 'shape': (2,), }",
      "[1, 2]",
      "\x01\x02\xff",
  };
  for (const char* header : headers) {
    SCOPED_TRACE(header);
    EXPECT_TRUE(throws_error([&] { parse_npy(handmade_npy(header, 8), "Q.npy"); },
                             ErrorCode::kFormat, "Q.npy: malformed .npy header"));
  }
}

TEST(NpyTest, RejectsMissingKey) {
  EXPECT_TRUE(throws_error(
      [&] { parse_npy(handmade_npy("{'descr': '<f4', 'fortran_order': False}", 4), "Q.npy"); },
      ErrorCode::kFormat,
      "Q.npy: header has no 'shape' key (expected 'descr', 'fortran_order' and 'shape')"));
  EXPECT_TRUE(throws_error(
      [&] { parse_npy(handmade_npy("{'fortran_order': False, 'shape': (1,)}", 4), "Q.npy"); },
      ErrorCode::kFormat, "header has no 'descr' key"));
  EXPECT_TRUE(throws_error(
      [&] { parse_npy(handmade_npy("{}", 4), "Q.npy"); }, ErrorCode::kFormat,
      "header has no 'descr' key"));
}

TEST(NpyTest, RejectsEmptyAndShortFiles) {
  EXPECT_TRUE(throws_error([&] { parse_npy({}, "Q.npy"); }, ErrorCode::kFormat,
                           "Q.npy: file is empty"));
  EXPECT_TRUE(throws_error([&] { parse_npy(to_bytes("\x93NUMPY\x01"), "Q.npy"); },
                           ErrorCode::kFormat, "file ends inside the .npy preamble"));
  EXPECT_TRUE(throws_error([&] { parse_npy(to_bytes(std::string("\x93NUMPY\x02\x00\x10", 9)),
                                           "Q.npy"); },
                           ErrorCode::kFormat, "file ends inside the .npy preamble"));
  TempDir dir;
  const std::string path = (dir.path() / "empty.npy").string();
  std::ofstream(path).close();
  EXPECT_TRUE(throws_error([&] { read_npy(path); }, ErrorCode::kFormat, path + ": file is empty"));
}

TEST(NpyTest, RejectsNonexistentPathAndDirectory) {
  TempDir dir;
  const std::string missing = (dir.path() / "missing.npy").string();
  EXPECT_TRUE(throws_error([&] { read_npy(missing); }, ErrorCode::kIo,
                           missing + ": cannot open for reading"));
  EXPECT_TRUE(throws_error([&] { read_npy(dir.path().string()); }, ErrorCode::kIo,
                           "not a regular file"));
}

// ---------------------------------------------------------- atomic writes

TEST(NpyTest, WriteIntoMissingDirectoryThrowsAndLeavesNothing) {
  TempDir dir;
  const fs::path missing_dir = dir.path() / "no_such_dir";
  const std::string path = (missing_dir / "out.npy").string();
  const float data[2] = {1.0f, 2.0f};
  const std::int64_t shape[] = {2};
  EXPECT_TRUE(throws_error([&] { write_npy(path, DType::kF32, shape, data); }, ErrorCode::kIo,
                           path));
  EXPECT_FALSE(fs::exists(missing_dir));
  EXPECT_TRUE(dir.entries().empty());
}

TEST(NpyTest, OverwriteReplacesTheWholeFile) {
  TempDir dir;
  const std::string path = (dir.path() / "out.npy").string();
  std::vector<float> big(10000, 7.0f);
  const std::int64_t big_shape[] = {100, 100};
  write_npy(path, DType::kF32, big_shape, big.data());
  const auto big_size = fs::file_size(path);

  const float small[3] = {1.0f, 2.0f, 3.0f};
  const std::int64_t small_shape[] = {3};
  write_npy(path, DType::kF32, small_shape, small);
  EXPECT_LT(fs::file_size(path), big_size);
  const NpyArray array = read_npy(path);  // would report trailing data if not replaced
  EXPECT_EQ(array.shape, (std::vector<std::int64_t>{3}));
  EXPECT_EQ(values_of<float>(array), (std::vector<float>{1.0f, 2.0f, 3.0f}));
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"out.npy"});
}

TEST(NpyTest, FailedRenameRemovesTheTemporary) {
  TempDir dir;
  // A non-empty directory cannot be replaced by a file: the rename fails after
  // the temporary has been fully written.
  const fs::path target = dir.path() / "target";
  fs::create_directory(target);
  std::ofstream(target / "keep").put('x');
  const std::byte bytes[4] = {};
  EXPECT_TRUE(throws_error([&] { write_output(target.string(), bytes); },
                           ErrorCode::kIo, target.string() + ": cannot rename"));
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"target"});
  EXPECT_TRUE(fs::is_directory(target));
}

TEST(NpyTest, NewFileGetsOrdinaryPermissions) {
  TempDir dir;
  const std::string path = (dir.path() / "perm.npy").string();
  const std::byte bytes[1] = {};
  write_output(path, bytes);
  // mkstemp's 0600 would hide the file from the group; a plain open() would
  // not. Owner read/write at least, and the same as a file made by ofstream.
  const std::string reference = (dir.path() / "reference").string();
  std::ofstream(reference).put('x');
  EXPECT_EQ(fs::status(path).permissions(), fs::status(reference).permissions());
}

// ---------------------------------------------------------- output paths
// (lookback/output_file.hpp; the CLI's side is tests/cli/test_outputs.py)

TEST(OutputPathTest, ASymlinkStaysALinkAndItsTargetIsReplaced) {
  TempDir dir;
  fs::create_directory(dir.path() / "sub");
  const fs::path target = dir.path() / "sub" / "target";
  std::ofstream(target) << "previous contents";
  const fs::path link = dir.path() / "link";
  fs::create_symlink("sub/target", link);
  write_output(link.string(), to_bytes("new"));
  EXPECT_TRUE(fs::is_symlink(link));
  EXPECT_EQ(file_bytes(target), to_bytes("new"));
  std::vector<std::string> names = dir.entries();  // no temporary left beside either
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"link", "sub"}));
  EXPECT_EQ(fs::directory_iterator(dir.path() / "sub")->path().filename(), "target");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path() / "sub"), fs::directory_iterator()), 1);
}

TEST(OutputPathTest, AFifoIsWrittenInPlace) {
  TempDir dir;
  const fs::path fifo = dir.path() / "fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  std::vector<std::byte> got;
  std::thread reader([&] { got = file_bytes(fifo); });
  write_output(fifo.string(), to_bytes("through the pipe"));
  reader.join();
  EXPECT_EQ(got, to_bytes("through the pipe"));
  EXPECT_TRUE(fs::is_fifo(fifo));
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"fifo"});
}

TEST(OutputPathTest, AnEmptyPathIsAnInvalidArgument) {
  const float data[1] = {1.0f};
  const std::int64_t shape[] = {1};
  EXPECT_TRUE(throws_error([&] { write_npy("", DType::kF32, shape, data); },
                           ErrorCode::kInvalidArgument, "output path: empty"));
}

TEST(OutputPathTest, AFifoInputIsRefusedWithoutWaitingForAWriter) {
  TempDir dir;
  const fs::path fifo = dir.path() / "fifo.npy";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  // open() of a FIFO with no writer blocks: this would hang without the check.
  EXPECT_TRUE(throws_error([&] { read_npy(fifo.string()); }, ErrorCode::kIo,
                           "not a regular file (expected a .npy file)"));
}

}  // namespace
}  // namespace lookback
