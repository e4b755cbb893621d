// The mask module against brute force: every answer it gives in closed form
// is recounted cell by cell from the definition in DESIGN.md §2.
#include <gtest/gtest.h>

#include <random>

#include "lookback/error.hpp"
#include "lookback/mask.hpp"

namespace lookback {
namespace {

// DESIGN.md §2 written out literally, independent of mask.cc.
bool visible_by_definition(std::int64_t i, std::int64_t j, std::int64_t seqlen_q,
                           std::int64_t seqlen_k, const MaskSpec& spec) {
  if (spec.causal == Causal::kNone) return true;
  const std::int64_t p = spec.causal == Causal::kBottomRight ? i + seqlen_k - seqlen_q : i;
  if (j > p) return false;
  if (spec.window_left && j < p - *spec.window_left) return false;
  return true;
}

MaskSpec random_spec(std::mt19937_64& rng) {
  MaskSpec spec;
  spec.causal = static_cast<Causal>(rng() % 3);
  if (spec.causal != Causal::kNone && rng() % 2 == 0) {
    spec.window_left = static_cast<std::int64_t>(rng() % 4 == 0 ? 0 : rng() % 40);
  }
  return spec;
}

TEST(Mask, SeedExampleHas28Interactions) {
  const Mask mask(7, 7);
  EXPECT_EQ(mask.visible_total(), 28);
  for (std::int64_t i = 0; i < 7; ++i) {
    EXPECT_EQ(mask.visible_in_row(i), i + 1);
    EXPECT_EQ(mask.key_range(i).begin, 0);
    EXPECT_EQ(mask.key_range(i).end, i + 1);
  }
  EXPECT_EQ(Mask(8, 8).visible_in_row(5), 6);
  EXPECT_EQ(Mask(4096, 4096).visible_total(), 4096LL * 4097 / 2);
}

TEST(Mask, AgreesWithBruteForceOnRandomCases) {
  std::mt19937_64 rng(20261126);
  int cases = 0;
  for (; cases < 3000; ++cases) {
    const std::int64_t seqlen_q = 1 + static_cast<std::int64_t>(rng() % 40);
    const std::int64_t seqlen_k = static_cast<std::int64_t>(rng() % 45);  // includes 0
    const MaskSpec spec = random_spec(rng);
    const Mask mask(seqlen_q, seqlen_k, spec);
    const std::string where = "seqlen_q=" + std::to_string(seqlen_q) + " seqlen_k=" +
                              std::to_string(seqlen_k) + " causal=" +
                              std::string(causal_name(spec.causal)) + " window=" +
                              (spec.window_left ? std::to_string(*spec.window_left) : "none");
    std::int64_t total = 0;
    for (std::int64_t i = 0; i < seqlen_q; ++i) {
      std::int64_t row_count = 0, first = -1, last = -1;
      for (std::int64_t j = 0; j < seqlen_k; ++j) {
        const bool expected = visible_by_definition(i, j, seqlen_q, seqlen_k, spec);
        ASSERT_EQ(mask.visible(i, j), expected) << where << " i=" << i << " j=" << j;
        if (expected) {
          ++row_count;
          if (first < 0) first = j;
          last = j;
        }
      }
      total += row_count;
      ASSERT_EQ(mask.visible_in_row(i), row_count) << where << " i=" << i;
      const KeyRange range = mask.key_range(i);
      if (row_count == 0) {
        ASSERT_TRUE(range.empty()) << where << " i=" << i;
      } else {
        // Visible keys are one contiguous run.
        ASSERT_EQ(last - first + 1, row_count) << where;
        ASSERT_EQ(range.begin, first) << where << " i=" << i;
        ASSERT_EQ(range.end, last + 1) << where << " i=" << i;
      }
    }
    ASSERT_EQ(mask.visible_total(), total) << where;

    // Random tiles, including ones that do not divide the lengths and ones
    // that stick out past the matrix.
    for (int t = 0; t < 8; ++t) {
      const std::int64_t tile_rows = 1 + static_cast<std::int64_t>(rng() % 9);
      const std::int64_t tile_keys = 1 + static_cast<std::int64_t>(rng() % 9);
      const std::int64_t row_begin = static_cast<std::int64_t>(rng() % (seqlen_q + 2));
      const std::int64_t key_begin = static_cast<std::int64_t>(rng() % (seqlen_k + 2));
      const std::int64_t row_end = row_begin + tile_rows, key_end = key_begin + tile_keys;
      std::int64_t count = 0, area = 0;
      for (std::int64_t i = row_begin; i < std::min(row_end, seqlen_q); ++i) {
        for (std::int64_t j = key_begin; j < std::min(key_end, seqlen_k); ++j) {
          ++area;
          count += visible_by_definition(i, j, seqlen_q, seqlen_k, spec) ? 1 : 0;
        }
      }
      ASSERT_EQ(mask.visible_in_tile(row_begin, row_end, key_begin, key_end), count)
          << where << " tile rows [" << row_begin << "," << row_end << ") keys [" << key_begin
          << "," << key_end << ")";
      const TileVisibility expected = count == 0      ? TileVisibility::kEmpty
                                      : count == area ? TileVisibility::kFull
                                                      : TileVisibility::kPartial;
      ASSERT_EQ(mask.tile_visibility(row_begin, row_end, key_begin, key_end), expected) << where;

      // The union range of the tile's rows covers exactly their visible keys.
      std::int64_t lo = seqlen_k, hi = -1;
      for (std::int64_t i = row_begin; i < std::min(row_end, seqlen_q); ++i) {
        const KeyRange range = mask.key_range(i);
        if (range.empty()) continue;
        lo = std::min(lo, range.begin);
        hi = std::max(hi, range.end);
      }
      const KeyRange rows_range = mask.key_range_of_rows(row_begin, row_end);
      if (hi < 0) {
        ASSERT_TRUE(rows_range.empty()) << where;
      } else {
        ASSERT_EQ(rows_range.begin, lo) << where;
        ASSERT_EQ(rows_range.end, hi) << where;
      }
    }
  }
  EXPECT_EQ(cases, 3000);
}

TEST(Mask, SeqlenQLargerThanSeqlenKLeavesEarlyRowsEmptyBottomRight) {
  const Mask mask(5, 3);  // p(i) = i - 2
  EXPECT_TRUE(mask.key_range(0).empty());
  EXPECT_TRUE(mask.key_range(1).empty());
  EXPECT_EQ(mask.visible_in_row(2), 1);
  EXPECT_EQ(mask.visible_in_row(4), 3);
  EXPECT_EQ(mask.visible_total(), 6);
}

TEST(Mask, WindowZeroSeesOnlyItself) {
  const Mask mask(6, 6, {.causal = Causal::kBottomRight, .window_left = 0});
  for (std::int64_t i = 0; i < 6; ++i) {
    EXPECT_EQ(mask.key_range(i).begin, i);
    EXPECT_EQ(mask.key_range(i).end, i + 1);
  }
  EXPECT_EQ(mask.visible_total(), 6);
}

TEST(Mask, TopLeftWithShortKeys) {
  const Mask mask(4, 2, {.causal = Causal::kTopLeft});
  EXPECT_EQ(mask.visible_in_row(0), 1);
  EXPECT_EQ(mask.visible_in_row(3), 2);
  // Window pushes the last rows past every key.
  const Mask windowed(6, 2, {.causal = Causal::kTopLeft, .window_left = 1});
  EXPECT_TRUE(windowed.key_range(5).empty());
  EXPECT_EQ(windowed.visible_in_row(2), 1);
}

TEST(Mask, RejectsBadArguments) {
  EXPECT_THROW(Mask(-1, 3), Error);
  EXPECT_THROW(Mask(3, -1), Error);
  EXPECT_THROW(Mask(3, 3, {.causal = Causal::kBottomRight, .window_left = -1}), Error);
  EXPECT_THROW(Mask(3, 3, {.causal = Causal::kNone, .window_left = 2}), Error);
  EXPECT_THROW(parse_causal("diagonal"), Error);
  try {
    parse_causal("diagonal", "--causal");
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--causal"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("bottom-right"), std::string::npos);
  }
  EXPECT_EQ(parse_causal("top-left"), Causal::kTopLeft);
}

}  // namespace
}  // namespace lookback

