// lookback cost --ranks P --context N: the scaling model of ring prefill
// across P ranks (docs/distributed.md), and under mpirun with --measure the
// same ring run and timed on this machine.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace lookback::cli {

struct RankCostOptions {
  int ranks = 1;
  std::int64_t context = 0;
  std::int64_t heads = 32;
  std::int64_t kv_heads = 8;
  std::int64_t dim = 128;
  std::string dtype = "f32";
  std::optional<std::int64_t> window;
  double link_gbps = 100.0;           // per direction, per rank
  double latency_us = 5.0;            // per message
  std::optional<double> rate_gflops;  // the kernel rate; default: measured here
  int threads = 0;
  bool measure = false;
  bool json = false;
  std::string out;
};

int run_rank_cost(const RankCostOptions& options);

}  // namespace lookback::cli
