// Agreement on errors: a rank that fails a check must not leave the others
// waiting in a collective it will never join, so every check that can fail
// on one rank alone is followed by agree(), and all ranks throw together.
#include <fmt/format.h>

#include <string>

#include "lookback/mpi.hpp"

namespace lookback::mpi {

void agree(MPI_Comm comm, const std::optional<Error>& local_error) {
  int rank = 0;
  int size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  const int mine = local_error ? rank : size;
  int failed = size;
  MPI_Allreduce(&mine, &failed, 1, MPI_INT, MPI_MIN, comm);
  if (failed == size) return;
  // The lowest failing rank tells the others its code and message.
  int header[2] = {0, 0};  // code, message length
  std::string message;
  if (rank == failed) {
    message = local_error->what();
    header[0] = static_cast<int>(local_error->code());
    header[1] = static_cast<int>(message.size());
  }
  MPI_Bcast(header, 2, MPI_INT, failed, comm);
  message.resize(static_cast<std::size_t>(header[1]));
  MPI_Bcast(message.data(), header[1], MPI_CHAR, failed, comm);
  if (failed != 0) message = fmt::format("rank {}: {}", failed, message);
  throw Error(static_cast<ErrorCode>(header[0]), message);
}

}  // namespace lookback::mpi
