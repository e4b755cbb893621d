/* A C program outside the lookback tree, built against an installed lookback
 * with nothing but pkg-config: cc main.c $(pkg-config --cflags --libs lookback). */
#include <lookback/lookback.h>

#include <stdio.h>

int main(void) {
  /* Two tokens, one head, head_dim 1, scale 1: row 1 mixes v0 and v1. */
  const float q[2] = {1, 2}, k[2] = {1, 3}, v[2] = {10, 20};
  float out[2] = {0, 0};
  lookback_attention_params params = {0};
  const lookback_tensor views[3] = {{q, LOOKBACK_F32, {1, 2, 1, 1}, {0}},
                                    {k, LOOKBACK_F32, {1, 2, 1, 1}, {0}},
                                    {v, LOOKBACK_F32, {1, 2, 1, 1}, {0}}};
  params.q = views[0];
  params.k = views[1];
  params.v = views[2];
  params.out = out;
  params.has_scale = 1;
  params.scale = 1.0f;
  params.causal = LOOKBACK_CAUSAL_BOTTOM_RIGHT;
  params.window_left = -1;
  params.storage = LOOKBACK_F32;
  lookback_context* context = NULL;
  if (lookback_context_create(1, &context) != LOOKBACK_OK ||
      lookback_attend(context, &params) != LOOKBACK_OK) {
    printf("lookback failed: %s\n", lookback_last_error());
    return 1;
  }
  lookback_context_destroy(context);
  /* exp(2) / (exp(2) + exp(6)) of v0, the rest v1; no libm needed. */
  const double expected = 20.0 - 10.0 / (1.0 + 54.598150033144236);
  if (out[0] != 10.0f || out[1] - expected > 1e-4 || expected - out[1] > 1e-4) {
    printf("wrong result: %f %f\n", out[0], out[1]);
    return 1;
  }
  printf("lookback %s works from C through pkg-config\n", lookback_version());
  return 0;
}
