// Register-blocked micro-kernels shared by the attention kernels:
//   C[rows x n] (op)= A[rows x depth] * B[depth x n]
// with A row-major (each element broadcast), B row-major (whole vectors),
// C row-major. Q*K^T uses it with B = K transposed per tile; P*V with B = V.
// n must be a multiple of the vector length (packed buffers guarantee it).
//
// Per-target: included from kernel .cc files after hwy/highway.h, inside their
// foreach_target loop.

#if defined(LOOKBACK_KERNELS_GEMM_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef LOOKBACK_KERNELS_GEMM_INL_H_
#undef LOOKBACK_KERNELS_GEMM_INL_H_
#else
#define LOOKBACK_KERNELS_GEMM_INL_H_
#endif

#include <cstddef>

#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace lookback::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// What happens to C.
enum class Accumulate {
  kOverwrite,  // C = A * B
  kAdd,        // C += A * B
  kScaleAdd,   // C = C * alpha[row] + A * B  (online-softmax rescale folded in)
};

// Register block: kRows rows of A times kVectors vectors of B per step. With
// 32 vector registers (AVX-512) 6 x 4 = 24 accumulators leave room for the
// 4 B vectors and a broadcast (each B vector loaded feeds 6 FMAs, not 4);
// with 16 registers (AVX2, SSE4, NEON) 4 x 2.
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
inline constexpr std::size_t kBlockRows = 6;
inline constexpr std::size_t kBlockVectors = 4;
#else
inline constexpr std::size_t kBlockRows = 4;
inline constexpr std::size_t kBlockVectors = 2;
#endif

// On AVX-512 the micro-kernel is compiled on its own: inlined into the
// loops around it, GCC ran short of registers there and kept one B vector
// on the stack, reloading it for every FMA that used it (P V 5-7% slower).
// With 16 registers the 4 x 2 block has room to spare, and the call costs
// more than it saves.
#undef LOOKBACK_MICRO_KERNEL_INLINE
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
#define LOOKBACK_MICRO_KERNEL_INLINE HWY_NOINLINE
#else
#define LOOKBACK_MICRO_KERNEL_INLINE HWY_INLINE
#endif

template <std::size_t kRows, std::size_t kVectors, Accumulate kMode>
LOOKBACK_MICRO_KERNEL_INLINE void MicroKernel(const float* HWY_RESTRICT a, std::size_t lda,
                            const float* HWY_RESTRICT b, std::size_t ldb,
                            std::size_t depth, float* HWY_RESTRICT c, std::size_t ldc,
                            const float* HWY_RESTRICT alpha) {
  const hn::ScalableTag<float> d;
  using V = hn::Vec<decltype(d)>;
  const std::size_t lanes = hn::Lanes(d);
  V acc[kRows][kVectors];
  for (std::size_t r = 0; r < kRows; ++r) {
    const V scale = kMode == Accumulate::kScaleAdd ? hn::Set(d, alpha[r]) : hn::Zero(d);
    for (std::size_t v = 0; v < kVectors; ++v) {
      if constexpr (kMode == Accumulate::kOverwrite) {
        acc[r][v] = hn::Zero(d);
      } else if constexpr (kMode == Accumulate::kAdd) {
        acc[r][v] = hn::Load(d, c + r * ldc + v * lanes);
      } else {
        acc[r][v] = hn::Mul(hn::Load(d, c + r * ldc + v * lanes), scale);
      }
    }
  }
  for (std::size_t k = 0; k < depth; ++k) {
    V bv[kVectors];
    for (std::size_t v = 0; v < kVectors; ++v) bv[v] = hn::Load(d, b + k * ldb + v * lanes);
    for (std::size_t r = 0; r < kRows; ++r) {
      const V av = hn::Set(d, a[r * lda + k]);
      for (std::size_t v = 0; v < kVectors; ++v) acc[r][v] = hn::MulAdd(av, bv[v], acc[r][v]);
    }
  }
  for (std::size_t r = 0; r < kRows; ++r) {
    for (std::size_t v = 0; v < kVectors; ++v) hn::Store(acc[r][v], d, c + r * ldc + v * lanes);
  }
}

// All column blocks of kRows rows.
template <std::size_t kRows, Accumulate kMode>
HWY_INLINE void RowBlock(const float* HWY_RESTRICT a, std::size_t lda,
                         const float* HWY_RESTRICT b, std::size_t ldb, std::size_t depth,
                         std::size_t n, float* HWY_RESTRICT c, std::size_t ldc,
                         const float* HWY_RESTRICT alpha) {
  const hn::ScalableTag<float> d;
  const std::size_t lanes = hn::Lanes(d);
  std::size_t col = 0;
  for (; col + kBlockVectors * lanes <= n; col += kBlockVectors * lanes) {
    MicroKernel<kRows, kBlockVectors, kMode>(a, lda, b + col, ldb, depth, c + col, ldc, alpha);
  }
  // The last 1 .. kBlockVectors - 1 vectors in one block (a single vector
  // per call would load as often as it multiplies).
  switch ((n - col) / lanes) {
    case 3:
      if constexpr (kBlockVectors > 3) {
        MicroKernel<kRows, 3, kMode>(a, lda, b + col, ldb, depth, c + col, ldc, alpha);
      }
      break;
    case 2:
      if constexpr (kBlockVectors > 2) {
        MicroKernel<kRows, 2, kMode>(a, lda, b + col, ldb, depth, c + col, ldc, alpha);
      }
      break;
    case 1: MicroKernel<kRows, 1, kMode>(a, lda, b + col, ldb, depth, c + col, ldc, alpha); break;
    default: break;
  }
}

// The last rows (fewer than kBlockRows) in one block of `rest` rows.
template <std::size_t kRows, Accumulate kMode>
HWY_INLINE void RestRows(std::size_t rest, const float* HWY_RESTRICT a, std::size_t lda,
                         const float* HWY_RESTRICT b, std::size_t ldb, std::size_t depth,
                         std::size_t n, float* HWY_RESTRICT c, std::size_t ldc,
                         const float* HWY_RESTRICT alpha) {
  if (rest == kRows) {
    RowBlock<kRows, kMode>(a, lda, b, ldb, depth, n, c, ldc, alpha);
  } else if constexpr (kRows > 1) {
    RestRows<kRows - 1, kMode>(rest, a, lda, b, ldb, depth, n, c, ldc, alpha);
  }
}

// C[rows x n] (op)= A[rows x depth] * B[depth x n]. alpha: one factor per row
// (kScaleAdd only).
template <Accumulate kMode>
HWY_NOINLINE void Gemm(std::size_t rows, std::size_t n, std::size_t depth,
                       const float* HWY_RESTRICT a, std::size_t lda,
                       const float* HWY_RESTRICT b, std::size_t ldb,
                       float* HWY_RESTRICT c, std::size_t ldc,
                       const float* HWY_RESTRICT alpha = nullptr) {
  std::size_t row = 0;
  for (; row + kBlockRows <= rows; row += kBlockRows) {
    RowBlock<kBlockRows, kMode>(a + row * lda, lda, b, ldb, depth, n, c + row * ldc, ldc,
                                alpha ? alpha + row : nullptr);
  }
  if (row < rows) {
    RestRows<kBlockRows - 1, kMode>(rows - row, a + row * lda, lda, b, ldb, depth, n,
                                    c + row * ldc, ldc, alpha ? alpha + row : nullptr);
  }
}

}  // namespace lookback::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // LOOKBACK_KERNELS_GEMM_INL_H_
