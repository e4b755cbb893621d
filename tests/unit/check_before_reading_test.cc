// Checking inputs before reading their data: read_npy_header reads only a
// .npy header (checked against the file's size, as read_npy checks it), and
// validate_shapes checks attention params whose views have no data yet, so a
// mismatched k next to a 4 GiB q fails before q is read.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "lookback/attention.hpp"
#include "lookback/error.hpp"
#include "lookback/modes.hpp"
#include "lookback/npy.hpp"
#include "testing/testing.hpp"

namespace lookback {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;
using testing::throws_error;

// A .npy file of `shape` (f32) whose data is a hole: `data_bytes` (the size
// the shape needs, unless told otherwise) cost no disk and are never read.
fs::path sparse_npy(const TempDir& dir, const std::string& name,
                    const std::vector<std::int64_t>& shape, std::int64_t data_bytes = -1) {
  const float one = 1.0f;
  const fs::path path = dir.path() / name;
  write_npy(path.string(), DType::kF32, std::vector<std::int64_t>(shape.size(), 1), &one);
  std::int64_t needed = 4;
  for (std::int64_t extent : shape) needed *= extent;
  // Same header length: write_npy pads the header for 21 digits of shape[0].
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    header += (i ? ", " : "") + std::to_string(shape[i]);
  }
  header += shape.size() == 1 ? ",), }" : "), }";
  std::fstream file(path, std::ios::in | std::ios::out | std::ios::binary);
  file.seekp(10);
  file.write(header.data(), static_cast<std::streamsize>(header.size()));
  file.close();
  const auto header_end = static_cast<std::int64_t>(fs::file_size(path)) - 4;
  fs::resize_file(path, static_cast<std::uintmax_t>(header_end + (data_bytes < 0 ? needed
                                                                                  : data_bytes)));
  return path;
}

TEST(NpyHeaderTest, ReadsTheShapeOfAHugeFileWithoutReadingIt) {
  const TempDir dir;
  const std::vector<std::int64_t> shape{1, std::int64_t{1} << 24, 4, 16};  // 4 GiB
  const NpyHeader header = read_npy_header(sparse_npy(dir, "q.npy", shape).string());
  EXPECT_EQ(header.dtype, DType::kF32);
  EXPECT_EQ(header.shape, shape);
  EXPECT_EQ(header.numel(), std::int64_t{1} << 30);
  const TensorView view = header.view("q");
  EXPECT_EQ(view.data, nullptr);
  EXPECT_EQ(view.rank, 4);
  EXPECT_EQ(view.shape[1], std::int64_t{1} << 24);
  EXPECT_EQ(view.strides[0], std::int64_t{1} << 30);
}

TEST(NpyHeaderTest, AgreesWithReadNpy) {
  const TempDir dir;
  const std::vector<double> values{1, 2, 3, 4, 5, 6};
  const std::string path = (dir.path() / "a.npy").string();
  write_npy(path, DType::kF64, std::vector<std::int64_t>{2, 3}, values.data());
  const NpyHeader header = read_npy_header(path);
  const NpyArray array = read_npy(path);
  EXPECT_EQ(header.dtype, array.dtype);
  EXPECT_EQ(header.shape, array.shape);
}

// load_npy and map_npy (what lookback cache and attend read with) give
// read_npy's array and refuse what it refuses, with the same messages.
TEST(LoadNpyTest, AgreesWithReadNpy) {
  const TempDir dir;
  std::vector<float> values(3 * 1024 * 1024 / 4 + 5);  // past 2 MiB: the huge-page advice
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i) * 0.5f - 7.0f;
  const std::string path = (dir.path() / "a.npy").string();
  const std::vector<std::int64_t> shape{static_cast<std::int64_t>(values.size())};
  write_npy(path, DType::kF32, shape, values.data());
  const NpyArray array = read_npy(path);
  const LoadedNpy loaded = load_npy(path);
  EXPECT_EQ(loaded.dtype, array.dtype);
  EXPECT_EQ(loaded.shape, array.shape);
  EXPECT_EQ(loaded.numel(), array.numel());
  ASSERT_EQ(loaded.data.size(), array.data.size());
  EXPECT_EQ(std::memcmp(loaded.data.data(), array.data.data(), array.data.size()), 0);
  EXPECT_EQ(loaded.view("a").data, loaded.data.data());
  // map_npy: the same bytes, from the file itself.
  const LoadedNpy mapped = map_npy(path);
  EXPECT_EQ(mapped.dtype, array.dtype);
  EXPECT_EQ(mapped.shape, array.shape);
  ASSERT_EQ(mapped.data.size(), array.data.size());
  EXPECT_EQ(std::memcmp(mapped.data.data(), array.data.data(), array.data.size()), 0);

  const std::vector<std::int64_t> small{2, 3};
  const std::string short_file = sparse_npy(dir, "short.npy", small, 20).string();
  const std::string long_file = sparse_npy(dir, "long.npy", small, 28).string();
  EXPECT_TRUE(throws_error([&] { load_npy(short_file); }, ErrorCode::kFormat, "truncated"));
  EXPECT_TRUE(throws_error([&] { load_npy(long_file); }, ErrorCode::kFormat, "trailing"));
  EXPECT_TRUE(throws_error([&] { map_npy(short_file); }, ErrorCode::kFormat, "truncated"));
  EXPECT_TRUE(throws_error([&] { map_npy(long_file); }, ErrorCode::kFormat, "trailing"));
  EXPECT_TRUE(throws_error([&] { map_npy(dir.path().string()); }, ErrorCode::kIo,
                           "not a regular file"));
  EXPECT_TRUE(throws_error([&] { load_npy((dir.path() / "missing.npy").string()); },
                           ErrorCode::kIo, "missing.npy"));
  EXPECT_TRUE(throws_error([&] { load_npy(dir.path().string()); }, ErrorCode::kIo,
                           "not a regular file"));
  // An empty array holds no memory.
  const std::string empty = (dir.path() / "empty_array.npy").string();
  const std::vector<std::int64_t> no_rows{0, 4};
  write_npy(empty, DType::kF32, no_rows, nullptr);
  EXPECT_EQ(load_npy(empty).data.size(), 0u);
  EXPECT_EQ(map_npy(empty).data.size(), 0u);
}

