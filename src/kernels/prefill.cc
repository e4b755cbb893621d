// Causal prefill (FlashAttention-2 on a CPU). One task is (batch, kv head,
// query tile): the query heads that share the kv head walk the key tiles the
// mask leaves visible, so each K/V tile is loaded once for the whole group.
// RunTask is the paper's loop; each phase is a small function per path
// (F32Path: FMA micro-kernels; AmxPath: bf16 on the AMX tiles; Bf16DotPath:
// bf16 by AVX512-BF16 dot products where there is no AMX), the path
// chosen once per call by the plan. Empty tiles are skipped, full tiles are
// not masked, only diagonal and window-edge tiles test the mask.
//
// Masked scores are never multiplied by zero: their S entries are replaced
// by -inf before the max, their P entries are never used, and P V runs only
// over each row's visible keys, so a NaN in a hidden key or value cannot
// reach a visible output.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/prefill.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/cache_control.h>
#include <hwy/highway.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <vector>

#include "kernels/amx-inl.h"
#include "kernels/bf16-inl.h"
#include "kernels/gemm-inl.h"
#include "kernels/online_softmax.hpp"
#include "kernels/pack-inl.h"
#include "kernels/pack.hpp"
#include "kernels/prefill.hpp"
#include "kernels/softmax-inl.h"
#include "kernels/tiles.hpp"
#include "lookback/mask.hpp"

HWY_BEFORE_NAMESPACE();
namespace lookback::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

namespace {

// What every phase of one task sees: the call, the task's rows and its
// worker's scratch (PrefillScratchLayout, shapes there).
struct TaskFrame {
  const PrefillParams& params;
  const PackedKV& packed;
  const Mask& mask;
  std::int64_t b, kv_head, group, padded;
  std::int64_t row_begin, rows;  // query rows [row_begin, row_begin + rows)
  float* q;
  std::uint16_t* q_bf16;
  float* acc;
  float* scores;
  float* p;
  std::uint16_t* p_bf16;
  float* v_rows;
  float* alpha;
  OnlineSoftmaxState* state;
  LocalRange* ranges;

