/* Calls lookback from C: a causal attention on a tiny problem checked against
 * a naive computation, and an error path with its message. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "lookback/lookback.h"

enum { kSeq = 5, kHeads = 2, kDim = 3 };

static int failures = 0;
#define CHECK(cond)                                             \
  do {                                                          \
    if (!(cond)) {                                              \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                               \
    }                                                           \
  } while (0)

int main(void) {
  float q[kSeq * kHeads * kDim], k[kSeq * kDim], v[kSeq * kDim];
  float out[kSeq * kHeads * kDim], lse[kHeads * kSeq];
  for (int i = 0; i < kSeq * kHeads * kDim; ++i) q[i] = (float)sin(0.7 * i);
  for (int i = 0; i < kSeq * kDim; ++i) {
    k[i] = (float)cos(0.3 * i);
    v[i] = (float)(i % 7) - 3.0f;
  }
  lookback_context* context = NULL;
  CHECK(lookback_context_create(1, &context) == LOOKBACK_OK);

  lookback_attention_params params;
  memset(&params, 0, sizeof params);
  params.q = (lookback_tensor){q, LOOKBACK_F32, {1, kSeq, kHeads, kDim}, {0, 0, 0, 0}};
  params.k = (lookback_tensor){k, LOOKBACK_F32, {1, kSeq, 1, kDim}, {0, 0, 0, 0}};
  params.v = (lookback_tensor){v, LOOKBACK_F32, {1, kSeq, 1, kDim}, {0, 0, 0, 0}};
  params.out = out;
  params.maybe_lse = lse;
  params.causal = LOOKBACK_CAUSAL_BOTTOM_RIGHT;
  params.window_left = -1;
  params.storage = LOOKBACK_F32;
  CHECK(lookback_attend(context, &params) == LOOKBACK_OK);

  /* Naive causal attention, in double. */
  const double scale = 1.0 / sqrt((double)kDim);
  for (int h = 0; h < kHeads; ++h) {
    for (int i = 0; i < kSeq; ++i) {
      double scores[kSeq], max = -INFINITY, sum = 0.0;
      for (int j = 0; j <= i; ++j) {
        double dot = 0.0;
        for (int e = 0; e < kDim; ++e) dot += q[(i * kHeads + h) * kDim + e] * k[j * kDim + e];
        scores[j] = scale * dot;
        if (scores[j] > max) max = scores[j];
      }
      for (int j = 0; j <= i; ++j) sum += exp(scores[j] - max);
      for (int e = 0; e < kDim; ++e) {
        double expected = 0.0;
        for (int j = 0; j <= i; ++j) expected += exp(scores[j] - max) / sum * v[j * kDim + e];
        CHECK(fabs(out[(i * kHeads + h) * kDim + e] - expected) < 1e-5);
      }
      CHECK(fabs(lse[h * kSeq + i] - (max + log(sum))) < 1e-5);
    }
  }

  /* heads (2) not a multiple of kv_heads (3): a clear error. */
  params.k.shape[2] = 3;
  params.v.shape[2] = 3;
  CHECK(lookback_attend(context, &params) == LOOKBACK_ERROR_INVALID_ARGUMENT);
  CHECK(strstr(lookback_last_error(), "kv_heads") != NULL);
  CHECK(lookback_attend(context, NULL) == LOOKBACK_ERROR_INVALID_ARGUMENT);
  lookback_context_destroy(context);

  if (failures == 0) printf("c_api_test: 1 passed, 0 failed\n");
  return failures == 0 ? 0 : 1;
}
