// The decode kernel. One call handles one kv head: its query heads (a GQA
// group) times the step's tokens are the rows; keys stream in tiles of
// kKeyTile straight from the cache (contiguous runs or paged blocks), in the
// storage dtype, converted to f32 in registers (8-bit codes too, their
// row's scale applied to the score for K and folded into P for V). Per
// tile: the scores of the visible keys (on AVX-512 four keys by four rows at
// a time, their 16 dot products reduced together), the shared
// online-softmax step, then O += P V over each row's visible keys only
// (hidden slots are never read).

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/decode.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/cache_control.h>
#include <hwy/highway.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "kernels/decode.hpp"
#include "kernels/bf16-inl.h"
#include "kernels/dispatch.hpp"
#include "kernels/online_softmax.hpp"
#include "kernels/pack.hpp"
#include "kernels/quant-inl.h"
#include "kernels/softmax-inl.h"
#include "kernels/tiles.hpp"

HWY_BEFORE_NAMESPACE();
namespace lookback::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

namespace {

// Loads `lanes` elements of a stored row at `offset` as f32.
template <typename T, class D>
HWY_INLINE hn::Vec<D> LoadAsFloat(D d, const T* HWY_RESTRICT row, std::size_t offset) {
  if constexpr (std::is_same_v<T, float>) {
    return hn::LoadU(d, row + offset);
  } else if constexpr (kIsCode<T>) {
    return LoadCodes(d, row, offset);
  } else if constexpr (std::is_same_v<T, hwy::float16_t> && !kVectorF16) {
    HWY_ALIGN float lanes[hn::MaxLanes(d)];
    const auto* bits = reinterpret_cast<const std::uint16_t*>(row + offset);
    for (std::size_t i = 0; i < hn::Lanes(d); ++i) lanes[i] = f16_to_f32(bits[i]);
    return hn::Load(d, lanes);
  } else {
    const hn::Rebind<T, D> narrow;
    return hn::PromoteTo(d, hn::LoadU(narrow, row + offset));
  }
}

// bf16 rows on AVX2 are read in pairs of dims: one 256-bit load of 16
// values gives the even ones (shifted up into f32) and the odd ones (the
// low half masked off) as two f32 vectors, three operations where widening
// each half takes four, and all but the shift run on any FP pipe. On the
// Zen 1 EPYC, whose 256-bit operations are split in two, the P V loop runs
// 23% and the scores' 12% faster in L1 (docs/PERFORMANCE.md). Queries and
// the output accumulators then hold each 16 dims of a head in that order,
// 8 even dims then 8 odd ones (kDimAlign keeps head dims a multiple of 16),
// and the output is put back in order when written.
template <typename T>
inline constexpr bool kEvenOdd = HWY_TARGET == HWY_AVX2 && std::is_same_v<T, hwy::bfloat16_t>;
inline constexpr std::size_t kEvenOddDims = 16;
static_assert(kDimAlign % kEvenOddDims == 0);

template <class D>
HWY_INLINE void LoadEvenOdd(D d, const hwy::bfloat16_t* HWY_RESTRICT row, std::size_t offset,
                            hn::Vec<D>& even, hn::Vec<D>& odd) {
  const hn::RebindToUnsigned<D> du;
  const auto pairs = hn::LoadU(du, reinterpret_cast<const std::uint32_t*>(row + offset));
  even = hn::BitCast(d, hn::ShiftLeft<16>(pairs));
  odd = hn::BitCast(d, hn::And(pairs, hn::Set(du, 0xFFFF0000u)));
}

// A head's dims in the even/odd order, or back (the inverse).
HWY_INLINE void ToEvenOdd(const float* HWY_RESTRICT in, float* HWY_RESTRICT out, std::int64_t dim) {
  constexpr std::int64_t kHalf = kEvenOddDims / 2;
  for (std::int64_t c = 0; c < dim; c += kEvenOddDims) {
    for (std::int64_t i = 0; i < kHalf; ++i) {
      out[c + i] = in[c + 2 * i];
      out[c + kHalf + i] = in[c + 2 * i + 1];
    }
  }
}
HWY_INLINE void FromEvenOdd(const float* HWY_RESTRICT in, float* HWY_RESTRICT out, std::int64_t dim) {
  constexpr std::int64_t kHalf = kEvenOddDims / 2;
  for (std::int64_t c = 0; c < dim; c += kEvenOddDims) {
    for (std::int64_t i = 0; i < kHalf; ++i) {
      out[c + 2 * i] = in[c + i];
      out[c + 2 * i + 1] = in[c + kHalf + i];
    }
  }
}

template <typename T>
HWY_INLINE float Dot(const float* HWY_RESTRICT q, const T* HWY_RESTRICT k, std::size_t dim) {
  const hn::ScalableTag<float> d;
  const std::size_t lanes = hn::Lanes(d);
  auto sum0 = hn::Zero(d), sum1 = hn::Zero(d);
  std::size_t e = 0;
  for (; e + 2 * lanes <= dim; e += 2 * lanes) {
    sum0 = hn::MulAdd(hn::LoadU(d, q + e), LoadAsFloat(d, k, e), sum0);
    sum1 = hn::MulAdd(hn::LoadU(d, q + e + lanes), LoadAsFloat(d, k, e + lanes), sum1);
  }
  for (; e < dim; e += lanes) sum0 = hn::MulAdd(hn::LoadU(d, q + e), LoadAsFloat(d, k, e), sum0);
  return hn::GetLane(hn::SumOfLanes(d, hn::Add(sum0, sum1)));
}

// Whether each tile prefetches the next tile's rows into L2, so that the
// memory is not idle while it computes: its K during the scores, its V
// during P V, a line at a time between the FMAs, in address order (row
// after row, line after line: the Zen 1 EPYC's memory streams them at
// 19-20 GB/s, but at 15 when they are requested a line of every row at a
// time, as P V reads them). On that CPU this takes about a third off f32
// decode at 64k; there bf16 and 8-bit decode are bound by arithmetic, and
// the prefetches only cost instructions. On an AVX-512 Xeon it made every
// dtype 10-18% slower (docs/PERFORMANCE.md).
template <typename T>
inline constexpr bool kPrefetchNextTile = HWY_ARCH_X86 && HWY_TARGET == HWY_AVX2 &&
                                          std::is_same_v<T, float>;

// acc[r] = alpha[r] * acc[r] + sum_j p[r][j] * v_rows[j] for kRows rows that
// share the key range [begin, end): each V row is loaded (and converted from
// the storage dtype) once for all of them. With kPrefetchNextTile, the next
// tile's V rows (v_rows[kKeyTile + i] for i < next_count) are prefetched
// along the way, one line per key and pass, in address order.
template <typename T, std::size_t kRows>
HWY_INLINE void AccumulateRows(float* HWY_RESTRICT acc, std::size_t acc_stride,
                               const float* HWY_RESTRICT alpha, const float* HWY_RESTRICT p,
                               std::size_t p_stride, const T* const* HWY_RESTRICT v_rows,
                               std::int64_t begin, std::int64_t end, std::size_t dim,
                               std::int64_t next_count) {
  const hn::ScalableTag<float> d;
  using V = hn::Vec<decltype(d)>;
  const std::size_t lanes = hn::Lanes(d);
  const std::size_t lines_per_row = dim * sizeof(T) / 64;
  std::int64_t next_row = 0;  // the next V line to prefetch: next_row's line `next_line`
  std::size_t next_line = 0;
  std::size_t e = 0;
  for (; e + 2 * lanes <= dim; e += 2 * lanes) {
    V a[kRows][2];
    for (std::size_t r = 0; r < kRows; ++r) {
      const V scale = hn::Set(d, alpha[r]);
      a[r][0] = hn::Mul(hn::Load(d, acc + r * acc_stride + e), scale);
      a[r][1] = hn::Mul(hn::Load(d, acc + r * acc_stride + e + lanes), scale);
    }
    for (std::int64_t j = begin; j < end; ++j) {
      if constexpr (kPrefetchNextTile<T>) {
        if (next_row < next_count) {
          const auto* row = reinterpret_cast<const char*>(v_rows[kKeyTile + next_row]);
          __builtin_prefetch(row + next_line * 64, 0, 2);  // into L2
          if (++next_line == lines_per_row) {
            next_line = 0;
            ++next_row;
          }
        }
      }
      V v0, v1;
      if constexpr (kEvenOdd<T>) {
        LoadEvenOdd(d, v_rows[j], e, v0, v1);
      } else {
        v0 = LoadAsFloat(d, v_rows[j], e);
        v1 = LoadAsFloat(d, v_rows[j], e + lanes);
      }
      for (std::size_t r = 0; r < kRows; ++r) {
        const V weight = hn::Set(d, p[r * p_stride + static_cast<std::size_t>(j)]);
        a[r][0] = hn::MulAdd(weight, v0, a[r][0]);
        a[r][1] = hn::MulAdd(weight, v1, a[r][1]);
      }
    }
    for (std::size_t r = 0; r < kRows; ++r) {
      hn::Store(a[r][0], d, acc + r * acc_stride + e);
      hn::Store(a[r][1], d, acc + r * acc_stride + e + lanes);
    }
  }
  for (; e < dim; e += lanes) {
    V a[kRows];
    for (std::size_t r = 0; r < kRows; ++r) {
      a[r] = hn::Mul(hn::Load(d, acc + r * acc_stride + e), hn::Set(d, alpha[r]));
    }
    for (std::int64_t j = begin; j < end; ++j) {
      const V v = LoadAsFloat(d, v_rows[j], e);
      for (std::size_t r = 0; r < kRows; ++r) {
        a[r] = hn::MulAdd(hn::Set(d, p[r * p_stride + static_cast<std::size_t>(j)]), v, a[r]);
      }
    }
    for (std::size_t r = 0; r < kRows; ++r) hn::Store(a[r], d, acc + r * acc_stride + e);
  }
}

// What every phase of one decode task sees: the call, its kv head and its
// scratch (DecodeScratchLayout, shapes there).
struct DecodeFrame {
  const DecodeParams& params;
  const DecodePlan& plan;
  const Mask& mask;
  std::int64_t kv_head, group, rows, padded;
  float* q;
  std::uint16_t* q_bf16;
  float* acc;
  float* scores;
  float* probs;
  float* alpha;
  float* k_row;
  OnlineSoftmaxState* state;
  LocalRange* ranges;
  const void** k_rows;
  const void** v_rows;
  float* k_scales;
  float* v_scales;

