// AMX kernels for bf16 prefill, written with intrinsics the kernels'
// Highway targets do not enable:
//   AmxBegin/AmxEnd: configure and release the tiles (once per task);
//   AmxScores:     S = Q K^T for a query tile and key tile, A = Q as bf16
//                  pairs of dims, B = the key tile as pairs of dims per key;
//   AmxAccumulate: O += P V over up to kAmxSpan key tiles, A = P as bf16
//                  pairs of keys, B = V as pairs of keys per dim;
//   PackAmxTile, UnpackVPairs: the pair layouts (PackedLayout) and back.
// The geometry (kAmxTileRows, kAmxRowBytes, kAmxBlock) is named in
// tiles.hpp. Compiled into the AVX-512 targets only (LOOKBACK_X86_AVX512);
// the prefill plan picks this path only where the CPU has AMX-BF16 and Linux
// granted the tile state (dispatch.hpp). Accumulation is f32.

#if defined(LOOKBACK_KERNELS_AMX_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOOKBACK_KERNELS_AMX_INL_H_
#undef LOOKBACK_KERNELS_AMX_INL_H_
#else
#define LOOKBACK_KERNELS_AMX_INL_H_
#endif

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kernels/bf16-inl.h"
#include "kernels/pack.hpp"
#include "kernels/prefill.hpp"
#include "kernels/tiles.hpp"
#include "kernels/transpose-inl.h"

#include "hwy/highway.h"

#undef LOOKBACK_AMX_TARGET
#if LOOKBACK_X86_AVX512
#define LOOKBACK_AMX_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))
#endif

