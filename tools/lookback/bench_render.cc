// `lookback bench`'s report as text, json and svg (bench_report.hpp).
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <map>

#include "bench_report.hpp"
#include "svg.hpp"

namespace lookback::cli {
namespace {

const char* ceiling_label(const std::string& ceiling) {
  if (ceiling == "fma") return "FMA";
  if (ceiling == "amx_bf16") return "AMX";
  if (ceiling == "bf16_dot") return "DOT";
  return "bw";
}

std::string openblas_text(const BenchMachine& m) {
  std::string text = fmt::format(
      "OpenBLAS core {}{}", m.openblas_core,
      m.openblas_coretype ? fmt::format(" (OPENBLAS_CORETYPE={} when loaded)", *m.openblas_coretype)
                          : std::string(" (OPENBLAS_CORETYPE unset when loaded)"));
  if (!m.openblas_trials.empty()) {
    text += fmt::format(",\n  the fastest correct of the cores measured: {}",
                        bench::describe_trials({.trials = m.openblas_trials}));
  }
  return text;
}

std::string case_name(const BenchCase& c) {
  return fmt::format("{}={} {} {}", c.suite == "prefill" ? "n" : "context", c.length,
                     c.ours ? "lookback" : "baseline", dtype_name(c.storage));
}

// One suite's table, and the largest difference from the baseline per dtype.
std::string suite_table(const BenchReport& r, const std::string& suite, const char* unit) {
  std::string text = fmt::format("{:<28} {:>26} {:>9} {:>11} {:>9}\n", "case", "ms (min-max)",
                                 unit, "of ceiling", "speed-up");
  std::map<DType, double> worst;
  for (const BenchCase& c : r.cases) {
    if (c.suite != suite) continue;
    text += fmt::format("{:<28} {:>26} {:>9.1f} {:>6.1f}% {:<3} {:>9}\n", case_name(c),
                        bench::ms_text(c.time), c.rate, 100.0 * c.rate / c.ceiling_value,
                        ceiling_label(c.ceiling),
                        c.speedup ? fmt::format("{:.2f}x", *c.speedup) : std::string("-"));
    if (c.rel_l2) worst[c.storage] = std::max(worst[c.storage], *c.rel_l2);
  }
  std::string agreement;
  for (const auto& [storage, value] : worst) {
    agreement += fmt::format("{}{} {:.1e}", agreement.empty() ? "" : ", ", dtype_name(storage), value);
  }
  if (!agreement.empty()) {
    text += fmt::format("largest relative L2 difference from the baseline's output: {}\n", agreement);
  }
  return text;
}

}  // namespace

std::string render_bench_text(const BenchReport& r) {
  const BenchMachine& m = r.machine;
  const BenchPlan& p = r.plan;
  std::string text = fmt::format(
      "lookback bench: {}, {} ({} cores online)\n"
      "kernels: {}\n"
      "ceilings at {} (the higher of a measurement before and after the cases): FMA peak "
      "{:.1f} GFLOP/s ({}), {}, {}read bandwidth {:.1f} GB/s\n"
      "times: median of {} after a warm-up, min-max in brackets (at most 2 runs for cases over "
      "a second)\n",
      m.cpu, threads_text(p.threads), m.cores_online, m.kernels, threads_text(p.threads),
      r.ceilings.fma_gflops, r.ceilings.target,
      r.ceilings.amx_gflops > 0
          ? fmt::format("AMX bf16 peak {:.1f} GFLOP/s{}", r.ceilings.amx_gflops,
                        r.amx_kernels ? "" : " (the kernels do not use AMX here)")
          : std::string("no AMX"),
      r.ceilings.bf16_dot_gflops > 0
          ? fmt::format("bf16 dot-product (VDPBF16PS, DOT) peak {:.1f} GFLOP/s{}, ",
                        r.ceilings.bf16_dot_gflops,
                        r.bf16_dot_kernels ? "" : " (bf16 prefill does not use it here)")
          : std::string(),
      r.ceilings.bandwidth_gbs, p.reps == 1 ? std::string("1 run") : fmt::format("{} runs", p.reps));
  if (p.prefill) {
    text += fmt::format(
        "\ncausal prefill: batch 1, {} heads, {} kv heads, head_dim {}; useful GFLOP/s = "
        "4*heads*head_dim*n(n+1)/2 / time\n"
        "baseline: materialised attention (sgemm, mask, softmax, sgemm per head) in f32, {}\n",
        p.heads, p.prefill_kv_heads, p.dim, openblas_text(m));
    text += suite_table(r, "prefill", "GFLOP/s");
  }
  if (p.decode) {
    text += fmt::format(
        "\ndecode of 1 token: batch 1, {} heads, {} kv heads, head_dim {}; GB/s = KV bytes read / "
        "time\n"
        "baseline: a plain C++ loop per head (dot with every cached key, softmax, weighted sum) "
        "over a token-major f32 cache\n",
        p.heads, p.decode_kv_heads, p.dim);
    text += suite_table(r, "decode", "GB/s");
  }
  return text;
}

std::string render_bench_json(const BenchReport& r) {
  const BenchMachine& m = r.machine;
  nlohmann::ordered_json machine{{"cpu", m.cpu},
                                 {"cores_online", m.cores_online},
                                 {"threads", r.plan.threads},
                                 {"simd_target", m.simd_target},
                                 {"kernels", m.kernels},
                                 {"ceiling_target", r.ceilings.target},
                                 {"openblas_core", m.openblas_core},
                                 {"openblas_coretype", nullptr}};
  if (m.openblas_coretype) machine["openblas_coretype"] = *m.openblas_coretype;
  nlohmann::ordered_json trials = nlohmann::ordered_json::array();
  for (const bench::OpenBlasCoreTrial& trial : m.openblas_trials) {
    trials.push_back({{"core", trial.core}, {"sgemm_gflops", trial.gflops}, {"correct", trial.correct}});
  }
  machine["openblas_cores_measured"] = trials;
  nlohmann::ordered_json cases = nlohmann::ordered_json::array();
  for (const BenchCase& c : r.cases) {
    nlohmann::ordered_json row{{"suite", c.suite},
                               {"implementation", c.ours ? "lookback" : "baseline"},
                               {"dtype", std::string(dtype_name(c.storage))},
                               {c.suite == "prefill" ? "n" : "context", c.length},
                               {"batch", 1},
                               {"heads", c.heads},
                               {"kv_heads", c.kv_heads},
                               {"head_dim", c.head_dim},
                               {"ms", {{"median", c.time.median * 1e3},
                                       {"min", c.time.min * 1e3},
                                       {"max", c.time.max * 1e3}}},
                               {"repetitions", c.time.reps},
                               {"work", c.work},
                               {"rate", c.rate},
                               {"rate_unit", c.suite == "prefill" ? "GFLOP/s" : "GB/s"},
                               {"ceiling", c.ceiling},
                               {"fraction_of_ceiling", c.rate / c.ceiling_value}};
    if (c.speedup) row["speedup_vs_baseline"] = *c.speedup;
    if (c.rel_l2) row["rel_l2_vs_baseline"] = *c.rel_l2;
    cases.push_back(row);
  }
  return nlohmann::ordered_json{
             {"machine", machine},
             {"settings", {{"quick", r.plan.quick}, {"warmup_runs", 1}, {"repetitions", r.plan.reps}}},
             {"ceilings", {{"fma_gflops", r.ceilings.fma_gflops},
                           {"amx_bf16_gflops", r.ceilings.amx_gflops},
                           {"bf16_dot_gflops", r.ceilings.bf16_dot_gflops},
                           {"read_bandwidth_gbs", r.ceilings.bandwidth_gbs}}},
             {"cases", cases}}
             .dump(2) +
         "\n";
}

// ---- svg --------------------------------------------------------------------------

namespace {

constexpr double kLeft = 80, kPlotW = 480, kPlotH = 260, kLegendX = kLeft + kPlotW + 20;
constexpr const char* kCeilingColour = "#d62728";

struct Series {
  std::string label, colour;
  std::vector<std::pair<double, double>> points;  // (length, rate)
};

// What one suite's panel draws: a line per implementation and dtype, the
// ceilings as (label, value), and the lengths on the x axis.
struct Panel {
  std::vector<Series> series;
  std::vector<std::pair<std::string, double>> ceilings;
  std::vector<std::int64_t> lengths;
  double rates_max = 0;
};

Panel collect_panel(const BenchReport& r, const std::string& suite) {
  static const std::map<std::string, std::string> colours{
      {"f32", "#1f77b4"}, {"bf16", "#ff7f0e"}, {"f16", "#2ca02c"}};
  Panel panel;
  for (const BenchCase& c : r.cases) {
    if (c.suite != suite) continue;
    const std::string dtype(dtype_name(c.storage));
    const std::string label = c.ours ? "lookback " + dtype
                              : suite == "prefill" ? "baseline (OpenBLAS) f32"
                                                   : "baseline (plain loop) f32";
    auto series = std::find_if(panel.series.begin(), panel.series.end(),
                               [&](const Series& s) { return s.label == label; });
    if (series == panel.series.end()) {
      panel.series.push_back({label, c.ours ? colours.at(dtype) : "#555555", {}});
      series = panel.series.end() - 1;
    }
    series->points.emplace_back(static_cast<double>(c.length), c.rate);
    panel.rates_max = std::max(panel.rates_max, c.rate);
    if (std::find(panel.lengths.begin(), panel.lengths.end(), c.length) == panel.lengths.end()) {
      panel.lengths.push_back(c.length);
    }
    const std::string ceiling = c.ceiling == "fma"        ? "FMA peak"
                                : c.ceiling == "amx_bf16" ? "AMX bf16 peak"
                                : c.ceiling == "bf16_dot" ? "bf16 dot-product peak"
                                                          : "read bandwidth";
    if (std::none_of(panel.ceilings.begin(), panel.ceilings.end(),
                     [&](const auto& line) { return line.first == ceiling; })) {
      panel.ceilings.emplace_back(ceiling, c.ceiling_value);
    }
  }
  return panel;
}

// The y scale: it covers the rates and the ceilings near them; a ceiling far
// above (the AMX peak is ten times the FMA peak) would flatten every line,
// so it is named in the legend instead of drawn. Ticks at 1, 2 or 5 times a
// power of ten. Returns (top of the scale, tick step).
std::pair<double, double> y_scale(const Panel& panel) {
  double near_max = 0;
  for (const auto& line : panel.ceilings) {
    if (line.second <= 4 * panel.rates_max) near_max = std::max(near_max, line.second);
  }
  const double y_max = std::max(panel.rates_max, near_max) * 1.05;
  double step = y_max > 0 ? std::pow(10.0, std::floor(std::log10(y_max / 4))) : 1.0;
  for (double factor : {1.0, 2.0, 5.0, 10.0}) {
    if (y_max / (step * factor) <= 5) {
      step *= factor;
      break;
    }
  }
  return {y_max > 0 ? std::ceil(y_max / step) * step : 1.0, step};
}

// One panel per suite: rate against n or context (log scale), one line per
// implementation and dtype, the ceilings as dashed horizontal lines.
void draw_panel(svg::Document& doc, const BenchReport& r, const std::string& suite, double top) {
  const bool prefill = suite == "prefill";
  const Panel panel = collect_panel(r, suite);
  const auto [y_max, step] = y_scale(panel);
  const auto [x_min, x_max] = std::minmax_element(panel.lengths.begin(), panel.lengths.end());
  const double lx_min = std::log2(static_cast<double>(*x_min));
  const double lx_max = std::log2(static_cast<double>(*x_max));
  const auto x_of = [&](double length) {
    if (lx_max <= lx_min) return kLeft + kPlotW / 2;
    return kLeft + kPlotW * (std::log2(length) - lx_min) / (lx_max - lx_min);
  };
  const auto y_of = [&](double rate) { return top + kPlotH * (1.0 - rate / y_max); };

  doc.text(kLeft, top - 12,
           fmt::format("{}: {} heads, {} kv heads, head_dim {}, {}",
                       prefill ? "Causal prefill" : "Decode of 1 token", r.plan.heads,
                       prefill ? r.plan.prefill_kv_heads : r.plan.decode_kv_heads, r.plan.dim,
                       threads_text(r.plan.threads)),
           "font-size=\"14\"");
  doc.axes(kLeft, top, kPlotW, kPlotH);
  for (double value = 0; value <= y_max * 1.0001; value += step) {
    doc.text(kLeft - 6, y_of(value) + 4,
             step < 1 ? fmt::format("{:.1f}", value) : fmt::format("{:.0f}", value),
             "text-anchor=\"end\"");
  }
  for (std::int64_t length : panel.lengths) {
    doc.text(x_of(static_cast<double>(length)), top + kPlotH + 18, fmt::format("{}", length),
             "text-anchor=\"middle\"");
  }
  doc.text(kLeft + kPlotW / 2, top + kPlotH + 40,
           fmt::format("{} (tokens, log scale)", prefill ? "n" : "context"), "text-anchor=\"middle\"");
  doc.vertical_text(kLeft - 50, top + kPlotH / 2, prefill ? "useful GFLOP/s" : "KV read GB/s",
                    "text-anchor=\"middle\"");

  const std::string dashed =
      fmt::format("stroke=\"{}\" stroke-dasharray=\"6,4\"", kCeilingColour);
  std::vector<std::string> above;  // ceilings too high to draw, named in the legend
  for (const auto& [label, value] : panel.ceilings) {
    if (value > y_max) {
      above.push_back(fmt::format("{} {:.1f}", label, value));
      continue;
    }
    doc.line(kLeft, y_of(value), kLeft + kPlotW, y_of(value), dashed);
    doc.text(kLeft + kPlotW - 4, y_of(value) - 4, fmt::format("{} {:.1f}", label, value),
             fmt::format("fill=\"{}\" text-anchor=\"end\"", kCeilingColour));
  }
  double legend_y = top + 10;
  for (const Series& s : panel.series) {
    std::vector<std::pair<double, double>> points;
    for (const auto& [length, rate] : s.points) points.emplace_back(x_of(length), y_of(rate));
    doc.polyline(points, s.colour);
    for (const auto& [x, y] : points) doc.circle(x, y, 3, s.colour);
    doc.line(kLegendX, legend_y, kLegendX + 20, legend_y,
             fmt::format("stroke=\"{}\" stroke-width=\"2\"", s.colour));
    doc.text(kLegendX + 26, legend_y + 4, s.label);
    legend_y += 18;
  }
  doc.line(kLegendX, legend_y, kLegendX + 20, legend_y, dashed);
  doc.text(kLegendX + 26, legend_y + 4, "ceiling (measured)");
  const std::string red = fmt::format("fill=\"{}\"", kCeilingColour);
  for (const std::string& note : above) {
    legend_y += 18;
    doc.text(kLegendX, legend_y + 4, note, red);
    doc.text(kLegendX, legend_y + 20, "(above the scale)", red);
    legend_y += 16;
  }
}

}  // namespace

std::string render_bench_svg(const BenchReport& r) {
  constexpr double kPanelH = 340;
  const int panels = (r.plan.prefill ? 1 : 0) + (r.plan.decode ? 1 : 0);
  const std::string title = fmt::format("lookback bench: {}", r.machine.cpu);
  svg::Document doc(800, 50 + kPanelH * panels, title, "12");
  doc.text(20, 22, title, "font-size=\"15\"");
  double top = 70;
  if (r.plan.prefill) {
    draw_panel(doc, r, "prefill", top);
    top += kPanelH;
  }
  if (r.plan.decode) draw_panel(doc, r, "decode", top);
  return doc.finish();
}

}  // namespace lookback::cli