  std::int64_t head_of_row(std::int64_t row) const { return kv_head * group + row % group; }
};

// One key tile [begin, end) and the rows gathered for it: keys begin ..
// table_end (the tile and up to `ahead` keys past it for prefetching, or the
// whole next tile with kPrefetchNextTile).
struct DecodeTile {
  std::int64_t begin = 0, end = 0, table_end = 0;

  // With kPrefetchNextTile: the next tile's keys in the tables (from index
  // kKeyTile on), when this tile is full and there is one.
  std::int64_t next_count() const { return end - begin == kKeyTile ? table_end - end : 0; }
};

// Queries are held in the storage dtype, like prefill's: as bf16 for the
// bf16 dot products (unscaled), else as f32, scaled.
void LoadQueries(const DecodeFrame& f, bool even_odd) {
  const DecodeParams& params = f.params;
  const std::int64_t bf16_stride = f.plan.scratch.bf16_stride;
  for (std::int64_t row = 0; row < f.rows; ++row) {
    const std::int64_t token = row / f.group;
    const float* q = params.q + (token * params.heads + f.head_of_row(row)) * f.padded;
    if (f.plan.bf16_dots) {
      std::uint16_t* q_bf16 = f.q_bf16 + row * bf16_stride;
      for (std::int64_t e = 0; e < bf16_stride; ++e) q_bf16[e] = e < f.padded ? f32_to_bf16(q[e]) : 0;
    } else {
      // In the even/odd order, the row is scaled into k_row (free until the
      // key tiles start), then reordered into q.
      float* q_row = f.q + row * f.padded;
      float* scaled = even_odd ? f.k_row : q_row;
      for (std::int64_t e = 0; e < f.padded; ++e) {
        scaled[e] = round_to_storage(q[e], params.storage) * params.scale;
      }
      if (even_odd) ToEvenOdd(scaled, q_row, f.padded);
    }
    std::fill(f.acc + row * f.padded, f.acc + (row + 1) * f.padded, 0.0f);
    f.state[row] = OnlineSoftmaxState{};
  }
}

// Row pointers of the tile's keys and of those up to table_end, from
// whichever runs hold them, one stretch of consecutive rows per run; `run`
// follows the tile. The walk ahead uses its own cursor: the next tile
// starts again at tile.end, possibly in an earlier run than the last key
// looked ahead.
template <typename T>
void GatherRows(const DecodeFrame& f, const DecodeTile& tile, std::int64_t& run) {
  const DecodeParams& params = f.params;
  std::int64_t cursor = run;
  for (std::int64_t key = tile.begin; key < tile.table_end;) {
    // Runs cover [0, seqlen_k) in order; never step past the last one.
    while (cursor + 1 < params.run_count &&
           key >= params.runs[cursor].first_key + params.runs[cursor].count) {
      ++cursor;
    }
    if (key < tile.end) run = cursor;
    const KvRun& r = params.runs[cursor];
    const std::int64_t stop = cursor + 1 < params.run_count
                                  ? std::min(tile.table_end, r.first_key + r.count)
                                  : tile.table_end;
    const std::int64_t offset = f.kv_head * r.head_stride + (key - r.first_key) * f.padded;
    const T* k = static_cast<const T*>(r.k) + offset;
    const T* v = static_cast<const T*>(r.v) + offset;
    const void** k_rows = f.k_rows + (key - tile.begin);
    const void** v_rows = f.v_rows + (key - tile.begin);
    for (std::int64_t i = 0; i < stop - key; ++i) {
      k_rows[i] = k + i * f.padded;
      v_rows[i] = v + i * f.padded;
    }
    if constexpr (kIsCode<T>) {
      const std::int64_t scale = f.kv_head * r.scale_head_stride + (key - r.first_key);
      const auto bytes = static_cast<std::size_t>(stop - key) * sizeof(float);
      std::memcpy(f.k_scales + (key - tile.begin), r.k_scales + scale, bytes);
      std::memcpy(f.v_scales + (key - tile.begin), r.v_scales + scale, bytes);
      if constexpr (kCodeFactor<T> != 1.0f) {
        for (std::int64_t i = key - tile.begin; i < stop - tile.begin; ++i) {
          f.k_scales[i] *= kCodeFactor<T>;
          f.v_scales[i] *= kCodeFactor<T>;
        }
      }
    }
    key = stop;
  }
}

// Each row's visible columns of the tile; returns their union.
LocalRange SetRanges(const DecodeFrame& f, const DecodeTile& tile) {
  LocalRange all{kKeyTile, 0};
  for (std::int64_t token = 0; token < f.params.tokens; ++token) {
    const KeyRange visible = f.mask.key_range(token);
    const LocalRange range{std::max(visible.begin, tile.begin) - tile.begin,
                           std::min(visible.end, tile.end) - tile.begin};
    for (std::int64_t g = 0; g < f.group; ++g) f.ranges[token * f.group + g] = range;
    if (range.empty()) continue;
    all.begin = std::min(all.begin, range.begin);
    all.end = std::max(all.end, range.end);
  }
  return all;
}

// Prefetches the K and V rows of key j + ahead into L1 (one head's keys are
// contiguous within a block, but blocks are scattered, and the hardware
// prefetchers stop at every page). A second prefetch twice as far into L2
// made 64k-token decode 2-5% slower (docs/PERFORMANCE.md).
HWY_INLINE void PrefetchAhead(const DecodeFrame& f, const DecodeTile& tile, std::int64_t j,
                              std::int64_t ahead, std::int64_t row_bytes) {
  if (tile.begin + j + ahead < tile.table_end) {
    const auto* k_ahead = static_cast<const char*>(f.k_rows[j + ahead]);
    const auto* v_ahead = static_cast<const char*>(f.v_rows[j + ahead]);
    for (std::int64_t line = 0; line < row_bytes; line += 64) {
      hwy::Prefetch(k_ahead + line);
      hwy::Prefetch(v_ahead + line);
    }
  }
}

// Blocked decode scores: kScoreKeys keys by four query rows at a time,
// their dot products accumulated side by side over the head dim (each K
// vector converted once for the four rows) and reduced together into one
// vector, whose lanes kScoreKeys r .. kScoreKeys (r + 1) - 1 are row r's
// scores of the keys. AVX-512: 4 keys (16 accumulators); AVX2: 2 keys (8
// accumulators of its 16 registers).
#undef LOOKBACK_BLOCKED_SCORES
#if LOOKBACK_X86_AVX512
#define LOOKBACK_BLOCKED_SCORES 1
inline constexpr std::int64_t kScoreKeys = 4;
using ScoreVec = __m512;

template <typename T>
HWY_INLINE __m512 ScoreBlock(const float* const* q, const T* const* k, std::size_t dim) {
  const hn::ScalableTag<float> d;
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (std::size_t e = 0; e < dim; e += 16) {
    __m512 kv[4], qv[4];
    for (int c = 0; c < 4; ++c) kv[c] = LoadAsFloat(d, k[c], e).raw;
    for (int r = 0; r < 4; ++r) qv[r] = _mm512_loadu_ps(q[r] + e);
    for (int r = 0; r < 4; ++r) {
      for (int c = 0; c < 4; ++c) acc[4 * r + c] = _mm512_fmadd_ps(qv[r], kv[c], acc[4 * r + c]);
    }
  }
  return SumsOf16(acc);
}

// The block times each key's scale (scales[c] for key c).
HWY_INLINE __m512 ScaleBlock(__m512 block, const float* scales) {
  return _mm512_mul_ps(block, _mm512_broadcast_f32x4(_mm_loadu_ps(scales)));
}

#elif HWY_TARGET == HWY_AVX2
#define LOOKBACK_BLOCKED_SCORES 1
inline constexpr std::int64_t kScoreKeys = 2;
using ScoreVec = __m256;

// Lane i of the result is the sum of acc[i]'s lanes: horizontal adds in
// pairs, then the two 128-bit halves.
HWY_INLINE __m256 SumsOf8(const __m256* acc) {
  const __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]), h23 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]), h67 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 low = _mm256_hadd_ps(h01, h23), high = _mm256_hadd_ps(h45, h67);
  // (low's low half, high's high half) + (low's high half, high's low half),
  // without VPERM2F128 (eight micro-ops on Zen 1).
  const __m256 crossed = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm256_extractf128_ps(low, 1)),
                                              _mm256_castps256_ps128(high), 1);
  return _mm256_add_ps(_mm256_blend_ps(low, high, 0xF0), crossed);
}