  std::int64_t head(std::int64_t g) const { return kv_head * group + g; }
  float* acc_of(std::int64_t g) const { return acc + g * kQueryTile * padded; }
};

// One step of the key loop: a key tile, or up to the path's span (kF32Span,
// kAmxSpan) of consecutive full tiles taken together.
struct KeyStep {
  std::int64_t tile = 0;
  std::int64_t span = 1;
  std::int64_t key_begin = 0;
  // The tile's keys that lie in the key range this call covers.
  std::int64_t used_begin = 0, used_end = 0;
  // Rows need their own ranges: a diagonal or window-edge tile, or one cut
  // short (the last tile, or the call's key range).
  bool masked = false;
  std::int64_t width() const { return span * kKeyTile; }
};

// ---- Phases shared by every path ----

void ResetRows(const TaskFrame& f) {
  for (std::int64_t g = 0; g < f.group; ++g) {
    std::fill(f.acc_of(g), f.acc_of(g) + f.rows * f.padded, 0.0f);
    std::fill(f.state + g * kQueryTile, f.state + (g + 1) * kQueryTile, OnlineSoftmaxState{});
  }
}

// Keys any of query rows [row_begin, row_end) can see, within the call's
// key range.
KeyRange VisibleKeys(const PrefillParams& params, const Mask& mask, std::int64_t row_begin,
                     std::int64_t row_end) {
  KeyRange keys = mask.key_range_of_rows(row_begin, row_end);
  keys.begin = std::max(keys.begin, params.keys.begin);
  keys.end = std::min(keys.end, params.keys.end);
  return keys;
}

// Keys any of the task's rows can see.
KeyRange TaskKeys(const TaskFrame& f) {
  return VisibleKeys(f.params, f.mask, f.row_begin, f.row_begin + f.rows);
}

// Whether every row sees every key of `tile`, and the tile is whole.
bool FullTile(const TaskFrame& f, std::int64_t tile) {
  const std::int64_t key_begin = tile * kKeyTile, key_end = key_begin + kKeyTile;
  return key_begin >= f.params.keys.begin && key_end <= f.params.keys.end &&
         key_end <= f.params.shape.seqlen_k &&
         f.mask.tile_visibility(f.row_begin, f.row_begin + f.rows, key_begin, key_end) ==
             TileVisibility::kFull;
}

// The step at the first non-empty tile from `tile` on; false past the last.
bool StepAt(const TaskFrame& f, KeyRange keys, std::int64_t tile, std::int64_t max_span,
            KeyStep& step) {
  const std::int64_t last_tile = (keys.end - 1) / kKeyTile;
  for (; tile <= last_tile; ++tile) {
    const std::int64_t key_begin = tile * kKeyTile;
    const std::int64_t key_end = std::min(f.params.shape.seqlen_k, key_begin + kKeyTile);
    const std::int64_t used_begin = std::max(key_begin, f.params.keys.begin);
    const std::int64_t used_end = std::min(key_end, f.params.keys.end);
    const TileVisibility visibility =
        f.mask.tile_visibility(f.row_begin, f.row_begin + f.rows, used_begin, used_end);
    if (visibility == TileVisibility::kEmpty) continue;
    step = {.tile = tile,
            .key_begin = key_begin,
            .used_begin = used_begin,
            .used_end = used_end,
            .masked = visibility == TileVisibility::kPartial || used_begin != key_begin ||
                      used_end - key_begin != kKeyTile};
    if (!step.masked) {
      while (step.span < max_span && tile + step.span <= last_tile && FullTile(f, tile + step.span)) {
        ++step.span;
      }
    }
    return true;
  }
  return false;
}

// Each row's visible columns of the step.
void SetRowRanges(const TaskFrame& f, const KeyStep& step) {
  for (std::int64_t r = 0; r < f.rows; ++r) {
    if (!step.masked) {
      f.ranges[r] = {0, step.width()};
      continue;
    }
    const KeyRange row_keys = f.mask.key_range(f.row_begin + r);
    f.ranges[r] = {std::max(row_keys.begin, step.used_begin) - step.key_begin,
                   std::min(row_keys.end, step.used_end) - step.key_begin};
  }
}

// Scores of one head -> probabilities and accumulator factors (softmax-inl.h).
// Full steps write P where the path's P V reads it; masked ones in place.
template <class Path>
void SoftmaxRows(const TaskFrame& f, const KeyStep& step, std::int64_t g) {
  const PrefillParams& params = f.params;
  const float slope =
      params.maybe_alibi_slopes != nullptr ? params.maybe_alibi_slopes[f.head(g)] : 0.0f;
  const std::int64_t width = step.width();
  OnlineSoftmaxState* state = f.state + g * kQueryTile;
  const float first_key = static_cast<float>(step.key_begin);
  for (std::int64_t r = 0; r < f.rows; ++r) {
    const LocalRange range = f.ranges[r];
    if (range.empty()) {
      f.alpha[r] = 1.0f;
      continue;
    }
    float* scores = f.scores + r * width;
    const float position = static_cast<float>(f.mask.position(f.row_begin + r));
    f.alpha[r] = step.masked ? SoftmaxRow<true>(scores, range, params.softcap, slope, position,
                                                first_key, state[r], Path::ScoreScale(f))
                             : SoftmaxRow<false>(scores, range, params.softcap, slope, position,
                                                 first_key, state[r], Path::ScoreScale(f),
                                                 Path::PBf16(f, r, width), Path::PF32(f, r, width));
  }
}

// O = alpha O + P V over each row's visible keys of a masked tile (f32, P in
// place of the scores): the keys a block of rows shares in one micro-kernel
// call, then each row's rest.
void AccumulateMasked(const TaskFrame& f, std::int64_t g, const float* v_rows) {
  float* acc = f.acc_of(g);
  const std::int64_t padded = f.padded;
  for (std::int64_t r0 = 0; r0 < f.rows; r0 += kBlockRows) {
    const std::int64_t r1 = std::min(f.rows, r0 + static_cast<std::int64_t>(kBlockRows));
    LocalRange common{0, kKeyTile};
    for (std::int64_t r = r0; r < r1; ++r) {
      common.begin = std::max(common.begin, f.ranges[r].begin);
      common.end = std::min(common.end, f.ranges[r].end);
    }
    if (common.empty()) {
      for (std::int64_t r = r0; r < r1; ++r) {
        const LocalRange range = f.ranges[r];
        if (range.empty()) continue;  // alpha is 1: nothing changes
        Gemm<Accumulate::kScaleAdd>(1, padded, range.end - range.begin,
                                    f.scores + r * kKeyTile + range.begin, kKeyTile,
                                    v_rows + range.begin * padded, padded, acc + r * padded,
                                    padded, f.alpha + r);
      }
      continue;
    }
    Gemm<Accumulate::kScaleAdd>(static_cast<std::size_t>(r1 - r0), padded,
                                common.end - common.begin, f.scores + r0 * kKeyTile + common.begin,
                                kKeyTile, v_rows + common.begin * padded, padded,
                                acc + r0 * padded, padded, f.alpha + r0);
    for (std::int64_t r = r0; r < r1; ++r) {
      const LocalRange range = f.ranges[r];
      const float* p_row = f.scores + r * kKeyTile;
      if (range.begin < common.begin) {
        Gemm<Accumulate::kAdd>(1, padded, common.begin - range.begin, p_row + range.begin,
                               kKeyTile, v_rows + range.begin * padded, padded, acc + r * padded,
                               padded);
      }
      if (common.end < range.end) {
        Gemm<Accumulate::kAdd>(1, padded, range.end - common.end, p_row + common.end, kKeyTile,
                               v_rows + common.end * padded, padded, acc + r * padded, padded);
      }
    }
  }
}

// An output of at least this many bytes is written with streaming
// (non-temporal) stores: it does not fit the cache that would hold it, so
// reading each line in before overwriting it would only double the traffic.
inline constexpr std::size_t kStreamOutputBytes = std::size_t{4} << 20;

// out[e * stride] = acc[e] * factor for e < dim. A contiguous output row
// (the common case) is written in whole vectors aligned to the output
// (a row that starts mid-line, as rows of a 16-byte aligned buffer do,
// would otherwise split every vector store over two cache lines), streamed
// past the caches when `stream`; a strided output goes element by element.
void ScaleRowOut(const float* HWY_RESTRICT acc, std::int64_t dim, float factor,
                 float* HWY_RESTRICT out, std::int64_t stride, bool stream) {
  std::int64_t e = 0;
  if (stride == 1) {
    const hn::ScalableTag<float> d;
    const auto lanes = static_cast<std::int64_t>(hn::Lanes(d));
    const auto vector_bytes = static_cast<std::uintptr_t>(lanes) * sizeof(float);
    const std::uintptr_t offset = reinterpret_cast<std::uintptr_t>(out) % vector_bytes;
    if (offset % sizeof(float) == 0) {
      const auto lead = std::min<std::int64_t>(
          dim, static_cast<std::int64_t>((vector_bytes - offset) % vector_bytes / sizeof(float)));
      for (; e < lead; ++e) out[e] = acc[e] * factor;
      const auto scale = hn::Set(d, factor);
      if (stream) {
        for (; e + lanes <= dim; e += lanes) {
          hn::Stream(hn::Mul(hn::LoadU(d, acc + e), scale), d, out + e);
        }
      } else {
        for (; e + lanes <= dim; e += lanes) {
          hn::Store(hn::Mul(hn::LoadU(d, acc + e), scale), d, out + e);
        }
      }
    }
  }
  for (; e < dim; ++e) out[e * stride] = acc[e] * factor;
}

// O = acc / sum; LSE = max + log(sum). Empty rows: zeros and -inf.
void WriteOutputs(const TaskFrame& f) {
  const PrefillParams& params = f.params;
  auto* out = static_cast<float*>(params.out.data);
  auto* lse = static_cast<float*>(params.maybe_lse.data);
  const bool stream = static_cast<std::size_t>(params.shape.batch * params.shape.seqlen_q *
                                               params.shape.heads * params.shape.head_dim) *
                          sizeof(float) >=
                      kStreamOutputBytes;
  for (std::int64_t g = 0; g < f.group; ++g) {
    const float* acc = f.acc_of(g);
    const OnlineSoftmaxState* state = f.state + g * kQueryTile;
    for (std::int64_t r = 0; r < f.rows; ++r) {
      float normalizer = state[r].normalizer();
      float row_lse = state[r].lse();
      if (params.maybe_sink_logits != nullptr) {  // one more term in the denominator
        const float with_sink = lse_with_sink(row_lse, params.maybe_sink_logits[f.head(g)]);
        normalizer *= std::exp(row_lse - with_sink);
        row_lse = with_sink;
      }
      const std::int64_t base = params.out.offset(f.b, f.row_begin + r, f.head(g), 0);
      ScaleRowOut(acc + r * f.padded, params.shape.head_dim, normalizer, out + base,
                  params.out.strides[3], stream);
      if (lse != nullptr) {
        lse[params.maybe_lse.offset(f.b, f.head(g), f.row_begin + r)] = row_lse;
      }
    }
  }
  // Streaming stores are weakly ordered: they must be visible before the
  // task counts as done (the context's synchronisation publishes them).
  if (stream) hwy::FlushStream();
}

// ---- The f32 path: FMA micro-kernels on storage-rounded values ----

struct F32Path {
  static constexpr std::int64_t kMaxSpan = kF32Span;

