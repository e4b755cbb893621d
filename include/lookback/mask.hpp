// The mask: which keys a query may see. One predicate and one range function,
// used by the reference, every kernel, the cost counts, the pattern printer and
// the tests, so that none of them can disagree. Conventions (docs/semantics.md):
//
//   p(i) = i + seqlen_k - seqlen_q   bottom-right alignment (the default)
//   p(i) = i                         top-left alignment (PyTorch is_causal=True)
//   key j is visible to query i iff j <= p(i), and with a window W >= 0 also
//   j >= p(i) - W (W + 1 keys at most, the query's own position included).
//   Causal::kNone makes every key visible (bidirectional); it takes no window.
//   Sink tokens S (StreamingLLM, with a window only): key j is also visible
//   when j < S and j <= p(i). A row then sees two ranges: sink_range(row) =
//   the sinks below its window, and key_range(row) = its window.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace lookback {

enum class Causal : std::uint8_t { kBottomRight, kTopLeft, kNone };

std::string_view causal_name(Causal causal) noexcept;  // "bottom-right", ...
// Parses "bottom-right", "top-left" or "none"; throws lookback::Error naming
// `argument` otherwise.
Causal parse_causal(std::string_view text, std::string_view argument = "causal");

struct MaskSpec {
  Causal causal = Causal::kBottomRight;
  std::optional<std::int64_t> window_left;  // W >= 0, or none for no window
  // Queries and keys as two slices of one longer sequence: query row i sits
  // at p(i) = i + query_offset in the keys' numbering, whatever the
  // alignment (which is then only causal or not). Queries starting at
  // absolute position a against keys starting at b: query_offset = a - b
  // (ring attention's block pairs). |query_offset| <= kMaxQueryOffset.
  std::optional<std::int64_t> query_offset;
  // StreamingLLM sink tokens: keys [0, S) stay visible (causally) beside the
  // window. S >= 0; S > 0 needs a window. Positions stay absolute.
  std::int64_t sink_tokens = 0;
};

inline constexpr std::int64_t kMaxQueryOffset = std::int64_t{1} << 52;

// Half-open range of key indices [begin, end); empty when begin >= end.
struct KeyRange {
  std::int64_t begin = 0;
  std::int64_t end = 0;
  bool empty() const noexcept { return end <= begin; }
  std::int64_t size() const noexcept { return empty() ? 0 : end - begin; }
};

enum class TileVisibility : std::uint8_t { kEmpty, kPartial, kFull };

class Mask {
 public:
  // Throws lookback::Error for negative lengths, a negative window, a window
  // with Causal::kNone, a query_offset beyond kMaxQueryOffset, negative sink
  // tokens, or sink tokens without a window.
  Mask(std::int64_t seqlen_q, std::int64_t seqlen_k, MaskSpec spec = {});

  std::int64_t seqlen_q() const noexcept { return seqlen_q_; }
  std::int64_t seqlen_k() const noexcept { return seqlen_k_; }
  const MaskSpec& spec() const noexcept { return spec_; }

  // Absolute position p(row) of a query row (meaningful for causal masks).
  std::int64_t position(std::int64_t row) const noexcept { return row + offset_; }

  bool visible(std::int64_t row, std::int64_t key) const noexcept;
  // Keys visible to `row` through causality and the window, clipped to
  // [0, seqlen_k). With sink tokens the row also sees sink_range(row).
  KeyRange key_range(std::int64_t row) const noexcept;
  // The sink tokens visible to `row` that lie below key_range(row): keys
  // [0, min(S, p + 1, key_range(row).begin)), clipped; empty without sinks.
  KeyRange sink_range(std::int64_t row) const noexcept;
  // The sink tokens that matter for this mask: min(S, seqlen_k), and 0 when
  // the window hides nothing (every row then sees its sinks anyway).
  std::int64_t effective_sink_tokens() const noexcept { return sinks_; }
  std::int64_t visible_in_row(std::int64_t row) const noexcept {
    return key_range(row).size() + sink_range(row).size();
  }
  // Visible pairs in rows [row_begin, row_end) x keys [key_begin, key_end),
  // in closed form (O(1), no loop over the tile).
  std::int64_t visible_in_tile(std::int64_t row_begin, std::int64_t row_end,
                               std::int64_t key_begin,
                               std::int64_t key_end) const noexcept;
  std::int64_t visible_total() const noexcept {
    return visible_in_tile(0, seqlen_q_, 0, seqlen_k_);
  }
  TileVisibility tile_visibility(std::int64_t row_begin, std::int64_t row_end,
                                 std::int64_t key_begin,
                                 std::int64_t key_end) const noexcept;
  // Union of the key ranges of rows [row_begin, row_end): every key any of
  // those rows can see through key_range lies inside it (rows' ranges are
  // monotone in the row). Sink ranges are not included.
  KeyRange key_range_of_rows(std::int64_t row_begin,
                             std::int64_t row_end) const noexcept;

 private:
  // Pairs (i, j) in the rectangle with j - i <= diagonal.
  std::int64_t pairs_at_or_below(std::int64_t row_begin, std::int64_t row_end,
                                 std::int64_t key_begin, std::int64_t key_end,
                                 std::int64_t diagonal) const noexcept;

  std::int64_t seqlen_q_;
  std::int64_t seqlen_k_;
  // The window as the mask applies it: none when spec_'s reaches key 0 from
  // every row (a window of any size up to INT64_MAX is then no window).
  std::optional<std::int64_t> window_;
  MaskSpec spec_;
  std::int64_t offset_;  // p(i) - i
  std::int64_t sinks_ = 0;  // effective_sink_tokens()
};

}  // namespace lookback
