// lookback cost: what each generated token costs, with a KV cache and without.
//
// With a cache, the token at position i computes its own query, key and value
// and attends to the cached keys: i + 1 query-key dot products (W + 1 with a
// window). Without one, producing token i means recomputing attention for
// the whole prefix 0..i: every visible pair of an (i+1) x (i+1) causal square.
// With sink tokens S (StreamingLLM, with a window) position i attends
// |{j <= i : j >= i - W or j < S}| keys: its window and the sinks below it.
// Counts come from lookback::Mask, the same code the kernels use.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#include "common.hpp"
#include "cost_ranks.hpp"
#include "output_format.hpp"
#include "svg.hpp"
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
  std::int64_t sink_tokens = 0;  // StreamingLLM, with --window
  OutputFormat format = OutputFormat::kText;
  bool measure = false;
  int threads = 0;
  std::string out;
  RankCostOptions ranks;  // --ranks: ring prefill across ranks (cost_ranks.hpp)
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
  const Mask mask(o.len, o.len, {.causal = Causal::kBottomRight, .window_left = o.window,
                                  .sink_tokens = o.sink_tokens});
  const double per_pair = 4.0 * static_cast<double>(o.heads * o.dim);
  // K and V rows; 8-bit rows carry one f32 scale each.
  const double bytes_per_key =
      2.0 * static_cast<double>(o.kv_heads) *
      (static_cast<double>(o.dim * static_cast<std::int64_t>(dtype_size(storage))) +
       (is_quantized(storage) ? 4.0 : 0.0));
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
  const DecodeOptions options{.window_left = o.window, .sink_tokens = o.sink_tokens};
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

// ", window 3, 2 sink tokens", or "" without a window.
std::string mask_words(const CostOptions& o) {
  std::string words = o.window ? fmt::format(", window {}", *o.window) : std::string();
  if (o.sink_tokens > 0) {
    words += fmt::format(", {} sink token{}", o.sink_tokens, o.sink_tokens == 1 ? "" : "s");
  }
  return words;
}

std::string render_text(const CostOptions& o, const std::vector<Position>& rows) {
  std::string text = fmt::format(
      "cost per generated token: {} heads, {} kv heads, head_dim {}, {}{}\n"
      "(cached: attend to the KV cache; uncached: recompute attention for the whole prefix)\n\n",
      o.heads, o.kv_heads, o.dim, o.dtype, mask_words(o));
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

std::string render_json(const CostOptions& o, const std::vector<Position>& rows) {
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
  return nlohmann::ordered_json{{"window", o.window ? nlohmann::ordered_json(*o.window) : nullptr},
                                {"sink_tokens", o.sink_tokens},
                                {"positions", positions},
                                {"totals", totals}}
             .dump() +
         "\n";
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
  auto points = [&](auto value_of) {
    std::vector<std::pair<double, double>> list;
    for (const Position& p : rows) list.emplace_back(x_of(static_cast<double>(p.position)), y_of(value_of(p)));
    return list;
  };
  const std::string heading = fmt::format("Cost per generated token: {} heads, {} kv heads, head_dim {}{}",
                                          o.heads, o.kv_heads, o.dim, mask_words(o));
  svg::Document doc(width, height, heading, "12");
  doc.text(left, 22, heading, "font-size=\"15\"");
  doc.axes(left, top, plot_w, plot_h);
  for (int tick = 0; tick <= 4; ++tick) {
    const double value = y_max * tick / 4, position = x_max * tick / 4;
    doc.text(left - 6, y_of(value) + 4, human(value), "text-anchor=\"end\"");
    doc.text(x_of(position), top + plot_h + 18, fmt::format("{:.0f}", position), "text-anchor=\"middle\"");
  }
  doc.text(left + plot_w / 2, height - 15, "position of the generated token", "text-anchor=\"middle\"");
  doc.vertical_text(18, top + plot_h / 2, timed ? "measured time per token (us)" : "FLOPs per token",
                    "text-anchor=\"middle\"");
  if (timed) {
    doc.polyline(points([](const Position& p) { return *p.measured_ns / 1e3; }), "#1f77b4");
    doc.text(left + 10, top + 14, "with the KV cache (measured)", "fill=\"#1f77b4\"");
  } else {
    doc.polyline(points([](const Position& p) { return p.flops_uncached; }), "#d62728");
    doc.polyline(points([](const Position& p) { return p.flops_cached; }), "#1f77b4");
    doc.text(left + 10, top + 14, "without a cache (recompute the prefix)", "fill=\"#d62728\"");
    doc.text(left + 10, top + 30, "with the KV cache", "fill=\"#1f77b4\"");
  }
  return doc.finish();
}

int run_cost(const CostOptions& o) {
  if (o.ranks.ranks > 1 || o.ranks.context > 0) {
    RankCostOptions ranks = o.ranks;
    ranks.heads = o.heads, ranks.kv_heads = o.kv_heads, ranks.dim = o.dim, ranks.dtype = o.dtype;
    ranks.window = o.window, ranks.threads = o.threads, ranks.measure = o.measure;
    ranks.json = o.format == OutputFormat::kJson, ranks.out = o.out;
    if (ranks.context < 1) throw Error("--context: missing (expected the tokens with --ranks)");
    if (o.len > 0) throw Error("--len: not with --ranks (expected --context)");
    if (o.format == OutputFormat::kSvg) throw Error("--format: svg not with --ranks (expected text or json)");
    if (o.sink_tokens > 0) {
      throw Error(fmt::format("--sink-tokens: {} not with --ranks (expected 0: ring attention has "
                              "no sink tokens)",
                              o.sink_tokens));
    }
    return run_rank_cost(ranks);
  }
  if (o.len < 1) throw Error("--len: missing (expected the tokens generated)");
  if (o.sink_tokens > 0 && !o.window) {
    throw Error(fmt::format("--sink-tokens: {} without --window (expected --window W with sink "
                            "tokens)",
                            o.sink_tokens));
  }
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
  if (o.format == OutputFormat::kSvg && o.len > 100'000) {
    throw Error(fmt::format("--len: {} with --format svg (expected at most 100000 points)", o.len));
  }
  std::vector<Position> rows = model(o, storage);
  if (o.measure) measure(o, storage, rows);
  write_output(o.out, o.format == OutputFormat::kJson ? render_json(o, rows)
                     : o.format == OutputFormat::kSvg ? render_svg(o, rows)
                                                      : render_text(o, rows));
  return kExitOk;
}

}  // namespace

