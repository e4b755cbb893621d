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

// Full key tiles the f32 path takes in one step: P V accumulates 256 keys
// per load and store of its output rows, and the softmax runs over rows of
// 256 scores (2 and 8 measured slower at n = 4096; docs/PERFORMANCE.md).
inline constexpr std::int64_t kF32Span = 4;

// Head tasks (PrefillPlan::pack_per_head): at least this many tasks per
// thread, each kv head cut into at most this many runs of query tiles.
inline constexpr std::int64_t kHeadTasksPerThread = 8;
inline constexpr std::int64_t kMaxHeadParts = 4;

// head_dim is padded with zeros to a multiple of 16 floats, the widest vector,
// so that every packed row is whole vectors on every target.
inline constexpr std::int64_t kDimAlign = 16;

// AMX tile geometry (amx-inl.h): a tile register holds kAmxTileRows rows of
// kAmxRowBytes: 16 f32, or 32 bf16 as 16 pairs. The kernels compute 32 x 32
// blocks of output (2 x 2 tiles of 16 x 16 f32), so query and key tiles
// must be whole blocks, and head_dim must be padded to whole tile rows of
// bf16 (kAmxPairDims) for Q K^T to run on the tiles.
inline constexpr std::int64_t kAmxTileRows = 16;
inline constexpr std::int64_t kAmxRowBytes = 64;
inline constexpr std::int64_t kAmxBlock = 2 * kAmxTileRows;
inline constexpr std::int64_t kAmxPairDims = kAmxRowBytes / 2;
static_assert(kQueryTile % kAmxBlock == 0 && kKeyTile % kAmxBlock == 0,
              "the AMX kernels cover query and key tiles in 32 x 32 blocks");
static_assert(kKeyTile / 2 % kAmxTileRows == 0,
              "P V on the tiles takes key pairs in rows of 16 pairs");

// The visible keys of one row inside the current key tile (or span of
// tiles), in tile-local columns [begin, end).
struct LocalRange {
  std::int64_t begin = 0;
  std::int64_t end = 0;
  bool empty() const { return end <= begin; }
};

constexpr std::int64_t padded_head_dim(std::int64_t head_dim) {
  return (head_dim + kDimAlign - 1) / kDimAlign * kDimAlign;
}

constexpr std::int64_t tiles_for(std::int64_t length, std::int64_t tile) {
  return (length + tile - 1) / tile;
}

}  // namespace lookback::kernels
