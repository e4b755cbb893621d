// Causal prefill (FlashAttention-2 on a CPU). One task is (batch, kv head,
// query tile): the query heads that share the kv head walk the key tiles the
// mask leaves visible, so each K/V tile is loaded once for the whole group.
// Per key tile and head: S = Q K^T (micro-kernel), online-softmax update,
// O = alpha O + P V (micro-kernel). Empty tiles are skipped, full tiles are
// not masked, only diagonal and window-edge tiles test the mask.
//
// Masked scores are never multiplied by zero: their S entries are replaced
// by -inf before the max, their P entries are never used, and P V runs only
// over each row's visible keys, so a NaN in a hidden key or value cannot
// reach a visible output.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/prefill.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <limits>
#include <tuple>
#include <vector>

#include "kernels/gemm-inl.h"
#include "kernels/amx-inl.h"
#include "kernels/softmax-inl.h"
#include "kernels/online_softmax.hpp"
#include "kernels/pack.hpp"
#include "kernels/prefill.hpp"
#include "kernels/tiles.hpp"
#include "lookback/error.hpp"
#include "lookback/mask.hpp"

#ifndef LOOKBACK_KERNELS_PREFILL_TASK_DEFINED
#define LOOKBACK_KERNELS_PREFILL_TASK_DEFINED
namespace lookback::kernels {
// One unit of parallel work.
struct PrefillTask {
  std::int64_t batch;
  std::int64_t kv_head;
  std::int64_t query_tile;
};
}  // namespace lookback::kernels
#endif

HWY_BEFORE_NAMESPACE();
namespace lookback::kernels::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

