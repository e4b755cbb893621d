// Tile sizes of the prefill kernel, with their reasons. Measured effects are
// recorded in docs/PERFORMANCE.md.
#pragma once

#include <cstdint>

namespace lookback::kernels {

// Query rows per task. 64 rows x head_dim 128 x 4 bytes = 32 KiB of Q per
// head: big enough that each K/V tile loaded from L2 feeds 64 rows of FMAs,
// small enough that a causal sequence of 4096 splits into 64 tiles per head
// for load balancing over threads.
inline constexpr std::int64_t kQueryTile = 64;

// Keys per tile. 64 keys x head_dim 128 x 4 bytes = 32 KiB of K (and of V):
// one K tile plus the current rows of Q stay in a 48 KiB L1. It is also a
// multiple of every vector width's register block (4 x 16 floats on AVX-512),
// and the score tile of one row is 4 AVX-512 vectors.
inline constexpr std::int64_t kKeyTile = 64;

// Full key tiles the AMX path takes in one step: a 64 x 256 score block per
// softmax pass, and P V accumulating 256 keys per load and store of the
// output tiles (whose short inner loop otherwise dominates).
inline constexpr std::int64_t kAmxSpan = 4;

// head_dim is padded with zeros to a multiple of 16 floats, the widest vector,
// so that every packed row is whole vectors on every target.
inline constexpr std::int64_t kDimAlign = 16;

constexpr std::int64_t padded_head_dim(std::int64_t head_dim) {
  return (head_dim + kDimAlign - 1) / kDimAlign * kDimAlign;
}

constexpr std::int64_t tiles_for(std::int64_t length, std::int64_t tile) {
  return (length + tile - 1) / tile;
}

}  // namespace lookback::kernels
