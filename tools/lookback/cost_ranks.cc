// The model: ranks step through the ring in lockstep (a block must arrive
// before it is used); a step costs the larger of the busiest rank's compute
// (its visible pairs times 4 * heads * head_dim FLOPs, at the kernel rate)
// and the transfer of the block that travels on (latency + bytes / link),
// since the transfer overlaps the compute. The efficiency is the ideal time
// (all useful FLOPs spread evenly over P ranks at the kernel rate) over the
// modelled time. Counts come from lookback::mpi::ring_work (the mask's own
// counts), so windows and uneven chunks are exact.
#include "cost_ranks.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "common.hpp"
#include "lookback/attention.hpp"
#include "lookback/error.hpp"

#ifdef LOOKBACK_HAVE_MPI
#include "lookback/mpi.hpp"
#endif

namespace lookback::cli {

#ifndef LOOKBACK_HAVE_MPI

int run_rank_cost(const RankCostOptions&) {
  throw Error("--ranks: this lookback was built without MPI (rebuild with libopenmpi-dev)");
}

#else

namespace {

struct LayoutCost {
  int steps = 0;
  double compute_s = 0;   // sum over steps of the busiest rank's compute
  double transfer_s = 0;  // sum over steps of the block transfers
  double time_s = 0;      // sum over steps of max(compute, transfer)
  double slowest_step_compute_s = 0;
  double largest_step_bytes = 0;
  bool hidden = true;  // every transfer shorter than its step's compute
};

LayoutCost layout_cost(const RankCostOptions& o, mpi::RingLayout layout, double rate,
                       double bytes_per_token) {
  const double flops_per_pair = 4.0 * static_cast<double>(o.heads * o.dim);
  LayoutCost cost;
  for (const mpi::RingStepWork& step :
       mpi::ring_work(o.context, o.ranks, layout, {.window_left = o.window})) {
    const double compute = static_cast<double>(step.slowest_pairs) * flops_per_pair / rate;
    const double bytes = static_cast<double>(step.largest_block_tokens) * bytes_per_token;
    const double transfer =
        bytes > 0 ? o.latency_us * 1e-6 + bytes * 8.0 / (o.link_gbps * 1e9) : 0.0;
    ++cost.steps;
    cost.compute_s += compute;
    cost.transfer_s += transfer;
    cost.time_s += std::max(compute, transfer);
    cost.slowest_step_compute_s = std::max(cost.slowest_step_compute_s, compute);
    cost.largest_step_bytes = std::max(cost.largest_step_bytes, bytes);
    cost.hidden = cost.hidden && transfer <= compute;
  }
  return cost;
}

// The kernel rate of this machine: causal-free attention of one block of
// queries against one block of keys (as a ring step computes), best of three.
double measure_rate(const RankCostOptions& o, DType storage, std::int64_t tokens) {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> q(static_cast<std::size_t>(tokens * o.heads * o.dim));
  std::vector<float> kv(static_cast<std::size_t>(tokens * o.kv_heads * o.dim));
  for (float& x : q) x = normal(rng);
  for (float& x : kv) x = normal(rng);
  std::vector<float> out(q.size());
  Context context(o.threads);
  const AttentionParams params{
      .q = make_view(q.data(), DType::kF32, {1, tokens, o.heads, o.dim}),
      .k = make_view(kv.data(), DType::kF32, {1, tokens, o.kv_heads, o.dim}),
      .v = make_view(kv.data(), DType::kF32, {1, tokens, o.kv_heads, o.dim}),
      .out = make_mutable_view(out.data(), DType::kF32, {1, tokens, o.heads, o.dim}),
      .mask = {.causal = Causal::kNone},
      .storage = storage};
  double best = 1e30;
  for (int trial = 0; trial < 4; ++trial) {  // the first is a warm-up
    const auto start = std::chrono::steady_clock::now();
    attend(params, context);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (trial > 0) best = std::min(best, seconds);
  }
  return 4.0 * static_cast<double>(o.heads * o.dim) * static_cast<double>(tokens * tokens) / best;
}

std::string seconds_text(double s) {
  if (s >= 100.0) return fmt::format("{:.0f} s", s);
  if (s >= 1.0) return fmt::format("{:.3g} s", s);
  if (s >= 1e-3) return fmt::format("{:.3g} ms", s * 1e3);
  return fmt::format("{:.3g} us", s * 1e6);
}

std::string bytes_text(double b) {
  if (b >= 1e9) return fmt::format("{:.3g} GB", b / 1e9);
  if (b >= 1e6) return fmt::format("{:.3g} MB", b / 1e6);
  if (b >= 1e3) return fmt::format("{:.3g} kB", b / 1e3);
  return fmt::format("{:.0f} B", b);
}

struct Measured {
  double compute_s = 0, wait_s = 0, total_s = 0;  // the slowest rank's
  std::int64_t bytes_sent = 0;
};

// Under mpirun: the ring on random inputs of the modelled shape, timed.
Measured measure_ring(const RankCostOptions& o, DType storage) {
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  if (ranks != o.ranks) {
    throw Error(
        fmt::format("--ranks: {} with --measure under {} MPI ranks (expected the job's "
                    "size: mpirun -np {} lookback cost --ranks {} ...)",
                    o.ranks, ranks, o.ranks, o.ranks));
  }
  const mpi::ZigzagLayout layout{.seqlen = o.context, .ranks = ranks};
  const std::int64_t local = layout.local_seqlen(rank);
  std::mt19937 rng(static_cast<unsigned>(rank + 1));
  std::normal_distribution<float> normal;
  std::vector<float> q(static_cast<std::size_t>(local * o.heads * o.dim));
  std::vector<float> k(static_cast<std::size_t>(local * o.kv_heads * o.dim)), v(k.size());
  for (auto* data : {&q, &k, &v}) {
    for (float& x : *data) x = normal(rng);
  }
  std::vector<float> out(q.size());
  Context context(o.threads);
  const mpi::RingParams params{
      .q = make_view(q.data(), DType::kF32, {1, local, o.heads, o.dim}),
      .k = make_view(k.data(), DType::kF32, {1, local, o.kv_heads, o.dim}),
      .v = make_view(v.data(), DType::kF32, {1, local, o.kv_heads, o.dim}),
      .out = make_mutable_view(out.data(), DType::kF32, {1, local, o.heads, o.dim}),
      .seqlen = o.context,
      .mask = {.window_left = o.window},
      .storage = storage};
  mpi::ring_attend(params, MPI_COMM_WORLD, context);  // warm-up
  MPI_Barrier(MPI_COMM_WORLD);
  const double start = MPI_Wtime();
  const mpi::RingStats stats = mpi::ring_attend(params, MPI_COMM_WORLD, context);
  double total = MPI_Wtime() - start;
  double values[3] = {stats.compute_seconds, stats.wait_seconds, total};
  MPI_Allreduce(MPI_IN_PLACE, values, 3, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return {.compute_s = values[0],
          .wait_s = values[1],
          .total_s = values[2],
          .bytes_sent = stats.bytes_sent};
}

void check_rank_cost_options(const RankCostOptions& o) {
  if (o.heads % o.kv_heads != 0) {
    throw Error(fmt::format("--kv-heads: {} does not divide --heads {} (expected a divisor)",
                            o.kv_heads, o.heads));
  }
  if (o.dim > kMaxHeadDim) {
    throw Error(fmt::format("--dim: {} (expected 1 to {})", o.dim, kMaxHeadDim));
  }
  if (o.ranks > 65536) throw Error(fmt::format("--ranks: {} (expected 1 to 65536)", o.ranks));
  if (o.context < 1 || o.context > (std::int64_t{1} << 40)) {
    throw Error(fmt::format("--context: {} (expected 1 to 2^40)", o.context));
  }
  if (!(o.link_gbps > 0) || !(o.latency_us >= 0)) {
    throw Error("--link-gbps, --latency-us: expected a positive bandwidth and a latency >= 0");
  }
}

// The model's figures for both layouts.
struct RankCostModel {
  std::int64_t rate_tokens = 0;  // block size the kernel rate was measured on (0: given)
  double rate = 0;               // FLOP/s per rank
  LayoutCost zigzag, plain;
  double useful_pairs = 0;
  double ideal_s = 0;
};

RankCostModel model_rank_cost(const RankCostOptions& o, DType storage) {
  RankCostModel m;
  // The kernel rate: given, or measured on blocks of a ring step's size (at
  // most 1024 tokens, to keep the measurement short).
  const std::int64_t chunk = std::max<std::int64_t>(1, o.context / (2 * o.ranks));
  m.rate_tokens = o.rate_gflops ? 0 : std::min<std::int64_t>(chunk, 1024);
  m.rate = o.rate_gflops ? *o.rate_gflops * 1e9 : measure_rate(o, storage, m.rate_tokens);
  // K and V as the ring sends them (f32 for 8-bit storage).
  const double bytes_per_token = 2.0 * static_cast<double>(o.kv_heads * o.dim) *
                                 static_cast<double>(dtype_size(mpi::ring_block_dtype(storage)));
  m.zigzag = layout_cost(o, mpi::RingLayout::kZigzag, m.rate, bytes_per_token);
  m.plain = layout_cost(o, mpi::RingLayout::kContiguous, m.rate, bytes_per_token);
  m.useful_pairs =
      static_cast<double>(Mask(o.context, o.context, {.window_left = o.window}).visible_total());
  m.ideal_s = m.useful_pairs * 4.0 * static_cast<double>(o.heads * o.dim) / m.rate / o.ranks;
  return m;
}

std::string rank_cost_json(const RankCostOptions& o, const RankCostModel& m,
                           const std::optional<Measured>& measured) {
  auto layout_json = [&](const LayoutCost& c) {
    return nlohmann::json{{"steps", c.steps},
                          {"compute_s", c.compute_s},
                          {"transfer_s", c.transfer_s},
                          {"time_s", c.time_s},
                          {"largest_step_bytes", c.largest_step_bytes},
                          {"communication_hidden", c.hidden},
                          {"efficiency", m.ideal_s / c.time_s}};
  };
  nlohmann::json doc{{"ranks", o.ranks},
                     {"context", o.context},
                     {"heads", o.heads},
                     {"kv_heads", o.kv_heads},
                     {"head_dim", o.dim},
                     {"dtype", o.dtype},
                     {"window", o.window ? nlohmann::json(*o.window) : nlohmann::json()},
                     {"rate_gflops", m.rate / 1e9},
                     {"rate_measured", !o.rate_gflops},
                     {"link_gbps", o.link_gbps},
                     {"latency_us", o.latency_us},
                     {"ideal_s", m.ideal_s},
                     {"zigzag", layout_json(m.zigzag)},
                     {"plain", layout_json(m.plain)}};
  if (measured) {
    doc["measured"] = {{"compute_s", measured->compute_s},
                       {"wait_s", measured->wait_s},
                       {"total_s", measured->total_s}};
  }
  return doc.dump() + "\n";
}

std::string rank_cost_text(const RankCostOptions& o, const RankCostModel& m,
                           const std::optional<Measured>& measured) {
  const LayoutCost& zigzag = m.zigzag;
  const LayoutCost& plain = m.plain;
  std::string text = fmt::format(
      "ring prefill across {} ranks: context {}, {} heads, {} kv heads, head_dim {}, {}{}\n",
      o.ranks, o.context, o.heads, o.kv_heads, o.dim, o.dtype,
      o.window ? fmt::format(", window {}", *o.window) : "");
  text += fmt::format(
      "kernel rate {:.1f} GFLOP/s per rank ({}); link {} Gbit/s, {} us "
      "latency\n\n",
      m.rate / 1e9,
      o.rate_gflops ? "given by --rate"
                    : fmt::format("measured here on {}-token blocks", m.rate_tokens),
      o.link_gbps, o.latency_us);
  text += fmt::format("{:<34}{:>16}{:>16}\n", "", "zigzag", "plain ring");
  auto row = [&](std::string_view name, const std::string& a, const std::string& b) {
    text += fmt::format("{:<34}{:>16}{:>16}\n", name, a, b);
  };
  row("steps with work", std::to_string(zigzag.steps), std::to_string(plain.steps));
  row("compute, busiest rank per step", seconds_text(zigzag.slowest_step_compute_s),
      seconds_text(plain.slowest_step_compute_s));
  row("bytes sent per rank per step", bytes_text(zigzag.largest_step_bytes),
      bytes_text(plain.largest_step_bytes));
  row("compute, all steps", seconds_text(zigzag.compute_s), seconds_text(plain.compute_s));
  row("transfers, all steps", seconds_text(zigzag.transfer_s), seconds_text(plain.transfer_s));
  row("communication hidden by compute", zigzag.hidden ? "yes" : "no",
      plain.hidden ? "yes" : "no");
  row("time", seconds_text(zigzag.time_s), seconds_text(plain.time_s));
  row("efficiency (ideal / time)", fmt::format("{:.1f}%", 100 * m.ideal_s / zigzag.time_s),
      fmt::format("{:.1f}%", 100 * m.ideal_s / plain.time_s));
  text += fmt::format("\nideal: {} ({} useful FLOPs spread evenly over {} ranks)\n",
                      seconds_text(m.ideal_s),
                      fmt::format("{:.3g}", m.useful_pairs * 4.0 * o.heads * o.dim), o.ranks);
  if (measured) {
    text += fmt::format(
        "measured here (slowest rank, zigzag): compute {}, waiting for blocks {}, total {}; "
        "predicted compute {}\n",
        seconds_text(measured->compute_s), seconds_text(measured->wait_s),
        seconds_text(measured->total_s), seconds_text(zigzag.compute_s));
  }
  return text;
}

}  // namespace

int run_rank_cost(const RankCostOptions& o) {
  const DType storage = parse_dtype(o.dtype, "--dtype");
  check_rank_cost_options(o);
  int initialized = 0;
  if (o.measure) {
    MPI_Initialized(&initialized);
    if (!initialized) MPI_Init(nullptr, nullptr);
  }
  int rank = 0;
  if (o.measure) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const RankCostModel model = model_rank_cost(o, storage);
  std::optional<Measured> measured;
  if (o.measure) measured = measure_ring(o, storage);
  if (o.measure && !initialized) MPI_Finalize();
  if (rank != 0) return kExitOk;
  write_output(o.out, o.json ? rank_cost_json(o, model, measured)
                             : rank_cost_text(o, model, measured));
  return kExitOk;
}

#endif

}  // namespace lookback::cli
