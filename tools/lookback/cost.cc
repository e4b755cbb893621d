// lookback cost: what each generated token costs, with a KV cache and without.
//
// With a cache, the token at position i computes its own query, key and value
// and attends to the cached keys: i + 1 query-key dot products (W + 1 with a
// window). Without one, producing token i means recomputing attention for
// the whole prefix 0..i: every visible pair of an (i+1) x (i+1) causal square.
// Counts come from lookback::Mask, the same code the kernels use.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <optional>
#include <random>
#include <vector>

#include "common.hpp"
#include "lookback/error.hpp"
#include "lookback/kv_cache.hpp"
#include "lookback/mask.hpp"

namespace lookback::cli {
namespace {

struct CostOptions {
  std::int64_t len = 0;
  std::int64_t heads = 32;
  std::int64_t kv_heads = 8;
  std::int64_t dim = 128;
  std::string dtype = "f32";
  std::optional<std::int64_t> window;
  std::string format = "text";
  bool measure = false;
  int threads = 0;
  std::string out;
};

struct Position {
  std::int64_t position = 0;
  std::int64_t keys = 0;
  double flops_cached = 0;    // 4 * heads * head_dim * keys
  double flops_uncached = 0;  // the whole prefix recomputed
  double kv_bytes = 0;        // K and V rows read
  std::optional<double> measured_ns;
};

std::vector<Position> model(const CostOptions& o, DType storage) {
  const Mask mask(o.len, o.len, {.causal = Causal::kBottomRight, .window_left = o.window});
  const double per_pair = 4.0 * static_cast<double>(o.heads * o.dim);
  const double bytes_per_key =
      2.0 * static_cast<double>(o.kv_heads * o.dim) * static_cast<double>(dtype_size(storage));
  std::vector<Position> rows;
  double prefix_pairs = 0;  // visible pairs of the (i+1) x (i+1) square
  for (std::int64_t i = 0; i < o.len; ++i) {
    Position p;
    p.position = i;
    p.keys = mask.visible_in_row(i);
    prefix_pairs += static_cast<double>(p.keys);
    p.flops_cached = per_pair * static_cast<double>(p.keys);
    p.flops_uncached = per_pair * prefix_pairs;
    p.kv_bytes = bytes_per_key * static_cast<double>(p.keys);
    rows.push_back(p);
  }
  return rows;
}

// Times one real decode step per position on this machine: append the token's
// key and value, attend its query to the cache.
void measure(const CostOptions& o, DType storage, std::vector<Position>& rows) {
  const CacheConfig config{.kv_heads = o.kv_heads, .head_dim = o.dim, .storage = storage};
  KvCache cache(config, o.len);
  Context context(o.threads);
  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> k(static_cast<std::size_t>(o.kv_heads * o.dim)), v(k.size());
  std::vector<float> q(static_cast<std::size_t>(o.heads * o.dim)), out(q.size());
  const DecodeOptions options{.window_left = o.window};
  for (Position& row : rows) {
    for (float& x : k) x = normal(rng);
    for (float& x : v) x = normal(rng);
    for (float& x : q) x = normal(rng);
    const auto start = std::chrono::steady_clock::now();
    cache.append(make_view(k.data(), DType::kF32, {1, o.kv_heads, o.dim}, "k"),
                 make_view(v.data(), DType::kF32, {1, o.kv_heads, o.dim}, "v"));
    cache.attend({.q = make_view(q.data(), DType::kF32, {1, o.heads, o.dim}, "q"),
                  .out = make_mutable_view(out.data(), DType::kF32, {1, o.heads, o.dim}, "out")},
                 options, context);
    row.measured_ns =
        std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
  }
}

std::string human(double value) {
  const char* units[] = {"", "K", "M", "G", "T", "P"};
  int unit = 0;
  while (std::fabs(value) >= 1000.0 && unit < 5) {
    value /= 1000.0;
    ++unit;
  }
  return unit == 0 ? fmt::format("{:.0f}", value) : fmt::format("{:.2f}{}", value, units[unit]);
}

std::string render_text(const CostOptions& o, const std::vector<Position>& rows) {
  std::string text = fmt::format(
      "cost per generated token: {} heads, {} kv heads, head_dim {}, {}{}\n"
      "(cached: attend to the KV cache; uncached: recompute attention for the whole prefix)\n\n",
      o.heads, o.kv_heads, o.dim, o.dtype,
      o.window ? fmt::format(", window {}", *o.window) : std::string());
  text += fmt::format("{:>9} {:>6} {:>12} {:>14} {:>10}{}\n", "position", "keys", "FLOPs cached",
                      "FLOPs uncached", "KV bytes", o.measure ? fmt::format(" {:>12}", "time/token") : "");
  // Every row for short sequences; a sample (powers of two and the last) otherwise.
  auto shown = [&](std::int64_t i) {
    if (o.len <= 64 || i == o.len - 1) return true;
    return (i & (i + 1)) == 0 || ((i + 1) & i) == 0;
  };
  double cached = 0, uncached = 0, bytes = 0, time = 0;
  for (const Position& p : rows) {
    cached += p.flops_cached;
    uncached += p.flops_uncached;
    bytes += p.kv_bytes;
    if (p.measured_ns) time += *p.measured_ns;
    if (!shown(p.position)) continue;
    text += fmt::format("{:>9} {:>6} {:>12} {:>14} {:>10}{}\n", p.position, p.keys,
                        human(p.flops_cached), human(p.flops_uncached), human(p.kv_bytes),
                        p.measured_ns ? fmt::format(" {:>9.1f} us", *p.measured_ns / 1e3) : "");
  }
  if (o.len > 64) text += "(a sample of positions; --format json lists every one)\n";
  text += fmt::format("\ntotal for {} tokens: {} FLOPs with the cache, {} without ({:.1f}x), {} of "
                      "KV read{}\n",
                      o.len, human(cached), human(uncached), cached > 0 ? uncached / cached : 0.0,
                      human(bytes) + "B",
                      o.measure ? fmt::format(", {:.2f} ms measured", time / 1e6) : "");
  return text;
}

std::string render_json(const std::vector<Position>& rows) {
  nlohmann::ordered_json positions = nlohmann::ordered_json::array();
  double cached = 0, uncached = 0, bytes = 0, time = 0;
  bool measured = false;
  for (const Position& p : rows) {
    nlohmann::ordered_json row{{"position", p.position},
                               {"keys", p.keys},
                               {"flops_cached", p.flops_cached},
                               {"flops_uncached", p.flops_uncached},
                               {"kv_bytes", p.kv_bytes}};
    cached += p.flops_cached;
    uncached += p.flops_uncached;
    bytes += p.kv_bytes;
    if (p.measured_ns) {
      row["measured_ns"] = *p.measured_ns;
      time += *p.measured_ns;
      measured = true;
    }
    positions.push_back(row);
  }
  nlohmann::ordered_json totals{{"tokens", rows.size()},
                                {"flops_cached", cached},
                                {"flops_uncached", uncached},
                                {"kv_bytes", bytes}};
  if (measured) totals["measured_ns"] = time;
  return nlohmann::ordered_json{{"positions", positions}, {"totals", totals}}.dump() + "\n";
}

std::string render_svg(const CostOptions& o, const std::vector<Position>& rows) {
  // Per-token cost against position: FLOPs with and without the cache, or,
  // with --measure, the measured time per token.
  const double width = 720, height = 420, left = 90, right = 20, top = 40, bottom = 60;
  const double plot_w = width - left - right, plot_h = height - top - bottom;
  const bool timed = o.measure;
  double y_max = 0;
  for (const Position& p : rows) {
    y_max = std::max(y_max, timed ? *p.measured_ns / 1e3 : p.flops_uncached);
  }
  if (y_max <= 0) y_max = 1;
  const double x_max = static_cast<double>(std::max<std::int64_t>(o.len - 1, 1));
  auto x_of = [&](double position) { return left + plot_w * position / x_max; };
  auto y_of = [&](double value) { return top + plot_h * (1.0 - value / y_max); };
  auto polyline = [&](auto value_of, const char* colour) {
    std::string points;
    for (const Position& p : rows) points += fmt::format("{:.1f},{:.1f} ", x_of(static_cast<double>(p.position)), y_of(value_of(p)));
    return fmt::format("<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>\n",
                       colour, points);
  };
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" "
      "font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
      width, height);
  svg += fmt::format("<text x=\"{}\" y=\"22\" font-size=\"15\">Cost per generated token: {} heads, "
                     "{} kv heads, head_dim {}</text>\n",
                     left, o.heads, o.kv_heads, o.dim);
  svg += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\" stroke=\"black\"/>\n", left, top,
                     top + plot_h);
  svg += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"black\"/>\n", left,
                     top + plot_h, left + plot_w);
  for (int tick = 0; tick <= 4; ++tick) {
    const double value = y_max * tick / 4, position = x_max * tick / 4;
    svg += fmt::format("<text x=\"{}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n", left - 6,
                       y_of(value) + 4, human(value));
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{:.0f}</text>\n",
                       x_of(position), top + plot_h + 18, position);
  }
  svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">position of the generated token</text>\n",
                     left + plot_w / 2, height - 15);
  svg += fmt::format("<text transform=\"translate(18,{}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
                     top + plot_h / 2, timed ? "measured time per token (us)" : "FLOPs per token");
  if (timed) {
    svg += polyline([](const Position& p) { return *p.measured_ns / 1e3; }, "#1f77b4");
    svg += fmt::format("<text x=\"{}\" y=\"{}\" fill=\"#1f77b4\">with the KV cache (measured)</text>\n",
                       left + 10, top + 14);
  } else {
    svg += polyline([](const Position& p) { return p.flops_uncached; }, "#d62728");
    svg += polyline([](const Position& p) { return p.flops_cached; }, "#1f77b4");
    svg += fmt::format("<text x=\"{}\" y=\"{}\" fill=\"#d62728\">without a cache (recompute the prefix)</text>\n",
                       left + 10, top + 14);
    svg += fmt::format("<text x=\"{}\" y=\"{}\" fill=\"#1f77b4\">with the KV cache</text>\n", left + 10,
                       top + 30);
  }
  return svg + "</svg>\n";
}

