#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "lookback/error.hpp"
#include "lookback/tensor.hpp"

namespace lookback {
namespace {

std::string message_of(const std::function<void()>& body) {
  try {
    body();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(TensorView, ContiguousStridesAndOffsets) {
  std::vector<float> data(2 * 3 * 4 * 5);
  const TensorView view = make_view(data.data(), DType::kF32, {2, 3, 4, 5}, "q");
  EXPECT_EQ(view.rank, 4);
  EXPECT_EQ(view.strides[0], 60);
  EXPECT_EQ(view.strides[3], 1);
  EXPECT_EQ(view.offset(1, 2, 3, 4), 119);
  EXPECT_EQ(view.numel(), 120);
  EXPECT_EQ(shape_string(view), "(2, 3, 4, 5)");
}

TEST(TensorView, ValidationNamesTheArgument) {
  std::vector<float> data(8);
  EXPECT_NE(message_of([&] { make_view(data.data(), DType::kF32, {2, -1}, "k"); }).find("k: dimension 1 is -1"),
            std::string::npos);
  EXPECT_NE(message_of([&] { make_view(nullptr, DType::kF32, {2, 2}, "v"); }).find("v: data is null"),
            std::string::npos);
  EXPECT_NE(message_of([&] { make_view(data.data(), DType::kF32, {1LL << 40, 1LL << 40}, "q"); })
                .find("q: shape"),
            std::string::npos);
  const TensorView view = make_view(data.data(), DType::kF32, {2, 4}, "q");
  EXPECT_NE(message_of([&] { validate_view(view, 4, "q"); }).find("q: expected 4 dimensions, got 2"),
            std::string::npos);
  EXPECT_THROW(make_view(data.data(), DType::kF32, {1, 1, 1, 1, 1}, "x"), Error);
  EXPECT_NE(message_of([&] { validate_view(view, 1, "slopes"); })
                .find("slopes: expected 1 dimension, got 2"),
            std::string::npos);
}

TEST(TensorView, LayoutValidationNeedsNoData) {
  TensorView described = make_view(nullptr, DType::kF32, {0, 5}, "q");
  described.shape[0] = 3;  // (3, 5), no data: a shape read from a file header
  EXPECT_NO_THROW(validate_view_layout(described, 2, "q"));
  EXPECT_NE(message_of([&] { validate_view(described, 2, "q"); }).find("q: data is null"),
            std::string::npos);
  EXPECT_NE(message_of([&] { validate_view_layout(described, 3, "q"); })
                .find("q: expected 3 dimensions, got 2"),
            std::string::npos);
}

TEST(TensorView, EmptyTensorsNeedNoData) {
  EXPECT_NO_THROW(make_view(nullptr, DType::kF32, {0, 5}, "q"));
}

}  // namespace
}  // namespace lookback
