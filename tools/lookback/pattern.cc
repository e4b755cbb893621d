// `lookback pattern`: shows which keys each query is scored against.
//
// Every visibility decision below comes from lookback::Mask (key_range,
// visible, visible_in_tile, position), the same code the kernels and the cost
// counts use, so what this command prints is what the engine computes.
// Conventions (alignment, inclusive window): docs/semantics.md.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common.hpp"
#include "output_format.hpp"
#include "svg.hpp"
#include "lookback/error.hpp"
#include "lookback/mask.hpp"

namespace lookback::cli {
namespace {

// Lengths and windows above this are refused: it keeps every position
// (i + seqlen_k - seqlen_q, minus a window) far from int64 overflow, and no
// real sequence comes near it.
constexpr std::int64_t kMaxLength = std::int64_t{1} << 40;
// text, matrix and json list every cell or pair they show; past ~4M cells the
// output runs to tens of megabytes, which nobody reads. --query shows one row.
constexpr std::int64_t kMaxListedCells = std::int64_t{1} << 22;
// svg draws one rectangle per row, so its size grows with the rows only;
// 16384 rows is about a megabyte.
constexpr std::int64_t kMaxSvgRows = std::int64_t{1} << 14;

struct PatternOptions {
  std::int64_t seqlen_q = 0;
  std::optional<std::int64_t> seqlen_k;  // default: seqlen_q
  std::optional<std::int64_t> query;     // one row only
  std::optional<std::int64_t> window_left;
  std::int64_t sink_tokens = 0;
  std::string causal = "bottom-right";
  OutputFormat format = OutputFormat::kText;
  std::string out;
};

// What one invocation shows: the mask and the query rows [row_begin, row_end).
struct Pattern {
  Mask mask;
  std::int64_t row_begin = 0;
  std::int64_t row_end = 0;
  std::optional<std::int64_t> query;  // set when --query picked one row