// With `next` (kPrefetchNextTile), next[c] is the row of the next tile at
// key c's place, or null: their lines are prefetched into L2 one per step
// over the dims, in address order, so that the requests spread over the
// block instead of queueing at its start.
template <typename T>
HWY_INLINE __m256 ScoreBlock(const float* const* q, const T* const* k, std::size_t dim,
                             const char* const* next = nullptr) {
  const hn::ScalableTag<float> d;
  __m256 acc[8];
  for (auto& a : acc) a = _mm256_setzero_ps();
  // The four rows' dims e .. e + 7 against the two keys' vectors.
  const auto accumulate = [&](std::size_t e, __m256 k0, __m256 k1) HWY_ATTR {
    for (int r = 0; r < 4; ++r) {
      // In a register: GCC would otherwise fold the load into both FMAs,
      // loading each Q vector twice (ten loads per eight FMAs; on a core
      // that splits 256-bit loads in two, as Zen 1 does, more cycles of
      // loads than of FMAs).
      __m256 qv = _mm256_loadu_ps(q[r] + e);
      asm("" : "+x"(qv));
      acc[2 * r] = _mm256_fmadd_ps(qv, k0, acc[2 * r]);
      acc[2 * r + 1] = _mm256_fmadd_ps(qv, k1, acc[2 * r + 1]);
    }
  };
  if constexpr (kEvenOdd<T>) {
    for (std::size_t e = 0; e < dim; e += kEvenOddDims) {
      hn::Vec<decltype(d)> k0[2], k1[2];
      LoadEvenOdd(d, k[0], e, k0[0], k0[1]);
      LoadEvenOdd(d, k[1], e, k1[0], k1[1]);
      accumulate(e, k0[0].raw, k1[0].raw);      // the even dims
      accumulate(e + 8, k0[1].raw, k1[1].raw);  // the odd ones
    }
  } else if (next != nullptr) {
    // The two rows hold one line per step of 8 floats: row 0's lines in the
    // first half of the steps, row 1's in the second.
    const std::size_t lines = dim * sizeof(T) / 64;
    for (std::size_t e = 0, step = 0; e < dim; e += 8, ++step) {
      const std::size_t row = step < lines ? 0 : 1;
      if (next[row] != nullptr) __builtin_prefetch(next[row] + (step - row * lines) * 64, 0, 2);
      accumulate(e, LoadAsFloat(d, k[0], e).raw, LoadAsFloat(d, k[1], e).raw);
    }
  } else {
    for (std::size_t e = 0; e < dim; e += 8) {
      accumulate(e, LoadAsFloat(d, k[0], e).raw, LoadAsFloat(d, k[1], e).raw);
    }
  }
  return SumsOf8(acc);
}

