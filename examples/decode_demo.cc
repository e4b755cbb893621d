// What serving a model looks like with lookback: prefill a prompt into a
// paged KV cache, then generate tokens one at a time, each attending to the
// cache. Prints the time per token at a few positions next to the cost model
// (keys attended, KV bytes read) and checks that what decode computed equals
// a single prefill over the whole sequence.
//
//   decode_demo [--prompt 2048] [--generate 256] [--heads 32] [--kv-heads 8]
//               [--dim 128] [--block-size 16] [--threads N]
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "lookback/lookback.hpp"
#include "lookback/kv_cache.hpp"

namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  using namespace lookback;
  std::int64_t prompt = 2048, generate = 256, heads = 32, kv_heads = 8, dim = 128, block_size = 16;
  int threads = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const std::int64_t value = std::atoll(argv[i + 1]);
    if (flag == "--prompt") prompt = value;
    else if (flag == "--generate") generate = value;
    else if (flag == "--heads") heads = value;
    else if (flag == "--kv-heads") kv_heads = value;
    else if (flag == "--dim") dim = value;
    else if (flag == "--block-size") block_size = value;
    else if (flag == "--threads") threads = static_cast<int>(value);
    else {
      fmt::print(stderr, "decode_demo: unknown option {}\n", flag);
      return 2;
    }
  }
  const std::int64_t total = prompt + generate;
  // What a model's projections would produce: Q (total, heads, dim), K and V
  // (total, kv_heads, dim), one batch element.
  std::mt19937_64 rng(2026);
  std::normal_distribution<float> normal;
  std::vector<float> q(static_cast<std::size_t>(total * heads * dim));
  std::vector<float> k(static_cast<std::size_t>(total * kv_heads * dim)), v(k.size());
  for (float& x : q) x = normal(rng);
  for (float& x : k) x = normal(rng);
  for (float& x : v) x = normal(rng);

  Context context(threads);
  fmt::print("{} heads, {} kv heads, head_dim {}, f32, paged cache with blocks of {} tokens, "
             "{} threads, SIMD {}\n",
             heads, kv_heads, dim, block_size, context.threads(), simd_target_name());

  // 1. Prefill: the prompt's attention in one call, its K/V into the cache.
  const CacheConfig config{.kv_heads = kv_heads, .head_dim = dim};
  PagedKvPool pool(config, block_size, (total + block_size - 1) / block_size);
  const SequenceId sequence = pool.create();
  std::vector<float> prompt_out(static_cast<std::size_t>(prompt * heads * dim));
  const auto prefill_start = Clock::now();
  AttentionParams prefill{
      .q = make_view(q.data(), DType::kF32, {1, prompt, heads, dim}, "q"),
      .k = make_view(k.data(), DType::kF32, {1, prompt, kv_heads, dim}, "k"),
      .v = make_view(v.data(), DType::kF32, {1, prompt, kv_heads, dim}, "v"),
      .out = make_mutable_view(prompt_out.data(), DType::kF32, {1, prompt, heads, dim}, "out"),
  };
  attend(prefill, context);
  pool.append(sequence, make_view(k.data(), DType::kF32, {prompt, kv_heads, dim}, "k"),
              make_view(v.data(), DType::kF32, {prompt, kv_heads, dim}, "v"));
  const double prefill_ms = ms_since(prefill_start);
  const double prefill_flops = 4.0 * static_cast<double>(heads * dim) *
                               static_cast<double>(Mask(prompt, prompt).visible_total());
  fmt::print("prefill of {} tokens: {:.1f} ms ({:.1f} GFLOP/s useful), K/V cached in {} blocks\n\n",
             prompt, prefill_ms, prefill_flops / prefill_ms * 1e-6, pool.block_table(sequence).size());

  // 2. Decode: one token at a time, each appending its K/V and attending.
  std::vector<float> decoded(static_cast<std::size_t>(generate * heads * dim));
  std::vector<double> step_ms;
  for (std::int64_t t = 0; t < generate; ++t) {
    const std::int64_t position = prompt + t;
    const auto start = Clock::now();
    pool.append(sequence,
                make_view(k.data() + position * kv_heads * dim, DType::kF32, {1, kv_heads, dim}, "k"),
                make_view(v.data() + position * kv_heads * dim, DType::kF32, {1, kv_heads, dim}, "v"));
    pool.attend(sequence,
                {.q = make_view(q.data() + position * heads * dim, DType::kF32, {1, heads, dim}, "q"),
                 .out = make_mutable_view(decoded.data() + t * heads * dim, DType::kF32,
                                          {1, heads, dim}, "out")},
                {}, context);
    step_ms.push_back(ms_since(start));
  }
  fmt::print("{:>9} {:>6} {:>12} {:>12} {:>12}\n", "position", "keys", "KV read", "time/token",
             "KV GB/s");
  for (std::int64_t t : {std::int64_t{0}, generate / 4, generate / 2, 3 * generate / 4, generate - 1}) {
    if (t < 0 || t >= generate) continue;
    const std::int64_t keys = prompt + t + 1;  // the cost model: i + 1 keys
    const double bytes = 2.0 * static_cast<double>(keys * kv_heads * dim) * sizeof(float);
    const double ms = step_ms[static_cast<std::size_t>(t)];
    fmt::print("{:>9} {:>6} {:>9.2f} MB {:>9.3f} ms {:>12.1f}\n", prompt + t, keys, bytes / 1e6, ms,
               bytes / ms * 1e-6);
  }
  double sum = 0;
  for (double ms : step_ms) sum += ms;
  fmt::print("mean over {} tokens: {:.3f} ms per token\n\n", generate, sum / static_cast<double>(generate));

  // 3. Check: the decoded outputs equal one prefill over the whole sequence.
  std::vector<float> full(static_cast<std::size_t>(total * heads * dim));
  AttentionParams whole{
      .q = make_view(q.data(), DType::kF32, {1, total, heads, dim}, "q"),
      .k = make_view(k.data(), DType::kF32, {1, total, kv_heads, dim}, "k"),
      .v = make_view(v.data(), DType::kF32, {1, total, kv_heads, dim}, "v"),
      .out = make_mutable_view(full.data(), DType::kF32, {1, total, heads, dim}, "out"),
  };
  attend(whole, context);
  double error = 0, norm = 0;
  for (std::size_t i = 0; i < decoded.size(); ++i) {
    const double expected = full[static_cast<std::size_t>(prompt * heads * dim) + i];
    error += (decoded[i] - expected) * (decoded[i] - expected);
    norm += expected * expected;
  }
  const double relative = std::sqrt(error / norm);
  const bool ok = relative <= 1e-5 && std::isfinite(relative);
  fmt::print("decode vs prefill over all {} tokens: relative L2 error {:.2e} ({})\n", total, relative,
             ok ? "match" : "MISMATCH");
  return ok ? 0 : 1;
}
