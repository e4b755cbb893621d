// Square blocks of 32-bit elements transposed in registers: 16 x 16 on
// AVX-512, shared by the f32 packing of K (floats) and the AMX packing of K
// (pairs of bf16 dims as 32-bit words; the shuffles move bits, never round
// them); 8 x 8 on AVX2, for the f32 packing of K.
//
// Per-target: included from kernel .cc files after hwy/highway.h, inside their
// foreach_target loop.

#if defined(LOOKBACK_KERNELS_TRANSPOSE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOOKBACK_KERNELS_TRANSPOSE_INL_H_
#undef LOOKBACK_KERNELS_TRANSPOSE_INL_H_
#else
#define LOOKBACK_KERNELS_TRANSPOSE_INL_H_
#endif

#include <cstdint>

#include "hwy/highway.h"

#undef LOOKBACK_TRANSPOSE_16X16
#undef LOOKBACK_TRANSPOSE_8X8
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
#include <immintrin.h>
#define LOOKBACK_TRANSPOSE_16X16 1
#define LOOKBACK_TRANSPOSE_8X8 0
#elif HWY_ARCH_X86 && HWY_TARGET == HWY_AVX2
#include <immintrin.h>
#define LOOKBACK_TRANSPOSE_16X16 0
#define LOOKBACK_TRANSPOSE_8X8 1
#else
#define LOOKBACK_TRANSPOSE_16X16 0
#define LOOKBACK_TRANSPOSE_8X8 0
#endif

HWY_BEFORE_NAMESPACE();
namespace lookback::kernels::HWY_NAMESPACE {

#if LOOKBACK_TRANSPOSE_16X16
// out[k * out_stride + i] = rows[i][k] for i, k < 16: pairs, then quads
// within 128-bit lanes, then the lanes.
HWY_INLINE void Transpose16x16(const float* const* rows, float* out, std::int64_t out_stride) {
  __m512 r[16], t[16], u[16], v[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(rows[i]);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  // u[4q + k] holds columns k, k + 4, k + 8, k + 12 of rows 4q .. 4q + 3.
  for (int h = 0; h < 16; h += 8) {
    for (int k = 0; k < 4; ++k) {
      // Rows h .. h + 7: columns k, k + 8 and columns k + 4, k + 12.
      v[h + k] = _mm512_shuffle_f32x4(u[h + k], u[h + 4 + k], 0x88);
      v[h + 4 + k] = _mm512_shuffle_f32x4(u[h + k], u[h + 4 + k], 0xDD);
    }
  }
  // v[k] (k < 8) and v[k + 8]: columns k and k + 8 of rows 0-7 and 8-15.
  for (int k = 0; k < 8; ++k) {
    _mm512_storeu_ps(out + k * out_stride, _mm512_shuffle_f32x4(v[k], v[k + 8], 0x88));
    _mm512_storeu_ps(out + (k + 8) * out_stride, _mm512_shuffle_f32x4(v[k], v[k + 8], 0xDD));
  }
}
#endif

#if LOOKBACK_TRANSPOSE_8X8
// out[k * out_stride + i] = rows[i][k] for i, k < 8: pairs, then quads
// within 128-bit lanes, then the lanes.
HWY_INLINE void Transpose8x8(const float* const* rows, float* out, std::int64_t out_stride) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows[i]);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  // u[4q + k] holds columns k and k + 4 of rows 4q .. 4q + 3.
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(out + k * out_stride, _mm256_permute2f128_ps(u[k], u[4 + k], 0x20));
    _mm256_storeu_ps(out + (k + 4) * out_stride, _mm256_permute2f128_ps(u[k], u[4 + k], 0x31));
  }
}
#endif

}  // namespace lookback::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // LOOKBACK_KERNELS_TRANSPOSE_INL_H_