  std::int64_t rows() const noexcept { return row_end - row_begin; }
  // Computed scores among the rows shown, and the cells those rows span.
  std::int64_t interactions() const noexcept {
    return mask.visible_in_tile(row_begin, row_end, 0, mask.seqlen_k());
  }
  std::int64_t cells() const noexcept { return rows() * mask.seqlen_k(); }
};

void check_at_most(const char* argument, std::int64_t value, std::int64_t limit) {
  if (value > limit) {
    throw Error(fmt::format("{}: {} (expected at most {})", argument, value, limit));
  }
}

// Validates the options and builds the pattern; nothing is written before
// this returns, so a bad argument never leaves an output file behind.
Pattern make_pattern(const PatternOptions& options) {
  check_at_most("--len", options.seqlen_q, kMaxLength);
  const std::int64_t seqlen_k = options.seqlen_k.value_or(options.seqlen_q);
  check_at_most("--seqlen-k", seqlen_k, kMaxLength);
  if (options.window_left) check_at_most("--window", *options.window_left, kMaxLength);
  check_at_most("--sink-tokens", options.sink_tokens, kMaxLength);
  if (options.sink_tokens > 0 && !options.window_left) {
    throw Error(fmt::format("--sink-tokens: {} without --window (expected --window W with sink "
                            "tokens)",
                            options.sink_tokens));
  }
  const MaskSpec spec{.causal = parse_causal(options.causal, "--causal"),
                      .window_left = options.window_left,
                      .sink_tokens = options.sink_tokens};
  // The Mask checks the window against the alignment (none takes no window).
  Pattern pattern{.mask = Mask(options.seqlen_q, seqlen_k, spec),
                  .row_begin = 0,
                  .row_end = options.seqlen_q,
                  .query = {}};
  if (const std::optional<std::int64_t> query = options.query) {
    if (*query < 0 || *query >= options.seqlen_q) {
      throw Error(fmt::format("--query: {} (expected a query row from 0 to {}, below --len {})",
                              *query, options.seqlen_q - 1, options.seqlen_q));
    }
    pattern.query = query;
    pattern.row_begin = *query;
    pattern.row_end = *query + 1;
  }
  if (options.format == OutputFormat::kSvg) {
    if (pattern.rows() > kMaxSvgRows) {
      throw Error(fmt::format(
          "--len: {} rows are too many to draw (expected at most {}; use --query to draw one row)",
          pattern.rows(), kMaxSvgRows));
    }
  } else if (pattern.query && seqlen_k > kMaxListedCells) {
    throw Error(fmt::format(
        "--seqlen-k: {} keys are too many to list in one row (expected at most {})", seqlen_k,
        kMaxListedCells));
  } else if (pattern.rows() > kMaxListedCells / seqlen_k) {
    throw Error(fmt::format(
        "--len x --seqlen-k: {} x {} cells are too many to list (expected at most {}; use --query "
        "to list one row)",
        pattern.rows(), seqlen_k, kMaxListedCells));
  }
  return pattern;
}

std::string summary_line(const Pattern& pattern) {
  const std::int64_t interactions = pattern.interactions();
  const std::int64_t cells = pattern.cells();
  return fmt::format("{} query-key interaction{} of {} ({:.1f}%)", interactions,
                     interactions == 1 ? "" : "s", cells,
                     100.0 * static_cast<double>(interactions) / static_cast<double>(cells));
}

// The notes' notation: q3: q3·k0ᵀ, q3·k1ᵀ, ... (U+00B7 middle dot, U+1D40 ᵀ).
std::string render_text(const Pattern& pattern) {
  std::string text;
  auto out = std::back_inserter(text);
  for (std::int64_t row = pattern.row_begin; row < pattern.row_end; ++row) {
    fmt::format_to(out, "q{}:", row);
    if (pattern.mask.visible_in_row(row) == 0) fmt::format_to(out, " (no visible keys)");
    bool first = true;
    // The sink tokens below the window first, then the window's keys.
    for (const KeyRange keys : {pattern.mask.sink_range(row), pattern.mask.key_range(row)}) {
      for (std::int64_t key = keys.begin; key < keys.end; ++key) {
        fmt::format_to(out, "{} q{}\u00b7k{}\u1d40", first ? "" : ",", row, key);
        first = false;
      }
    }
    text += '\n';
  }
  text += summary_line(pattern);
  text += '\n';
  return text;
}

// One line per query row, one token per key: S = score computed, 0 = masked.
std::string render_matrix(const Pattern& pattern) {
  std::string text;
  const std::int64_t seqlen_k = pattern.mask.seqlen_k();
  text.reserve(static_cast<std::size_t>(pattern.cells() * 2));
  for (std::int64_t row = pattern.row_begin; row < pattern.row_end; ++row) {
    for (std::int64_t key = 0; key < seqlen_k; ++key) {
      if (key > 0) text += ' ';
      text += pattern.mask.visible(row, key) ? 'S' : '0';
    }
    text += '\n';
  }
  return text;
}

std::string render_json(const Pattern& pattern) {
  const Mask& mask = pattern.mask;
  // ordered_json keeps the fields in the order a reader expects them.
  nlohmann::ordered_json doc;
  doc["seqlen_q"] = mask.seqlen_q();
  doc["seqlen_k"] = mask.seqlen_k();
  doc["causal"] = std::string(causal_name(mask.spec().causal));
  doc["window"] = mask.spec().window_left ? nlohmann::ordered_json(*mask.spec().window_left)
                                          : nlohmann::ordered_json(nullptr);
  if (mask.spec().sink_tokens > 0) doc["sink_tokens"] = mask.spec().sink_tokens;
  doc["query"] = pattern.query ? nlohmann::ordered_json(*pattern.query)
                               : nlohmann::ordered_json(nullptr);
  doc["interactions"] = pattern.interactions();
  doc["full"] = pattern.cells();
  auto& rows = doc["rows"] = nlohmann::ordered_json::array();
  for (std::int64_t row = pattern.row_begin; row < pattern.row_end; ++row) {
    nlohmann::ordered_json keys_json = nlohmann::ordered_json::array();
    for (const KeyRange keys : {mask.sink_range(row), mask.key_range(row)}) {
      for (std::int64_t key = keys.begin; key < keys.end; ++key) keys_json.push_back(key);
    }
    rows.push_back({{"query", row}, {"keys", std::move(keys_json)}});
  }
  return doc.dump() + "\n";
}

// ---- svg -------------------------------------------------------------------

// Sizes in px. Long sequences shrink the cells so the plot stays about
// kPlotSide across; short ones keep kMaxCell so q0..q6 stay readable.
constexpr double kPlotSide = 640;
constexpr double kMaxCell = 40;
constexpr double kLabelCell = 24;   // a label on every row/column from here up
constexpr double kTickSpacing = 40;  // otherwise at least this far apart
constexpr double kGridCell = 4;     // grid lines and per-cell diagonal from here up
constexpr double kLeft = 84;        // room for "q16383" and the rotated axis name
constexpr double kTop = 96;         // title, subtitle, axis name, key labels
constexpr double kMinWidth = 420;   // the title and legend need this much

constexpr const char* kMaskedColour = "#e8e8e8";
constexpr const char* kVisibleColour = "#3b6ea8";
constexpr const char* kDiagonalColour = "#e8743b";

// Smallest step of the form 1, 2, 5, 10, 20, 50, ... whose labels, `cell` px
// per index apart, are at least kTickSpacing px apart.
std::int64_t tick_step(double cell) {
  if (cell >= kLabelCell) return 1;
  for (std::int64_t decade = 1;; decade *= 10) {
    for (std::int64_t factor : {1, 2, 5}) {
      if (static_cast<double>(decade * factor) * cell >= kTickSpacing) return decade * factor;
    }
  }
}

// The plot's geometry in px: cells shrink with long sequences.
struct Plot {
  double cell_w, cell_h, width, height;
  bool big_cells() const noexcept { return cell_w >= kGridCell && cell_h >= kGridCell; }
  double x(double key) const noexcept { return kLeft + key * cell_w; }
  double y(double shown_row) const noexcept { return kTop + shown_row * cell_h; }
};

Plot plot_of(const Pattern& pattern) {
  const auto keys = static_cast<double>(pattern.mask.seqlen_k());
  const auto rows = static_cast<double>(pattern.rows());
  const double cell_w = std::min(kMaxCell, kPlotSide / keys);
  const double cell_h = std::min(kMaxCell, kPlotSide / rows);
  return {.cell_w = cell_w, .cell_h = cell_h, .width = cell_w * keys, .height = cell_h * rows};
}

// The cells, in cell units (scaled group): masked background, then one
// rectangle per row for its visible keys (two with sink tokens: sink_range and
// key_range are one interval each),
// so this is exact and the file grows with the rows, not with rows x keys.
// The rectangles are sub-paths of one path: a renderer fills a path in one
// pass, so rows under a pixel tall leave no anti-aliased seams between them.
// The diagonal is the key at the query's own position p(i): big cells get a
// square each, small ones a line (drawn in px, outside the scaled group, so
// its width does not grow with the cells), which stays visible when a cell
// is under a pixel.
void draw_cells(svg::Document& doc, const Pattern& pattern, const Plot& plot) {
  const Mask& mask = pattern.mask;
  doc.raw(fmt::format("<g transform=\"translate({} {}) scale({} {})\">\n"
                      "<rect width=\"{}\" height=\"{}\" fill=\"{}\"/>\n",
                      svg::number(kLeft), svg::number(kTop), plot.cell_w, plot.cell_h,
                      mask.seqlen_k(), pattern.rows(), kMaskedColour));
  std::string visible;
  for (std::int64_t row = pattern.row_begin; row < pattern.row_end; ++row) {
    for (const KeyRange keys : {mask.sink_range(row), mask.key_range(row)}) {
      if (!keys.empty()) svg::add_cell_run(visible, keys.begin, row - pattern.row_begin, keys.size());
    }
  }
  doc.raw(fmt::format("<path fill=\"{}\" d=\"{}\"/>\n", kVisibleColour, visible));
  std::vector<std::int64_t> diagonal;  // rows whose own position is a key
  for (std::int64_t row = pattern.row_begin; row < pattern.row_end; ++row) {
    if (!mask.visible(row, mask.position(row))) continue;  // off the key axis
    diagonal.push_back(row);
    if (plot.big_cells()) {
      doc.raw(fmt::format("<rect x=\"{}\" y=\"{}\" width=\"1\" height=\"1\" fill=\"{}\"/>\n",
                          mask.position(row), row - pattern.row_begin, kDiagonalColour));
    }
  }
  doc.raw("</g>\n");
  if (!plot.big_cells() && !diagonal.empty()) {
    const auto centre = [&](std::int64_t row) {
      return std::pair{plot.x(static_cast<double>(mask.position(row)) + 0.5),
                       plot.y(static_cast<double>(row - pattern.row_begin) + 0.5)};
    };
    const auto [x1, y1] = centre(diagonal.front());
    const auto [x2, y2] = centre(diagonal.back());
    doc.line(x1, y1, x2, y2,
             fmt::format("stroke=\"{}\" stroke-width=\"1.5\" stroke-linecap=\"square\"",
                         kDiagonalColour));
  }
}

// Labels: every row and key when the cells are big enough, else ticks.
void draw_labels(svg::Document& doc, const Pattern& pattern, const Plot& plot) {
  doc.raw("<g font-size=\"11\" fill=\"#222\">\n");
  const std::int64_t key_step = tick_step(plot.cell_w);
  for (std::int64_t key = 0; key < pattern.mask.seqlen_k(); key += key_step) {
    doc.text(plot.x(static_cast<double>(key) + 0.5), kTop - 8, fmt::format("k{}", key),
             "text-anchor=\"middle\"");
  }
  const std::int64_t row_step = tick_step(plot.cell_h);
  for (std::int64_t row = pattern.row_begin; row < pattern.row_end; ++row) {
    const std::int64_t shown = row - pattern.row_begin;
    if (row % row_step != 0 && shown != 0) continue;
    doc.text(kLeft - 6, plot.y(static_cast<double>(shown) + 0.5), fmt::format("q{}", row),
             "text-anchor=\"end\" dominant-baseline=\"middle\"");
  }
  doc.raw("</g>\n");
}

std::string render_svg(const Pattern& pattern) {
  const Mask& mask = pattern.mask;
  const Plot plot = plot_of(pattern);
  const std::string window_text =
      mask.spec().window_left
          ? fmt::format("window {} ({} keys at most)", *mask.spec().window_left,
                        *mask.spec().window_left + 1) +
                (mask.spec().sink_tokens > 0
                     ? fmt::format(", {} sink tokens", mask.spec().sink_tokens)
                     : std::string())
          : std::string("no window");
  const std::string subtitle =
      fmt::format("seqlen_q {}, seqlen_k {}, {}, {}", mask.seqlen_q(), mask.seqlen_k(),
                  causal_name(mask.spec().causal), window_text);
  const std::string summary = summary_line(pattern);

  svg::Document doc(kLeft + std::max(plot.width, kMinWidth) + 24, kTop + plot.height + 48,
                    fmt::format("Attention mask: {} ({})", summary, subtitle));
  doc.matrix_titles({.heading = summary,
                     .heading_attributes = "font-size=\"16\" font-weight=\"bold\"",
                     .subtitle = subtitle,
                     .columns = "keys k_j",
                     .rows = "queries q_i",
                     .rows_x = 16},
                    kLeft, kTop, plot.width, plot.height);
  draw_cells(doc, pattern, plot);
  if (plot.big_cells()) {
    doc.grid(kLeft, kTop, plot.cell_w, plot.cell_h, mask.seqlen_k(), pattern.rows());
  }
  draw_labels(doc, pattern, plot);
  doc.legend(kLeft, kTop + plot.height + 20,
             {{kVisibleColour, "score computed"},
              {kDiagonalColour, "own position j = p(i)"},
              {kMaskedColour, "masked"}},
             20);
  return doc.finish();
}

}  // namespace

void add_pattern_command(CLI::App& app, Runner& runner) {
  auto options = std::make_shared<PatternOptions>();
  // The description is also the one line `lookback --help` lists; the rest
  // goes after the options in `lookback pattern --help`.
  CLI::App* command = add_command(
      app, "pattern", "Show which keys each query is scored against under a causal mask.",
      std::string(
          "In an autoregressive model a token may look only at itself and earlier tokens, so\n"
          "only those query-key scores (q_i·k_jᵀ) are computed; the rest are masked.\n"
          "Query i sits at position p(i) = i + seqlen_k - seqlen_q (bottom-right, the default)\n"
          "or p(i) = i (top-left) and is scored against keys 0..p(i) only; with --window W\n"
          "only against keys p(i)-W..p(i), W+1 keys at most; --sink-tokens S (StreamingLLM,\n"
          "with --window) keeps keys 0..S-1 visible too (those <= p(i)). --causal none lets\n"
          "every query see every key.\n"
          "\n"
          "Formats:\n"
          "  text    each query with its dot products (q3: q3·k0ᵀ, ...), then a count such as\n"
          "          '28 query-key interactions of 49 (57.1%)'\n"
          "  matrix  one line per query, one token per key: S = score computed, 0 = masked\n"
          "  json    {seqlen_q, seqlen_k, causal, window, query, interactions, full,\n"
          "           rows: [{query, keys: [...]}]} (and sink_tokens when given)\n"
          "  svg     a picture of the mask (own position j = p(i) in orange)\n"
          "With --query I only row I is shown, and the count (text, json 'interactions' and\n"
          "'full') is of that row's seqlen_k keys.") +
      fmt::format(" text, matrix and json list at most {} cells\n"
                  "(--len x --seqlen-k) and svg draws at most {} rows; use --query for one row\n"
                  "of a longer sequence.\n",
                  kMaxListedCells, kMaxSvgRows) +
      "\n"
      "Examples:\n"
      "  lookback pattern --len 7\n"
      "  lookback pattern --len 8 --query 5 --format json\n"
      "  lookback pattern --len 3 --seqlen-k 5 --causal top-left --format matrix\n"
      "  lookback pattern --len 512 --window 127 --format svg --out mask.svg\n"
      "  lookback pattern --len 12 --window 3 --sink-tokens 2 --format matrix\n"
      "Conventions: docs/semantics.md.");
  command->add_option("--len", options->seqlen_q, "number of queries, seqlen_q (>= 1)")
      ->required()
      ->check(kPositive);
  command->add_option("--seqlen-k", options->seqlen_k,
                      "number of keys, seqlen_k (>= 1; default: --len)")
      ->check(kPositive);
  command->add_option("--query", options->query, "show only query row I (0 <= I < --len)")
      ->check(kNonNegative);
  command->add_option("--window", options->window_left,
                      "left window W >= 0: a query sees its own key and the W before it")
      ->check(kNonNegative);
  command->add_option("--sink-tokens", options->sink_tokens,
                      "StreamingLLM sink tokens S >= 0 (with --window): keys 0..S-1 stay visible")
      ->check(kNonNegative);
  command->add_option("--causal", options->causal,
                      "alignment: bottom-right (default), top-left, or none (every key visible)");
  add_format_option(*command, options->format,
                    {OutputFormat::kText, OutputFormat::kMatrix, OutputFormat::kJson,
                     OutputFormat::kSvg});
  add_out_option(*command, options->out);

  command->callback([options, &runner] {
    runner = [options] {
      const Pattern pattern = make_pattern(*options);
      std::string output;
      switch (options->format) {
        case OutputFormat::kText: output = render_text(pattern); break;
        case OutputFormat::kMatrix: output = render_matrix(pattern); break;
        case OutputFormat::kJson: output = render_json(pattern); break;
        case OutputFormat::kSvg: output = render_svg(pattern); break;
      }
      write_output(options->out, output);
      return kExitOk;
    };
  });
}

}  // namespace lookback::cli