TEST(NpyHeaderTest, ChecksTheHeaderAgainstTheFileSize) {
  const TempDir dir;
  const std::vector<std::int64_t> shape{2, 3};
  const std::string short_file = sparse_npy(dir, "short.npy", shape, 20).string();
  const std::string long_file = sparse_npy(dir, "long.npy", shape, 28).string();
  EXPECT_TRUE(throws_error([&] { read_npy_header(short_file); }, ErrorCode::kFormat, "truncated"));
  EXPECT_TRUE(throws_error([&] { read_npy_header(long_file); }, ErrorCode::kFormat, "trailing"));
  // The same verdicts as read_npy's.
  EXPECT_TRUE(throws_error([&] { read_npy(short_file); }, ErrorCode::kFormat, "truncated"));
  EXPECT_TRUE(throws_error([&] { read_npy(long_file); }, ErrorCode::kFormat, "trailing"));
}

TEST(NpyHeaderTest, RefusesWhatReadNpyRefuses) {
  const TempDir dir;
  const fs::path empty = dir.path() / "empty.npy";
  std::ofstream(empty).close();
  const fs::path garbage = dir.path() / "garbage.npy";
  std::ofstream(garbage) << "\x93NUMPY\x01" << '\0' << "\x10" << '\0' << "{'descr': 'xx'\n\n";
  EXPECT_TRUE(throws_error([&] { read_npy_header(empty.string()); }, ErrorCode::kFormat, "empty"));
  EXPECT_TRUE(throws_error([&] { read_npy_header(garbage.string()); }, ErrorCode::kFormat,
                           "garbage.npy"));
  EXPECT_TRUE(throws_error([&] { read_npy_header((dir.path() / "missing.npy").string()); },
                           ErrorCode::kIo, "missing.npy"));
  EXPECT_TRUE(throws_error([&] { read_npy_header(dir.path().string()); }, ErrorCode::kIo,
                           "not a regular file"));
}

// q, k, v described by shape alone, as headers describe them.
AttentionParams described(std::vector<std::int64_t> q, std::vector<std::int64_t> k) {
  AttentionParams params;
  params.q = NpyHeader{.dtype = DType::kF32, .shape = q}.view("q");
  params.k = NpyHeader{.dtype = DType::kF16, .shape = k}.view("k");
  params.v = params.k;
  return params;
}

TEST(ValidateShapesTest, ChecksShapesWithoutData) {
  const AttentionShape shape = validate_shapes(described({2, 7, 8, 64}, {2, 9, 2, 64}));
  EXPECT_EQ(shape.heads, 8);
  EXPECT_EQ(shape.kv_heads, 2);
  EXPECT_EQ(shape.seqlen_k, 9);
  EXPECT_TRUE(throws_error([] { validate_shapes(described({2, 7, 8, 64}, {2, 9, 2, 32})); },
                           ErrorCode::kInvalidArgument, "k: head_dim 32"));
  EXPECT_TRUE(throws_error([] { validate_shapes(described({2, 7, 8, 64}, {2, 9, 3, 64})); },
                           ErrorCode::kInvalidArgument, "kv_heads 3"));
  AttentionParams windowed = described({1, 4, 1, 8}, {1, 4, 1, 8});
  windowed.mask = {.causal = Causal::kNone, .window_left = 2};
  EXPECT_TRUE(throws_error([&] { validate_shapes(windowed); }, ErrorCode::kInvalidArgument,
                           "window"));
}

TEST(ValidateShapesTest, ValidateStillNeedsTheData) {
  AttentionParams params = described({1, 4, 1, 8}, {1, 4, 1, 8});
  std::vector<float> out(32);
  params.out = make_mutable_view(out.data(), DType::kF32, {1, 4, 1, 8}, "out");
  EXPECT_TRUE(throws_error([&] { validate(params); }, ErrorCode::kInvalidArgument,
                           "q: data is null"));
}

TEST(ValidateShapesTest, AppliesTheModeRules) {
  AttentionParams params = described({1, 9, 1, 8}, {1, 4, 1, 8});
  EXPECT_NO_THROW(validate_shapes(params, {.mode = Mode::kPrefill}));
  EXPECT_TRUE(throws_error([&] { validate_shapes(params, {.mode = Mode::kDecode}); },
                           ErrorCode::kInvalidArgument, "seqlen_q 9 > seqlen_k 4"));
  EXPECT_TRUE(throws_error([&] { validate_shapes(params, {.mode = Mode::kSplit, .splits = 0}); },
                           ErrorCode::kInvalidArgument, "splits: 0"));
}

}  // namespace
}  // namespace lookback
