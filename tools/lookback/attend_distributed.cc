#include "attend_distributed.hpp"

#include <fmt/format.h>

#include <cstring>
#include <iostream>
#include <limits>

#include "common.hpp"
#include "lookback/error.hpp"

#ifdef LOOKBACK_HAVE_MPI
#include "lookback/kv_cache.hpp"
#include "lookback/mpi.hpp"
#endif

namespace lookback::cli {

bool is_distributed_mode(std::string_view mode) {
  return mode == "ring" || mode == "sharded-decode";
}

#ifndef LOOKBACK_HAVE_MPI

int run_distributed_attend(const DistributedAttend& options, const std::function<AttendInputs()>&) {
  throw Error(
      fmt::format("--mode {}: this lookback was built without MPI (expected prefill, "
                  "decode, chunked, paged or split; or rebuild with libopenmpi-dev)",
                  options.mode));
}

#else

namespace {

// The problem as every rank knows it, broadcast from rank 0.
struct Description {
  std::int64_t batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim;
  std::int64_t storage, causal, window, softcap_bits, scale_bits, alibi, sinks;
};

// The per-head inputs every rank needs, broadcast from rank 0: ALiBi slopes
// and learned sink logits, each (heads,) when given, empty otherwise.
struct PerHead {
  std::vector<float> slopes, sink_logits;