HWY_INLINE __m256 ScaleBlock(__m256 block, const float* scales) {
  return _mm256_mul_ps(block, _mm256_setr_ps(scales[0], scales[1], scales[0], scales[1],
                                             scales[0], scales[1], scales[0], scales[1]));
}

// Row r's scores of the block's keys (lanes 2 r, 2 r + 1) at scores + r * stride.
// A whole block is stored as four pairs straight from the register (3-5%
// faster decode in cache on the Zen 1 EPYC than through the array below).
HWY_INLINE void StoreScoreBlock(__m256 block, std::size_t rows, std::int64_t keys, float* scores,
                                std::size_t stride) {
  if (rows >= 4 && keys == 2) {
    const __m128 low = _mm256_castps256_ps128(block), high = _mm256_extractf128_ps(block, 1);
    _mm_storel_pi(reinterpret_cast<__m64*>(scores), low);
    _mm_storeh_pi(reinterpret_cast<__m64*>(scores + stride), low);
    _mm_storel_pi(reinterpret_cast<__m64*>(scores + 2 * stride), high);
    _mm_storeh_pi(reinterpret_cast<__m64*>(scores + 3 * stride), high);
    return;
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, block);
  for (std::size_t r = 0; r < rows && r < 4; ++r) {
    for (std::int64_t c = 0; c < keys; ++c) {
      scores[r * stride + static_cast<std::size_t>(c)] = lanes[2 * r + static_cast<std::size_t>(c)];
    }
  }
}
#else
#define LOOKBACK_BLOCKED_SCORES 0
#endif