HWY_BEFORE_NAMESPACE();
namespace lookback::kernels::HWY_NAMESPACE {

#if LOOKBACK_X86_AVX512

// AMX: eight tile registers of kAmxTileRows (16) rows x kAmxRowBytes (64). A 32 x 32 f32 block of
// the output lives in tiles 0-3 (2 x 2 tiles of 16 x 16), tiles 4-5 hold two
// 16-row slices of A (32 bf16 per row), tiles 6-7 two 16-column slices of B
// in pair layout (16 pair-rows x 16 columns x 2 bf16). One TDPBF16PS does
// 16 x 16 x 32 multiply-adds.
struct alignas(64) AmxTileConfig {
  std::uint8_t palette = 1;
  std::uint8_t start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t bytes_per_row[16] = {};
  std::uint8_t rows[16] = {};
};

inline LOOKBACK_AMX_TARGET HWY_NOINLINE void AmxBegin() {
  AmxTileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = kAmxRowBytes;
    config.rows[t] = kAmxTileRows;
  }
  // GCC does not model LDTILECFG as reading its operand and drops the
  // stores above without this barrier.
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

inline LOOKBACK_AMX_TARGET HWY_NOINLINE void AmxEnd() { _tile_release(); }

// S[64 x 64] = Q K^T for one query tile and key tile: q_pairs (64 rows x
// pairs, row stride q_stride u32), k_pairs (pairs x 64 u32); pairs a
// multiple of 16. S rows are score_stride floats apart.
inline LOOKBACK_AMX_TARGET HWY_NOINLINE void AmxScores(const std::uint32_t* q_pairs, std::size_t q_stride,
                                                const std::uint32_t* k_pairs, std::size_t pairs,
                                                float* scores, std::size_t score_stride) {
  const std::size_t s_bytes = score_stride * 4;
  for (std::size_t rb = 0; rb < std::size_t{kQueryTile}; rb += std::size_t{kAmxBlock}) {
    for (std::size_t cb = 0; cb < std::size_t{kKeyTile}; cb += std::size_t{kAmxBlock}) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (std::size_t p = 0; p < pairs; p += 16) {
        _tile_loadd(4, q_pairs + rb * q_stride + p, q_stride * 4);
        _tile_loadd(5, q_pairs + (rb + 16) * q_stride + p, q_stride * 4);
        _tile_loadd(6, k_pairs + p * 64 + cb, 256);
        _tile_loadd(7, k_pairs + p * 64 + cb + 16, 256);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      float* s = scores + rb * score_stride + cb;
      _tile_stored(0, s, s_bytes);
      _tile_stored(1, s + 16, s_bytes);
      _tile_stored(2, s + 16 * score_stride, s_bytes);
      _tile_stored(3, s + 16 * score_stride + 16, s_bytes);
    }
  }
}

// acc[64 x dim] += P V over 2 * key_pairs keys: p_pairs (64 rows of bf16
// pairs of keys, p_stride u32 apart), v_pairs (key_pairs rows x dim u32:
// pairs of keys per dim); key_pairs a multiple of 16, dim of 32.
inline LOOKBACK_AMX_TARGET HWY_NOINLINE void AmxAccumulate(const std::uint32_t* p_pairs, std::size_t p_stride,
                                                    const std::uint32_t* v_pairs,
                                                    std::size_t key_pairs, std::size_t dim,
                                                    float* acc) {
  const std::size_t acc_stride = dim * 4, v_stride = dim * 4;
  for (std::size_t rb = 0; rb < std::size_t{kQueryTile}; rb += std::size_t{kAmxBlock}) {
    for (std::size_t nb = 0; nb < dim; nb += std::size_t{kAmxBlock}) {
      float* c = acc + rb * dim + nb;
      _tile_loadd(0, c, acc_stride);
      _tile_loadd(1, c + 16, acc_stride);
      _tile_loadd(2, c + 16 * dim, acc_stride);
      _tile_loadd(3, c + 16 * dim + 16, acc_stride);
      for (std::size_t s = 0; s < key_pairs; s += 16) {
        _tile_loadd(4, p_pairs + rb * p_stride + s, p_stride * 4);
        _tile_loadd(5, p_pairs + (rb + 16) * p_stride + s, p_stride * 4);
        _tile_loadd(6, v_pairs + s * dim + nb, v_stride);
        _tile_loadd(7, v_pairs + s * dim + nb + 16, v_stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c, acc_stride);
      _tile_stored(1, c + 16, acc_stride);
      _tile_stored(2, c + 16 * dim, acc_stride);
      _tile_stored(3, c + 16 * dim + 16, acc_stride);
    }
  }
}

// The f32 rows of a V pair tile (kKeyTile keys x dim, dim a multiple of
// 16): the masked tiles' P V runs on the vector units.
inline LOOKBACK_BF16_TARGET HWY_NOINLINE void UnpackVPairs(const std::uint32_t* v_pairs, std::size_t dim,
                                                    float* v_rows) {
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (std::size_t s = 0; s < static_cast<std::size_t>(kKeyTile) / 2; ++s) {
    for (std::size_t e = 0; e < dim; e += 16) {
      const __m512i pairs = _mm512_loadu_si512(v_pairs + s * dim + e);
      _mm512_storeu_si512(v_rows + 2 * s * dim + e, _mm512_slli_epi32(pairs, 16));
      _mm512_storeu_si512(v_rows + (2 * s + 1) * dim + e, _mm512_and_si512(pairs, high_half));
    }
  }
}

// Packs key tile `tile` of (b, kv_head) for the tiles: K as pairs of dims per
// key, V as pairs of keys per dim. Keys past seqlen_k and dims past head_dim
// are zeros.
inline LOOKBACK_BF16_TARGET HWY_NOINLINE void PackAmxTile(const PrefillParams& params,
                                                   const PackedKV& packed, std::int64_t b,
                                                   std::int64_t kv_head, std::int64_t tile) {
  const AttentionShape& shape = params.shape;
  const std::int64_t padded = packed.padded_dim, pairs = padded / 2;
  const std::int64_t key_begin = tile * kKeyTile;
  const std::int64_t count = std::min(shape.seqlen_k, key_begin + kKeyTile) - key_begin;
  alignas(64) std::uint16_t rows[kKeyTile * padded_head_dim(kMaxHeadDim)];
  auto convert = [&](const TensorView& view) {
    for (std::int64_t c = 0; c < count; ++c) {
      prefetch_row(view, b, key_begin + c + kRowPrefetchDistance, kv_head);
      RowToBf16(view.data, view.dtype, view.offset(b, key_begin + c, kv_head, 0), view.strides[3],
                shape.head_dim, padded, rows + c * padded);
    }
    std::fill(rows + count * padded, rows + kKeyTile * padded, std::uint16_t{0});
  };

  // K: dims (2r, 2r+1) of key c are the r-th u32 of its bf16 row; the
  // (keys x pairs) words transposed in 16 x 16 blocks (pairs is a multiple
  // of 16: head_dim pads to whole tile rows here).
  convert(params.k);
  auto* k_pairs = const_cast<std::uint32_t*>(packed.k_pair_tile(b, kv_head, shape.kv_heads, tile));
  const auto* words = reinterpret_cast<const float*>(rows);
  for (std::int64_t c0 = 0; c0 < kKeyTile; c0 += 16) {
    for (std::int64_t r0 = 0; r0 < pairs; r0 += 16) {
      const float* block[16];
      for (int i = 0; i < 16; ++i) block[i] = words + (c0 + i) * pairs + r0;
      Transpose16x16(block, reinterpret_cast<float*>(k_pairs) + r0 * kKeyTile + c0, kKeyTile);
    }
  }

  // V: interleave the bf16 rows of keys 2s and 2s+1.
  convert(params.v);
  auto* v_pairs = const_cast<std::uint32_t*>(packed.v_pair_tile(b, kv_head, shape.kv_heads, tile));
  alignas(64) std::uint16_t low_index[32], high_index[32];
  for (int i = 0; i < 16; ++i) {
    low_index[2 * i] = static_cast<std::uint16_t>(i);
    low_index[2 * i + 1] = static_cast<std::uint16_t>(32 + i);
    high_index[2 * i] = static_cast<std::uint16_t>(16 + i);
    high_index[2 * i + 1] = static_cast<std::uint16_t>(48 + i);
  }
  const __m512i low = _mm512_load_si512(low_index), high = _mm512_load_si512(high_index);
  for (std::int64_t s = 0; s < kKeyTile / 2; ++s) {
    const std::uint16_t* even = rows + 2 * s * padded;
    const std::uint16_t* odd = even + padded;
    for (std::int64_t e = 0; e < padded; e += 32) {
      const __m512i a = _mm512_loadu_si512(even + e), c = _mm512_loadu_si512(odd + e);
      _mm512_storeu_si512(v_pairs + s * padded + e, _mm512_permutex2var_epi16(a, low, c));
      _mm512_storeu_si512(v_pairs + s * padded + e + 16, _mm512_permutex2var_epi16(a, high, c));
    }
  }
}

#endif  // LOOKBACK_X86_AVX512

}  // namespace lookback::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // LOOKBACK_KERNELS_AMX_INL_H_
