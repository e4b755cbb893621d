// One description of a scratch buffer (FlashInfer's counting allocator,
// llm.c's size table): a layout lists named regions once, each aligned to 64
// bytes (a cache line, an AVX-512 vector); the same layout gives the byte
// count to reserve and, over the reserved base, each region's pointer. A
// new buffer is one add() in one place, and no slack is kept by hand.
#pragma once

#include <cstddef>

namespace lookback::kernels {

inline constexpr std::size_t kScratchAlign = 64;

constexpr std::size_t align_scratch(std::size_t bytes) {
  return (bytes + kScratchAlign - 1) / kScratchAlign * kScratchAlign;
}

// `count` elements of T at `offset` bytes from the base of a scratch buffer.
template <typename T>
struct ScratchRegion {
  std::size_t offset = 0;
  std::size_t count = 0;
  T* in(void* base) const noexcept {
    return reinterpret_cast<T*>(static_cast<std::byte*>(base) + offset);
  }
};

class ScratchLayout {
 public:
  // A region of `count` elements of T, 64-byte aligned; count 0 is an empty
  // region that takes no space.
  template <typename T>
  ScratchRegion<T> add(std::size_t count) noexcept {
    const ScratchRegion<T> region{bytes_, count};
    bytes_ += align_scratch(count * sizeof(T));
    return region;
  }
  // Bytes to reserve (64-byte aligned) for every region added so far.
  std::size_t bytes() const noexcept { return bytes_; }

 private:
  std::size_t bytes_ = 0;
};

}  // namespace lookback::kernels