#if LOOKBACK_BLOCKED_SCORES
// Decode scores, blocked (above), for every cache but bf16 with VDPBF16PS:
// the visible columns `all` of the tile. Scores of (row, key) pairs outside
// a row's range are written too and never read (the masked softmax selects
// by range). 8-bit K rows are scored on their bare codes and the score takes
// the row's scale.
template <typename T>
void ScoresBlocked(const DecodeFrame& f, const DecodeTile& tile, LocalRange all, std::int64_t ahead,
                   std::int64_t row_bytes) {
  const auto dim = static_cast<std::size_t>(f.padded);
  const std::int64_t rows = f.rows;
  float* HWY_RESTRICT scores = f.scores;
  for (std::int64_t j = all.begin; j < all.end; j += kScoreKeys) {
    const std::int64_t keys = std::min<std::int64_t>(kScoreKeys, all.end - j);
    for (std::int64_t c = 0; c < keys; ++c) PrefetchAhead(f, tile, j + c, ahead, row_bytes);
    // The next tile's K rows at the same places (prefetched by the block).
    const char* next[kScoreKeys] = {};
    if constexpr (kPrefetchNextTile<T>) {
      for (std::int64_t c = 0; c < keys && j + c < tile.next_count(); ++c) {
        next[c] = static_cast<const char*>(f.k_rows[kKeyTile + j + c]);
      }
    }
    const T* k[kScoreKeys];
    float key_scales[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    for (std::int64_t c = 0; c < kScoreKeys; ++c) {
      const std::int64_t key = j + std::min(c, keys - 1);  // repeats past the end
      k[c] = static_cast<const T*>(f.k_rows[key]);
      if constexpr (kIsCode<T>) key_scales[c] = f.k_scales[key];
    }
    for (std::int64_t row = 0; row < rows; row += 4) {
      const float* q[4];
      for (std::int64_t r = 0; r < 4; ++r) q[r] = f.q + std::min(row + r, rows - 1) * f.padded;
      ScoreVec block;
      if constexpr (kPrefetchNextTile<T>) {
        block = ScoreBlock(q, k, dim, row == 0 ? next : nullptr);
      } else {
        block = ScoreBlock(q, k, dim);
      }
      if constexpr (kIsCode<T>) block = ScaleBlock(block, key_scales);
      StoreScoreBlock(block, static_cast<std::size_t>(rows - row), keys,
                      scores + row * kKeyTile + j, kKeyTile);
    }
  }
}
#endif

// S for the visible columns `all` of the tile, key by key so that each K row
// is read from memory once for the whole group.
template <typename T>
void Scores(const DecodeFrame& f, const DecodeTile& tile, LocalRange all, std::int64_t ahead,
            std::int64_t row_bytes) {
  const auto dim = static_cast<std::size_t>(f.padded);
#if LOOKBACK_X86_AVX512
  if constexpr (std::is_same_v<T, hwy::bfloat16_t>) {
    if (f.plan.bf16_dots) {
      DecodeScoresBf16(f.q_bf16, static_cast<std::size_t>(f.plan.scratch.bf16_stride),
                       static_cast<std::size_t>(f.rows), f.k_rows, f.v_rows, all.begin, all.end,
                       ahead, tile.table_end - tile.begin, static_cast<std::size_t>(row_bytes), dim,
                       f.scores, kKeyTile);
      return;
    }
  }
#endif
#if LOOKBACK_BLOCKED_SCORES
  ScoresBlocked<T>(f, tile, all, ahead, row_bytes);
  return;
#endif
  // Locals: the stores to scores below must not make the compiler reload
  // the frame's fields.
  const std::int64_t rows = f.rows, padded = f.padded;
  const LocalRange* HWY_RESTRICT ranges = f.ranges;
  const float* HWY_RESTRICT q = f.q;
  float* HWY_RESTRICT k_row = f.k_row;
  float* HWY_RESTRICT scores = f.scores;
  for (std::int64_t j = all.begin; j < all.end; ++j) {
    PrefetchAhead(f, tile, j, ahead, row_bytes);
    const T* k = static_cast<const T*>(f.k_rows[j]);
    const float* k_f32 = nullptr;
    if constexpr (std::is_same_v<T, float>) {
      k_f32 = k;
    } else {
      // Convert the stored row once for every query row of the group.
      const hn::ScalableTag<float> d;
      if constexpr (kIsCode<T>) {
        const auto scale = hn::Set(d, f.k_scales[j]);
        for (std::size_t e = 0; e < dim; e += hn::Lanes(d)) {
          hn::Store(hn::Mul(LoadAsFloat(d, k, e), scale), d, k_row + e);
        }
      } else {
        for (std::size_t e = 0; e < dim; e += hn::Lanes(d)) hn::Store(LoadAsFloat(d, k, e), d, k_row + e);
      }
      k_f32 = k_row;
    }
    for (std::int64_t row = 0; row < rows; ++row) {
      if (j < ranges[row].begin || j >= ranges[row].end) continue;
      scores[row * kKeyTile + j] = Dot(q + row * padded, k_f32, dim);
    }
  }
}

void Softmax(const DecodeFrame& f, const DecodeTile& tile) {
  const DecodeParams& params = f.params;
  for (std::int64_t row = 0; row < f.rows; ++row) {
    const LocalRange range = f.ranges[row];
    if (range.empty()) continue;
    const std::int64_t head = f.head_of_row(row);
    const float slope = params.maybe_alibi_slopes != nullptr ? params.maybe_alibi_slopes[head] : 0.0f;
    const float position = static_cast<float>(f.mask.position(row / f.group));
    const float score_scale = f.plan.bf16_dots ? params.scale : 1.0f;
    float* scores = f.scores + row * kKeyTile;
    float* p = f.probs + row * kKeyTile;
    // A row that sees the whole tile takes the unmasked softmax (one pass
    // against the running max where it can), the others the masked one.
    f.alpha[row] = range.begin == 0 && range.end == kKeyTile
                       ? SoftmaxRow<false>(scores, range, params.softcap, slope, position,
                                           static_cast<float>(tile.begin), f.state[row],
                                           score_scale, nullptr, p)
                       : SoftmaxRow<true>(scores, range, params.softcap, slope, position,
                                          static_cast<float>(tile.begin), f.state[row],
                                          score_scale, nullptr, p);
  }
}

// 8-bit V: p_ij * (decode(code_j) * scale_j) = (p_ij * scale_j) * decode(code_j),
// so each row's P takes its keys' V scales and Accumulate reads bare codes.
void ScaleProbabilitiesByV(const DecodeFrame& f) {
  for (std::int64_t row = 0; row < f.rows; ++row) {
    const LocalRange range = f.ranges[row];
    float* p = f.probs + row * kKeyTile;
    for (std::int64_t j = range.begin; j < range.end; ++j) p[j] *= f.v_scales[j];
  }
}

// O = alpha O + P V: rows that share a key range (the heads of a token) four
// at a time, so each V row is converted once for them.
template <typename T>
void Accumulate(const DecodeFrame& f, const DecodeTile& tile) {
  const auto dim = static_cast<std::size_t>(f.padded);
  const auto* v_rows = reinterpret_cast<const T* const*>(f.v_rows);
  const std::int64_t next_count = tile.next_count();
  for (std::int64_t row = 0; row < f.rows;) {
    const LocalRange range = f.ranges[row];
    std::int64_t same = 1;
    while (same < 4 && row + same < f.rows && f.ranges[row + same].begin == range.begin &&
           f.ranges[row + same].end == range.end) {
      ++same;
    }
    if (!range.empty()) {
      float* acc = f.acc + row * f.padded;
      const float* p = f.probs + row * kKeyTile;
      const float* alpha = f.alpha + row;
      const auto rows = [&]<std::size_t kRows>() {
        AccumulateRows<T, kRows>(acc, dim, alpha, p, kKeyTile, v_rows, range.begin,
                                 range.end, dim, next_count);
      };
      switch (same) {
        case 4: rows.template operator()<4>(); break;
        case 3: rows.template operator()<3>(); break;
        case 2: rows.template operator()<2>(); break;
        default: rows.template operator()<1>(); break;
      }
    }
    row += same;
  }
}

// The normalised partial output and its LSE.
void WriteOutputs(const DecodeFrame& f, bool even_odd) {
  const DecodeParams& params = f.params;
  for (std::int64_t row = 0; row < f.rows; ++row) {
    const std::int64_t token = row / f.group;
    const std::int64_t head = f.head_of_row(row);
    const float normalizer = f.state[row].normalizer();
    float* out = params.out + (token * params.heads + head) * f.padded;
    float* acc = f.acc + row * f.padded;
    if (even_odd) {
      for (std::int64_t e = 0; e < f.padded; ++e) acc[e] *= normalizer;
      FromEvenOdd(acc, out, f.padded);
    } else {
      for (std::int64_t e = 0; e < f.padded; ++e) out[e] = acc[e] * normalizer;
    }
    params.lse[head * params.tokens + token] = f.state[row].lse();
  }
}

// One kv head over params.keys, tile by tile.
template <typename T>
void DecodeTyped(const DecodeFrame& f) {
  constexpr bool even_odd = kEvenOdd<T>;
  LoadQueries(f, even_odd);
  const std::int64_t row_bytes = f.padded * static_cast<std::int64_t>(sizeof(T));
  const std::int64_t ahead = std::clamp<std::int64_t>(kPrefetchBytes / row_bytes, 1, kMaxPrefetchKeys);
  // Rows gathered past each tile: those the scores prefetch, or the whole
  // next tile with kPrefetchNextTile.
  const std::int64_t past = kPrefetchNextTile<T> ? kKeyTile : ahead;
  KeyRange keys = f.mask.key_range_of_rows(0, f.params.tokens);
  keys.begin = std::max(keys.begin, f.params.keys.begin);
  keys.end = std::min(keys.end, f.params.keys.end);
  std::int64_t run = 0;
  for (std::int64_t begin = keys.begin; begin < keys.end; begin += kKeyTile) {
    const std::int64_t end = std::min(keys.end, begin + kKeyTile);
    const DecodeTile tile{begin, end, std::min(keys.end, end + past)};
    GatherRows<T>(f, tile, run);
    const LocalRange all = SetRanges(f, tile);
    Scores<T>(f, tile, all, ahead, row_bytes);
    Softmax(f, tile);
    if constexpr (kIsCode<T>) ScaleProbabilitiesByV(f);
    Accumulate<T>(f, tile);
  }
  WriteOutputs(f, even_odd);
}

}  // namespace