namespace {

struct Scratch {
  float* q;       // (group, kQueryTile, padded_dim): scaled, storage-rounded
  float* acc;     // (group, kQueryTile, padded_dim): unnormalised output
  float* scores;  // (kQueryTile, kAmxSpan * kKeyTile): one span of tiles
  float* alpha;   // (kQueryTile)
  OnlineSoftmaxState* state;  // (group, kQueryTile)
  LocalRange* ranges;         // (kQueryTile)
  std::uint32_t* q_pairs;     // (group, kQueryTile, padded_dim / 2): bf16 Q, unscaled
  std::uint32_t* p_pairs;     // (kQueryTile, kAmxSpan * kKeyTile / 2): bf16 P
  float* v_tile;              // (kKeyTile, padded_dim): a masked tile's V (AMX path)
};

void RunTask(const PrefillParams& params, const PackedKV& packed, const Mask& mask,
             const PrefillTask& task, Scratch scratch) {
  const AttentionShape& shape = params.shape;
  const std::int64_t group = shape.heads / shape.kv_heads;
  const std::int64_t dim = shape.head_dim;
  const std::int64_t padded = packed.padded_dim;
  const std::int64_t row_begin = task.query_tile * kQueryTile;
  const std::int64_t row_end = std::min(shape.seqlen_q, row_begin + kQueryTile);
  const std::int64_t rows = row_end - row_begin;
  const std::int64_t b = task.batch;

  // Q rows of every head in the group: scaled and rounded to storage (f32
  // tiles), or as bf16 pairs (AMX tiles).
  for (std::int64_t g = 0; g < group; ++g) {
    const std::int64_t head = task.kv_head * group + g;
    float* q_tile = scratch.q + g * kQueryTile * padded;
    for (std::int64_t r = 0; r < rows; ++r) {
      prefetch_row(params.q, b, row_begin + r + kRowPrefetchDistance, head);
      float* q_row = q_tile + r * padded;
      const std::int64_t base = params.q.offset(b, row_begin + r, head, 0);
#if LOOKBACK_HAVE_AMX
      if (params.amx_tiles) {
        // The tiles take Q as bf16 pairs, unscaled: the scale multiplies the
        // f32 scores, so Q holds exactly its stored bf16 values (deriving
        // them from a scaled row fails for scale 0 or tiny scales, a fuzzer
        // finding).
        std::uint32_t* pairs = scratch.q_pairs + (g * kQueryTile + r) * (padded / 2);
        RowToBf16(params.q.data, params.q.dtype, base, params.q.strides[3], dim, padded,
                  reinterpret_cast<std::uint16_t*>(pairs));
        continue;
      }
#endif
      if (params.q.dtype == DType::kF32 && params.storage == DType::kF32 &&
          params.q.strides[3] == 1) {
        // The common case, kept free of per-element conversion so it vectorises.
        const float* q_in = static_cast<const float*>(params.q.data) + base;
        for (std::int64_t e = 0; e < dim; ++e) q_row[e] = q_in[e] * params.scale;
        for (std::int64_t e = dim; e < padded; ++e) q_row[e] = 0.0f;
        continue;
      }
      for (std::int64_t e = 0; e < dim; ++e) {
        const std::int64_t offset = base + e * params.q.strides[3];
        const float value = params.q.dtype == DType::kF32
                                ? static_cast<const float*>(params.q.data)[offset]
                                : load_as_float(params.q.data, params.q.dtype, offset);
        q_row[e] = round_to_storage(value, params.storage) * params.scale;
      }
      for (std::int64_t e = dim; e < padded; ++e) q_row[e] = 0.0f;
    }
    std::fill(scratch.acc + g * kQueryTile * padded,
              scratch.acc + (g * kQueryTile + rows) * padded, 0.0f);
    std::fill(scratch.state + g * kQueryTile, scratch.state + (g + 1) * kQueryTile,
              OnlineSoftmaxState{});
  }

#if LOOKBACK_HAVE_AMX
  if (params.amx_tiles) AmxBegin();
#endif
  KeyRange keys = mask.key_range_of_rows(row_begin, row_end);
  keys.begin = std::max(keys.begin, params.keys.begin);
  keys.end = std::min(keys.end, params.keys.end);
  if (!keys.empty()) {
    const std::int64_t first_tile = keys.begin / kKeyTile;
    const std::int64_t last_tile = (keys.end - 1) / kKeyTile;
    // Whether every row sees every key of the tile (and the tile is whole).
    auto full = [&](std::int64_t tile) {
      const std::int64_t key_begin = tile * kKeyTile;
      return key_begin >= params.keys.begin && key_begin + kKeyTile <= params.keys.end &&
             key_begin + kKeyTile <= shape.seqlen_k &&
             mask.tile_visibility(row_begin, row_end, key_begin, key_begin + kKeyTile) ==
                 TileVisibility::kFull;
    };
    std::int64_t span = 1;  // tiles taken by the current step
    for (std::int64_t tile = first_tile; tile <= last_tile; tile += span) {
      span = 1;
      const std::int64_t key_begin = tile * kKeyTile;
      const std::int64_t key_end = std::min(shape.seqlen_k, key_begin + kKeyTile);
      // The tile's columns that lie in the key range this call covers.
      const std::int64_t used_begin = std::max(key_begin, params.keys.begin);
      const std::int64_t used_end = std::min(key_end, params.keys.end);
      const TileVisibility visibility =
          mask.tile_visibility(row_begin, row_end, used_begin, used_end);
      if (visibility == TileVisibility::kEmpty) continue;
      // A full tile narrower than kKeyTile (the last one, or one cut by the
      // key range) still needs the other columns hidden: the masked path.
      const bool masked = visibility == TileVisibility::kPartial ||
                          used_begin != key_begin || used_end - key_begin != kKeyTile;
      // The AMX tiles take up to kAmxSpan consecutive full tiles in one step
      // (one softmax pass and one accumulator load per span); everything
      // else goes one tile at a time. `width` is also the scores' row stride.
      if (params.amx_tiles && !masked) {
        while (span < kAmxSpan && tile + span <= last_tile && full(tile + span)) ++span;
      }
      const std::int64_t width = span * kKeyTile;
      for (std::int64_t r = 0; r < rows; ++r) {
        if (masked) {
          const KeyRange row_keys = mask.key_range(row_begin + r);
          scratch.ranges[r] = {std::max(row_keys.begin, used_begin) - key_begin,
                               std::min(row_keys.end, used_end) - key_begin};
        } else {
          scratch.ranges[r] = {0, width};
        }
      }
      // f32 K^T exists only off the AMX path (no arithmetic on its null base).
      const float* k_tile =
          params.amx_tiles ? nullptr : packed.k_tile(b, task.kv_head, shape.kv_heads, tile);
      const float* v_rows = nullptr;
#if LOOKBACK_HAVE_AMX
      if (params.amx_tiles) {
        // V only as pairs: the masked tile's rows, once for the group.
        if (masked) {
          UnpackVPairs(packed.v_pair_tile(b, task.kv_head, shape.kv_heads, tile),
                       static_cast<std::size_t>(padded), scratch.v_tile);
        }
        v_rows = scratch.v_tile;
      } else
#endif
      {
        v_rows = packed.v_rows(b, task.kv_head, shape.kv_heads, key_begin);
      }

      for (std::int64_t g = 0; g < group; ++g) {
        const std::int64_t head = task.kv_head * group + g;
        const float slope =
            params.maybe_alibi_slopes != nullptr ? params.maybe_alibi_slopes[head] : 0.0f;
        const float* q_tile = scratch.q + g * kQueryTile * padded;
        float* acc = scratch.acc + g * kQueryTile * padded;
        OnlineSoftmaxState* state = scratch.state + g * kQueryTile;

        // S = Q K^T over the whole tile width (padded keys read zeros).
#if LOOKBACK_HAVE_AMX
        if (params.amx_tiles) {
          for (std::int64_t part = 0; part < span; ++part) {
            AmxScores(scratch.q_pairs + g * kQueryTile * (padded / 2), padded / 2,
                      packed.k_pair_tile(b, task.kv_head, shape.kv_heads, tile + part), padded / 2,
                      scratch.scores + part * kKeyTile, static_cast<std::size_t>(width));
          }
        } else
#endif
        {
          Gemm<Accumulate::kOverwrite>(rows, kKeyTile, padded, q_tile, padded, k_tile, kKeyTile,
                                       scratch.scores, kKeyTile);
        }
        // The AMX tiles hold unscaled Q (its exact bf16 values): the softmax
        // scales the scores, and on full tiles writes P as bf16 for the tiles.
        const float score_scale = params.amx_tiles ? params.scale : 1.0f;
        auto* p_bf16 = reinterpret_cast<std::uint16_t*>(scratch.p_pairs);
        // f32 full tiles: P beside the scores (its space is the AMX path's).
        auto* p_f32 = reinterpret_cast<float*>(scratch.p_pairs);
        for (std::int64_t r = 0; r < rows; ++r) {
          const LocalRange range = scratch.ranges[r];
          if (range.empty()) {
            scratch.alpha[r] = 1.0f;
            continue;
          }
          float* scores = scratch.scores + r * width;
          const float position = static_cast<float>(mask.position(row_begin + r));
          const float first_key = static_cast<float>(key_begin);
          scratch.alpha[r] =
              masked ? SoftmaxRow<true>(scores, range, params.softcap, slope, position,
                                        first_key, state[r], score_scale)
                     : SoftmaxRow<false>(scores, range, params.softcap, slope, position,
                                         first_key, state[r], score_scale,
                                         params.amx_tiles ? p_bf16 + r * width : nullptr,
                                         params.amx_tiles ? nullptr : p_f32 + r * width);
        }

        // O = alpha O + P V, over each row's visible keys only.
        if (!masked) {
#if LOOKBACK_HAVE_AMX
          if (params.amx_tiles) {
            // Full tile: every key of every row is visible, so all of V is
            // read with a visible weight and bf16 pairs of keys are safe.
            ScaleRows(acc, static_cast<std::size_t>(rows), padded, scratch.alpha);
            AmxAccumulate(scratch.p_pairs, static_cast<std::size_t>(width / 2),
                          packed.v_pair_tile(b, task.kv_head, shape.kv_heads, tile),
                          static_cast<std::size_t>(width / 2), padded, acc);
            continue;
          }
#endif
          Gemm<Accumulate::kScaleAdd>(rows, padded, kKeyTile, p_f32, kKeyTile, v_rows,
                                      padded, acc, padded, scratch.alpha);
          continue;
        }
        for (std::int64_t r0 = 0; r0 < rows; r0 += kBlockRows) {
          const std::int64_t r1 = std::min(rows, r0 + static_cast<std::int64_t>(kBlockRows));
          LocalRange common{0, kKeyTile};
          for (std::int64_t r = r0; r < r1; ++r) {
            common.begin = std::max(common.begin, scratch.ranges[r].begin);
            common.end = std::min(common.end, scratch.ranges[r].end);
          }
          if (!common.empty()) {
            // The shared keys for the whole row block, then each row's rest.
            Gemm<Accumulate::kScaleAdd>(
                static_cast<std::size_t>(r1 - r0), padded, common.end - common.begin,
                scratch.scores + r0 * kKeyTile + common.begin, kKeyTile,
                v_rows + common.begin * padded, padded, acc + r0 * padded, padded,
                scratch.alpha + r0);
            for (std::int64_t r = r0; r < r1; ++r) {
              const LocalRange range = scratch.ranges[r];
              const float* p_row = scratch.scores + r * kKeyTile;
              if (range.begin < common.begin) {
                Gemm<Accumulate::kAdd>(1, padded, common.begin - range.begin,
                                       p_row + range.begin, kKeyTile,
                                       v_rows + range.begin * padded, padded,
                                       acc + r * padded, padded);
              }
              if (common.end < range.end) {
                Gemm<Accumulate::kAdd>(1, padded, range.end - common.end, p_row + common.end,
                                       kKeyTile, v_rows + common.end * padded, padded,
                                       acc + r * padded, padded);
              }
            }
          } else {
            for (std::int64_t r = r0; r < r1; ++r) {
              const LocalRange range = scratch.ranges[r];
              if (range.empty()) continue;  // alpha is 1: nothing changes
              Gemm<Accumulate::kScaleAdd>(1, padded, range.end - range.begin,
                                          scratch.scores + r * kKeyTile + range.begin, kKeyTile,
                                          v_rows + range.begin * padded, padded,
                                          acc + r * padded, padded, scratch.alpha + r);
            }
          }
        }
      }
    }
  }

#if LOOKBACK_HAVE_AMX
  if (params.amx_tiles) AmxEnd();
#endif
  // O = acc / sum; LSE = max + log(sum). Empty rows: zeros and -inf.
  for (std::int64_t g = 0; g < group; ++g) {
    const std::int64_t head = task.kv_head * group + g;
    const float* acc = scratch.acc + g * kQueryTile * padded;
    const OnlineSoftmaxState* state = scratch.state + g * kQueryTile;
    float* out = static_cast<float*>(params.out.data);
    float* lse = static_cast<float*>(params.maybe_lse.data);
    for (std::int64_t r = 0; r < rows; ++r) {
      const float normalizer = state[r].normalizer();
      const std::int64_t base = params.out.offset(b, row_begin + r, head, 0);
      for (std::int64_t e = 0; e < dim; ++e) {
        out[base + e * params.out.strides[3]] = acc[r * padded + e] * normalizer;
      }
      if (lse != nullptr) lse[params.maybe_lse.offset(b, head, row_begin + r)] = state[r].lse();
    }
  }
}

}  // namespace