  // Q rows of every head in the group, scaled and rounded to storage.
  static void LoadQueries(const TaskFrame& f) {
    const TensorView& q = f.params.q;
    const std::int64_t dim = f.params.shape.head_dim;
    for (std::int64_t g = 0; g < f.group; ++g) {
      for (std::int64_t r = 0; r < f.rows; ++r) {
        prefetch_row(q, f.b, f.row_begin + r + kRowPrefetchDistance, f.head(g));
        float* q_row = f.q + (g * kQueryTile + r) * f.padded;
        const std::int64_t base = q.offset(f.b, f.row_begin + r, f.head(g), 0);
        if (q.dtype == DType::kF32 && f.params.storage == DType::kF32 && q.strides[3] == 1) {
          // The common case, kept free of per-element conversion so it vectorises.
          const float* q_in = static_cast<const float*>(q.data) + base;
          for (std::int64_t e = 0; e < dim; ++e) q_row[e] = q_in[e] * f.params.scale;
        } else {
          LoadRoundedRow(q, base, dim, f.params.storage, q_row);
          for (std::int64_t e = 0; e < dim; ++e) q_row[e] *= f.params.scale;
        }
        std::fill(q_row + dim, q_row + f.padded, 0.0f);
      }
    }
  }
  static void Begin() {}
  static void End() {}
  static const float* VRows(const TaskFrame& f, const KeyStep& step) {
    return f.packed.v_rows(f.b, f.kv_head, f.params.shape.kv_heads, step.key_begin);
  }
  // S = Q K^T over the whole step, tile by tile (padded keys read zeros); on a masked
  // tile (the diagonal, a window's edge) each block of rows only over the
  // whole vectors that hold its visible columns. The softmax of a masked
  // tile replaces every column outside a row's range before it reads it.
  static void Scores(const TaskFrame& f, const KeyStep& step, std::int64_t g) {
    const float* q = f.q + g * kQueryTile * f.padded;
    const float* k_tile = f.packed.k_tile(f.b, f.kv_head, f.params.shape.kv_heads, step.tile);
    if (!step.masked) {
      const std::int64_t width = step.width();
      for (std::int64_t part = 0; part < step.span; ++part) {
        Gemm<Accumulate::kOverwrite>(f.rows, kKeyTile, f.padded, q, f.padded,
                                     k_tile + part * f.padded * kKeyTile, kKeyTile,
                                     f.scores + part * kKeyTile, width);
      }
      return;
    }
    const auto lanes = static_cast<std::int64_t>(hn::Lanes(hn::ScalableTag<float>()));
    const auto block = static_cast<std::int64_t>(kBlockRows);
    for (std::int64_t r0 = 0; r0 < f.rows; r0 += block) {
      const std::int64_t r1 = std::min(f.rows, r0 + block);
      LocalRange columns{kKeyTile, 0};
      for (std::int64_t r = r0; r < r1; ++r) {
        if (f.ranges[r].empty()) continue;
        columns.begin = std::min(columns.begin, f.ranges[r].begin);
        columns.end = std::max(columns.end, f.ranges[r].end);
      }
      if (columns.empty()) continue;  // no row of the block reads its scores
      const std::int64_t c0 = columns.begin / lanes * lanes;
      const std::int64_t c1 = (columns.end + lanes - 1) / lanes * lanes;
      Gemm<Accumulate::kOverwrite>(static_cast<std::size_t>(r1 - r0), static_cast<std::size_t>(c1 - c0),
                                   f.padded, q + r0 * f.padded, f.padded, k_tile + c0, kKeyTile,
                                   f.scores + r0 * kKeyTile + c0, kKeyTile);
    }
  }
  static float ScoreScale(const TaskFrame&) { return 1.0f; }  // Q holds the scale
  static std::uint16_t* PBf16(const TaskFrame&, std::int64_t, std::int64_t) { return nullptr; }
  static float* PF32(const TaskFrame& f, std::int64_t r, std::int64_t width) {
    return f.p + r * width;
  }
  static void AccumulateFull(const TaskFrame& f, const KeyStep& step, std::int64_t g,
                             const float* v_rows) {
    const std::int64_t width = step.width();
    Gemm<Accumulate::kScaleAdd>(f.rows, f.padded, width, f.p, width, v_rows, f.padded,
                                f.acc_of(g), f.padded, f.alpha);
  }
};

// ---- The AMX path: bf16 storage, Q K^T and P V on the tiles ----

#if LOOKBACK_X86_AVX512
struct AmxPath {
  static constexpr std::int64_t kMaxSpan = kAmxSpan;

