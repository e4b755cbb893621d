// The decode kernel. One call handles one kv head: its query heads (a GQA
// group) times the step's tokens are the rows; keys stream in tiles of
// kKeyTile straight from the cache (contiguous runs or paged blocks), in the
// storage dtype, converted to f32 in registers. Per tile: one dot product
// per (row, visible key), the shared online-softmax step, then O += P V over
// each row's visible keys only (hidden slots are never read).

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
  } else {
    const hn::Rebind<T, D> narrow;
    return hn::PromoteTo(d, hn::LoadU(narrow, row + offset));
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

// acc[r] = alpha[r] * acc[r] + sum_j p[r][j] * v_rows[j] for kRows rows that
// share the key range [begin, end): each V row is loaded (and converted from
// the storage dtype) once for all of them.
template <typename T, std::size_t kRows>
HWY_INLINE void AccumulateRows(float* HWY_RESTRICT acc, std::size_t acc_stride,
                               const float* HWY_RESTRICT alpha, const float* HWY_RESTRICT p,
                               std::size_t p_stride, const T* const* HWY_RESTRICT v_rows,
                               std::int64_t begin, std::int64_t end, std::size_t dim) {
  const hn::ScalableTag<float> d;
  using V = hn::Vec<decltype(d)>;
  const std::size_t lanes = hn::Lanes(d);
  std::size_t e = 0;
  for (; e + 2 * lanes <= dim; e += 2 * lanes) {
    V a[kRows][2];
    for (std::size_t r = 0; r < kRows; ++r) {
      const V scale = hn::Set(d, alpha[r]);
      a[r][0] = hn::Mul(hn::Load(d, acc + r * acc_stride + e), scale);
      a[r][1] = hn::Mul(hn::Load(d, acc + r * acc_stride + e + lanes), scale);
    }
    for (std::int64_t j = begin; j < end; ++j) {
      const V v0 = LoadAsFloat(d, v_rows[j], e);
      const V v1 = LoadAsFloat(d, v_rows[j], e + lanes);
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

struct DecodeScratch {
  float* q;                   // (rows, padded_dim): scaled queries of the group
  float* acc;                 // (rows, padded_dim)
  float* scores;              // (rows, kKeyTile)
  OnlineSoftmaxState* state;  // (rows)
  LocalRange* ranges;         // (rows)
  float* alpha;               // (rows)
  float* k_row;               // (padded_dim): one key row converted to f32
  const void** k_rows;        // (kKeyTile + kMaxPrefetchKeys)
  const void** v_rows;        // (kKeyTile + kMaxPrefetchKeys)
  std::uint16_t* q_bf16;      // (rows, bf16_stride): unscaled bf16 queries (bf16 dot products)
  std::int64_t bf16_stride;   // padded_dim rounded up to 32
};

// bf16 caches on CPUs with AVX512-BF16: scores by VDPBF16PS on the stored
// rows, the queries rounded to bf16 (the storage dtype, as prefill holds
// them) and the scale applied to the scores.
bool UseBf16Dots() {
#if LOOKBACK_X86_AVX512
  static const bool supported = __builtin_cpu_supports("avx512bf16");
  return supported;
#else
  return false;
#endif
}

template <typename T>
void DecodeTyped(const DecodeParams& params, std::int64_t kv_head, DecodeScratch s) {
  const std::int64_t group = params.heads / params.kv_heads;
  const std::int64_t rows = params.tokens * group;  // row = token * group + g
  const std::int64_t padded = params.padded_dim;
  const auto dim = static_cast<std::size_t>(padded);
  const Mask mask(params.tokens, params.seqlen_k,
                  {.causal = Causal::kBottomRight, .window_left = params.window_left});

  const bool bf16_dots = std::is_same_v<T, hwy::bfloat16_t> && UseBf16Dots();
  for (std::int64_t token = 0; token < params.tokens; ++token) {
    for (std::int64_t g = 0; g < group; ++g) {
      const std::int64_t row = token * group + g;
      const float* q = params.q + (token * params.heads + kv_head * group + g) * padded;
      // Queries are held in the storage dtype, like prefill's: as bf16 for
      // the bf16 dot products (unscaled), else as f32, scaled.
      if (bf16_dots) {
        std::uint16_t* q_bf16 = s.q_bf16 + row * s.bf16_stride;
        for (std::int64_t e = 0; e < s.bf16_stride; ++e) q_bf16[e] = e < padded ? f32_to_bf16(q[e]) : 0;
      } else {
        for (std::int64_t e = 0; e < padded; ++e) {
          s.q[row * padded + e] = round_to_storage(q[e], params.storage) * params.scale;
        }
      }
      std::fill(s.acc + row * padded, s.acc + (row + 1) * padded, 0.0f);
      s.state[row] = OnlineSoftmaxState{};
    }
  }

  const auto row_bytes = static_cast<std::int64_t>(dim * sizeof(T));
  const std::int64_t ahead = std::clamp<std::int64_t>(kPrefetchBytes / row_bytes, 1, kMaxPrefetchKeys / 2);
  KeyRange keys = mask.key_range_of_rows(0, params.tokens);
  keys.begin = std::max(keys.begin, params.keys.begin);
  keys.end = std::min(keys.end, params.keys.end);
  std::int64_t run = 0;
  for (std::int64_t tile_begin = keys.begin; tile_begin < keys.end; tile_begin += kKeyTile) {
    const std::int64_t tile_end = std::min(keys.end, tile_begin + kKeyTile);
    // Row pointers of the tile's keys and of the next 2 * ahead
    // (prefetched across the tile boundary), from whichever runs hold them.
    // The walk ahead uses its own cursor: the next tile starts again at
    // tile_end, possibly in an earlier run than the last key looked ahead.
    const std::int64_t table_end = std::min(keys.end, tile_end + 2 * ahead);
    std::int64_t cursor = run;
    for (std::int64_t key = tile_begin; key < table_end; ++key) {
      // Runs cover [0, seqlen_k) in order; never step past the last one.
      while (cursor + 1 < params.run_count &&
             key >= params.runs[cursor].first_key + params.runs[cursor].count) {
        ++cursor;
      }
      if (key < tile_end) run = cursor;
      const KvRun& r = params.runs[cursor];
      const std::int64_t offset = kv_head * r.head_stride + (key - r.first_key) * padded;
      s.k_rows[key - tile_begin] = static_cast<const T*>(r.k) + offset;
      s.v_rows[key - tile_begin] = static_cast<const T*>(r.v) + offset;
    }
    for (std::int64_t token = 0; token < params.tokens; ++token) {
      const KeyRange visible = mask.key_range(token);
      const LocalRange range{std::max(visible.begin, tile_begin) - tile_begin,
                             std::min(visible.end, tile_end) - tile_begin};
      for (std::int64_t g = 0; g < group; ++g) s.ranges[token * group + g] = range;
    }
    // Scores, key by key so that each K row is read from memory once for the
    // whole group, with the rows a few keys ahead prefetched (one head's keys
    // are contiguous within a block, but blocks are scattered).
    LocalRange all{kKeyTile, 0};
    for (std::int64_t row = 0; row < rows; ++row) {
      if (s.ranges[row].empty()) continue;
      all.begin = std::min(all.begin, s.ranges[row].begin);
      all.end = std::max(all.end, s.ranges[row].end);
    }
#if LOOKBACK_X86_AVX512
    if (bf16_dots) {
      DecodeScoresBf16(s.q_bf16, static_cast<std::size_t>(s.bf16_stride), static_cast<std::size_t>(rows),
                       s.k_rows, s.v_rows, all.begin, all.end, ahead, table_end - tile_begin,
                       static_cast<std::size_t>(row_bytes), dim, s.scores, kKeyTile);
      all = LocalRange{};  // scored
    }
#endif
    for (std::int64_t j = all.begin; j < all.end; ++j) {
      if (tile_begin + j + ahead < table_end) {
        const auto* k_ahead = static_cast<const char*>(s.k_rows[j + ahead]);
        const auto* v_ahead = static_cast<const char*>(s.v_rows[j + ahead]);
        for (std::int64_t line = 0; line < row_bytes; line += 64) {
          hwy::Prefetch(k_ahead + line);
          hwy::Prefetch(v_ahead + line);
        }
      }
      if (tile_begin + j + 2 * ahead < table_end) {
        const auto* k_far = static_cast<const char*>(s.k_rows[j + 2 * ahead]);
        const auto* v_far = static_cast<const char*>(s.v_rows[j + 2 * ahead]);
        for (std::int64_t line = 0; line < row_bytes; line += 64) {
          __builtin_prefetch(k_far + line, 0, 2);
          __builtin_prefetch(v_far + line, 0, 2);
        }
      }
      const T* k = static_cast<const T*>(s.k_rows[j]);
      if constexpr (std::is_same_v<T, float>) {
        for (std::int64_t row = 0; row < rows; ++row) {
          if (j < s.ranges[row].begin || j >= s.ranges[row].end) continue;
          s.scores[row * kKeyTile + j] = Dot(s.q + row * padded, k, dim);
        }
      } else {
        // Convert the stored row once for every query row of the group.
        const hn::ScalableTag<float> d;
        for (std::size_t e = 0; e < dim; e += hn::Lanes(d)) {
          hn::Store(LoadAsFloat(d, k, e), d, s.k_row + e);
        }
        for (std::int64_t row = 0; row < rows; ++row) {
          if (j < s.ranges[row].begin || j >= s.ranges[row].end) continue;
          s.scores[row * kKeyTile + j] = Dot(s.q + row * padded, s.k_row, dim);
        }
      }
    }
    for (std::int64_t row = 0; row < rows; ++row) {
      const LocalRange range = s.ranges[row];
      if (range.empty()) continue;
      float* scores = s.scores + row * kKeyTile;
      const std::int64_t token = row / group;
      const std::int64_t head = kv_head * group + row % group;
      const float slope =
          params.maybe_alibi_slopes != nullptr ? params.maybe_alibi_slopes[head] : 0.0f;
      s.alpha[row] = SoftmaxRow<true>(scores, range, params.softcap, slope,
                                      static_cast<float>(mask.position(token)),
                                      static_cast<float>(tile_begin), s.state[row],
                                      bf16_dots ? params.scale : 1.0f);
    }
    // P V: rows that share a key range (the heads of a token) four at a time.
    const auto* v_rows = reinterpret_cast<const T* const*>(s.v_rows);
    for (std::int64_t row = 0; row < rows;) {
      const LocalRange range = s.ranges[row];
      std::int64_t same = 1;
      while (same < 4 && row + same < rows && s.ranges[row + same].begin == range.begin &&
             s.ranges[row + same].end == range.end) {
        ++same;
      }
      if (!range.empty()) {
        float* acc = s.acc + row * padded;
        const float* p = s.scores + row * kKeyTile;
        const float* alpha = s.alpha + row;
        switch (same) {
          case 4: AccumulateRows<T, 4>(acc, dim, alpha, p, kKeyTile, v_rows, range.begin, range.end, dim); break;
          case 3: AccumulateRows<T, 3>(acc, dim, alpha, p, kKeyTile, v_rows, range.begin, range.end, dim); break;
          case 2: AccumulateRows<T, 2>(acc, dim, alpha, p, kKeyTile, v_rows, range.begin, range.end, dim); break;
          default: AccumulateRows<T, 1>(acc, dim, alpha, p, kKeyTile, v_rows, range.begin, range.end, dim); break;
        }
      }
      row += same;
    }
  }

  for (std::int64_t row = 0; row < rows; ++row) {
    const std::int64_t token = row / group;
    const std::int64_t head = kv_head * group + row % group;
    const float normalizer = s.state[row].normalizer();
    float* out = params.out + (token * params.heads + head) * padded;
    for (std::int64_t e = 0; e < padded; ++e) out[e] = s.acc[row * padded + e] * normalizer;
    params.lse[head * params.tokens + token] = s.state[row].lse();
  }
}

}  // namespace

void DecodeKvHead(const DecodeParams& params, std::int64_t kv_head, void* scratch) {
  const std::int64_t rows = params.tokens * (params.heads / params.kv_heads);
  const std::int64_t padded = params.padded_dim;
  DecodeScratch s;
  auto* base = static_cast<float*>(scratch);
  s.q = base;
  s.acc = s.q + rows * padded;
  s.scores = s.acc + rows * padded;
  s.state = reinterpret_cast<OnlineSoftmaxState*>(s.scores + rows * kKeyTile);
  s.ranges = reinterpret_cast<LocalRange*>(s.state + rows);
  s.alpha = reinterpret_cast<float*>(s.ranges + rows);
  // 64-byte aligned: whole-vector stores.
  s.k_row = reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(s.alpha + rows) + 63) / 64 * 64);
  s.k_rows = reinterpret_cast<const void**>(s.k_row + padded);
  s.v_rows = s.k_rows + kKeyTile + kMaxPrefetchKeys;
  s.bf16_stride = (padded + 31) / 32 * 32;
  s.q_bf16 = reinterpret_cast<std::uint16_t*>(
      (reinterpret_cast<std::uintptr_t>(s.v_rows + kKeyTile + kMaxPrefetchKeys) + 63) / 64 * 64);
  switch (params.storage) {
    case DType::kBF16: DecodeTyped<hwy::bfloat16_t>(params, kv_head, s); break;
    case DType::kF16: DecodeTyped<hwy::float16_t>(params, kv_head, s); break;
    default: DecodeTyped<float>(params, kv_head, s); break;
  }
}

}  // namespace lookback::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lookback::kernels {

HWY_EXPORT(DecodeKvHead);

std::size_t decode_scratch_bytes(const DecodeParams& params) {
  const std::int64_t rows = params.tokens * (params.heads / params.kv_heads);
  return static_cast<std::size_t>(2 * rows * params.padded_dim + rows * kKeyTile) * sizeof(float) +
         static_cast<std::size_t>(rows) * (sizeof(OnlineSoftmaxState) + 2 * sizeof(std::int64_t)) +
         2 * (kKeyTile + kMaxPrefetchKeys) * sizeof(void*) + static_cast<std::size_t>(rows + params.padded_dim) * sizeof(float) +
         static_cast<std::size_t>(rows * ((params.padded_dim + 31) / 32 * 32)) * sizeof(std::uint16_t) +
         576;
}

void decode_kv_head(const DecodeParams& params, std::int64_t kv_head, void* scratch) {
  apply_simd_policy();
  HWY_DYNAMIC_DISPATCH(DecodeKvHead)(params, kv_head, scratch);
}

}  // namespace lookback::kernels
#endif  // HWY_ONCE
