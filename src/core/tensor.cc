#include "lookback/tensor.hpp"

#include <fmt/format.h>

#include <cstdint>
#include <cstdlib>

#include "lookback/error.hpp"

namespace lookback {

std::array<std::int64_t, kMaxRank> contiguous_strides(
    const std::array<std::int64_t, kMaxRank>& shape, int rank) noexcept {
  std::array<std::int64_t, kMaxRank> strides{};
  std::int64_t stride = 1;
  for (int axis = rank - 1; axis >= 0; --axis) {
    strides[axis] = stride;
    // Saturate instead of overflowing: validate_view rejects such shapes.
    if (__builtin_mul_overflow(stride, shape[axis], &stride)) stride = INT64_MAX;
  }
  return strides;
}

template <typename Pointer>
std::string shape_string(const BasicTensorView<Pointer>& view) {
  std::string text = "(";
  for (int axis = 0; axis < view.rank; ++axis) {
    if (axis > 0) text += ", ";
    text += std::to_string(view.shape[axis]);
  }
  if (view.rank == 1) text += ",";
  return text + ")";
}

template <typename Pointer>
void validate_view_layout(const BasicTensorView<Pointer>& view, int expected_rank,
                          std::string_view argument) {
  if (view.rank != expected_rank) {
    throw Error(fmt::format("{}: expected {} dimension{}, got {} {}", argument, expected_rank,
                            expected_rank == 1 ? "" : "s", view.rank, shape_string(view)));
  }
  std::int64_t numel = 1;
  std::int64_t max_offset = 0;
  for (int axis = 0; axis < view.rank; ++axis) {
    const std::int64_t extent = view.shape[axis];
    if (extent < 0) {
      throw Error(fmt::format("{}: dimension {} is {} (expected >= 0)", argument,
                              axis, extent));
    }
    if (__builtin_mul_overflow(numel, extent, &numel)) {
      throw Error(fmt::format("{}: shape {} has more elements than fit in 64 bits",
                              argument, shape_string(view)));
    }
  }
  if (numel == 0) return;  // nothing is read; data and strides may be anything
  for (int axis = 0; axis < view.rank; ++axis) {
    std::int64_t reach;
    const std::int64_t magnitude = view.strides[axis] < 0 ? -view.strides[axis]
                                                           : view.strides[axis];
    if (__builtin_mul_overflow(view.shape[axis] - 1, magnitude, &reach) ||
        __builtin_add_overflow(max_offset, reach, &max_offset)) {
      throw Error(fmt::format("{}: strides reach beyond 64-bit offsets", argument));
    }
  }
  std::int64_t bytes;
  if (__builtin_mul_overflow(max_offset + 1, static_cast<std::int64_t>(dtype_size(view.dtype)),
                             &bytes)) {
    throw Error(fmt::format("{}: byte extent overflows 64 bits", argument));
  }
}

template <typename Pointer>
void validate_view(const BasicTensorView<Pointer>& view, int expected_rank,
                   std::string_view argument) {
  validate_view_layout(view, expected_rank, argument);
  // numel cannot overflow here: validate_view_layout checked it.
  if (view.numel() != 0 && view.data == nullptr) {
    throw Error(fmt::format("{}: data is null (expected a pointer to {} elements)",
                            argument, view.numel()));
  }
}

template std::string shape_string(const TensorView&);
template std::string shape_string(const MutableTensorView&);
template void validate_view(const TensorView&, int, std::string_view);
template void validate_view(const MutableTensorView&, int, std::string_view);
template void validate_view_layout(const TensorView&, int, std::string_view);
template void validate_view_layout(const MutableTensorView&, int, std::string_view);

namespace {

template <typename Pointer>
BasicTensorView<Pointer> make(Pointer data, DType dtype,
                              std::initializer_list<std::int64_t> shape,
                              std::string_view argument) {
  if (shape.size() < 1 || shape.size() > static_cast<std::size_t>(kMaxRank)) {
    throw Error(fmt::format("{}: expected 1 to {} dimensions, got {}", argument,
                            kMaxRank, shape.size()));
  }
  BasicTensorView<Pointer> view;
  view.data = data;
  view.dtype = dtype;
  view.rank = static_cast<int>(shape.size());
  int axis = 0;
  for (std::int64_t extent : shape) view.shape[axis++] = extent;
  view.strides = contiguous_strides(view.shape, view.rank);
  validate_view(view, view.rank, argument);
  return view;
}

}  // namespace

TensorView make_view(const void* data, DType dtype,
                     std::initializer_list<std::int64_t> shape,
                     std::string_view argument) {
  return make<const void*>(data, dtype, shape, argument);
}

MutableTensorView make_mutable_view(void* data, DType dtype,
                                    std::initializer_list<std::int64_t> shape,
                                    std::string_view argument) {
  return make<void*>(data, dtype, shape, argument);
}

}  // namespace lookback
