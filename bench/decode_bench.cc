// Decode benchmark: one new token attending to a KV cache of 1k..64k tokens.
// Decode is memory-bound, so its rate is KV bytes read per second, reported
// next to this machine's read bandwidth measured in the same run, plus a
// linear fit of time per token against context length.
//
//   decode_bench [--quick] [--threads 1,2] [--contexts 1024,4096,16384,65536]
//                [--heads 32] [--kv-heads 8] [--dim 128] [--dtype f32|bf16|f16|int8|fp8e4m3|fp8e5m2] [--reps 7]
#include <fmt/format.h>

#include <algorithm>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "ceilings.hpp"
#include "harness.hpp"
#include "lookback/attention.hpp"
#include "lookback/kv_cache.hpp"
#include "machine.hpp"

namespace {

struct Options {
  std::vector<std::int64_t> threads_list{1, 2}, contexts{1024, 4096, 16384, 65536};
  std::int64_t heads = 32, kv_heads = 8, dim = 128;
  int reps = 7;
  lookback::DType storage = lookback::DType::kF32;
};

// The options, or nullopt after a usage line on stderr.
std::optional<Options> parse_options(int argc, char** argv) {
  Options o;
  auto& [threads_list, contexts, heads, kv_heads, dim, reps, storage] = o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const std::string value = i + 1 < argc ? argv[i + 1] : "";
    if (arg == "--quick") {
      contexts = {1024, 16384};
      reps = 3;
      continue;
    }
    if (value.empty()) {
      fmt::print(stderr,
                 "usage: decode_bench [--quick] [--threads 1,2] [--contexts 1024,4096,...] "
                 "[--heads H] [--kv-heads HK] [--dim D] [--dtype f32|bf16|f16|int8|fp8e4m3|fp8e5m2] [--reps R]\n");
      return std::nullopt;
    }
    ++i;
    if (arg == "--threads") threads_list = lookback::bench::parse_list(value, arg);
    else if (arg == "--contexts") contexts = lookback::bench::parse_list(value, arg);
    else if (arg == "--heads") heads = std::stoll(value);
    else if (arg == "--kv-heads") kv_heads = std::stoll(value);
    else if (arg == "--dim") dim = std::stoll(value);
    else if (arg == "--reps") reps = std::stoi(value);
    else if (arg == "--dtype") storage = lookback::parse_dtype(value, "--dtype");
    else {
      fmt::print(stderr, "decode_bench: unknown option {}\n", arg);
      return std::nullopt;
    }
  }
  return o;
}

// Least-squares line time = a + b * context, and its R^2, printed.
void print_fit(const std::vector<double>& xs, const std::vector<double>& ys) {
  const double count = static_cast<double>(xs.size());
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    sx += xs[i];
    sy += ys[i];
    sxx += xs[i] * xs[i];
    sxy += xs[i] * ys[i];
  }
  const double slope = (count * sxy - sx * sy) / (count * sxx - sx * sx);
  const double intercept = (sy - slope * sx) / count;
  double ss_res = 0, ss_tot = 0;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const double fit = intercept + slope * xs[i];
    ss_res += (ys[i] - fit) * (ys[i] - fit);
    ss_tot += (ys[i] - sy / count) * (ys[i] - sy / count);
  }
  if (xs.size() >= 2) {
    fmt::print("fit: time/token = {:.4f} ms + {:.4f} ms per 1k tokens of context, R^2 = {:.4f}\n\n",
               intercept, slope * 1e3, ss_tot > 0 ? 1 - ss_res / ss_tot : 1.0);
  }
}

}  // namespace

int main(int argc, char** argv) {
  using namespace lookback;
  const std::optional<Options> parsed = parse_options(argc, argv);
  if (!parsed) return 2;
  const auto& [threads_list, contexts, heads, kv_heads, dim, reps, storage] = *parsed;
  fmt::print("machine: {}; lookback SIMD path {}\n", bench::cpu_model(), simd_target_name());
  fmt::print("decode of 1 token, batch 1, {} heads, {} kv heads, head_dim {}, {} KV cache; median "
             "of {} (min-max)\n\n",
             heads, kv_heads, dim, dtype_name(storage), reps);

  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal;
  const std::int64_t max_context = *std::max_element(contexts.begin(), contexts.end());
  // Fill one cache with the longest context; shorter contexts attend to a
  // cache of their own length (filled from the same data).
  std::vector<float> k(static_cast<std::size_t>(max_context * kv_heads * dim)), v(k.size());
  for (float& x : k) x = normal(rng);
  for (float& x : v) x = normal(rng);
  std::vector<float> q(static_cast<std::size_t>(heads * dim)), out(q.size());
  for (float& x : q) x = normal(rng);
  const CacheConfig config{.kv_heads = kv_heads, .head_dim = dim, .storage = storage};

  for (std::int64_t threads : threads_list) {
    const double bandwidth = bench::measure_read_bandwidth_gbs(static_cast<int>(threads));
    fmt::print("threads {}: read bandwidth {:.1f} GB/s (1 GiB arrays)\n", threads, bandwidth);
    fmt::print("{:>8} {:>10} {:>24} {:>9} {:>8}\n", "context", "KV MB", "time/token ms", "GB/s",
               "%bw");
    Context context(static_cast<int>(threads));
    std::vector<double> xs, ys;
    for (std::int64_t n : contexts) {
      KvCache cache(config, n);
      cache.append(make_view(k.data(), DType::kF32, {n, kv_heads, dim}, "k"),
                   make_view(v.data(), DType::kF32, {n, kv_heads, dim}, "v"));
      const DecodeStep step{.q = make_view(q.data(), DType::kF32, {1, heads, dim}, "q"),
                            .out = make_mutable_view(out.data(), DType::kF32, {1, heads, dim}, "out")};
      const bench::Timing time = bench::time_it(reps, [&] { cache.attend(step, {}, context); });
      const double median = time.median;
      // 8-bit rows carry one f32 scale each.
      const double bytes = 2.0 * static_cast<double>(n * kv_heads) *
                           (static_cast<double>(dim) * static_cast<double>(dtype_size(storage)) +
                            (is_quantized(storage) ? 4.0 : 0.0));
      const double rate = bytes / median * 1e-9;
      fmt::print("{:>8} {:>10.1f} {:>24} {:>9.1f} {:>7.1f}%\n", n, bytes / 1e6,
                 bench::ms_text(time), rate, 100.0 * rate / bandwidth);
      std::fflush(stdout);
      xs.push_back(static_cast<double>(n));
      ys.push_back(median * 1e3);
    }
    print_fit(xs, ys);
  }
  return 0;
}