  // Q rows as bf16, unscaled: the scale multiplies the f32 scores, so Q
  // holds exactly its stored bf16 values (deriving them from a scaled row
  // fails for scale 0 or tiny scales, a fuzzer finding).
  static void LoadQueries(const TaskFrame& f) {
    const TensorView& q = f.params.q;
    for (std::int64_t g = 0; g < f.group; ++g) {
      for (std::int64_t r = 0; r < f.rows; ++r) {
        prefetch_row(q, f.b, f.row_begin + r + kRowPrefetchDistance, f.head(g));
        RowToBf16(q.data, q.dtype, q.offset(f.b, f.row_begin + r, f.head(g), 0), q.strides[3],
                  f.params.shape.head_dim, f.padded, f.q_bf16 + (g * kQueryTile + r) * f.padded);
      }
    }
  }
  static void Begin() { AmxBegin(); }
  static void End() { AmxEnd(); }
  // Full steps read V as pairs on the tiles; a masked tile's rows are
  // unpacked once for the group.
  static const float* VRows(const TaskFrame& f, const KeyStep& step) {
    if (!step.masked) return nullptr;
    UnpackVPairs(f.packed.v_pair_tile(f.b, f.kv_head, f.params.shape.kv_heads, step.tile),
                 static_cast<std::size_t>(f.padded), f.v_rows);
    return f.v_rows;
  }
  static void Scores(const TaskFrame& f, const KeyStep& step, std::int64_t g) {
    const auto* q_pairs = reinterpret_cast<const std::uint32_t*>(f.q_bf16 + g * kQueryTile * f.padded);
    for (std::int64_t part = 0; part < step.span; ++part) {
      AmxScores(q_pairs, f.padded / 2,
                f.packed.k_pair_tile(f.b, f.kv_head, f.params.shape.kv_heads, step.tile + part),
                f.padded / 2, f.scores + part * kKeyTile, static_cast<std::size_t>(step.width()));
    }
  }
  static float ScoreScale(const TaskFrame& f) { return f.params.scale; }
  static std::uint16_t* PBf16(const TaskFrame& f, std::int64_t r, std::int64_t width) {
    return f.p_bf16 + r * width;
  }
  static float* PF32(const TaskFrame&, std::int64_t, std::int64_t) { return nullptr; }
  // Every key of every row is visible, so all of V is read with a visible
  // weight and bf16 pairs of keys are safe.
  static void AccumulateFull(const TaskFrame& f, const KeyStep& step, std::int64_t g,
                             const float*) {
    ScaleRows(f.acc_of(g), static_cast<std::size_t>(f.rows), f.padded, f.alpha);
    AmxAccumulate(reinterpret_cast<const std::uint32_t*>(f.p_bf16),
                  static_cast<std::size_t>(step.width() / 2),
                  f.packed.v_pair_tile(f.b, f.kv_head, f.params.shape.kv_heads, step.tile),
                  static_cast<std::size_t>(step.width() / 2), f.padded, f.acc_of(g));
  }
};

// ---- The bf16-dot path: bf16 storage, Q K^T and P V by VDPBF16PS ----

// For AVX512-BF16 CPUs without AMX (Zen 4/5, Cooper Lake): the AMX path's
// queries, packing (K pairs of dims per key, V pairs of keys per dim),
// spans, softmax and masked tiles, with the two GEMMs as register-blocked
// VDPBF16PS micro-kernels (bf16-inl.h), each instruction two bf16 products
// per f32 lane.
struct Bf16DotPath : AmxPath {
  static void Begin() {}
  static void End() {}
  static void Scores(const TaskFrame& f, const KeyStep& step, std::int64_t g) {
    const auto* q_pairs = reinterpret_cast<const std::uint32_t*>(f.q_bf16 + g * kQueryTile * f.padded);
    for (std::int64_t part = 0; part < step.span; ++part) {
      DotScores(q_pairs, static_cast<std::size_t>(f.padded / 2), static_cast<std::size_t>(f.rows),
                f.packed.k_pair_tile(f.b, f.kv_head, f.params.shape.kv_heads, step.tile + part),
                static_cast<std::size_t>(f.padded / 2), f.scores + part * kKeyTile,
                static_cast<std::size_t>(step.width()));
    }
  }
  // As AmxPath's: every key of every row is visible.
  static void AccumulateFull(const TaskFrame& f, const KeyStep& step, std::int64_t g,
                             const float*) {
    DotAccumulate(reinterpret_cast<const std::uint32_t*>(f.p_bf16),
                  static_cast<std::size_t>(step.width() / 2), static_cast<std::size_t>(f.rows),
                  f.packed.v_pair_tile(f.b, f.kv_head, f.params.shape.kv_heads, step.tile),
                  static_cast<std::size_t>(step.width() / 2), static_cast<std::size_t>(f.padded),
                  f.acc_of(g), f.alpha);
  }
};
#endif

// FlashAttention-2's loop for one task.
template <class Path>
void RunTask(const TaskFrame& f) {
  Path::LoadQueries(f);
  ResetRows(f);
  Path::Begin();
  const KeyRange keys = TaskKeys(f);
  KeyStep step;
  for (std::int64_t tile = keys.begin / kKeyTile;
       !keys.empty() && StepAt(f, keys, tile, Path::kMaxSpan, step); tile = step.tile + step.span) {
    SetRowRanges(f, step);
    const float* v_rows = Path::VRows(f, step);
    for (std::int64_t g = 0; g < f.group; ++g) {
      Path::Scores(f, step, g);
      SoftmaxRows<Path>(f, step, g);
      if (step.masked) {
        AccumulateMasked(f, g, v_rows);
      } else {
        Path::AccumulateFull(f, step, g, v_rows);
      }
    }
  }
  Path::End();
  WriteOutputs(f);
}

TaskFrame MakeFrame(const PrefillParams& params, const PrefillPlan& plan, const PackedKV& packed,
                    const Mask& mask, const PrefillTask& task, void* base) {
  const PrefillScratchLayout& s = plan.scratch;
  const std::int64_t row_begin = task.query_tile * kQueryTile;
  return {.params = params,
          .packed = packed,
          .mask = mask,
          .b = task.batch,
          .kv_head = task.kv_head,
          .group = plan.group,
          .padded = plan.padded_dim,
          .row_begin = row_begin,
          .rows = std::min(params.shape.seqlen_q, row_begin + kQueryTile) - row_begin,
          .q = s.q.in(base),
          .q_bf16 = s.q_bf16.in(base),
          .acc = s.acc.in(base),
          .scores = s.scores.in(base),
          .p = s.p.in(base),
          .p_bf16 = s.p_bf16.in(base),
          .v_rows = s.v_rows.in(base),
          .alpha = s.alpha.in(base),
          .state = s.state.in(base),
          .ranges = s.ranges.in(base)};
}

void RunQueryTile(const PrefillParams& params, const PrefillPlan& plan, const PackedKV& packed,
                  const Mask& mask, const PrefillTask& task, void* scratch) {
  const TaskFrame frame = MakeFrame(params, plan, packed, mask, task, scratch);
#if LOOKBACK_X86_AVX512
  if (plan.path == PrefillPath::kAmx) {
    RunTask<AmxPath>(frame);
    return;
  }
  if (plan.path == PrefillPath::kBf16Dot) {
    RunTask<Bf16DotPath>(frame);
    return;
  }
#endif
  RunTask<F32Path>(frame);
}

}  // namespace