void add_cost_command(CLI::App& app, Runner& runner) {
  auto o = std::make_shared<CostOptions>();
  CLI::App* command = add_command(
      app, "cost",
      "Cost per generated token with a KV cache and without.",
      "For each position i: the keys attended (i+1, or W+1 with a window, plus the sink tokens\n"
      "0..S-1 below the window with --sink-tokens S), the FLOPs with the cache\n"
      "(4 * heads * head_dim per key) against recomputing attention for the whole prefix,\n"
      "the KV bytes read, and totals. --measure also times real decode steps on this machine.\n"
      "json: {window, sink_tokens, positions: [{position, keys, flops_cached, flops_uncached,\n"
      "kv_bytes[, measured_ns]}], totals}.\n"
      "\n"
      "Examples:\n"
      "  lookback cost --len 4096\n"
      "  lookback cost --len 4096 --window 1023 --dtype bf16 --format svg --out cost.svg\n"
      "  lookback cost --len 12 --window 3 --sink-tokens 2 --format json\n"
      "  lookback cost --len 2048 --window 255 --sink-tokens 4 --measure");
  command->add_option("--len", o->len, "tokens generated")->check(kPositive);
  command->add_option("--heads", o->heads, "query heads (default 32)")->check(kPositive);
  command->add_option("--kv-heads", o->kv_heads, "kv heads (default 8)")->check(kPositive);
  command->add_option("--dim", o->dim, "head_dim (default 128)")->check(kPositive);
  command->add_option("--dtype", o->dtype,
                      "KV cache storage: f32 (default), bf16, f16, or 8 bits with an f32 scale "
                      "per row: int8, fp8e4m3, fp8e5m2")
      ->check(CLI::IsMember({"f32", "bf16", "f16", "int8", "fp8e4m3", "fp8e5m2"}));
  command->add_option("--window", o->window, "left window W (W+1 keys per token)")->check(kNonNegative);
  command->add_option("--sink-tokens", o->sink_tokens,
                      "StreamingLLM sink tokens S >= 0 (with --window): keys 0..S-1 stay visible")
      ->check(kNonNegative);
  add_format_option(*command, o->format,
                    {OutputFormat::kText, OutputFormat::kJson, OutputFormat::kSvg});
  command->add_flag("--measure", o->measure, "time real decode steps on this machine");
  command->add_option("--threads", o->threads, "threads for --measure (default: all cores)")
      ->check(kPositive);
  add_out_option(*command, o->out);
  command->add_option("--ranks", o->ranks.ranks,
                      "ring prefill across P ranks: model per-rank compute, bytes per step, "
                      "overlap and zigzag vs plain-ring efficiency (docs/distributed.md); "
                      "--measure under mpirun -np P also runs and times the ring")
      ->check(kPositive);
  command->add_option("--context", o->ranks.context, "with --ranks: tokens of the sequence")
      ->check(kPositive);
  command->add_option("--link-gbps", o->ranks.link_gbps,
                      "with --ranks: link bandwidth per rank, Gbit/s (default 100)");
  command->add_option("--latency-us", o->ranks.latency_us,
                      "with --ranks: latency per message, microseconds (default 5)");
  command->add_option("--rate", o->ranks.rate_gflops,
                      "with --ranks: kernel rate per rank in GFLOP/s (default: measured here)");
  command->callback([&runner, o] { runner = [o] { return run_cost(*o); }; });
}

}  // namespace lookback::cli
