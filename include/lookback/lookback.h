/* lookback C API: causal attention for use from C and other languages.
 * Every function returns a lookback_status; on failure lookback_last_error()
 * gives a message naming the argument and the expected value (valid until the
 * next lookback call on the same thread). Layout and semantics as in the C++
 * API (lookback/attention.hpp, docs/semantics.md). */
#ifndef LOOKBACK_LOOKBACK_H_
#define LOOKBACK_LOOKBACK_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum lookback_status {
  LOOKBACK_OK = 0,
  LOOKBACK_ERROR_INVALID_ARGUMENT = 1,
  LOOKBACK_ERROR_IO = 2,
  LOOKBACK_ERROR_FORMAT = 3,
  LOOKBACK_ERROR_CAPACITY = 4,
  LOOKBACK_ERROR_INTERNAL = 5
} lookback_status;

typedef enum lookback_dtype {
  LOOKBACK_F32 = 0,
  LOOKBACK_F16 = 1,
  LOOKBACK_BF16 = 2,
  LOOKBACK_F64 = 3,
  /* 8-bit K/V storage only (docs/semantics.md): codes with one f32 scale per
     (token, kv head) row. */
  LOOKBACK_INT8 = 4,
  LOOKBACK_FP8E4M3 = 5,
  LOOKBACK_FP8E5M2 = 6
} lookback_dtype;

typedef enum lookback_causal {
  LOOKBACK_CAUSAL_BOTTOM_RIGHT = 0,
  LOOKBACK_CAUSAL_TOP_LEFT = 1,
  LOOKBACK_CAUSAL_NONE = 2
} lookback_causal;

/* A 4-d view. strides are in elements; all zero means contiguous (C order). */
typedef struct lookback_tensor {
  const void* data;
  lookback_dtype dtype;
  int64_t shape[4];
  int64_t strides[4];
} lookback_tensor;

typedef struct lookback_attention_params {
  lookback_tensor q; /* (batch, seqlen_q, heads, head_dim) */
  lookback_tensor k; /* (batch, seqlen_k, kv_heads, head_dim) */
  lookback_tensor v; /* (batch, seqlen_k, kv_heads, head_dim) */
  float* out;        /* (batch, seqlen_q, heads, head_dim), contiguous f32 */
  float* maybe_lse;  /* (batch, heads, seqlen_q), contiguous f32, or NULL */
  const float* maybe_alibi_slopes; /* (heads,), or NULL */
  int has_scale;     /* 0: scale = 1/sqrt(head_dim) */
  float scale;
  float softcap;     /* 0 disables */
  lookback_causal causal;
  int64_t window_left; /* -1: no window; W >= 0: keys p-W..p */
  lookback_dtype storage; /* F32, F16, BF16, INT8, FP8E4M3 or FP8E5M2 */
  const float* maybe_sink_logits; /* (heads,), or NULL: learned sinks (gpt-oss) */
  int64_t sink_tokens; /* StreamingLLM, with a window: keys 0..S-1 stay visible; 0: none */
} lookback_attention_params;

typedef struct lookback_context lookback_context;

/* threads == 0: all cores. */
lookback_status lookback_context_create(int threads, lookback_context** context);
void lookback_context_destroy(lookback_context* context);

lookback_status lookback_attend(lookback_context* context,
                                const lookback_attention_params* params);

/* Variable-length packed batch (FlashAttention's varlen): `batch` sequences
   packed end to end. params->q is (1, total_q, heads, head_dim), k and v
   (1, total_k, kv_heads, head_dim), out like q, maybe_lse (1, heads, total_q);
   cu_seqlens_q and cu_seqlens_k hold batch + 1 ascending offsets from 0 to
   the totals. Sequence b is q[cu_q[b]:cu_q[b+1]] against k, v[cu_k[b]:cu_k[b+1]],
   masked as a sequence of its own. */
lookback_status lookback_attend_varlen(lookback_context* context,
                                       const lookback_attention_params* params,
                                       const int64_t* cu_seqlens_q, const int64_t* cu_seqlens_k,
                                       int64_t batch);

const char* lookback_last_error(void);
const char* lookback_version(void);

#ifdef __cplusplus
}
#endif

#endif /* LOOKBACK_LOOKBACK_H_ */