int run_cost(const CostOptions& o) {
  const DType storage = parse_dtype(o.dtype, "--dtype");
  if (o.heads % o.kv_heads != 0) {
    throw Error(fmt::format("--kv-heads: {} does not divide --heads {} (expected a divisor)",
                            o.kv_heads, o.heads));
  }
  if (o.dim > kMaxHeadDim) throw Error(fmt::format("--dim: {} (expected 1 to {})", o.dim, kMaxHeadDim));
  if (o.len > (std::int64_t{1} << 32)) throw Error(fmt::format("--len: {} (expected at most 2^32)", o.len));
  if (o.measure && o.len > 1'000'000) {
    throw Error(fmt::format("--len: {} with --measure (expected at most 1000000 decode steps)", o.len));
  }
  if (o.format == "svg" && o.len > 100'000) {
    throw Error(fmt::format("--len: {} with --format svg (expected at most 100000 points)", o.len));
  }
  std::vector<Position> rows = model(o, storage);
  if (o.measure) measure(o, storage, rows);
  std::string text;
  if (o.format == "json") {
    text = render_json(rows);
  } else if (o.format == "svg") {
    text = render_svg(o, rows);
  } else {
    text = render_text(o, rows);
  }
  write_output(o.out, text);
  return kExitOk;
}

}  // namespace