void PrefillTiles(const PrefillParams& params, const PackedKV& packed,
                  const std::vector<PrefillTask>& tasks, Context& context) {
  const Mask mask(params.shape.seqlen_q, params.shape.seqlen_k, params.mask);
  const std::int64_t group = params.shape.heads / params.shape.kv_heads;
  const std::int64_t padded = packed.padded_dim;
  const std::size_t q_floats = static_cast<std::size_t>(group * kQueryTile * padded);
  const std::size_t score_floats = static_cast<std::size_t>(kQueryTile * kAmxSpan * kKeyTile);
  const std::size_t bytes = (2 * q_floats + score_floats + kQueryTile) * sizeof(float) +
                            static_cast<std::size_t>(group * kQueryTile) * sizeof(OnlineSoftmaxState) +
                            kQueryTile * sizeof(LocalRange) + (q_floats / 2 + score_floats / 2) * 4 +
                            static_cast<std::size_t>(kKeyTile * padded) * sizeof(float) + 512;
  context.parallel_for(static_cast<std::int64_t>(tasks.size()), [&](std::int64_t index, int worker) {
    auto* base = static_cast<float*>(context.scratch(worker, bytes));
    Scratch scratch;
    scratch.q = base;
    scratch.acc = scratch.q + q_floats;
    scratch.scores = scratch.acc + q_floats;
    scratch.alpha = scratch.scores + score_floats;
    scratch.state = reinterpret_cast<OnlineSoftmaxState*>(scratch.alpha + kQueryTile);
    scratch.ranges = reinterpret_cast<LocalRange*>(scratch.state + group * kQueryTile);
    // 64-byte aligned for the vector stores of the bf16 kernels.
    const auto after_ranges = reinterpret_cast<std::uintptr_t>(scratch.ranges + kQueryTile);
    scratch.q_pairs = reinterpret_cast<std::uint32_t*>((after_ranges + 63) / 64 * 64);
    scratch.p_pairs = scratch.q_pairs + q_floats / 2;
    scratch.v_tile = reinterpret_cast<float*>(scratch.p_pairs + score_floats / 2);
    RunTask(params, packed, mask, tasks[static_cast<std::size_t>(index)], scratch);
  });
}

