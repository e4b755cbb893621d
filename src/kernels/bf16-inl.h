// AVX512-BF16 kernels for bf16 storage, written with intrinsics the
// kernels' Highway targets do not enable:
//   SumsOf16, StoreScoreBlock: decode's 4 x 4 score blocks reduced and
//                     stored (plain AVX-512, shared with decode.cc's blocked
//                     scores for the other dtypes);
//   DecodeScoresBf16: decode's Q K^T on a bf16 cache by VDPBF16PS;
//   RowToBf16:        one stored row as bf16 (f32 rows by a vector rounding);
//   ScaleRows:        the accumulator rows times their factors;
//   DotScores, DotAccumulate: prefill's Q K^T and P V by VDPBF16PS on the
//                     pair layouts of the AMX path (CPUs with AVX512-BF16
//                     and no AMX: Zen 4/5, Cooper Lake).
// Compiled into the AVX-512 targets only (LOOKBACK_X86_AVX512); callers
// check the CPU through dispatch.hpp (use_bf16_decode_dots, prefill_path).

#if defined(LOOKBACK_KERNELS_BF16_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOOKBACK_KERNELS_BF16_INL_H_
#undef LOOKBACK_KERNELS_BF16_INL_H_
#else
#define LOOKBACK_KERNELS_BF16_INL_H_
#endif

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kernels/tiles.hpp"
#include "lookback/dtype.hpp"
#include "lookback/shape.hpp"

#include "hwy/highway.h"

// Whether this Highway target is one of the x86 AVX-512 targets, where the
// AVX512-BF16 and AMX intrinsics (amx-inl.h) are compiled.
#undef LOOKBACK_X86_AVX512
#undef LOOKBACK_BF16_TARGET
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
#include <immintrin.h>
#define LOOKBACK_X86_AVX512 1
// The current target's features and AVX512-BF16, so that the target's own
// always-inline helpers (SumsOf16) inline into these functions with clang too.
#define LOOKBACK_BF16_TARGET __attribute__((target(HWY_TARGET_STR ",avx512bf16")))
#else
#define LOOKBACK_X86_AVX512 0
#endif

HWY_BEFORE_NAMESPACE();
namespace lookback::kernels::HWY_NAMESPACE {

#if LOOKBACK_X86_AVX512

// Sixteen 16-lane sums at once: lane i of the result is the sum of acc[i]'s
// lanes. Pairwise interleaves within 128-bit blocks, then the blocks: 45
// shuffles and adds for 16 sums, against about 10 per sum one at a time.
HWY_INLINE __m512 SumsOf16(const __m512* acc) {
  __m512 pairs[8];
  for (int i = 0; i < 8; ++i) {
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]),
                             _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
  }
  __m512 quads[4];  // each 128-bit block: four accumulators' partial sums
  for (int i = 0; i < 4; ++i) {
    quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0xEE));
  }
  const __m512 lo = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x44),
                                  _mm512_shuffle_f32x4(quads[0], quads[1], 0xEE));
  const __m512 hi = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x44),
                                  _mm512_shuffle_f32x4(quads[2], quads[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(lo, hi, 0x88), _mm512_shuffle_f32x4(lo, hi, 0xDD));
}

// Stores a 4 x 4 block of scores (SumsOf16's lanes 4 r .. 4 r + 3: row r's
// scores of four keys) at scores + r * stride for the first `rows` rows,
// the first `keys` keys of each.
HWY_INLINE void StoreScoreBlock(__m512 block, std::size_t rows, std::int64_t keys,
                                float* scores, std::size_t stride) {
  const auto mask = static_cast<__mmask8>((1u << keys) - 1u);
  const __m128 parts[4] = {_mm512_castps512_ps128(block), _mm512_extractf32x4_ps(block, 1),
                           _mm512_extractf32x4_ps(block, 2), _mm512_extractf32x4_ps(block, 3)};
  for (std::size_t r = 0; r < rows && r < 4; ++r) {
    _mm_mask_storeu_ps(scores + r * stride, mask, parts[r]);
  }
}