namespace lookback {
namespace {

// StreamingLLM sink tokens, DESIGN.md §2 written out literally: key j is
// visible to query i iff j <= p(i) and (j >= p(i) - W or j < S).
bool visible_with_sinks(std::int64_t i, std::int64_t j, std::int64_t seqlen_q,
                        std::int64_t seqlen_k, const MaskSpec& spec) {
  if (j < 0 || j >= seqlen_k) return false;
  const std::int64_t p = spec.query_offset                      ? i + *spec.query_offset
                         : spec.causal == Causal::kBottomRight ? i + seqlen_k - seqlen_q
                                                               : i;
  if (j > p) return false;
  return j >= p - *spec.window_left || j < spec.sink_tokens;
}

TEST(MaskSinkTokens, AgreesWithBruteForceOnRandomCases) {
  std::mt19937_64 rng(20261203);
  for (int cases = 0; cases < 3000; ++cases) {
    const std::int64_t seqlen_q = 1 + static_cast<std::int64_t>(rng() % 40);
    const std::int64_t seqlen_k = static_cast<std::int64_t>(rng() % 45);  // includes 0
    MaskSpec spec;
    spec.causal = rng() % 2 == 0 ? Causal::kBottomRight : Causal::kTopLeft;
    spec.window_left = static_cast<std::int64_t>(rng() % 4 == 0 ? 0 : rng() % 30);
    spec.sink_tokens = static_cast<std::int64_t>(rng() % 8);
    if (rng() % 4 == 0) spec.query_offset = static_cast<std::int64_t>(rng() % 50) - 20;
    const Mask mask(seqlen_q, seqlen_k, spec);
    const std::string where =
        "seqlen_q=" + std::to_string(seqlen_q) + " seqlen_k=" + std::to_string(seqlen_k) +
        " causal=" + std::string(causal_name(spec.causal)) +
        " window=" + std::to_string(*spec.window_left) +
        " sink_tokens=" + std::to_string(spec.sink_tokens) +
        " query_offset=" + (spec.query_offset ? std::to_string(*spec.query_offset) : "none");
    std::int64_t total = 0;
    for (std::int64_t i = 0; i < seqlen_q; ++i) {
      const KeyRange window = mask.key_range(i), sinks = mask.sink_range(i);
      // The two ranges are disjoint, sinks first.
      if (!sinks.empty() && !window.empty()) ASSERT_LE(sinks.end, window.begin) << where;
      std::int64_t row_count = 0;
      for (std::int64_t j = 0; j < seqlen_k; ++j) {
        const bool expected = visible_with_sinks(i, j, seqlen_q, seqlen_k, spec);
        ASSERT_EQ(mask.visible(i, j), expected) << where << " i=" << i << " j=" << j;
        const bool in_ranges = (j >= window.begin && j < window.end) ||
                               (j >= sinks.begin && j < sinks.end);
        ASSERT_EQ(in_ranges, expected) << where << " i=" << i << " j=" << j;
        row_count += expected ? 1 : 0;
      }
      total += row_count;
      ASSERT_EQ(mask.visible_in_row(i), row_count) << where << " i=" << i;
    }
    ASSERT_EQ(mask.visible_total(), total) << where;
    for (int t = 0; t < 8; ++t) {
      const std::int64_t row_begin = static_cast<std::int64_t>(rng() % (seqlen_q + 2));
      const std::int64_t key_begin = static_cast<std::int64_t>(rng() % (seqlen_k + 2));
      const std::int64_t row_end = row_begin + 1 + static_cast<std::int64_t>(rng() % 9);
      const std::int64_t key_end = key_begin + 1 + static_cast<std::int64_t>(rng() % 9);
      std::int64_t count = 0, area = 0;
      for (std::int64_t i = row_begin; i < std::min(row_end, seqlen_q); ++i) {
        for (std::int64_t j = key_begin; j < std::min(key_end, seqlen_k); ++j) {
          ++area;
          count += visible_with_sinks(i, j, seqlen_q, seqlen_k, spec) ? 1 : 0;
        }
      }
      ASSERT_EQ(mask.visible_in_tile(row_begin, row_end, key_begin, key_end), count)
          << where << " tile rows [" << row_begin << "," << row_end << ") keys [" << key_begin
          << "," << key_end << ")";
      const TileVisibility expected = count == 0      ? TileVisibility::kEmpty
                                      : count == area ? TileVisibility::kFull
                                                      : TileVisibility::kPartial;
      ASSERT_EQ(mask.tile_visibility(row_begin, row_end, key_begin, key_end), expected) << where;
    }
  }
}

// lookback pattern --len 12 --window 3 --sink-tokens 2: the last row sees
// the two sinks and its four window keys.
TEST(MaskSinkTokens, StreamingLlmShape) {
  const Mask mask(12, 12, {.window_left = 3, .sink_tokens = 2});
  EXPECT_EQ(mask.effective_sink_tokens(), 2);
  EXPECT_EQ(mask.visible_in_row(11), 6);
  EXPECT_EQ(mask.sink_range(11).end, 2);
  EXPECT_EQ(mask.key_range(11).begin, 8);
  EXPECT_EQ(mask.visible_in_row(4), 5);  // keys 0..4: the window reaches key 1
  EXPECT_EQ(mask.visible_in_row(0), 1);
  // Rows 0..5 see 1, 2, 3, 4, 5, 6 keys; rows 6..11 see 2 sinks + 4: 21 + 36.
  EXPECT_EQ(mask.visible_total(), 57);
  // A window that hides nothing makes the sinks irrelevant.
  EXPECT_EQ(Mask(5, 5, {.window_left = 10, .sink_tokens = 2}).effective_sink_tokens(), 0);
  // More sinks than keys: every key is a sink.
  EXPECT_EQ(Mask(3, 3, {.window_left = 0, .sink_tokens = 9}).visible_total(), 6);
}

TEST(MaskSinkTokens, RejectsBadArguments) {
  try {
    Mask(4, 4, {.sink_tokens = 2});
    ADD_FAILURE() << "sink tokens without a window were accepted";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("sink_tokens"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("window"), std::string::npos) << error.what();
  }
  try {
    Mask(4, 4, {.window_left = 1, .sink_tokens = -1});
    ADD_FAILURE() << "negative sink tokens were accepted";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("sink_tokens: -1"), std::string::npos) << error.what();
  }
}

}  // namespace
}  // namespace lookback