// The whole call on one target: pack K/V, then every task; or, with head
// tasks, each task packs its kv head and runs its query tiles.
void PrefillRun(const PrefillParams& params, const PrefillPlan& plan, Context& context) {
  // Packing and the tiles share the context's scratch: hold it for both.
  const auto call = context.lock_for_call();
  const Mask mask(params.shape.seqlen_q, params.shape.seqlen_k, params.mask);
  if (plan.pack_per_head) {
    const std::size_t tile_bytes = align_scratch(plan.scratch.bytes);
    context.parallel_for(static_cast<std::int64_t>(plan.tasks.size()), [&](std::int64_t index, int worker) {
      const PrefillTask& task = plan.tasks[static_cast<std::size_t>(index)];
      auto* scratch = static_cast<char*>(context.scratch(worker, tile_bytes + plan.packed.bytes));
      const PackedKV packed(plan.packed, scratch + tile_bytes, plan.key_tiles, plan.padded_dim,
                            /*single_head=*/true);
      // The key tiles any of the task's rows can see.
      const std::int64_t row_begin = task.query_tile * kQueryTile;
      const KeyRange keys = VisibleKeys(
          params, mask, row_begin,
          std::min(params.shape.seqlen_q, row_begin + task.query_tiles * kQueryTile));
      if (!keys.empty()) {
        for (std::int64_t tile = keys.begin / kKeyTile; tile <= (keys.end - 1) / kKeyTile; ++tile) {
          PackTile(params, plan, packed, task.batch, task.kv_head, tile);
        }
      }
      for (std::int64_t tile = task.query_tile; tile < task.query_tile + task.query_tiles; ++tile) {
        RunQueryTile(params, plan, packed, mask, {task.batch, task.kv_head, tile}, scratch);
      }
    });
    return;
  }
  const PackedKV packed(plan.packed, context.shared_scratch(plan.packed.bytes), plan.key_tiles,
                        plan.padded_dim);
  PackKV(params, plan, packed, context);
  context.parallel_for(static_cast<std::int64_t>(plan.tasks.size()), [&](std::int64_t index, int worker) {
    RunQueryTile(params, plan, packed, mask, plan.tasks[static_cast<std::size_t>(index)],
                 context.scratch(worker, plan.scratch.bytes));
  });
}

}  // namespace lookback::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lookback::kernels {