  const float* maybe_slopes() const { return slopes.empty() ? nullptr : slopes.data(); }
  const float* maybe_sink_logits() const {
    return sink_logits.empty() ? nullptr : sink_logits.data();
  }
};

std::int64_t bits_of(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

float float_of(std::int64_t bits) {
  const auto word = static_cast<std::uint32_t>(bits);
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

// MPI counts are int: large arrays go in pieces.
void broadcast_floats(std::vector<float>& data, MPI_Comm comm) {
  constexpr std::size_t kPiece = std::size_t{1} << 28;
  for (std::size_t offset = 0; offset < data.size(); offset += kPiece) {
    MPI_Bcast(data.data() + offset, static_cast<int>(std::min(kPiece, data.size() - offset)),
              MPI_FLOAT, 0, comm);
  }
}

void send_floats(const std::vector<float>& data, int destination, MPI_Comm comm) {
  constexpr std::size_t kPiece = std::size_t{1} << 28;
  for (std::size_t offset = 0; offset < data.size(); offset += kPiece) {
    MPI_Send(data.data() + offset, static_cast<int>(std::min(kPiece, data.size() - offset)),
             MPI_FLOAT, destination, 0, comm);
  }
}

void receive_floats(std::vector<float>& data, int source, MPI_Comm comm) {
  constexpr std::size_t kPiece = std::size_t{1} << 28;
  for (std::size_t offset = 0; offset < data.size(); offset += kPiece) {
    MPI_Recv(data.data() + offset, static_cast<int>(std::min(kPiece, data.size() - offset)),
             MPI_FLOAT, source, 0, comm, MPI_STATUS_IGNORE);
  }
}

std::vector<float> as_floats(const TensorView& view) {
  std::vector<float> values(static_cast<std::size_t>(view.numel()));
  std::size_t index = 0;
  for (std::int64_t a = 0; a < view.shape[0]; ++a) {
    for (std::int64_t b = 0; b < view.shape[1]; ++b) {
      for (std::int64_t c = 0; c < view.shape[2]; ++c) {
        for (std::int64_t d = 0; d < view.shape[3]; ++d) {
          values[index++] = load_as_float(view.data, view.dtype, view.offset(a, b, c, d));
        }
      }
    }
  }
  return values;
}

struct Outputs {
  std::vector<float> out;  // (batch, seqlen_q, heads, head_dim), on rank 0
  std::vector<float> lse;  // (batch, heads, seqlen_q), on rank 0
};

// Where this rank stands in a ring run: the communicator, its rank, and the
// zigzag layout of the sequence over the ranks.
struct RingPlace {
  MPI_Comm comm;
  int rank = 0;
  mpi::ZigzagLayout layout;
};

// This rank's zigzag rows (ZigzagLayout::local_seqlen of them) as f32.
struct LocalRows {
  std::int64_t local = 0;
  std::vector<float> q;     // (batch, local, heads, head_dim)
  std::vector<float> k, v;  // (batch, local, kv_heads, head_dim)
  std::vector<float> out;   // (batch, local, heads, head_dim)
  std::vector<float> lse;   // (batch, heads, local)
};

// Rank 0 sends every rank its zigzag rows of q, k and v.
LocalRows distribute_rows(const Description& d, const RingPlace& place, AttendInputs& inputs) {
  const mpi::ZigzagLayout& layout = place.layout;
  LocalRows rows;
  rows.local = layout.local_seqlen(place.rank);
  rows.q.resize(static_cast<std::size_t>(d.batch * rows.local * d.heads * d.head_dim));
  rows.k.resize(static_cast<std::size_t>(d.batch * rows.local * d.kv_heads * d.head_dim));
  rows.v.resize(rows.k.size());
  if (place.rank == 0) {
    for (int r = layout.ranks - 1; r >= 0; --r) {
      std::vector<float> rq = mpi::gather_local_rows(inputs.params.q, layout, r);
      std::vector<float> rk = mpi::gather_local_rows(inputs.params.k, layout, r);
      std::vector<float> rv = mpi::gather_local_rows(inputs.params.v, layout, r);
      if (r == 0) {
        rows.q = std::move(rq), rows.k = std::move(rk), rows.v = std::move(rv);
      } else {
        send_floats(rq, r, place.comm);
        send_floats(rk, r, place.comm);
        send_floats(rv, r, place.comm);
      }
    }
    inputs.arrays.clear();  // the inputs' memory is not needed any more
  } else {
    receive_floats(rows.q, 0, place.comm);
    receive_floats(rows.k, 0, place.comm);
    receive_floats(rows.v, 0, place.comm);
  }
  return rows;
}

// The ring's arguments over this rank's rows, the settings as described.
mpi::RingParams ring_params(const Description& d, const PerHead& per_head, LocalRows& rows) {
  const std::int64_t local = rows.local;
  return {
      .q = make_view(rows.q.data(), DType::kF32, {d.batch, local, d.heads, d.head_dim}),
      .k = make_view(rows.k.data(), DType::kF32, {d.batch, local, d.kv_heads, d.head_dim}),
      .v = make_view(rows.v.data(), DType::kF32, {d.batch, local, d.kv_heads, d.head_dim}),
      .out = make_mutable_view(rows.out.data(), DType::kF32, {d.batch, local, d.heads, d.head_dim}),
      .maybe_lse = make_mutable_view(rows.lse.data(), DType::kF32, {d.batch, d.heads, local}),
      .maybe_alibi_slopes = per_head.maybe_slopes(),
      .maybe_sink_logits = per_head.maybe_sink_logits(),
      .seqlen = d.seqlen_q,
      .scale = d.scale_bits >= 0 ? std::optional<float>(float_of(d.scale_bits)) : std::nullopt,
      .softcap = float_of(d.softcap_bits),
      .mask = {.causal = static_cast<Causal>(d.causal),
               .window_left = d.window >= 0 ? std::optional<std::int64_t>(d.window) : std::nullopt},
      .storage = static_cast<DType>(d.storage)};
}

// Rank 0 collects every rank's rows of out and lse into the whole sequence's;
// the other ranks send theirs and return empty outputs.
Outputs collect_rows(const Description& d, const RingPlace& place, const LocalRows& rows) {
  const mpi::ZigzagLayout& layout = place.layout;
  Outputs result;
  if (place.rank != 0) {
    send_floats(rows.out, 0, place.comm);
    send_floats(rows.lse, 0, place.comm);
    return result;
  }
  result.out.resize(static_cast<std::size_t>(d.batch * d.seqlen_q * d.heads * d.head_dim));
  result.lse.resize(static_cast<std::size_t>(d.batch * d.heads * d.seqlen_q));
  const MutableTensorView full = make_mutable_view(
      result.out.data(), DType::kF32, {d.batch, d.seqlen_q, d.heads, d.head_dim}, "out");
  for (int r = 0; r < layout.ranks; ++r) {
    const std::int64_t local = layout.local_seqlen(r);
    std::vector<float> r_out =
        r == 0
            ? rows.out
            : std::vector<float>(static_cast<std::size_t>(d.batch * local * d.heads * d.head_dim));
    std::vector<float> r_lse =
        r == 0 ? rows.lse : std::vector<float>(static_cast<std::size_t>(d.batch * d.heads * local));
    if (r != 0) {
      receive_floats(r_out, r, place.comm);
      receive_floats(r_lse, r, place.comm);
    }
    mpi::scatter_local_rows(r_out.data(), layout, r, full);
    for (std::int64_t bh = 0; bh < d.batch * d.heads; ++bh) {
      std::int64_t row = 0;
      for (const KeyRange& chunk : layout.rank_chunks(r)) {
        for (std::int64_t i = chunk.begin; i < chunk.end; ++i, ++row) {
          result.lse[static_cast<std::size_t>(bh * d.seqlen_q + i)] =
              r_lse[static_cast<std::size_t>(bh * local + row)];
        }
      }
    }
  }
  return result;
}

Outputs run_ring(const Description& d, const PerHead& per_head, AttendInputs& inputs,
                 const DistributedAttend& options, MPI_Comm comm) {
  int rank = 0, ranks = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &ranks);
  if (d.seqlen_q != d.seqlen_k) {
    throw Error(
        fmt::format("--mode ring: seqlen_q {} and seqlen_k {} differ (expected one "
                    "sequence: q, k and v of the same length)",
                    d.seqlen_q, d.seqlen_k));
  }
  const RingPlace place{
      .comm = comm, .rank = rank, .layout = {.seqlen = d.seqlen_q, .ranks = ranks}};
  LocalRows rows = distribute_rows(d, place, inputs);
  rows.out.resize(rows.q.size());
  rows.lse.resize(static_cast<std::size_t>(d.batch * d.heads * rows.local));
  Context context(options.threads);
  mpi::ring_attend(ring_params(d, per_head, rows), comm, context);
  return collect_rows(d, place, rows);
}

// The mode's own rules, checked on every rank from the shared description
// before any K/V moves.
void check_sharded_decode(const Description& d) {
  if (static_cast<Causal>(d.causal) != Causal::kBottomRight) {
    throw Error(
        fmt::format("--causal: {} (--mode sharded-decode keeps a KV cache, which needs "
                    "bottom-right alignment: new tokens come after the cached ones)",
                    causal_name(static_cast<Causal>(d.causal))));
  }
  if (d.seqlen_q > d.seqlen_k) {
    throw Error(
        fmt::format("--q: seqlen_q {} > seqlen_k {} (--mode sharded-decode appends each "
                    "query's own key, so expected seqlen_q <= seqlen_k)",
                    d.seqlen_q, d.seqlen_k));
  }
  if (is_quantized(static_cast<DType>(d.storage))) {
    // The sharded cache would refuse it once built, after K/V had moved.
    throw Error(fmt::format("--dtype: {} (expected f32, f16 or bf16: --mode "
                            "sharded-decode stores no 8-bit K/V; --mode ring, decode and paged do)",
                            dtype_name(static_cast<DType>(d.storage))));
  }
}

Outputs run_sharded_decode(const Description& d, const PerHead& per_head, AttendInputs& inputs,
                           const DistributedAttend& options, MPI_Comm comm) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  check_sharded_decode(d);
  // Every rank gets K and V (each keeps the positions it owns); Q stays on rank 0.
  std::vector<float> k(static_cast<std::size_t>(d.batch * d.seqlen_k * d.kv_heads * d.head_dim));
  std::vector<float> v(k.size()), q;
  if (rank == 0) {
    k = as_floats(inputs.params.k);
    v = as_floats(inputs.params.v);
    q = as_floats(inputs.params.q);
    inputs.arrays.clear();
  }
  broadcast_floats(k, comm);
  broadcast_floats(v, comm);

  Outputs result;
  if (rank == 0) {
    result.out.resize(static_cast<std::size_t>(d.batch * d.seqlen_q * d.heads * d.head_dim));
    result.lse.resize(static_cast<std::size_t>(d.batch * d.heads * d.seqlen_q));
  }
  const DecodeOptions decode{
      .scale = d.scale_bits >= 0 ? std::optional<float>(float_of(d.scale_bits)) : std::nullopt,
      .softcap = float_of(d.softcap_bits),
      .window_left = d.window >= 0 ? std::optional<std::int64_t>(d.window) : std::nullopt,
      .maybe_alibi_slopes = per_head.maybe_slopes(),
      .maybe_sink_logits = per_head.maybe_sink_logits()};
  Context context(options.threads);
  const std::int64_t prompt = d.seqlen_k - d.seqlen_q;
  for (std::int64_t b = 0; b < d.batch; ++b) {
    mpi::ShardedKvCache cache(
        {.kv_heads = d.kv_heads, .head_dim = d.head_dim, .storage = static_cast<DType>(d.storage)},
        options.segment, comm);
    const TensorView k_rows = make_view(k.data() + b * d.seqlen_k * d.kv_heads * d.head_dim,
                                        DType::kF32, {d.seqlen_k, d.kv_heads, d.head_dim}, "k");
    const TensorView v_rows = make_view(v.data() + b * d.seqlen_k * d.kv_heads * d.head_dim,
                                        DType::kF32, {d.seqlen_k, d.kv_heads, d.head_dim}, "v");
    if (prompt > 0) cache.append(slice(k_rows, 0, 0, prompt), slice(v_rows, 0, 0, prompt));
    std::vector<float> out(static_cast<std::size_t>(d.heads * d.head_dim));
    std::vector<float> lse(static_cast<std::size_t>(d.heads));
    for (std::int64_t i = 0; i < d.seqlen_q; ++i) {
      cache.append(slice(k_rows, 0, prompt + i, 1), slice(v_rows, 0, prompt + i, 1));
      TensorView q_row;
      if (rank == 0) {
        q_row = make_view(q.data() + ((b * d.seqlen_q + i) * d.heads) * d.head_dim, DType::kF32,
                          {1, d.heads, d.head_dim}, "q");
      }
      cache.attend({.q = q_row,
                    .out = make_mutable_view(out.data(), DType::kF32, {1, d.heads, d.head_dim}),
                    .maybe_lse = make_mutable_view(lse.data(), DType::kF32, {d.heads, 1})},
                   decode, context);
      if (rank == 0) {
        std::copy(out.begin(), out.end(),
                  result.out.begin() + ((b * d.seqlen_q + i) * d.heads) * d.head_dim);
        for (std::int64_t h = 0; h < d.heads; ++h) {
          result.lse[static_cast<std::size_t>((b * d.heads + h) * d.seqlen_q + i)] =
              lse[static_cast<std::size_t>(h)];
        }
      }
    }
  }
  return result;
}

// Rank 0's slopes and sink logits, as the description says they are given.
PerHead broadcast_per_head(const Description& d, const AttendInputs& inputs, MPI_Comm comm) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  PerHead per_head;
  const auto heads = static_cast<std::size_t>(d.heads);
  per_head.slopes.resize(d.alibi ? heads : 0);
  per_head.sink_logits.resize(d.sinks ? heads : 0);
  if (rank == 0) {
    if (d.alibi) per_head.slopes = inputs.slopes;
    if (d.sinks) per_head.sink_logits = inputs.sink_logits;
  }
  broadcast_floats(per_head.slopes, comm);
  broadcast_floats(per_head.sink_logits, comm);
  return per_head;
}

void run(const DistributedAttend& options, const std::function<AttendInputs()>& read_inputs,
         MPI_Comm comm) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  if (options.segment < 1) {
    throw Error(fmt::format("--segment: {} (expected >= 1)", options.segment));
  }
  AttendInputs inputs;
  Description d{};
  mpi::checked_on_every_rank(comm, [&] {
    if (rank != 0) return;
    inputs = read_inputs();
    const AttentionParams& p = inputs.params;
    d = {.batch = p.q.shape[0],
         .seqlen_q = p.q.shape[1],
         .seqlen_k = p.k.shape[1],
         .heads = p.q.shape[2],
         .kv_heads = p.k.shape[2],
         .head_dim = p.q.shape[3],
         .storage = static_cast<std::int64_t>(p.storage),
         .causal = static_cast<std::int64_t>(p.mask.causal),
         .window = p.mask.window_left.value_or(-1),
         .softcap_bits = bits_of(p.softcap),
         .scale_bits = p.scale ? bits_of(*p.scale) : -1,
         .alibi = p.maybe_alibi_slopes != nullptr ? 1 : 0,
         .sinks = p.maybe_sink_logits != nullptr ? 1 : 0};
  });
  MPI_Bcast(&d, sizeof d / sizeof(std::int64_t), MPI_INT64_T, 0, comm);
  const PerHead per_head = broadcast_per_head(d, inputs, comm);

