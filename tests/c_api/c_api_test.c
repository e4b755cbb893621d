/* Calls lookback from C: a causal attention on a tiny problem checked against
 * a naive computation, error paths with their messages, and a context whose
 * threads the system refuses. */
#define _GNU_SOURCE
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

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

/* A context whose worker threads cannot all be started (an address-space
 * limit just above what the process maps) must fail with
 * LOOKBACK_ERROR_CAPACITY and join the threads it started, not hang or abort.
 * Runs in a child process under alarm(): a hang or a crash shows as a failed
 * child. Skipped under sanitizers, whose shadow memory needs the address
 * space. */
static void check_refused_threads(void) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  printf("c_api_test: refused threads skipped under sanitizers\n");
#else
  const pid_t child = fork();
  CHECK(child >= 0);
  if (child == 0) {
    alarm(30);
    long pages = 0;
    FILE* statm = fopen("/proc/self/statm", "r");
    if (statm == NULL || fscanf(statm, "%ld", &pages) != 1) _exit(3);
    fclose(statm);
    const rlim_t limit = (rlim_t)pages * (rlim_t)sysconf(_SC_PAGESIZE) + ((rlim_t)12 << 20);
    const struct rlimit rl = {limit, limit};
    if (setrlimit(RLIMIT_AS, &rl) != 0) _exit(3);
    lookback_context* context = NULL;
    const lookback_status status = lookback_context_create(16, &context);
    if (status == LOOKBACK_OK) _exit(4);  /* the limit did not bite */
    if (status != LOOKBACK_ERROR_CAPACITY) _exit(1);
    if (strstr(lookback_last_error(), "threads") == NULL) _exit(2);
    _exit(0);
  }
  int status = 0;
  CHECK(waitpid(child, &status, 0) == child);
  if (WIFEXITED(status) && WEXITSTATUS(status) == 4) {
    printf("c_api_test: refused threads not exercised (the limit did not bite)\n");
    return;
  }
  if (!WIFEXITED(status)) fprintf(stderr, "refused threads: child killed by signal %d\n", WTERMSIG(status));
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
#endif
}

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
  /* Naive causal attention, in double; then with learned sink logits (one
     more term e^sink in each row's denominator). */
  const float sinks[kHeads] = {0.5f, -1.25f};
  for (int with_sinks = 0; with_sinks < 2; ++with_sinks) {
    params.maybe_sink_logits = with_sinks ? sinks : NULL;
    CHECK(lookback_attend(context, &params) == LOOKBACK_OK);
    const double scale = 1.0 / sqrt((double)kDim);
    for (int h = 0; h < kHeads; ++h) {
      for (int i = 0; i < kSeq; ++i) {
        double scores[kSeq], max = with_sinks ? sinks[h] : -INFINITY, sum = 0.0;
        for (int j = 0; j <= i; ++j) {
          double dot = 0.0;
          for (int e = 0; e < kDim; ++e) dot += q[(i * kHeads + h) * kDim + e] * k[j * kDim + e];
          scores[j] = scale * dot;
          if (scores[j] > max) max = scores[j];
        }
        for (int j = 0; j <= i; ++j) sum += exp(scores[j] - max);
        if (with_sinks) sum += exp(sinks[h] - max);
        for (int e = 0; e < kDim; ++e) {
          double expected = 0.0;
          for (int j = 0; j <= i; ++j) expected += exp(scores[j] - max) / sum * v[j * kDim + e];
          CHECK(fabs(out[(i * kHeads + h) * kDim + e] - expected) < 1e-5);
        }
        CHECK(fabs(lse[h * kSeq + i] - (max + log(sum))) < 1e-5);
      }
    }
  }
  params.maybe_sink_logits = NULL;

  /* StreamingLLM sink tokens: window 1 and one sink, key j visible to query
     i iff j <= i and (j >= i - 1 or j < 1). */
  params.window_left = 1;
  params.sink_tokens = 1;
  CHECK(lookback_attend(context, &params) == LOOKBACK_OK);
  for (int h = 0; h < kHeads; ++h) {
    for (int i = 0; i < kSeq; ++i) {
      double scores[kSeq], max = -INFINITY, sum = 0.0;
      for (int j = 0; j <= i; ++j) {
        double dot = 0.0;
        for (int e = 0; e < kDim; ++e) dot += q[(i * kHeads + h) * kDim + e] * k[j * kDim + e];
        scores[j] = (j >= i - 1 || j < 1) ? dot / sqrt((double)kDim) : -INFINITY;
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
  params.window_left = -1; /* sink tokens without a window: refused, named */
  CHECK(lookback_attend(context, &params) == LOOKBACK_ERROR_INVALID_ARGUMENT);
  CHECK(strstr(lookback_last_error(), "sink_tokens") != NULL);
  params.sink_tokens = 0;

  /* K/V stored in 8 bits: close to f32, not equal; 8-bit inputs are refused. */
  float exact[kSeq * kHeads * kDim];
  CHECK(lookback_attend(context, &params) == LOOKBACK_OK);
  memcpy(exact, out, sizeof exact);
  const lookback_dtype eight_bit[] = {LOOKBACK_INT8, LOOKBACK_FP8E4M3, LOOKBACK_FP8E5M2};
  for (int d = 0; d < 3; ++d) {
    params.storage = eight_bit[d];
    CHECK(lookback_attend(context, &params) == LOOKBACK_OK);
    double error = 0.0, norm = 0.0;
    for (int i = 0; i < kSeq * kHeads * kDim; ++i) {
      error += (out[i] - exact[i]) * (out[i] - exact[i]);
      norm += exact[i] * exact[i];
    }
    CHECK(sqrt(error / norm) < 0.2);
  }
  params.q.dtype = LOOKBACK_INT8;
  CHECK(lookback_attend(context, &params) == LOOKBACK_ERROR_INVALID_ARGUMENT);
  CHECK(strstr(lookback_last_error(), "dtype") != NULL);
  params.q.dtype = LOOKBACK_F32;
  params.storage = LOOKBACK_F32;

  /* A packed batch of two sequences (2 and 3 tokens): each equals its run
     alone; offsets that go down are a clear error. */
  {
    const int64_t cu[3] = {0, 2, 5};
    float packed_out[kSeq * kHeads * kDim], packed_lse[kHeads * kSeq];
    params.out = packed_out;
    params.maybe_lse = packed_lse;
    CHECK(lookback_attend_varlen(context, &params, cu, cu, 2) == LOOKBACK_OK);
    for (int b = 0; b < 2; ++b) {
      const int64_t first = cu[b], count = cu[b + 1] - cu[b];
      lookback_attention_params alone = params;
      alone.q = (lookback_tensor){q + first * kHeads * kDim, LOOKBACK_F32, {1, count, kHeads, kDim}, {0, 0, 0, 0}};
      alone.k = (lookback_tensor){k + first * kDim, LOOKBACK_F32, {1, count, 1, kDim}, {0, 0, 0, 0}};
      alone.v = (lookback_tensor){v + first * kDim, LOOKBACK_F32, {1, count, 1, kDim}, {0, 0, 0, 0}};
      alone.out = out;
      alone.maybe_lse = lse;
      CHECK(lookback_attend(context, &alone) == LOOKBACK_OK);
      for (int64_t i = 0; i < count * kHeads * kDim; ++i) {
        CHECK(out[i] == packed_out[first * kHeads * kDim + i]);
      }
      for (int h = 0; h < kHeads; ++h) {
        for (int64_t i = 0; i < count; ++i) CHECK(lse[h * count + i] == packed_lse[h * kSeq + first + i]);
      }
    }
    const int64_t down[3] = {0, 4, 2};
    CHECK(lookback_attend_varlen(context, &params, down, cu, 2) == LOOKBACK_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(lookback_last_error(), "cu_seqlens_q") != NULL);
    params.out = out;
    params.maybe_lse = lse;
  }

  /* heads (2) not a multiple of kv_heads (3): a clear error. */
  params.k.shape[2] = 3;
  params.v.shape[2] = 3;
  CHECK(lookback_attend(context, &params) == LOOKBACK_ERROR_INVALID_ARGUMENT);
  CHECK(strstr(lookback_last_error(), "kv_heads") != NULL);
  CHECK(lookback_attend(context, NULL) == LOOKBACK_ERROR_INVALID_ARGUMENT);
  lookback_context_destroy(context);

  /* More threads than a context accepts: a clear error, no thread started. */
  CHECK(lookback_context_create(100000, &context) == LOOKBACK_ERROR_INVALID_ARGUMENT);
  CHECK(strstr(lookback_last_error(), "threads") != NULL);
  check_refused_threads();

  if (failures == 0) printf("c_api_test: 1 passed, 0 failed\n");
  return failures == 0 ? 0 : 1;
}