HWY_EXPORT(PrefillRun);

PrefillScratchLayout prefill_scratch_layout(PrefillPath path, std::int64_t group,
                                            std::int64_t padded_dim) {
  // The AMX and bf16-dot paths share Q as bf16, spans and the pair layouts.
  const bool amx = path != PrefillPath::kF32;
  const auto heads = static_cast<std::size_t>(group), dim = static_cast<std::size_t>(padded_dim);
  const auto rows = static_cast<std::size_t>(kQueryTile), keys = static_cast<std::size_t>(kKeyTile);
  const std::size_t span_keys = static_cast<std::size_t>(amx ? kAmxSpan : kF32Span) * keys;
  ScratchLayout layout;
  PrefillScratchLayout s;
  s.q = layout.add<float>(amx ? 0 : heads * rows * dim);
  s.q_bf16 = layout.add<std::uint16_t>(amx ? heads * rows * dim : 0);
  s.acc = layout.add<float>(heads * rows * dim);
  s.scores = layout.add<float>(rows * span_keys);
  s.p = layout.add<float>(amx ? 0 : rows * span_keys);
  s.p_bf16 = layout.add<std::uint16_t>(amx ? rows * span_keys : 0);
  s.v_rows = layout.add<float>(amx ? keys * dim : 0);
  s.alpha = layout.add<float>(rows);
  s.state = layout.add<OnlineSoftmaxState>(heads * rows);
  s.ranges = layout.add<LocalRange>(rows);
  s.bytes = layout.bytes();
  return s;
}

