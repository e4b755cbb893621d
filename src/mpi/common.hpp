// Helpers shared by the ring and the sharded cache: converting rows into the
// storage dtype for sending, checking that every rank was given the same
// settings, moving large buffers, and ending the job when a rank fails after
// the ranks have started exchanging data.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "lookback/dtype.hpp"
#include "lookback/tensor.hpp"

namespace lookback::mpi::detail {

// Copies rows [begin, begin + count) of axis 1 of a rank-4 view
// (batch, rows, heads, head_dim) into `destination`, contiguous
// (batch, count, heads, head_dim), converted to `storage` (f32, f16, bf16).
void pack_rows(const TensorView& view, std::int64_t begin, std::int64_t count, DType storage,
               std::uint8_t* destination);
// One element converted to the storage dtype at `destination` (its index).
void store_as(float value, DType storage, std::uint8_t* destination, std::int64_t index);

// The bits of a float, for check_same_everywhere.
std::int64_t float_bits(float value);

// Collective: throws the same lookback::Error on every rank when the ranks
// were given different values of any setting (name, value).
void check_same_everywhere(MPI_Comm comm,
                           const std::vector<std::pair<std::string_view, std::int64_t>>& settings);

// Non-blocking send and receive of a byte buffer of any size (in pieces of at
// most 1 GiB, MPI counts being int), appending the requests.
void isend_bytes(const std::uint8_t* data, std::int64_t bytes, int destination, MPI_Comm comm,
                 std::vector<MPI_Request>& requests);
void irecv_bytes(std::uint8_t* data, std::int64_t bytes, int source, MPI_Comm comm,
                 std::vector<MPI_Request>& requests);

// After the ranks agreed and started exchanging data, a failure on one rank
// cannot be agreed on without waiting forever: it prints one line and ends
// the whole job with exit code 2.
[[noreturn]] void abort_job(MPI_Comm comm, std::string_view what);

}  // namespace lookback::mpi::detail