// out[e * kKeyTile + c] = rows[c][e] for c < count, e < dim.
void TransposeKeys(const float* const* rows, std::int64_t count, std::int64_t dim, float* out) {
  std::int64_t c0 = 0;
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
  // 16 x 16 blocks in registers: pairs, then quads within 128-bit lanes,
  // then the lanes.
  for (; c0 + 16 <= count; c0 += 16) {
    std::int64_t e0 = 0;
    for (; e0 + 16 <= dim; e0 += 16) {
      __m512 r[16], t[16], u[16], v[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(rows[c0 + i] + e0);
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
        _mm512_storeu_ps(out + (e0 + k) * kKeyTile + c0, _mm512_shuffle_f32x4(v[k], v[k + 8], 0x88));
        _mm512_storeu_ps(out + (e0 + k + 8) * kKeyTile + c0,
                         _mm512_shuffle_f32x4(v[k], v[k + 8], 0xDD));
      }
    }
    for (; e0 < dim; ++e0) {
      for (std::int64_t c = c0; c < c0 + 16; ++c) out[e0 * kKeyTile + c] = rows[c][e0];
    }
  }
#endif
  for (std::int64_t e = 0; e < dim; ++e) {
    for (std::int64_t c = c0; c < count; ++c) out[e * kKeyTile + c] = rows[c][e];
  }
}