void DecodeKvHead(const DecodeParams& params, const DecodePlan& plan, std::int64_t kv_head,
                  void* scratch) {
  const DecodeScratchLayout& s = plan.scratch;
  const Mask mask(params.tokens, params.seqlen_k,
                  {.causal = Causal::kBottomRight, .window_left = params.window_left});
  const std::int64_t group = params.heads / params.kv_heads;
  const DecodeFrame frame{.params = params,
                          .plan = plan,
                          .mask = mask,
                          .kv_head = kv_head,
                          .group = group,
                          .rows = params.tokens * group,  // row = token * group + g
                          .padded = params.padded_dim,
                          .q = s.q.in(scratch),
                          .q_bf16 = s.q_bf16.in(scratch),
                          .acc = s.acc.in(scratch),
                          .scores = s.scores.in(scratch),
                          .probs = s.probs.in(scratch),
                          .alpha = s.alpha.in(scratch),
                          .k_row = s.k_row.in(scratch),
                          .state = s.state.in(scratch),
                          .ranges = s.ranges.in(scratch),
                          .k_rows = s.k_rows.in(scratch),
                          .v_rows = s.v_rows.in(scratch),
                          .k_scales = s.k_scales.in(scratch),
                          .v_scales = s.v_scales.in(scratch)};
  switch (params.storage) {
    case DType::kBF16: DecodeTyped<hwy::bfloat16_t>(frame); break;
    case DType::kF16: DecodeTyped<hwy::float16_t>(frame); break;
    case DType::kI8: DecodeTyped<Int8Code>(frame); break;
    case DType::kFP8E4M3: DecodeTyped<E4M3Code>(frame); break;
    case DType::kFP8E5M2: DecodeTyped<E5M2Code>(frame); break;
    default: DecodeTyped<float>(frame); break;
  }
}

}  // namespace lookback::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lookback::kernels {

