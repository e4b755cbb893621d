// Non-owning tensor views: a pointer, an element type, a shape and element
// strides (any order, so transposed or sliced tensors need no copy).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "lookback/dtype.hpp"

namespace lookback {

inline constexpr int kMaxRank = 4;

template <typename Pointer>
struct BasicTensorView {
  Pointer data = nullptr;
  DType dtype = DType::kF32;
  int rank = 0;
  std::array<std::int64_t, kMaxRank> shape{};    // extent of each dimension
  std::array<std::int64_t, kMaxRank> strides{};  // in elements, not bytes

  bool empty() const noexcept { return data == nullptr; }
  std::int64_t dim(int axis) const noexcept { return shape[axis]; }
  std::int64_t stride(int axis) const noexcept { return strides[axis]; }
  std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (int a = 0; a < rank; ++a) n *= shape[a];
    return n;
  }
  // Element offset of a multi-index (no bounds check).
  std::int64_t offset(std::int64_t i0, std::int64_t i1 = 0, std::int64_t i2 = 0,
                      std::int64_t i3 = 0) const noexcept {
    return i0 * strides[0] + i1 * strides[1] + i2 * strides[2] + i3 * strides[3];
  }
};

// Elements [begin, begin + count) of `axis`, over the same memory (no
// bounds check: callers pass a range inside the view).
template <typename Pointer>
BasicTensorView<Pointer> slice(BasicTensorView<Pointer> view, int axis, std::int64_t begin,
                               std::int64_t count) noexcept {
  using Byte = std::conditional_t<std::is_const_v<std::remove_pointer_t<Pointer>>, const std::byte,
                                  std::byte>;
  if (view.data != nullptr) {
    view.data = static_cast<Byte*>(view.data) +
                begin * view.strides[axis] * static_cast<std::int64_t>(dtype_size(view.dtype));
  }
  view.shape[axis] = count;
  return view;
}

// Index `index` of `axis`, that axis dropped (rank - 1), over the same memory.
template <typename Pointer>
BasicTensorView<Pointer> select(BasicTensorView<Pointer> view, int axis,
                                std::int64_t index) noexcept {
  view = slice(view, axis, index, 1);
  for (int a = axis; a + 1 < kMaxRank; ++a) {
    view.shape[a] = view.shape[a + 1];
    view.strides[a] = view.strides[a + 1];
  }
  view.shape[kMaxRank - 1] = 0;
  view.strides[kMaxRank - 1] = 0;
  --view.rank;
  return view;
}

// The axes reordered: axis a of the result is axis order[a] of `view` (a
// transpose needs no copy).
template <typename Pointer>
BasicTensorView<Pointer> permute(BasicTensorView<Pointer> view,
                                 const std::array<int, kMaxRank>& order) noexcept {
  BasicTensorView<Pointer> result = view;
  for (int a = 0; a < view.rank; ++a) {
    result.shape[a] = view.shape[order[a]];
    result.strides[a] = view.strides[order[a]];
  }
  return result;
}

using TensorView = BasicTensorView<const void*>;   // read-only input
using MutableTensorView = BasicTensorView<void*>;  // output

// Row-major (C order) strides for a shape.
std::array<std::int64_t, kMaxRank> contiguous_strides(
    const std::array<std::int64_t, kMaxRank>& shape, int rank) noexcept;

// Builds a contiguous view; throws lookback::Error naming `argument` when a
// dimension is negative, the rank is outside 1..4 or the byte count overflows.
TensorView make_view(const void* data, DType dtype,
                     std::initializer_list<std::int64_t> shape,
                     std::string_view argument = "tensor");
MutableTensorView make_mutable_view(void* data, DType dtype,
                                    std::initializer_list<std::int64_t> shape,
                                    std::string_view argument = "tensor");

// Checks a view: non-null data, the expected rank, non-negative extents,
// strides that keep every element addressable without int64 overflow.
// Throws lookback::Error whose message starts with `argument`.
template <typename Pointer>
void validate_view(const BasicTensorView<Pointer>& view, int expected_rank,
                   std::string_view argument);
// The same checks but the data pointer's: for a view that describes a tensor
// before its data is read (e.g. from a file header), whose data may be null.
template <typename Pointer>
void validate_view_layout(const BasicTensorView<Pointer>& view, int expected_rank,
                          std::string_view argument);

// "(2, 7, 4, 64)"
template <typename Pointer>
std::string shape_string(const BasicTensorView<Pointer>& view);

}  // namespace lookback
