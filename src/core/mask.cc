#include "lookback/mask.hpp"

#include <fmt/format.h>

#include <algorithm>

#include "lookback/error.hpp"

namespace lookback {

std::string_view causal_name(Causal causal) noexcept {
  switch (causal) {
    case Causal::kBottomRight: return "bottom-right";
    case Causal::kTopLeft: return "top-left";
    case Causal::kNone: return "none";
  }
  return "?";
}

Causal parse_causal(std::string_view text, std::string_view argument) {
  if (text == "bottom-right") return Causal::kBottomRight;
  if (text == "top-left") return Causal::kTopLeft;
  if (text == "none") return Causal::kNone;
  throw Error(fmt::format("{}: unknown alignment '{}' (expected bottom-right, top-left or none)",
                          argument, text));
}

Mask::Mask(std::int64_t seqlen_q, std::int64_t seqlen_k, MaskSpec spec)
    : seqlen_q_(seqlen_q), seqlen_k_(seqlen_k), spec_(spec) {
  if (seqlen_q < 0) throw Error(fmt::format("seqlen_q: {} (expected >= 0)", seqlen_q));
  if (seqlen_k < 0) throw Error(fmt::format("seqlen_k: {} (expected >= 0)", seqlen_k));
  if (spec.window_left) {
    if (*spec.window_left < 0) {
      throw Error(fmt::format("window: {} (expected >= 0, or no window)", *spec.window_left));
    }
    if (spec.causal == Causal::kNone) {
      throw Error("window: a window needs a causal mask (expected bottom-right or top-left)");
    }
  }
  if (spec.sink_tokens < 0) {
    throw Error(fmt::format("sink_tokens: {} (expected >= 0)", spec.sink_tokens));
  }
  if (spec.sink_tokens > 0 && !spec.window_left) {
    throw Error(fmt::format("sink_tokens: {} without a window (expected a window with sink "
                            "tokens, or sink_tokens 0)",
                            spec.sink_tokens));
  }
  if (spec.query_offset &&
      (*spec.query_offset > kMaxQueryOffset || *spec.query_offset < -kMaxQueryOffset)) {
    throw Error(fmt::format("query_offset: {} (expected within +-2^52)", *spec.query_offset));
  }
  // Causal::kNone sees every key; its positions (for ALiBi) are bottom-right.
  offset_ = spec.query_offset ? *spec.query_offset
            : spec.causal == Causal::kTopLeft ? 0
                                              : seqlen_k - seqlen_q;
  // A window that reaches key 0 from the last row's position hides nothing:
  // it is no window (so W up to INT64_MAX never overflows p - W below).
  const std::int64_t last_position = seqlen_q - 1 + offset_;
  if (spec.window_left && *spec.window_left < std::max<std::int64_t>(last_position, 0)) {
    window_ = spec.window_left;
    sinks_ = std::min(spec.sink_tokens, seqlen_k);
  }
}

bool Mask::visible(std::int64_t row, std::int64_t key) const noexcept {
  if (row < 0 || row >= seqlen_q_ || key < 0 || key >= seqlen_k_) return false;
  if (spec_.causal == Causal::kNone) return true;
  const std::int64_t p = row + offset_;
  if (key > p) return false;
  return !window_ || key >= p - *window_ || key < sinks_;
}

KeyRange Mask::key_range(std::int64_t row) const noexcept {
  if (row < 0 || row >= seqlen_q_) return {};
  if (spec_.causal == Causal::kNone) return {0, seqlen_k_};
  const std::int64_t p = row + offset_;
  const std::int64_t end = std::min(p + 1, seqlen_k_);
  const std::int64_t begin = window_ ? std::max<std::int64_t>(0, p - *window_) : 0;
  if (end <= begin) return {};
  return {begin, end};
}

KeyRange Mask::sink_range(std::int64_t row) const noexcept {
  if (sinks_ == 0 || row < 0 || row >= seqlen_q_) return {};
  const std::int64_t p = row + offset_;
  // Below the window's first key p - W (sinks_ > 0 implies a window).
  const std::int64_t end = std::min({sinks_, p + 1, std::max<std::int64_t>(p - *window_, 0)});
  if (end <= 0) return {};
  return {0, end};
}

namespace {

// sum over integers x < n of clamp(x, 0, width).
std::int64_t clamped_prefix_sum(std::int64_t n, std::int64_t width) noexcept {
  if (n <= 0) return 0;
  if (n <= width + 1) return n * (n - 1) / 2;
  return width * (width + 1) / 2 + (n - width - 1) * width;
}

}  // namespace

std::int64_t Mask::pairs_at_or_below(std::int64_t row_begin, std::int64_t row_end,
                                     std::int64_t key_begin, std::int64_t key_end,
                                     std::int64_t diagonal) const noexcept {
  // Row i contributes clamp(i + diagonal + 1 - key_begin, 0, width) keys.
  const std::int64_t width = key_end - key_begin;
  const std::int64_t shift = diagonal + 1 - key_begin;
  return clamped_prefix_sum(row_end + shift, width) -
         clamped_prefix_sum(row_begin + shift, width);
}

std::int64_t Mask::visible_in_tile(std::int64_t row_begin, std::int64_t row_end,
                                   std::int64_t key_begin,
                                   std::int64_t key_end) const noexcept {
  row_begin = std::max<std::int64_t>(row_begin, 0);
  row_end = std::min(row_end, seqlen_q_);
  key_begin = std::max<std::int64_t>(key_begin, 0);
  key_end = std::min(key_end, seqlen_k_);
  if (row_end <= row_begin || key_end <= key_begin) return 0;
  if (spec_.causal == Causal::kNone) return (row_end - row_begin) * (key_end - key_begin);
  // Visible: j - i <= offset, and with a window j - i >= offset - W.
  std::int64_t count = pairs_at_or_below(row_begin, row_end, key_begin, key_end, offset_);
  if (window_) {
    count -= pairs_at_or_below(row_begin, row_end, key_begin, key_end, offset_ - *window_ - 1);
    // Sinks below the window: j < S and j - i <= offset - W - 1 (which
    // implies j <= p(i)).
    const std::int64_t sink_end = std::min(key_end, sinks_);
    if (key_begin < sink_end) {
      count += pairs_at_or_below(row_begin, row_end, key_begin, sink_end, offset_ - *window_ - 1);
    }
  }
  return count;
}

TileVisibility Mask::tile_visibility(std::int64_t row_begin, std::int64_t row_end,
                                     std::int64_t key_begin,
                                     std::int64_t key_end) const noexcept {
  const std::int64_t count = visible_in_tile(row_begin, row_end, key_begin, key_end);
  if (count == 0) return TileVisibility::kEmpty;
  // Clipped as visible_in_tile clips: a full tile is full over its part
  // inside the mask.
  row_begin = std::max<std::int64_t>(row_begin, 0);
  row_end = std::min(row_end, seqlen_q_);
  key_begin = std::max<std::int64_t>(key_begin, 0);
  key_end = std::min(key_end, seqlen_k_);
  if (count == (row_end - row_begin) * (key_end - key_begin)) return TileVisibility::kFull;
  return TileVisibility::kPartial;
}

KeyRange Mask::key_range_of_rows(std::int64_t row_begin, std::int64_t row_end) const noexcept {
  row_begin = std::max<std::int64_t>(row_begin, 0);
  row_end = std::min(row_end, seqlen_q_);
  if (row_end <= row_begin || seqlen_k_ == 0) return {};
  if (spec_.causal == Causal::kNone) return {0, seqlen_k_};
  // Rows with a visible key form one interval: p(i) >= 0, and with a window
  // p(i) - W <= seqlen_k - 1. Both ends of a row's range grow with the row.
  std::int64_t first = std::max(row_begin, -offset_);
  std::int64_t last = row_end - 1;
  if (window_) last = std::min(last, seqlen_k_ - 1 + *window_ - offset_);
  if (last < first) return {};
  return {key_range(first).begin, key_range(last).end};
}

}  // namespace lookback