void PackAmxKeyTile(const PrefillParams& params, const PackedKV& packed, std::int64_t b,
                    std::int64_t kv_head, std::int64_t tile) {
#if LOOKBACK_HAVE_AMX
  PackAmxTile(params, packed, b, kv_head, tile);
#else
  (void)params, (void)packed, (void)b, (void)kv_head, (void)tile;
  HWY_ABORT("AMX packing on a target without AMX");
#endif
}

const char* TargetName() { return hwy::TargetName(HWY_TARGET); }

}  // namespace lookback::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace lookback::kernels {

HWY_EXPORT(PrefillTiles);
HWY_EXPORT(TargetName);
HWY_EXPORT(PackAmxKeyTile);
HWY_EXPORT(TransposeKeys);

void transpose_key_tile(const float* const* rows, std::int64_t count, std::int64_t dim, float* out) {
  HWY_DYNAMIC_DISPATCH(TransposeKeys)(rows, count, dim, out);
}

void pack_amx_tile(const PrefillParams& params, const PackedKV& packed, std::int64_t b,
                   std::int64_t kv_head, std::int64_t tile) {
  HWY_DYNAMIC_DISPATCH(PackAmxKeyTile)(params, packed, b, kv_head, tile);
}

void prefill(const PrefillParams& params, Context& context) {
  apply_simd_policy();
  const AttentionShape& shape = params.shape;
  if (shape.batch == 0 || shape.seqlen_q == 0) return;
  const Mask mask(shape.seqlen_q, shape.seqlen_k, params.mask);
  const std::int64_t query_tiles = tiles_for(shape.seqlen_q, kQueryTile);

  // Task order: head by head (consecutive tasks read the same K/V tiles,
  // which stay in the core's L2 instead of streaming from L3), heaviest
  // first within a head: under a causal mask the last query tile sees up to
  // seqlen/kQueryTile times the keys of the first, so the list ends with
  // small tasks and the threads finish together. The order depends only on
  // shapes, so results do not depend on which thread runs which task.
  std::vector<PrefillTask> tasks;
  tasks.reserve(static_cast<std::size_t>(shape.batch * shape.kv_heads * query_tiles));
  for (std::int64_t b = 0; b < shape.batch; ++b) {
    for (std::int64_t kv_head = 0; kv_head < shape.kv_heads; ++kv_head) {
      for (std::int64_t tile = 0; tile < query_tiles; ++tile) {
        tasks.push_back({b, kv_head, tile});
      }
    }
  }
  auto task_cost = [&](const PrefillTask& task) {
    const std::int64_t row_begin = task.query_tile * kQueryTile;
    return mask.visible_in_tile(row_begin, row_begin + kQueryTile, 0, shape.seqlen_k);
  };
  std::stable_sort(tasks.begin(), tasks.end(), [&](const PrefillTask& x, const PrefillTask& y) {
    if (x.batch != y.batch || x.kv_head != y.kv_head) {
      return std::tie(x.batch, x.kv_head) < std::tie(y.batch, y.kv_head);
    }
    return task_cost(x) > task_cost(y);
  });

  // bf16 storage runs as bf16 dot products where the CPU has them and the
  // AVX-512 kernels are the ones dispatched (not when a test forces another).
  PrefillParams run = params;
  const std::string target = dispatched_target_name();
  run.amx_tiles = params.storage == DType::kBF16 && amx_supported() &&
                 (target == "AVX3" || target == "AVX3_DL") &&
                 padded_head_dim(shape.head_dim) % 32 == 0;

  // Packing and the tiles share the context's scratch: hold it for both.
  const auto call = context.lock_for_call();
  const PackedKV packed = pack_kv(run, context);
  HWY_DYNAMIC_DISPATCH(PrefillTiles)(run, packed, tasks, context);
}