PackedLayout packed_layout(PrefillPath path, const AttentionShape& shape) {
  const auto elements = static_cast<std::size_t>(shape.batch * shape.kv_heads *
                                                 tiles_for(shape.seqlen_k, kKeyTile) * kKeyTile *
                                                 padded_head_dim(shape.head_dim));
  const bool amx = path != PrefillPath::kF32;  // the pair layouts
  ScratchLayout layout;
  PackedLayout packed;
  packed.k_transposed = layout.add<float>(amx ? 0 : elements);
  packed.v = layout.add<float>(amx ? 0 : elements);
  packed.k_pairs = layout.add<std::uint32_t>(amx ? elements / 2 : 0);
  packed.v_pairs = layout.add<std::uint32_t>(amx ? elements / 2 : 0);
  packed.bytes = layout.bytes();
  return packed;
}

namespace {

// A task's work: the visible (query, key) pairs of its query tiles.
std::int64_t TaskCost(const Mask& mask, std::int64_t seqlen_k, const PrefillTask& task) {
  const std::int64_t row_begin = task.query_tile * kQueryTile;
  return mask.visible_in_tile(row_begin, row_begin + task.query_tiles * kQueryTile, 0, seqlen_k);
}

// Runs of query tiles per kv head for head tasks, or 0 for none: head
// tasks when the kv heads, each cut into at most kMaxHeadParts runs, make
// at least kHeadTasksPerThread tasks per thread, in a multiple of the
// threads (one thread alone takes every head whole). A run packs only the
// key tiles its rows see, so cutting a head costs repacking some.
std::int64_t HeadParts(const AttentionShape& shape, std::int64_t query_tiles, int threads) {
  const std::int64_t heads = shape.batch * shape.kv_heads;
  const std::int64_t workers = std::max(threads, 1);
  std::int64_t parts = 1;
  if (workers > 1) {
    parts = std::max<std::int64_t>(1, tiles_for(kHeadTasksPerThread * workers, heads));
    while (heads * parts % workers != 0) ++parts;
  }
  return parts <= std::min(kMaxHeadParts, query_tiles) ? parts : 0;
}

// Query tiles [0, query_tiles) cut into exactly `parts` runs, each cut at
// the first tile where the running cost reaches k / parts of the head's
// total (moved on where that would leave a run empty): the run boundaries,
// from 0 to query_tiles.
std::vector<std::int64_t> CutHead(const Mask& mask, std::int64_t seqlen_k,
                                  std::int64_t query_tiles, std::int64_t parts) {
  std::vector<std::int64_t> prefix{0};
  for (std::int64_t tile = 0; tile < query_tiles; ++tile) {
    prefix.push_back(prefix.back() + TaskCost(mask, seqlen_k, {0, 0, tile, 1}));
  }
  std::vector<std::int64_t> cuts{0};
  for (std::int64_t k = 1; k < parts; ++k) {
    std::int64_t cut = cuts.back() + 1;
    while (cut < query_tiles - (parts - k) &&
           prefix[static_cast<std::size_t>(cut)] * parts < prefix.back() * k) {
      ++cut;
    }
    cuts.push_back(cut);
  }
  cuts.push_back(query_tiles);
  return cuts;
}

}  // namespace