// Decode scores with AVX512-BF16: scores[r * score_stride + j] = q_r . k_j
// for every row r < rows and key j in [begin, end), k_j = k_rows[j] a bf16
// row. q: rows x q_stride bf16 (q_stride a multiple of 32, zeros past the
// head dim); K rows are read in whole 32-element vectors up to q_stride, so
// they must hold that many readable elements (padded cache rows: dims past
// the head dim are zeros). Four rows by four keys at a time, their 16 dot
// products reduced together. While scoring key j, the K and V rows `ahead`
// keys on are prefetched into L1 (below prefetch_end).
inline LOOKBACK_BF16_TARGET HWY_NOINLINE void DecodeScoresBf16(
    const std::uint16_t* q, std::size_t q_stride, std::size_t rows, const void* const* k_rows,
    const void* const* v_rows, std::int64_t begin, std::int64_t end, std::int64_t ahead,
    std::int64_t prefetch_end, std::size_t row_bytes, std::size_t dim, float* scores,
    std::size_t score_stride) {
  const std::size_t vectors = (dim + 31) / 32;
  const auto tail = static_cast<__mmask32>(dim % 32 == 0 ? 0xFFFFFFFFu : (1u << (dim % 32)) - 1u);
  for (std::int64_t j = begin; j < end; j += 4) {
    const std::int64_t keys = std::min<std::int64_t>(4, end - j);
    for (std::int64_t key = j; key < j + keys; ++key) {
      if (key + ahead < prefetch_end) {
        const auto* k_ahead = static_cast<const char*>(k_rows[key + ahead]);
        const auto* v_ahead = static_cast<const char*>(v_rows[key + ahead]);
        for (std::size_t line = 0; line < row_bytes; line += 64) {
          _mm_prefetch(k_ahead + line, _MM_HINT_T0);
          _mm_prefetch(v_ahead + line, _MM_HINT_T0);
        }
      }
    }
    const std::uint16_t* k[4];
    for (std::int64_t c = 0; c < 4; ++c) {
      k[c] = static_cast<const std::uint16_t*>(k_rows[j + std::min<std::int64_t>(c, keys - 1)]);
    }
    for (std::size_t r = 0; r < rows; r += 4) {
      const std::uint16_t* qr[4];
      for (std::size_t i = 0; i < 4; ++i) qr[i] = q + std::min(r + i, rows - 1) * q_stride;
      __m512 acc[16];
      for (auto& a : acc) a = _mm512_setzero_ps();
      for (std::size_t v = 0; v < vectors; ++v) {
        const __mmask32 m = v + 1 < vectors ? 0xFFFFFFFFu : tail;
        __m512bh kv[4], qv[4];
        for (int c = 0; c < 4; ++c) kv[c] = (__m512bh)_mm512_maskz_loadu_epi16(m, k[c] + v * 32);
        for (int i = 0; i < 4; ++i) qv[i] = (__m512bh)_mm512_loadu_si512(qr[i] + v * 32);
        for (int i = 0; i < 4; ++i) {
          for (int c = 0; c < 4; ++c) acc[4 * i + c] = _mm512_dpbf16_ps(acc[4 * i + c], qv[i], kv[c]);
        }
      }
      StoreScoreBlock(SumsOf16(acc), rows - r, keys, scores + r * score_stride + j, score_stride);
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

// C[kRows x 16 kVecs] (+)= A B by VDPBF16PS, where A's rows hold `steps`
// u32 pairs of bf16 (a_stride u32 apart) and B's `steps` rows hold 16 kVecs
// u32 pairs (b_stride u32 apart): each lane of a product takes the two bf16
// of A's pair times the two of B's and adds both to its f32 sum. C rows are
// c_stride floats apart; with maybe_scale, C starts as C * scale[row]
// (the online softmax's rescale, folded into the load), else from zero.
template <int kRows, int kVecs>
LOOKBACK_BF16_TARGET HWY_INLINE void DotBlock(const std::uint32_t* a, std::size_t a_stride,
                                              const std::uint32_t* b, std::size_t b_stride,
                                              std::size_t steps, float* c, std::size_t c_stride,
                                              const float* maybe_scale) {
  __m512 acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    const __m512 scale = maybe_scale != nullptr ? _mm512_set1_ps(maybe_scale[r]) : _mm512_setzero_ps();
    for (int v = 0; v < kVecs; ++v) {
      acc[r][v] = maybe_scale != nullptr ? _mm512_mul_ps(_mm512_loadu_ps(c + r * c_stride + v * 16), scale)
                                         : _mm512_setzero_ps();
    }
  }
  for (std::size_t s = 0; s < steps; ++s) {
    __m512bh bv[kVecs];
    for (int v = 0; v < kVecs; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + s * b_stride + v * 16);
    for (int r = 0; r < kRows; ++r) {
      const auto pair = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * a_stride + s]));
      for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], pair, bv[v]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) _mm512_storeu_ps(c + r * c_stride + v * 16, acc[r][v]);
  }
}

