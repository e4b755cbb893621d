// A program outside the lookback tree, built against an installed lookback.
#include <lookback/lookback.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  // Two tokens, one head, head_dim 1: row 1 mixes v0 and v1.
  std::vector<float> q{1, 2}, k{1, 3}, v{10, 20}, out(2);
  lookback::AttentionParams params;
  params.q = lookback::make_view(q.data(), lookback::DType::kF32, {1, 2, 1, 1}, "q");
  params.k = lookback::make_view(k.data(), lookback::DType::kF32, {1, 2, 1, 1}, "k");
  params.v = lookback::make_view(v.data(), lookback::DType::kF32, {1, 2, 1, 1}, "v");
  params.out = lookback::make_mutable_view(out.data(), lookback::DType::kF32, {1, 2, 1, 1}, "out");
  params.scale = 1.0f;
  lookback::Context context(1);
  lookback::attend(params, context);
  const double expected = (10 * std::exp(2.0) + 20 * std::exp(6.0)) / (std::exp(2.0) + std::exp(6.0));
  if (out[0] != 10.0f || std::fabs(out[1] - expected) > 1e-4) {
    std::printf("wrong result: %f %f\n", out[0], out[1]);
    return 1;
  }
  std::printf("lookback %s works from an installed tree\n", lookback::kVersion);
  return 0;
}