PrefillPlan plan_prefill(const PrefillParams& params, int threads) {
  const AttentionShape& shape = params.shape;
  PrefillPlan plan;
  plan.padded_dim = padded_head_dim(shape.head_dim);
  plan.path = prefill_path(params.storage, plan.padded_dim);
  plan.group = shape.heads / shape.kv_heads;
  plan.key_tiles = tiles_for(shape.seqlen_k, kKeyTile);
  plan.scratch = prefill_scratch_layout(plan.path, plan.group, plan.padded_dim);
  const std::int64_t query_tiles = tiles_for(shape.seqlen_q, kQueryTile);
  const Mask mask(shape.seqlen_q, shape.seqlen_k, params.mask);
  auto cost = [&](const PrefillTask& task) { return TaskCost(mask, shape.seqlen_k, task); };

  if (const std::int64_t parts = HeadParts(shape, query_tiles, threads); parts > 0) {
    plan.pack_per_head = true;
    AttentionShape one_head = shape;
    one_head.batch = 1;
    one_head.kv_heads = 1;
    plan.packed = packed_layout(plan.path, one_head);
    const std::vector<std::int64_t> cuts = CutHead(mask, shape.seqlen_k, query_tiles, parts);
    for (std::int64_t b = 0; b < shape.batch; ++b) {
      for (std::int64_t kv_head = 0; kv_head < shape.kv_heads; ++kv_head) {
        for (std::size_t c = 0; c + 1 < cuts.size(); ++c) {
          plan.tasks.push_back({b, kv_head, cuts[c], cuts[c + 1] - cuts[c]});
        }
      }
    }
    // Heaviest first, so the threads finish together.
    std::stable_sort(plan.tasks.begin(), plan.tasks.end(),
                     [&](const PrefillTask& x, const PrefillTask& y) { return cost(x) > cost(y); });
    return plan;
  }
  plan.packed = packed_layout(plan.path, shape);

  // Task order: head by head (consecutive tasks read the same K/V tiles,
  // which stay in the core's L2 instead of streaming from L3), heaviest
  // first within a head: under a causal mask the last query tile sees up to
  // seqlen/kQueryTile times the keys of the first, so the list ends with
  // small tasks and the threads finish together. The order depends only on
  // shapes, so results do not depend on which thread runs which task.
  plan.tasks.reserve(static_cast<std::size_t>(shape.batch * shape.kv_heads * query_tiles));
  for (std::int64_t b = 0; b < shape.batch; ++b) {
    for (std::int64_t kv_head = 0; kv_head < shape.kv_heads; ++kv_head) {
      for (std::int64_t tile = 0; tile < query_tiles; ++tile) plan.tasks.push_back({b, kv_head, tile});
    }
  }
  std::stable_sort(plan.tasks.begin(), plan.tasks.end(),
                   [&](const PrefillTask& x, const PrefillTask& y) {
                     if (x.batch != y.batch || x.kv_head != y.kv_head) {
                       return std::tie(x.batch, x.kv_head) < std::tie(y.batch, y.kv_head);
                     }
                     return cost(x) > cost(y);
                   });
  return plan;
}

void prefill(const PrefillParams& params, Context& context) {
  apply_simd_policy();
  if (params.shape.batch == 0 || params.shape.seqlen_q == 0) return;
  const PrefillPlan plan = plan_prefill(params, context.threads());
  HWY_DYNAMIC_DISPATCH(PrefillRun)(params, plan, context);
}

}  // namespace lookback::kernels
#endif  // HWY_ONCE