std::string dispatched_target_name() {
  apply_simd_policy();
  return HWY_DYNAMIC_DISPATCH(TargetName)();
}

bool amx_supported() {
#if defined(__linux__) && defined(__x86_64__)
  // AMX tile data is off until the process asks Linux for it.
  static const bool supported = [] {
    if (std::getenv("LOOKBACK_DISABLE_AMX") != nullptr) return false;
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE (clang 14's
    // __builtin_cpu_supports does not know "amx-bf16").
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool amx = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) != 0 &&
                     ((edx >> 22) & 1u) != 0 && ((edx >> 24) & 1u) != 0;
    if (!amx || !__builtin_cpu_supports("avx512bf16")) return false;
    constexpr long kArchRequestXcompPerm = 0x1023;
    constexpr long kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchRequestXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return supported;
#else
  return false;
#endif
}

namespace {

// Every target compiled in and supported by this CPU, best first.
const std::vector<std::int64_t>& all_targets() {
  static const std::vector<std::int64_t> targets = [] {
    hwy::SetSupportedTargetsForTest(0);
    return hwy::SupportedAndGeneratedTargets();
  }();
  return targets;
}

// LOOKBACK_SIMD=NAME caps dispatch at that target (and those below it), e.g.
// LOOKBACK_SIMD=AVX2 runs an AVX-512 machine as an AVX2-only one. Returns
// the mask of allowed targets, 0 for no cap.
std::int64_t environment_cap() {
  static const std::int64_t cap = []() -> std::int64_t {
    const char* name = std::getenv("LOOKBACK_SIMD");
    if (name == nullptr || *name == '\0') return 0;
    std::int64_t mask = 0;
    bool found = false;
    std::string known;
    for (std::int64_t target : all_targets()) {  // best (lowest bit) first
      found = found || std::string_view(name) == hwy::TargetName(target);
      if (found) mask |= target;
      known += (known.empty() ? "" : ", ") + std::string(hwy::TargetName(target));
    }
    if (!found) {
      throw Error(std::string("LOOKBACK_SIMD: '") + name + "' is not available (expected one of " +
                  known + ")");
    }
    return mask;
  }();
  return cap;
}

const std::vector<std::int64_t>& compiled_and_supported() {
  static const std::vector<std::int64_t> targets = [] {
    const std::int64_t cap = environment_cap();
    std::vector<std::int64_t> allowed;
    for (std::int64_t target : all_targets()) {
      if (cap == 0 || (target & cap) != 0) allowed.push_back(target);
    }
    hwy::SetSupportedTargetsForTest(cap);
    return allowed;
  }();
  return targets;
}

}  // namespace

void apply_simd_policy() { compiled_and_supported(); }

std::vector<std::string> available_targets() {
  std::vector<std::string> names;
  for (std::int64_t target : compiled_and_supported()) names.emplace_back(hwy::TargetName(target));
  return names;
}

void force_target(std::string_view name) {
  const std::vector<std::int64_t>& targets = compiled_and_supported();
  if (name.empty()) {
    hwy::SetSupportedTargetsForTest(environment_cap());
    return;
  }
  std::string known;
  for (std::int64_t target : targets) {
    if (name == hwy::TargetName(target)) {
      hwy::SetSupportedTargetsForTest(target);
      return;
    }
    known += (known.empty() ? "" : ", ") + std::string(hwy::TargetName(target));
  }
  throw Error("simd target: '" + std::string(name) + "' is not available (expected one of " +
              known + ")");
}

}  // namespace lookback::kernels
#endif  // HWY_ONCE
