#include "mpi/common.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "lookback/error.hpp"

namespace lookback::mpi::detail {

void store_as(float value, DType storage, std::uint8_t* destination, std::int64_t index) {
  switch (storage) {
    case DType::kF16: {
      const std::uint16_t bits = f32_to_f16(value);
      std::memcpy(destination + index * 2, &bits, 2);
      break;
    }
    case DType::kBF16: {
      const std::uint16_t bits = f32_to_bf16(value);
      std::memcpy(destination + index * 2, &bits, 2);
      break;
    }
    default:
      std::memcpy(destination + index * 4, &value, 4);
      break;
  }
}

void pack_rows(const TensorView& view, std::int64_t begin, std::int64_t count, DType storage,
               std::uint8_t* destination) {
  std::int64_t index = 0;
  for (std::int64_t b = 0; b < view.shape[0]; ++b) {
    for (std::int64_t row = begin; row < begin + count; ++row) {
      for (std::int64_t h = 0; h < view.shape[2]; ++h) {
        const std::int64_t base = view.offset(b, row, h, 0);
        for (std::int64_t e = 0; e < view.shape[3]; ++e) {
          store_as(load_as_float(view.data, view.dtype, base + e * view.strides[3]), storage,
                   destination, index++);
        }
      }
    }
  }
}

std::int64_t float_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

void check_same_everywhere(MPI_Comm comm,
                           const std::vector<std::pair<std::string_view, std::int64_t>>& settings) {
  const int count = static_cast<int>(settings.size());
  std::vector<std::int64_t> low(settings.size()), high(settings.size());
  for (std::size_t i = 0; i < settings.size(); ++i) low[i] = settings[i].second;
  high = low;
  MPI_Allreduce(MPI_IN_PLACE, low.data(), count, MPI_INT64_T, MPI_MIN, comm);
  MPI_Allreduce(MPI_IN_PLACE, high.data(), count, MPI_INT64_T, MPI_MAX, comm);
  for (std::size_t i = 0; i < settings.size(); ++i) {
    if (low[i] != high[i]) {
      throw Error(
          fmt::format("{}: the ranks disagree ({} on one rank, {} on another; expected "
                      "the same value on every rank)",
                      settings[i].first, low[i], high[i]));
    }
  }
}

namespace {
constexpr std::int64_t kPieceBytes = std::int64_t{1} << 30;
}  // namespace

void isend_bytes(const std::uint8_t* data, std::int64_t bytes, int destination, MPI_Comm comm,
                 std::vector<MPI_Request>& requests) {
  int tag = 0;
  for (std::int64_t offset = 0; offset < bytes; offset += kPieceBytes, ++tag) {
    MPI_Request request;
    MPI_Isend(data + offset, static_cast<int>(std::min(kPieceBytes, bytes - offset)), MPI_BYTE,
              destination, tag, comm, &request);
    requests.push_back(request);
  }
}

void irecv_bytes(std::uint8_t* data, std::int64_t bytes, int source, MPI_Comm comm,
                 std::vector<MPI_Request>& requests) {
  int tag = 0;
  for (std::int64_t offset = 0; offset < bytes; offset += kPieceBytes, ++tag) {
    MPI_Request request;
    MPI_Irecv(data + offset, static_cast<int>(std::min(kPieceBytes, bytes - offset)), MPI_BYTE,
              source, tag, comm, &request);
    requests.push_back(request);
  }
}

void abort_job(MPI_Comm comm, std::string_view what) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  std::fprintf(stderr, "lookback: rank %d: %.*s\n", rank, static_cast<int>(what.size()),
               what.data());
  std::fflush(stderr);
  MPI_Abort(comm, 2);
  std::abort();  // MPI_Abort does not return
}

}  // namespace lookback::mpi::detail
