// bf16 kernels written with intrinsics the kernels' Highway targets do not
// enable (AMX, AVX512-BF16), for bf16 storage:
//   AmxScores:     S = Q K^T for a 64 x 64 tile, A = Q as bf16 pairs of dims,
//                  B = the key tile as pairs of dims per key (pack.hpp);
//   AmxAccumulate: O += P V over up to kAmxSpan key tiles, A = P as bf16
//                  pairs of keys, B = V as pairs of keys per dim;
//   PackAmxTile, RowToBf16, UnpackVPairs: the pair layouts and back;
//   DecodeScoresBf16: decode's Q K^T on a bf16 cache by VDPBF16PS.
// Only compiled into the AVX-512 targets; callers check that the CPU has
// AMX-BF16 and that Linux granted the tile state (params.amx_tiles), or
// AVX512-BF16 for the decode scores. Accumulation is f32.

#if defined(LOOKBACK_KERNELS_AMX_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOOKBACK_KERNELS_AMX_INL_H_
#undef LOOKBACK_KERNELS_AMX_INL_H_
#else
#define LOOKBACK_KERNELS_AMX_INL_H_
#endif

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kernels/pack.hpp"
#include "kernels/prefill.hpp"
#include "kernels/tiles.hpp"
#include "lookback/attention.hpp"
#include "lookback/dtype.hpp"

#include "hwy/highway.h"

#undef LOOKBACK_HAVE_AMX
#undef LOOKBACK_BF16_TARGET
#undef LOOKBACK_AMX_TARGET
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
#include <immintrin.h>
#define LOOKBACK_HAVE_AMX 1
#define LOOKBACK_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define LOOKBACK_AMX_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))
#else
#define LOOKBACK_HAVE_AMX 0
#endif

HWY_BEFORE_NAMESPACE();
namespace lookback::kernels::HWY_NAMESPACE {

#if LOOKBACK_HAVE_AMX

// AMX: eight tile registers of 16 rows x 64 bytes. A 32 x 32 f32 block of
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
    config.bytes_per_row[t] = 64;
    config.rows[t] = 16;
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
  for (std::size_t rb = 0; rb < 64; rb += 32) {
    for (std::size_t cb = 0; cb < 64; cb += 32) {
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
  for (std::size_t rb = 0; rb < 64; rb += 32) {
    for (std::size_t nb = 0; nb < dim; nb += 32) {
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

// Decode scores with AVX512-BF16: scores[r * score_stride + j] = q_r . k_j
// for every row r < rows and key j in [begin, end), k_j = k_rows[j] a bf16
// row. q: rows x q_stride bf16 (q_stride a multiple of 32, zeros past the
// head dim); K rows are read in whole 32-element vectors up to q_stride, so
// they must hold that many readable elements (padded cache rows: dims past
// the head dim are zeros). Four rows' dot products are reduced together.
// While scoring key j, the K and V rows `ahead` keys on are prefetched into
// L1 and those 2 * ahead keys on into L2 (below prefetch_end).
inline LOOKBACK_BF16_TARGET HWY_NOINLINE void DecodeScoresBf16(
    const std::uint16_t* q, std::size_t q_stride, std::size_t rows, const void* const* k_rows,
    const void* const* v_rows, std::int64_t begin, std::int64_t end, std::int64_t ahead,
    std::int64_t prefetch_end, std::size_t row_bytes, std::size_t dim, float* scores,
    std::size_t score_stride) {
  const std::size_t vectors = (dim + 31) / 32;
  const auto tail = static_cast<__mmask32>(dim % 32 == 0 ? 0xFFFFFFFFu : (1u << (dim % 32)) - 1u);
  for (std::int64_t j = begin; j < end; ++j) {
    if (j + ahead < prefetch_end) {
      const auto* k_ahead = static_cast<const char*>(k_rows[j + ahead]);
      const auto* v_ahead = static_cast<const char*>(v_rows[j + ahead]);
      for (std::size_t line = 0; line < row_bytes; line += 64) {
        _mm_prefetch(k_ahead + line, _MM_HINT_T0);
        _mm_prefetch(v_ahead + line, _MM_HINT_T0);
      }
    }
    if (j + 2 * ahead < prefetch_end) {
      const auto* k_far = static_cast<const char*>(k_rows[j + 2 * ahead]);
      const auto* v_far = static_cast<const char*>(v_rows[j + 2 * ahead]);
      for (std::size_t line = 0; line < row_bytes; line += 64) {
        _mm_prefetch(k_far + line, _MM_HINT_T1);
        _mm_prefetch(v_far + line, _MM_HINT_T1);
      }
    }
    const auto* k = static_cast<const std::uint16_t*>(k_rows[j]);
    __m512bh kv[kMaxHeadDim / 32];
    for (std::size_t v = 0; v < vectors; ++v) {
      kv[v] = (__m512bh)_mm512_maskz_loadu_epi16(v + 1 < vectors ? 0xFFFFFFFFu : tail, k + v * 32);
    }
    std::size_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      __m512 acc[4];
      for (std::size_t i = 0; i < 4; ++i) {
        acc[i] = _mm512_setzero_ps();
        for (std::size_t v = 0; v < vectors; ++v) {
          acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(q + (r + i) * q_stride + v * 32), kv[v]);
        }
      }
      // Four 16-lane sums at once: pairwise interleaves, then the four
      // 128-bit blocks.
      const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(acc[0], acc[1]), _mm512_unpackhi_ps(acc[0], acc[1]));
      const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(acc[2], acc[3]), _mm512_unpackhi_ps(acc[2], acc[3]));
      __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
      abcd = _mm512_add_ps(abcd, _mm512_shuffle_f32x4(abcd, abcd, 0x4E));
      abcd = _mm512_add_ps(abcd, _mm512_shuffle_f32x4(abcd, abcd, 0xB1));
      alignas(16) float sums[4];
      _mm_store_ps(sums, _mm512_castps512_ps128(abcd));
      for (std::size_t i = 0; i < 4; ++i) scores[(r + i) * score_stride + static_cast<std::size_t>(j)] = sums[i];
    }
    for (; r < rows; ++r) {
      __m512 acc = _mm512_setzero_ps();
      for (std::size_t v = 0; v < vectors; ++v) {
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + r * q_stride + v * 32), kv[v]);
      }
      scores[r * score_stride + static_cast<std::size_t>(j)] = _mm512_reduce_add_ps(acc);
    }
  }
}