void add_cost_command(CLI::App& app, Runner& runner) {
  auto o = std::make_shared<CostOptions>();
  CLI::App* command = app.add_subcommand(
      "cost",
      "Cost per generated token with a KV cache and without.");
  command->footer(
      "For each position i: the keys attended (i+1, or W+1 with a window), the FLOPs with the\n"
      "cache (4 * heads * head_dim per key) against recomputing attention for the whole prefix,\n"
      "the KV bytes read, and totals. --measure also times real decode steps on this machine.");
  command->add_option("--len", o->len, "tokens generated")->required()->check(kPositive);
  command->add_option("--heads", o->heads, "query heads (default 32)")->check(kPositive);
  command->add_option("--kv-heads", o->kv_heads, "kv heads (default 8)")->check(kPositive);
  command->add_option("--dim", o->dim, "head_dim (default 128)")->check(kPositive);
  command->add_option("--dtype", o->dtype, "KV cache storage: f32 (default), bf16, f16")
      ->check(CLI::IsMember({"f32", "bf16", "f16"}));
  command->add_option("--window", o->window, "left window W (W+1 keys per token)")->check(kNonNegative);
  command->add_option("--format", o->format, "text (default), json or svg")
      ->check(CLI::IsMember({"text", "json", "svg"}));
  command->add_flag("--measure", o->measure, "time real decode steps on this machine");
  command->add_option("--threads", o->threads, "threads for --measure (default: all cores)")
      ->check(kPositive);
  command->add_option("--out", o->out, "write to FILE instead of stdout (- is stdout)")
      ->check(kOutputPath);
  command->callback([&runner, o] { runner = [o] { return run_cost(*o); }; });
}

}  // namespace lookback::cli