  const Outputs outputs = options.mode == "ring"
                              ? run_ring(d, per_head, inputs, options, comm)
                              : run_sharded_decode(d, per_head, inputs, options, comm);
  // Rank 0 writes (each file atomically); a failure is every rank's.
  mpi::checked_on_every_rank(comm, [&] {
    if (rank != 0) return;
    write_npy(options.out_path, DType::kF32,
              std::vector<std::int64_t>{d.batch, d.seqlen_q, d.heads, d.head_dim},
              outputs.out.data());
    if (!options.lse_path.empty()) {
      write_npy(options.lse_path, DType::kF32,
                std::vector<std::int64_t>{d.batch, d.heads, d.seqlen_q}, outputs.lse.data());
    }
  });
}

}  // namespace

int run_distributed_attend(const DistributedAttend& options,
                           const std::function<AttendInputs()>& read_inputs) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) MPI_Init(nullptr, nullptr);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  int code = kExitOk;
  try {
    run(options, read_inputs, MPI_COMM_WORLD);
  } catch (const Error& error) {
    // Every rank holds the same agreed error: rank 0 says it once.
    if (rank == 0) std::cerr << "lookback: " << error.what() << "\n";
    code = kExitUsage;
  } catch (const std::exception& error) {
    // Not agreed on (memory exhausted outside the checked steps): the other
    // ranks may be waiting for this one, so the whole job ends here.
    std::cerr << "lookback: rank " << rank << ": " << error.what() << "\n";
    MPI_Abort(MPI_COMM_WORLD, kExitUsage);
  }
  if (!initialized) MPI_Finalize();
  return code;
}

#endif

}  // namespace lookback::cli
