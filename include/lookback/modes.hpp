// The paths that must agree (DESIGN.md §4), behind one call: the same
// AttentionParams computed by prefill, by decode over a KV cache, chunk by
// chunk, over a paged cache, or with the key range split and merged. Every
// path computes the same function within float32 rounding, and every path is
// causal: an output row never changes when a later input changes.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "lookback/attention.hpp"
#include "lookback/context.hpp"

namespace lookback {

enum class Mode : std::uint8_t {
  kPrefill,  // all of Q against all of K/V in one call
  kDecode,   // cache the first seqlen_k - seqlen_q tokens, then one token at a time
  kChunked,  // like decode, `chunk` tokens at a time
  kPaged,    // decode (chunk 1) or chunked over a paged cache of `block_size` blocks
  kSplit,    // prefill with the key range cut into `splits` parts, merged by LSE
};

std::string_view mode_name(Mode mode) noexcept;  // "prefill", "decode", ...
// Throws lookback::Error naming `argument` for an unknown name.
Mode parse_mode(std::string_view text, std::string_view argument = "mode");
// Every mode, in the order above.
std::vector<Mode> all_modes();

struct ModeOptions {
  Mode mode = Mode::kPrefill;
  std::int64_t chunk = 1;        // kChunked, kPaged: tokens per step (>= 1)
  std::int64_t block_size = 16;  // kPaged: tokens per block (>= 1)
  std::int64_t splits = 2;       // kSplit: parts of the key range (>= 1)
  // kDecode, kChunked: each sequence's cache is a ring (RingSpec) of
  // sink_tokens + window + chunk slots, overwriting what the mask no longer
  // sees. Needs a window.
  bool ring = false;
};

// Validates like lookback::validate plus the mode's own rules (cache modes
// need bottom-right alignment; chunk, block size and splits >= 1), then
// computes params.out (and params.maybe_lse) through the chosen path.
void attend_with_mode(const AttentionParams& params, const ModeOptions& options,
                      Context& context);

// attend_with_mode's checks that need no data: validate_shapes(params) plus
// the mode's own rules (see validate_shapes in lookback/attention.hpp).
AttentionShape validate_shapes(const AttentionParams& params, const ModeOptions& options);

}  // namespace lookback