// x[rows x n] *= factor[row] (n a multiple of 16, 64-byte aligned rows).
// Rows whose factor is 1 are left as they are.
inline LOOKBACK_BF16_TARGET HWY_NOINLINE void ScaleRows(float* x, std::size_t rows, std::size_t n,
                                                 const float* factor) {
  for (std::size_t r = 0; r < rows; ++r) {
    if (factor[r] == 1.0f) continue;  // the row's max did not change
    const __m512 f = _mm512_set1_ps(factor[r]);
    for (std::size_t e = 0; e < n; e += 16) {
      _mm512_store_ps(x + r * n + e, _mm512_mul_ps(_mm512_load_ps(x + r * n + e), f));
    }
  }
}

// 16 f32 -> bf16, exactly as lookback::f32_to_bf16 (nearest even on the
// dropped bits, NaN kept as a quiet NaN of the same sign).
LOOKBACK_BF16_TARGET HWY_INLINE __m256i RoundToBf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i high = _mm512_srli_epi32(bits, 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF)),
                                                _mm512_set1_epi32(0x7F800000));
  const __m512i rounding = _mm512_add_epi32(_mm512_and_si512(high, _mm512_set1_epi32(1)),
                                            _mm512_set1_epi32(0x7FFF));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, rounding), 16);
  const __m512i quiet = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet));
}

// One stored row (`count` elements `stride` apart from `base`) as bf16,
// zero-padded to `padded` (a multiple of 16).
inline LOOKBACK_BF16_TARGET HWY_NOINLINE void RowToBf16(const void* data, DType dtype, std::int64_t base,
                                                 std::int64_t stride, std::int64_t count,
                                                 std::int64_t padded, std::uint16_t* out) {
  if (stride == 1 && dtype == DType::kF32) {
    const float* in = static_cast<const float*>(data) + base;
    for (std::int64_t e = 0; e < padded; e += 16) {
      const std::int64_t left = std::clamp<std::int64_t>(count - e, 0, 16);
      const auto live = static_cast<__mmask16>((1u << left) - 1u);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + e),
                          RoundToBf16(_mm512_maskz_loadu_ps(live, in + e)));
    }
    return;
  }
  if (stride == 1 && dtype == DType::kBF16) {
    std::memcpy(out, static_cast<const std::uint16_t*>(data) + base,
                static_cast<std::size_t>(count) * sizeof(std::uint16_t));
  } else {
    for (std::int64_t e = 0; e < count; ++e) out[e] = f32_to_bf16(load_as_float(data, dtype, base + e * stride));
  }
  std::fill(out + count, out + padded, std::uint16_t{0});
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

  // K: dims (2r, 2r+1) of key c are the r-th u32 of its bf16 row.
  convert(params.k);
  auto* k_pairs = const_cast<std::uint32_t*>(packed.k_pair_tile(b, kv_head, shape.kv_heads, tile));
  const auto* words = reinterpret_cast<const std::uint32_t*>(rows);
  for (std::int64_t r = 0; r < pairs; ++r) {
    for (std::int64_t c = 0; c < kKeyTile; ++c) k_pairs[r * kKeyTile + c] = words[c * pairs + r];
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

#endif  // LOOKBACK_HAVE_AMX

}  // namespace lookback::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // LOOKBACK_KERNELS_AMX_INL_H_
