// Rotary position embedding. Pair (a, b) of a head is rotated by the angle
// position * theta^(-2 f / head_dim) for frequency index f: NeoX layout pairs
// element f with f + head_dim/2, the interleaved layout pairs 2f with 2f + 1.
// An odd head_dim leaves its last element unrotated.
#include <cmath>

#include "lookback/kv_cache.hpp"

namespace lookback {

void apply_rope(float* x, std::int64_t tokens, std::int64_t heads, std::int64_t head_dim,
                std::int64_t first_position, const RopeSpec& rope) {
  const std::int64_t pairs = head_dim / 2;
  for (std::int64_t t = 0; t < tokens; ++t) {
    const double position = static_cast<double>(first_position + t);
    for (std::int64_t h = 0; h < heads; ++h) {
      float* row = x + (t * heads + h) * head_dim;
      for (std::int64_t f = 0; f < pairs; ++f) {
        const double angle =
            position * std::pow(static_cast<double>(rope.theta),
                                -2.0 * static_cast<double>(f) / static_cast<double>(head_dim));
        const double c = std::cos(angle), s = std::sin(angle);
        float& a = rope.interleaved ? row[2 * f] : row[f];
        float& b = rope.interleaved ? row[2 * f + 1] : row[f + pairs];
        const double a0 = a, b0 = b;
        a = static_cast<float>(a0 * c - b0 * s);
        b = static_cast<float>(a0 * s + b0 * c);
      }
    }
  }
}

}  // namespace lookback
