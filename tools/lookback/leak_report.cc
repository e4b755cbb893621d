#include "leak_report.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <iterator>
#include <string_view>

#include "lookback/mask.hpp"
#include "svg.hpp"

namespace lookback::cli {
namespace {

using diagnostics::BuiltinCheck;
using diagnostics::Cell;
using diagnostics::LeakReport;
using diagnostics::LeakShape;
using diagnostics::Pair;
using diagnostics::Verdict;

std::string describe_mask(const MaskSpec& spec) {
  std::string text(causal_name(spec.causal));
  if (spec.window_left) {
    text += fmt::format(", window {} ({} keys at most)", *spec.window_left, *spec.window_left + 1);
  } else {
    text += ", no window";
  }
  if (spec.sink_tokens > 0) {
    text += fmt::format(", {} sink token{}", spec.sink_tokens, spec.sink_tokens == 1 ? "" : "s");
  }
  return text;
}

std::string describe_problem(const LeakReport& report) {
  const LeakShape& s = report.shape;
  return fmt::format("len {}, batch {}, heads {}, kv_heads {}, dim {}, {}; {} runs{}", s.seqlen,
                     s.batch, s.heads, s.kv_heads, s.head_dim, describe_mask(report.mask_spec),
                     report.runs,
                     report.tolerance > 0 ? fmt::format(", tolerance {:g}", report.tolerance)
                                          : std::string());
}

// One row per output position i, one cell per perturbed position j: S
// allowed and observed, . allowed but not observed, X a leak, blank where
// masked and clean. Trailing blanks dropped.
std::string render_matrix(const Mask& mask, const std::vector<std::uint8_t>& dependency) {
  const std::int64_t n = mask.seqlen_q();
  const std::size_t label_width = fmt::format("q{}", n - 1).size();
  std::string text;
  for (std::int64_t i = 0; i < n; ++i) {
    std::string line = fmt::format("{:<{}} ", fmt::format("q{}", i), label_width);
    for (std::int64_t j = 0; j < n; ++j) {
      const bool observed = dependency[static_cast<std::size_t>(i * n + j)] != 0;
      line += ' ';
      line += diagnostics::cell_symbol(diagnostics::classify_cell(mask, i, j, observed));
    }
    while (line.back() == ' ') line.pop_back();
    text += line + '\n';
  }
  return text;
}

std::string where_text(const LeakReport& report, const Pair& pair) {
  const std::vector<Pair> where = report.where_observed(pair.first, pair.second);
  const std::int64_t batch = report.shape.batch;
  const std::int64_t heads = report.shape.heads;
  if (static_cast<std::int64_t>(where.size()) == batch * heads) {
    if (batch == 1) return heads == 1 ? "" : "in every head";
    return heads == 1 ? "in every batch element" : "in every batch element and head";
  }
  // Name only what varies: "head 1" when there is one batch element.
  std::string text = "only in ";
  for (std::size_t w = 0; w < where.size() && w < 4; ++w) {
    const auto [b, h] = where[w];
    text += w ? ", " : "";
    if (batch == 1) {
      text += fmt::format("head {}", h);
    } else if (heads == 1) {
      text += fmt::format("batch element {}", b);
    } else {
      text += fmt::format("batch element {} head {}", b, h);
    }
  }
  if (where.size() > 4) text += fmt::format(" and {} more", where.size() - 4);
  return text;
}

std::string verdict_line(const LeakReport& report) {
  const auto& leaks = report.result.leaks;
  if (leaks.empty()) {
    return "verdict: causal: no output row changed when a position it must not see changed\n";
  }
  const Pair& first = leaks.front();
  const std::string where = where_text(report, first);
  return fmt::format(
      "verdict: leak: output row {} changed when position {} changed, which it must not see{}{} "
      "({} leaking pair{})\n",
      first.first, first.second, where.empty() ? "" : ", ", where, leaks.size(),
      leaks.size() == 1 ? "" : "s");
}

std::string missing_line(const std::vector<Pair>& missing, std::string_view prefix) {
  if (missing.empty()) return {};
  return fmt::format(
      "{}warning: {} allowed dependenc{} never observed, e.g. output row {} did not change when "
      "position {} changed (not a leak, but an output that ignores a token it may see)\n",
      prefix, missing.size(), missing.size() == 1 ? "y" : "ies", missing.front().first,
      missing.front().second);
}

nlohmann::ordered_json pairs_json(const std::vector<Pair>& pairs) {
  nlohmann::ordered_json list = nlohmann::ordered_json::array();
  for (const Pair& pair : pairs) list.push_back({pair.first, pair.second});
  return list;
}

nlohmann::ordered_json matrix_json(const std::vector<std::uint8_t>& matrix, std::int64_t n) {
  nlohmann::ordered_json rows = nlohmann::ordered_json::array();
  for (std::int64_t i = 0; i < n; ++i) {
    nlohmann::ordered_json row = nlohmann::ordered_json::array();
    for (std::int64_t j = 0; j < n; ++j) row.push_back(matrix[static_cast<std::size_t>(i * n + j)]);
    rows.push_back(std::move(row));
  }
  return rows;
}

// ---- svg ----------------------------------------------------------------------

constexpr double kSvgPlot = 640;    // the plot's side in px, for long sequences
constexpr double kSvgMaxCell = 32;  // short sequences keep cells this big
constexpr double kSvgLabelCell = 20;
constexpr double kSvgLeft = 72;
constexpr double kSvgTop = 92;

struct CellStyle {
  Cell cell;
  const char* colour;
  const char* label;
};
constexpr CellStyle kCellStyles[] = {
    {Cell::kMasked, "#ececec", "masked, clean"},
    {Cell::kObserved, "#3b6ea8", "S allowed, observed"},
    {Cell::kMissing, "#f2c14e", ". allowed, not observed"},
    {Cell::kLeak, "#d62728", "X leak"},
};

// In cell units: one path per class, one sub-path per run of equal cells in
// a row, so a clean causal matrix costs a few sub-paths per row.
void draw_cells(svg::Document& doc, const LeakReport& report, double cell) {
  const Mask mask = report.mask();
  const std::int64_t n = report.shape.seqlen;
  doc.raw(fmt::format("<g transform=\"translate({} {}) scale({})\">\n", svg::number(kSvgLeft),
                      svg::number(kSvgTop), cell));
  for (const CellStyle& style : kCellStyles) {
    std::string path;
    for (std::int64_t i = 0; i < n; ++i) {
      const auto cell_at = [&](std::int64_t key) {
        return diagnostics::classify_cell(mask, i, key, report.observed(i, key));
      };
      for (std::int64_t j = 0; j < n;) {
        if (cell_at(j) != style.cell) {
          ++j;
          continue;
        }
        std::int64_t end = j + 1;
        while (end < n && cell_at(end) == style.cell) ++end;
        svg::add_cell_run(path, j, i, end - j);
        j = end;
      }
    }
    if (!path.empty()) doc.raw(fmt::format("<path fill=\"{}\" d=\"{}\"/>\n", style.colour, path));
  }
  doc.raw("</g>\n");
}

}  // namespace

std::string render_report_text(const LeakReport& report, bool per_head) {
  const Mask mask = report.mask();
  std::string text = fmt::format("lookback leakcheck: {}\n", describe_problem(report));
  text += "rows: output position i; columns: perturbed position j (q, k and v rows)\n";
  text += "S allowed and observed, . allowed but not observed, X leak, blank masked and clean\n\n";
  text += render_matrix(mask, report.dependency);
  if (per_head) {
    const std::int64_t group = report.shape.heads / report.shape.kv_heads;
    for (std::int64_t h = 0; h < report.shape.heads; ++h) {
      const std::vector<std::uint8_t> matrix = report.head_dependency(h);
      const diagnostics::Classification result = diagnostics::classify(mask, matrix);
      text += fmt::format("\nhead {} (kv head {}): ", h, h / group);
      text += result.leaks.empty()
                  ? std::string("causal\n")
                  : fmt::format("leak: output row {} changed when position {} changed ({} pair{})\n",
                                result.leaks.front().first, result.leaks.front().second,
                                result.leaks.size(), result.leaks.size() == 1 ? "" : "s");
      text += render_matrix(mask, matrix);
    }
  }
  text += '\n';
  text += missing_line(report.result.missing, "");
  if (report.nan_rows > 0) {
    text += fmt::format(
        "warning: {} output rows held NaN (summed over the runs; allowed by --allow-nan); a NaN "
        "row that stays NaN shows no dependency\n",
        report.nan_rows);
  }
  text += verdict_line(report);
  return text;
}

std::string render_report_json(const LeakReport& report, bool per_head) {
  const LeakShape& s = report.shape;
  // ordered_json: the documented keys first, in the documented order.
  nlohmann::ordered_json doc;
  doc["len"] = s.seqlen;
  doc["verdict"] = report.result.causal() ? "causal" : "leak";
  doc["leaks"] = pairs_json(report.result.leaks);
  doc["missing"] = pairs_json(report.result.missing);
  doc["dependency"] = matrix_json(report.dependency, s.seqlen);
  doc["batch"] = s.batch;
  doc["heads"] = s.heads;
  doc["kv_heads"] = s.kv_heads;
  doc["dim"] = s.head_dim;
  doc["causal"] = std::string(causal_name(report.mask_spec.causal));
  doc["window"] = report.mask_spec.window_left
                      ? nlohmann::ordered_json(*report.mask_spec.window_left)
                      : nlohmann::ordered_json(nullptr);
  doc["sink_tokens"] = report.mask_spec.sink_tokens;
  doc["runs"] = report.runs;
  doc["tolerance"] = report.tolerance;
  doc["nan_rows"] = report.nan_rows;
  if (per_head) {
    const Mask mask = report.mask();
    auto& heads = doc["per_head"] = nlohmann::ordered_json::array();
    for (std::int64_t h = 0; h < s.heads; ++h) {
      const std::vector<std::uint8_t> matrix = report.head_dependency(h);
      const diagnostics::Classification result = diagnostics::classify(mask, matrix);
      nlohmann::ordered_json head;
      head["head"] = h;
      head["verdict"] = result.causal() ? "causal" : "leak";
      head["leaks"] = pairs_json(result.leaks);
      head["missing"] = pairs_json(result.missing);
      head["dependency"] = matrix_json(matrix, s.seqlen);
      heads.push_back(std::move(head));
    }
  }
  return doc.dump() + "\n";
}

std::string render_report_svg(const LeakReport& report) {
  const std::int64_t n = report.shape.seqlen;
  const double cell = std::min(kSvgMaxCell, kSvgPlot / static_cast<double>(n));
  const double plot = cell * static_cast<double>(n);
  // Shorter than the text verdict line: it has to fit above the plot.
  const auto& leaks = report.result.leaks;
  const std::string title =
      leaks.empty()
          ? std::string("causal: no row depends on a position it must not see")
          : fmt::format("leak: row {} depends on position {} ({} leaking pair{})",
                        leaks.front().first, leaks.front().second, leaks.size(),
                        leaks.size() == 1 ? "" : "s");
  svg::Document doc(kSvgLeft + std::max(plot, 560.0) + 24, kSvgTop + plot + 48,
                    "lookback leakcheck: " + title);
  const std::string heading_attributes = fmt::format(
      "font-size=\"14\" font-weight=\"bold\" fill=\"{}\"", report.result.causal() ? "#222" : "#d62728");
  const std::string problem = describe_problem(report);
  doc.matrix_titles({.heading = title,
                     .heading_attributes = heading_attributes,
                     .subtitle = problem,
                     .columns = "perturbed position j",
                     .rows = "output row i",
                     .rows_x = 14},
                    kSvgLeft, kSvgTop, plot, plot);
  draw_cells(doc, report, cell);
  if (cell >= 4) doc.grid(kSvgLeft, kSvgTop, cell, cell, n, n);

  // Labels on every index when cells are big enough, else on every tenth.
  const std::int64_t step = cell >= kSvgLabelCell ? 1 : cell * 5 >= kSvgLabelCell ? 5 : 10;
  doc.raw("<g font-size=\"11\" fill=\"#222\">\n");
  for (std::int64_t index = 0; index < n; index += step) {
    const double centre = (static_cast<double>(index) + 0.5) * cell;
    doc.text(kSvgLeft + centre, kSvgTop - 8, fmt::format("{}", index), "text-anchor=\"middle\"");
    doc.text(kSvgLeft - 6, kSvgTop + centre, fmt::format("{}", index),
             "text-anchor=\"end\" dominant-baseline=\"middle\"");
  }
  doc.raw("</g>\n");
  std::vector<svg::Swatch> swatches;
  for (const CellStyle& style : kCellStyles) swatches.push_back({style.colour, style.label});
  doc.legend(kSvgLeft, kSvgTop + plot + 20, swatches, 16);
  return doc.finish();
}

// ---- the built-in plan ------------------------------------------------------------

bool all_causal(const std::vector<BuiltinCheck>& checks) {
  return std::all_of(checks.begin(), checks.end(),
                     [](const BuiltinCheck& check) { return check.verdict == Verdict::kCausal; });
}

std::string render_builtin_json(const std::vector<BuiltinCheck>& checks, const LeakShape& shape) {
  const bool any_leak = std::any_of(checks.begin(), checks.end(), [](const BuiltinCheck& check) {
    return check.verdict == Verdict::kLeak;
  });
  // A leak outweighs an error in the overall verdict: it is what was asked.
  nlohmann::ordered_json doc;
  doc["len"] = shape.seqlen;
  doc["verdict"] = all_causal(checks) ? "causal" : any_leak ? "leak" : "error";
  doc["batch"] = shape.batch;
  doc["heads"] = shape.heads;
  doc["kv_heads"] = shape.kv_heads;
  doc["dim"] = shape.head_dim;
  doc["runs_per_check"] = diagnostics::leak_runs(shape);
  auto& list = doc["checks"] = nlohmann::ordered_json::array();
  for (const BuiltinCheck& check : checks) {
    nlohmann::ordered_json item;
    item["path"] = std::string(mode_name(check.mode.mode));
    item["label"] = check.label;  // with the path's chunk, block size or splits
    item["ring_cache"] = check.mode.ring;
    item["storage"] = std::string(dtype_name(check.storage));
    item["window"] =
        check.window ? nlohmann::ordered_json(*check.window) : nlohmann::ordered_json(nullptr);
    item["sink_tokens"] = check.sink_tokens;
    item["sink_logits"] = check.sink_logits;
    item["verdict"] = std::string(diagnostics::verdict_name(check.verdict));
    if (check.report) {
      item["leaks"] = pairs_json(check.report->result.leaks);
      item["missing"] = pairs_json(check.report->result.missing);
    } else {
      item["message"] = check.message;
    }
    list.push_back(std::move(item));
  }
  return doc.dump() + "\n";
}

std::string render_builtin_text(const std::vector<BuiltinCheck>& checks, const LeakShape& shape) {
  std::string output;
  auto out = std::back_inserter(output);
  fmt::format_to(out,
                 "lookback leakcheck: every path x storage dtype, with and without a window, sink "
                 "tokens and sink logits\n"
                 "len {}, batch {}, heads {}, kv_heads {}, dim {}, bottom-right; {} runs per "
                 "check\n\n",
                 shape.seqlen, shape.batch, shape.heads, shape.kv_heads, shape.head_dim,
                 diagnostics::leak_runs(shape));
  std::size_t width = 4;
  for (const BuiltinCheck& check : checks) width = std::max(width, check.label.size());
  // Checks come one per storage dtype (f32, bf16, f16, int8, fp8e4m3,
  // fp8e5m2) for each path row (builtin_plan).
  std::size_t storages = 1;
  while (storages < checks.size() && checks[storages].label == checks[0].label) ++storages;
  std::string header = fmt::format("{:<{}} ", "path", width);
  for (std::size_t c = 0; c < storages && c < checks.size(); ++c) {
    header += fmt::format(" {:<12}", dtype_name(checks[c].storage));
  }
  while (!header.empty() && header.back() == ' ') header.pop_back();
  output += header + '\n';
  for (std::size_t row = 0; row + storages <= checks.size(); row += storages) {
    std::string line = fmt::format("{:<{}} ", checks[row].label, width);
    for (std::size_t c = row; c < row + storages; ++c) {
      line += fmt::format(" {:<12}", diagnostics::verdict_name(checks[c].verdict));
    }
    while (line.back() == ' ') line.pop_back();
    output += line + '\n';
  }
  output += '\n';
  std::size_t failed = 0;
  bool any_leak = false;
  const BuiltinCheck* first_failure = nullptr;
  for (const BuiltinCheck& check : checks) {
    const std::string name = fmt::format("{} {}", check.label, dtype_name(check.storage));
    if (check.verdict == Verdict::kLeak) {
      const Pair& first = check.report->result.leaks.front();
      fmt::format_to(out, "{}: leak: output row {} changed when position {} changed ({} pairs)\n",
                     name, first.first, first.second, check.report->result.leaks.size());
    } else if (check.verdict == Verdict::kError) {
      fmt::format_to(out, "{}: error: {}\n", name, check.message);
    }
    if (check.report) output += missing_line(check.report->result.missing, name + ": ");
    if (check.verdict != Verdict::kCausal) {
      ++failed;
      any_leak = any_leak || check.verdict == Verdict::kLeak;
      if (!first_failure) first_failure = &check;
    }
  }
  if (!first_failure) {
    fmt::format_to(out, "verdict: causal: all {} checks are causal\n", checks.size());
  } else {
    fmt::format_to(out, "verdict: {}: {} of {} checks failed, the first: {} {}\n",
                   any_leak ? "leak" : "error", failed, checks.size(), first_failure->label,
                   dtype_name(first_failure->storage));
  }
  return output;
}

}  // namespace lookback::cli