HWY_EXPORT(DecodeKvHead);

DecodePlan plan_decode(const DecodeParams& params) {
  DecodePlan plan;
  plan.bf16_dots = use_bf16_decode_dots(params.storage);
  const auto rows = static_cast<std::size_t>(params.tokens * (params.heads / params.kv_heads));
  const auto dim = static_cast<std::size_t>(params.padded_dim);
  static_assert(kMaxPrefetchKeys <= kKeyTile);
  const auto table = static_cast<std::size_t>(2 * kKeyTile);  // up to the whole next tile
  DecodeScratchLayout& s = plan.scratch;
  s.bf16_stride = (params.padded_dim + 31) / 32 * 32;
  ScratchLayout layout;
  s.q = layout.add<float>(plan.bf16_dots ? 0 : rows * dim);
  s.q_bf16 = layout.add<std::uint16_t>(plan.bf16_dots ? rows * static_cast<std::size_t>(s.bf16_stride) : 0);
  s.acc = layout.add<float>(rows * dim);
  s.scores = layout.add<float>(rows * static_cast<std::size_t>(kKeyTile));
  s.probs = layout.add<float>(rows * static_cast<std::size_t>(kKeyTile));
  s.alpha = layout.add<float>(rows);
  s.k_row = layout.add<float>(params.storage == DType::kF32 ? 0 : dim);
  s.state = layout.add<OnlineSoftmaxState>(rows);
  s.ranges = layout.add<LocalRange>(rows);
  s.k_rows = layout.add<const void*>(table);
  s.v_rows = layout.add<const void*>(table);
  s.k_scales = layout.add<float>(is_quantized(params.storage) ? table : 0);
  s.v_scales = layout.add<float>(is_quantized(params.storage) ? table : 0);
  s.bytes = layout.bytes();
  return plan;
}

void decode_kv_head(const DecodeParams& params, const DecodePlan& plan, std::int64_t kv_head,
                    void* scratch) {
  apply_simd_policy();
  HWY_DYNAMIC_DISPATCH(DecodeKvHead)(params, plan, kv_head, scratch);
}

}  // namespace lookback::kernels
#endif  // HWY_ONCE