// C[rows x 16 kVecs] by blocks of 4 rows (16 accumulators), the rest 1-3.
template <int kVecs>
LOOKBACK_BF16_TARGET HWY_INLINE void DotRows(const std::uint32_t* a, std::size_t a_stride,
                                             std::size_t rows, const std::uint32_t* b,
                                             std::size_t b_stride, std::size_t steps, float* c,
                                             std::size_t c_stride, const float* maybe_scale) {
  std::size_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    DotBlock<4, kVecs>(a + r * a_stride, a_stride, b, b_stride, steps, c + r * c_stride, c_stride,
                       maybe_scale != nullptr ? maybe_scale + r : nullptr);
  }
  const float* scale = maybe_scale != nullptr ? maybe_scale + r : nullptr;
  a += r * a_stride;
  c += r * c_stride;
  switch (rows - r) {
    case 3: DotBlock<3, kVecs>(a, a_stride, b, b_stride, steps, c, c_stride, scale); break;
    case 2: DotBlock<2, kVecs>(a, a_stride, b, b_stride, steps, c, c_stride, scale); break;
    case 1: DotBlock<1, kVecs>(a, a_stride, b, b_stride, steps, c, c_stride, scale); break;
    default: break;
  }
}

// S[rows x kKeyTile] = Q K^T: q_pairs (rows x pairs u32: dims (2p, 2p+1) of
// a query, q_stride u32 apart), k_pairs (pairs x kKeyTile u32: the same dims
// of each key, AmxScores' B layout). S rows score_stride floats apart.
inline LOOKBACK_BF16_TARGET HWY_NOINLINE void DotScores(const std::uint32_t* q_pairs,
                                                 std::size_t q_stride, std::size_t rows,
                                                 const std::uint32_t* k_pairs, std::size_t pairs,
                                                 float* scores, std::size_t score_stride) {
  static_assert(kKeyTile == 64, "one block of 4 vectors covers a key tile");
  DotRows<4>(q_pairs, q_stride, rows, k_pairs, kKeyTile, pairs, scores, score_stride, nullptr);
}

// acc[rows x dim] = acc * alpha[row] + P V: p_pairs (rows x key_pairs u32:
// P of keys (2s, 2s+1), p_stride u32 apart), v_pairs (key_pairs x dim u32:
// those keys' values of each dim, AmxAccumulate's B layout); dim a multiple
// of 32.
inline LOOKBACK_BF16_TARGET HWY_NOINLINE void DotAccumulate(const std::uint32_t* p_pairs,
                                                     std::size_t p_stride, std::size_t rows,
                                                     const std::uint32_t* v_pairs,
                                                     std::size_t key_pairs, std::size_t dim,
                                                     float* acc, const float* alpha) {
  std::size_t e = 0;
  for (; e + 64 <= dim; e += 64) {
    DotRows<4>(p_pairs, p_stride, rows, v_pairs + e, dim, key_pairs, acc + e, dim, alpha);
  }
  if (e < dim) DotRows<2>(p_pairs, p_stride, rows, v_pairs + e, dim, key_pairs, acc + e, dim, alpha);
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

#endif  // LOOKBACK_X86_AVX512

}  // namespace lookback::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // LOOKBACK_KERNELS_BF16_INL_H_
