// lookback attend --mode ring | sharded-decode: attention across the ranks of
// an MPI job (lookback::lookback_mpi). Rank 0 reads and checks the inputs and
// sends each rank its share; rank 0 writes the outputs. Errors are agreed on
// by every rank and printed once, by rank 0; every rank exits with the same
// code.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "lookback/attention.hpp"
#include "lookback/npy.hpp"

namespace lookback::cli {

// What rank 0 read and checked: q, k, v views over `arrays` (and the slopes
// and sink logits, when given).
struct AttendInputs {
  AttentionParams params;
  std::vector<LoadedNpy> arrays;  // mapped (map_npy)
  std::vector<float> slopes;
  std::vector<float> sink_logits;
};

struct DistributedAttend {
  std::string mode;            // "ring" or "sharded-decode"
  std::int64_t segment = 256;  // sharded-decode: tokens per segment of the sharded cache
  int threads = 0;
  std::string out_path, lse_path;
};

bool is_distributed_mode(std::string_view mode);

// Initialises MPI (when the caller has not), runs, finalises. `read_inputs`
// runs on rank 0 only. Returns the exit code (0, or 2 after one error line
// on rank 0's stderr).
int run_distributed_attend(const DistributedAttend& options,
                           const std::function<AttendInputs()>& read_inputs);

}  // namespace lookback::cli
