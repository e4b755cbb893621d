// Context-parallel attention under mpirun (tests/mpi/CMakeLists.txt runs this
// program with P = 1, 2, 3 and 4 ranks). Every rank builds the same random
// problem from the same seed, runs its share, and checks its own rows
// against the float64 reference; the ring's and the sharded cache's results
// must also equal single-process attention, be causal across ranks, and (for
// decode) be bit-identical on every rank.
#include "lookback/mpi.hpp"

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "lookback/kv_cache.hpp"
#include "testing/testing.hpp"

namespace lookback::testing {
namespace {

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

int world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

// The reference for query rows [begin, end) of the whole problem (keys as the
// mask lets them see), in the ring's local layout.
struct LocalReference {
  std::vector<double> out;  // (batch, local, heads, dim)
  std::vector<double> lse;  // (batch, heads, local)
};

LocalReference local_reference(Problem& full, const mpi::ZigzagLayout& layout, int rank) {
  const ProblemSpec& spec = full.spec;
  const std::int64_t local = layout.local_seqlen(rank);
  LocalReference result;
  result.out.resize(static_cast<std::size_t>(spec.batch * local * spec.heads * spec.head_dim));
  result.lse.resize(static_cast<std::size_t>(spec.batch * spec.heads * local));
  std::int64_t row0 = 0;
  for (const KeyRange& chunk : layout.rank_chunks(rank)) {
    if (chunk.empty()) continue;
    AttentionParams params = full.params();
    params.q = slice(params.q, 1, chunk.begin, chunk.size());
    params.out = slice(params.out, 1, chunk.begin, chunk.size());
    params.maybe_lse = slice(params.maybe_lse, 2, chunk.begin, chunk.size());
    if (spec.mask.causal == Causal::kNone) {
      // Every key visible; ALiBi needs the queries' true positions.
      params.mask = {.causal = Causal::kNone, .query_offset = chunk.begin};
    } else {
      // Bottom-right over keys [0, chunk.end): query i at position chunk.begin + i.
      params.k = slice(params.k, 1, 0, chunk.end);
      params.v = slice(params.v, 1, 0, chunk.end);
      params.mask = {.causal = Causal::kBottomRight, .window_left = spec.mask.window_left};
    }
    const ReferenceResult reference = reference_attention(params);
    const std::int64_t rows = chunk.size();
    for (std::int64_t b = 0; b < spec.batch; ++b) {
      for (std::int64_t i = 0; i < rows; ++i) {
        for (std::int64_t h = 0; h < spec.heads; ++h) {
          for (std::int64_t e = 0; e < spec.head_dim; ++e) {
            result.out[static_cast<std::size_t>(
                (((b * local + row0 + i) * spec.heads + h) * spec.head_dim) + e)] =
                reference.out[static_cast<std::size_t>(
                    ((b * rows + i) * spec.heads + h) * spec.head_dim + e)];
          }
          result.lse[static_cast<std::size_t>((b * spec.heads + h) * local + row0 + i)] =
              reference.lse[static_cast<std::size_t>((b * spec.heads + h) * rows + i)];
        }
      }
    }
    row0 += rows;
  }
  return result;
}

::testing::AssertionResult close_to(const std::vector<float>& out, const std::vector<float>& lse,
                                    const std::vector<double>& expected_out,
                                    const std::vector<double>& expected_lse, DType storage) {
  const double tolerance = tolerance_for(storage);
  // As the single-process tests: LSE within kLseTolerance for f32, 0.05 for
  // bf16/f16 (whose inputs are rounded before the scores are formed).
  const double lse_tolerance = storage == DType::kF32 ? kLseTolerance : 0.05;
  for (float value : out) {
    if (!std::isfinite(value)) return ::testing::AssertionFailure() << "non-finite output";
  }
  const double error = relative_l2(out, expected_out);
  if (!(error <= tolerance)) {
    return ::testing::AssertionFailure() << "relative L2 error " << error << " > " << tolerance;
  }
  for (std::size_t row = 0; row < expected_lse.size(); ++row) {
    if (std::isinf(expected_lse[row])) {
      if (!(std::isinf(lse[row]) && lse[row] < 0)) {
        return ::testing::AssertionFailure() << "empty row " << row << " has lse " << lse[row];
      }
      continue;
    }
    if (!(std::fabs(lse[row] - expected_lse[row]) <= lse_tolerance)) {
      return ::testing::AssertionFailure()
             << "lse of row " << row << ": " << lse[row] << " vs " << expected_lse[row];
    }
  }
  return ::testing::AssertionSuccess();
}

struct RingRun {
  std::vector<float> out, lse;
  mpi::RingStats stats;
};

RingRun run_ring(Problem& full, Context& context) {
  const ProblemSpec& spec = full.spec;
  const mpi::ZigzagLayout layout{.seqlen = spec.seqlen_q, .ranks = world_size()};
  const int rank = world_rank();
  const AttentionParams whole = full.params();
  const std::vector<float> q = mpi::gather_local_rows(whole.q, layout, rank);
  const std::vector<float> k = mpi::gather_local_rows(whole.k, layout, rank);
  const std::vector<float> v = mpi::gather_local_rows(whole.v, layout, rank);
  const std::int64_t local = layout.local_seqlen(rank);
  RingRun run;
  run.out.assign(static_cast<std::size_t>(spec.batch * local * spec.heads * spec.head_dim), NAN);
  run.lse.assign(static_cast<std::size_t>(spec.batch * spec.heads * local), NAN);
  run.stats = mpi::ring_attend(
      {.q = make_view(q.data(), DType::kF32, {spec.batch, local, spec.heads, spec.head_dim}),
       .k = make_view(k.data(), DType::kF32, {spec.batch, local, spec.kv_heads, spec.head_dim}),
       .v = make_view(v.data(), DType::kF32, {spec.batch, local, spec.kv_heads, spec.head_dim}),
       .out = make_mutable_view(run.out.data(), DType::kF32,
                                {spec.batch, local, spec.heads, spec.head_dim}),
       .maybe_lse = make_mutable_view(run.lse.data(), DType::kF32, {spec.batch, spec.heads, local}),
       .maybe_alibi_slopes = whole.maybe_alibi_slopes,
       .maybe_sink_logits = whole.maybe_sink_logits,
       .seqlen = spec.seqlen_q,
       .scale = spec.scale,
       .softcap = spec.softcap,
       .mask = spec.mask,
       .storage = spec.storage},
      MPI_COMM_WORLD, context);
  return run;
}

struct RingCase {
  std::int64_t seqlen;
  ProblemSpec spec;
};

std::vector<RingCase> ring_cases() {
  std::vector<RingCase> cases;
  const ProblemSpec gqa{.heads = 4, .kv_heads = 2, .head_dim = 24};
  for (std::int64_t n : {1, 5, 64, 1000, 4097}) {
    ProblemSpec spec = gqa;
    cases.push_back({n, spec});  // causal
    spec.mask.window_left = 37;
    spec.softcap = 4.0f;
    spec.alibi = true;
    spec.head_dim = 17;
    cases.push_back({n, spec});  // window, softcap, ALiBi
    if (n <= 1000) {
      ProblemSpec half = gqa;
      half.storage = DType::kBF16;
      half.mask.window_left = 100;
      half.alibi = true;
      cases.push_back({n, half});
      half.storage = DType::kF16;
      half.mask = {.causal = Causal::kTopLeft};
      half.softcap = 3.0f;
      half.heads = 3;
      half.kv_heads = 1;
      cases.push_back({n, half});
      ProblemSpec none{.batch = 2, .heads = 2, .kv_heads = 2, .head_dim = 8};
      none.mask.causal = Causal::kNone;
      none.alibi = true;
      cases.push_back({n, none});
    }
  }
  return cases;
}

class RingTest : public ::testing::TestWithParam<RingCase> {};

TEST_P(RingTest, EqualsTheReferenceAndSingleProcessAttention) {
  RingCase c = GetParam();
  c.spec.seqlen_q = c.spec.seqlen_k = c.seqlen;
  Problem full = make_problem(c.spec, 1000 + static_cast<std::uint64_t>(c.seqlen));
  Context context(1);
  const RingRun run = run_ring(full, context);
  const mpi::ZigzagLayout layout{.seqlen = c.seqlen, .ranks = world_size()};
  const LocalReference expected = local_reference(full, layout, world_rank());
  EXPECT_TRUE(close_to(run.out, run.lse, expected.out, expected.lse, c.spec.storage))
      << c.spec.describe() << " on rank " << world_rank() << " of " << world_size();

  // The same rows from one process: the result does not depend on P beyond rounding.
  attend(full.params(), context);
  const TensorView single_out = make_view(full.out.data(), DType::kF32,
                                          {c.spec.batch, c.seqlen, c.spec.heads, c.spec.head_dim});
  const std::vector<float> single = mpi::gather_local_rows(single_out, layout, world_rank());
  std::vector<double> single_d(single.begin(), single.end());
  EXPECT_LE(relative_l2(run.out, single_d), tolerance_for(c.spec.storage)) << c.spec.describe();
}

INSTANTIATE_TEST_SUITE_P(Sweep, RingTest, ::testing::ValuesIn(ring_cases()));

// Single-process lookback::attend of `problem` (its storage, its sink
// logits) on this rank's rows, in the ring's local layout.
struct SingleProcessRows {
  std::vector<double> out;  // (batch, local, heads, dim)
  std::vector<double> lse;  // (batch, heads, local)
};

SingleProcessRows single_process_rows(Problem problem) {
  const ProblemSpec& spec = problem.spec;
  const mpi::ZigzagLayout layout{.seqlen = spec.seqlen_q, .ranks = world_size()};
  Context context(1);
  attend(problem.params(), context);
  const TensorView out = make_view(problem.out.data(), DType::kF32,
                                   {spec.batch, spec.seqlen_q, spec.heads, spec.head_dim});
  const std::vector<float> local_out = mpi::gather_local_rows(out, layout, world_rank());
  SingleProcessRows rows{.out = {local_out.begin(), local_out.end()}};
  for (std::int64_t bh = 0; bh < spec.batch * spec.heads; ++bh) {
    for (const KeyRange& chunk : layout.rank_chunks(world_rank())) {
      for (std::int64_t i = chunk.begin; i < chunk.end; ++i) {
        rows.lse.push_back(problem.lse[static_cast<std::size_t>(bh * spec.seqlen_q + i)]);
      }
    }
  }
  return rows;
}

// The largest |actual - expected| over rows (the LSE's error).
double max_abs_difference(const std::vector<float>& actual, const std::vector<double>& expected) {
  double largest = 0.0;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const double difference = std::fabs(static_cast<double>(actual[i]) - expected[i]);
    largest = std::isnan(difference) ? std::numeric_limits<double>::infinity()
                                     : std::max(largest, difference);
  }
  return largest;
}

// The problem with its sink logits dropped, or moved by log 2 (the same as
// adding each sink twice: e^(s + log 2) = 2 e^s).
Problem without_sinks(Problem problem) {
  problem.spec.sinks = false;
  problem.sink_logits.clear();
  return problem;
}

Problem with_sinks_twice(Problem problem) {
  for (float& logit : problem.sink_logits) logit += std::log(2.0f);
  return problem;
}

// Learned sink logits join each row's denominator once, after the ring's
// last merge: the ring equals the float64 reference and single-process
// attention with the same sinks, and lies far beyond the tolerance from the
// results with the sinks dropped or added twice, so either mistake fails.
TEST(RingSinks, AreAddedOnceAsSingleProcessAttentionAddsThem) {
  std::vector<ProblemSpec> specs;
  ProblemSpec spec{.seqlen_q = 203, .seqlen_k = 203, .heads = 4, .kv_heads = 2, .head_dim = 24};
  spec.sinks = true;
  specs.push_back(spec);
  spec.seqlen_q = spec.seqlen_k = 1000;
  spec.mask.window_left = 37;
  spec.softcap = 4.0f;
  spec.alibi = true;
  spec.head_dim = 17;
  specs.push_back(spec);
  ProblemSpec tiny{.seqlen_q = 5, .seqlen_k = 5, .heads = 2, .kv_heads = 1, .head_dim = 8};
  tiny.sinks = true;  // fewer tokens than chunks: some ranks hold none
  specs.push_back(tiny);
  for (const ProblemSpec& s : specs) {
    Problem full = make_problem(s, 3000 + static_cast<std::uint64_t>(s.seqlen_q));
    Context context(1);
    const RingRun run = run_ring(full, context);
    const mpi::ZigzagLayout layout{.seqlen = s.seqlen_q, .ranks = world_size()};
    const LocalReference reference = local_reference(full, layout, world_rank());
    EXPECT_TRUE(close_to(run.out, run.lse, reference.out, reference.lse, s.storage))
        << s.describe() << " on rank " << world_rank();
    const SingleProcessRows once = single_process_rows(full);
    EXPECT_LE(relative_l2(run.out, once.out), kF32Tolerance) << s.describe();
    EXPECT_LE(max_abs_difference(run.lse, once.lse), kLseTolerance) << s.describe();
    if (run.out.empty()) continue;  // this rank holds no rows
    for (const Problem& wrong : {without_sinks(full), with_sinks_twice(full)}) {
      const SingleProcessRows rows = single_process_rows(wrong);
      EXPECT_GT(relative_l2(run.out, rows.out), 10 * kF32Tolerance) << s.describe();
      EXPECT_GT(max_abs_difference(run.lse, rows.lse), 10 * kLseTolerance) << s.describe();
    }
  }
}

// 8-bit K/V: the blocks travel as f32 and every rank quantizes the rows it
// receives as a single-process call does (per (token, kv head) row), so both
// compute in f32 on the same dequantized values and differ only in the order
// of the f32 sums and the LSE merges. The f32 tolerances of the other ring
// tests therefore apply (kF32Tolerance, kLseTolerance), not kQuantTolerance,
// which bounds the distance to the float64 reference on dequantized values.
// The quantization error itself (about 1e-2 relative) lies far beyond them:
// a ring that attended unquantized K/V fails.
TEST(RingQuantized, EqualsSingleProcessAttentionWithTheSameStorage) {
  for (const DType storage : {DType::kI8, DType::kFP8E4M3, DType::kFP8E5M2}) {
    std::vector<ProblemSpec> specs;
    ProblemSpec spec{.seqlen_q = 203, .seqlen_k = 203, .heads = 4, .kv_heads = 2, .head_dim = 24};
    spec.storage = storage;
    specs.push_back(spec);
    spec.seqlen_q = spec.seqlen_k = 1000;
    spec.mask.window_left = 37;
    spec.softcap = 4.0f;
    spec.alibi = true;
    spec.sinks = true;
    spec.head_dim = 17;
    specs.push_back(spec);
    ProblemSpec none{.batch = 2, .seqlen_q = 64, .seqlen_k = 64, .heads = 2, .kv_heads = 2,
                     .head_dim = 8};
    none.mask.causal = Causal::kNone;
    none.storage = storage;
    specs.push_back(none);
    for (const ProblemSpec& s : specs) {
      Problem full = make_problem(s, 4000 + static_cast<std::uint64_t>(s.seqlen_q));
      Context context(1);
      const RingRun run = run_ring(full, context);
      const SingleProcessRows same = single_process_rows(full);
      EXPECT_LE(relative_l2(run.out, same.out), kF32Tolerance) << s.describe();
      EXPECT_LE(max_abs_difference(run.lse, same.lse), kLseTolerance) << s.describe();
      Problem unquantized = full;
      unquantized.spec.storage = DType::kF32;
      EXPECT_GT(relative_l2(run.out, single_process_rows(unquantized).out), 10 * kF32Tolerance)
          << s.describe();
    }
  }
}

// With 8-bit storage the blocks travel as f32: the same bytes as an f32 ring.
TEST(RingQuantized, BlocksTravelAsF32) {
  ProblemSpec spec{.seqlen_q = 203, .seqlen_k = 203, .heads = 4, .kv_heads = 2, .head_dim = 24};
  Problem f32 = make_problem(spec, 5);
  spec.storage = DType::kI8;
  Problem int8 = make_problem(spec, 5);
  Context context(1);
  EXPECT_EQ(run_ring(int8, context).stats.bytes_sent, run_ring(f32, context).stats.bytes_sent);
}

// Runs the ring on `spec` (seqlen 301) with the future after a few positions
// perturbed: local rows at positions <= that must not move, bit for bit.
void expect_ring_causal(ProblemSpec spec) {
  const int rank = world_rank();
  spec.seqlen_q = spec.seqlen_k = 301;
  const mpi::ZigzagLayout layout{.seqlen = 301, .ranks = world_size()};
  for (std::int64_t last : {0, 77, 150, 299}) {
    Problem before = make_problem(spec, 7);
    Problem after = make_problem(spec, 7);
    perturb_future(after, last, 99);
    Context context(1);
    const RingRun a = run_ring(before, context);
    const RingRun b = run_ring(after, context);
    std::int64_t row = 0;
    const std::int64_t local = layout.local_seqlen(rank);
    for (const KeyRange& chunk : layout.rank_chunks(rank)) {
      for (std::int64_t i = chunk.begin; i < chunk.end; ++i, ++row) {
        if (i > last) continue;
        for (std::int64_t h = 0; h < spec.heads; ++h) {
          const auto o = static_cast<std::size_t>((row * spec.heads + h) * spec.head_dim);
          EXPECT_EQ(0, std::memcmp(&a.out[o], &b.out[o], sizeof(float) * spec.head_dim))
              << spec.describe() << ": position " << i << " head " << h
              << " moved when positions > " << last << " changed (rank " << rank << ")";
          const auto l = static_cast<std::size_t>(h * local + row);
          EXPECT_EQ(0, std::memcmp(&a.lse[l], &b.lse[l], sizeof(float)))
              << spec.describe() << ": lse of position " << i << " head " << h;
        }
      }
    }
  }
}

TEST(Ring, PerturbingTheFutureLeavesEarlierRowsBitIdentical) {
  ProblemSpec spec{.heads = 2, .kv_heads = 1, .head_dim = 16};
  expect_ring_causal(spec);
  spec.mask.window_left = 20;
  spec.alibi = true;
  expect_ring_causal(spec);
}

TEST(Ring, StaysCausalWithSinkLogits) {
  ProblemSpec spec{.heads = 2, .kv_heads = 1, .head_dim = 16};
  spec.sinks = true;
  expect_ring_causal(spec);
  spec.mask.window_left = 20;
  spec.alibi = true;
  expect_ring_causal(spec);
}

TEST(Ring, StaysCausalWith8BitStorage) {
  ProblemSpec spec{.heads = 2, .kv_heads = 1, .head_dim = 16};
  spec.storage = DType::kI8;
  expect_ring_causal(spec);
  spec.storage = DType::kFP8E5M2;
  spec.mask.window_left = 20;
  spec.alibi = true;
  spec.sinks = true;
  expect_ring_causal(spec);
}

TEST(Ring, SkipsMaskedPairsAndAWindowShortensTheRing) {
  ProblemSpec spec{.seqlen_q = 4000, .seqlen_k = 4000, .heads = 1, .kv_heads = 1, .head_dim = 8};
  spec.mask.window_left = 50;  // far less than a chunk (4000 / 2P >= 500)
  Problem full = make_problem(spec, 3);
  Context context(1);
  const RingRun run = run_ring(full, context);
  const int ranks = world_size();
  // Chunk c sees only chunks c and c - 1: steps 0, 1 and P - 1.
  EXPECT_EQ(run.stats.steps, std::min(ranks, 3));
  // Two diagonal pairs, and each chunk but chunk 0 its predecessor: 4P - 1 calls in all.
  std::int64_t computed = run.stats.pairs_computed;
  MPI_Allreduce(MPI_IN_PLACE, &computed, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_EQ(computed, 4 * ranks - 1);
}

TEST(RingSteps, AreEveryStepWithoutAWindowAndFewWithOne) {
  const mpi::ZigzagLayout layout{.seqlen = 1 << 20, .ranks = 16};
  EXPECT_EQ(mpi::ring_steps(layout, {}).size(), 16u);
  // Chunks of 32768 tokens; a window of 40000 reaches two chunks back.
  const std::vector<int> steps = mpi::ring_steps(layout, {.window_left = 40000});
  EXPECT_EQ(steps, (std::vector<int>{0, 1, 2, 14, 15}));
  // Fewer tokens than chunks: 3 tokens in chunks 10, 21 and 31, held by ranks
  // 10 (positions 0 and 1) and 0 (position 2): only rank 0 needs a block,
  // rank 10's, six steps on.
  EXPECT_EQ(mpi::ring_steps({.seqlen = 3, .ranks = 16}, {}), (std::vector<int>{0, 6}));
  EXPECT_EQ(mpi::ring_steps({.seqlen = 1, .ranks = 16}, {}), std::vector<int>{0});
}

// ---------------------------------------------------------------------------
// Sharded decode.

struct DecodeCase {
  std::int64_t seqlen;
  std::int64_t segment;
  ProblemSpec spec;
};

std::vector<DecodeCase> decode_cases() {
  std::vector<DecodeCase> cases;
  for (std::int64_t n : {1, 5, 64, 1000, 4097}) {
    ProblemSpec spec{.heads = 4, .kv_heads = 2, .head_dim = 24};
    cases.push_back({n, 16, spec});
    spec.mask.window_left = 45;
    spec.softcap = 5.0f;
    spec.alibi = true;
    cases.push_back({n, 7, spec});
    spec.storage = DType::kBF16;
    cases.push_back({n, 128, spec});
    spec.storage = DType::kF16;
    spec.mask.window_left.reset();
    cases.push_back({n, 1, spec});
  }
  return cases;
}

class ShardedDecodeTest : public ::testing::TestWithParam<DecodeCase> {};

TEST_P(ShardedDecodeTest, EqualsTheReferenceOnEveryRankBitForBit) {
  DecodeCase c = GetParam();
  c.spec.seqlen_q = c.spec.seqlen_k = c.seqlen;
  Problem full = make_problem(c.spec, 2000 + static_cast<std::uint64_t>(c.seqlen));
  const ProblemSpec& spec = full.spec;
  const std::int64_t dim = spec.head_dim;
  mpi::ShardedKvCache cache({.kv_heads = spec.kv_heads, .head_dim = dim, .storage = spec.storage},
                            c.segment, MPI_COMM_WORLD);
  Context context(1);
  const AttentionParams whole = full.params();
  auto rows = [&](const TensorView& view, std::int64_t begin, std::int64_t count) {
    return select(slice(view, 1, begin, count), 0, 0);  // (count, heads, dim)
  };
  // The prompt in one append, then steps of 1, 2 and 1 tokens (as many as fit).
  std::vector<std::int64_t> steps;
  std::int64_t remaining = c.seqlen;
  for (std::int64_t t : {1, 2, 1}) {
    if (t <= remaining) {
      steps.insert(steps.begin(), t);
      remaining -= t;
    }
  }
  if (remaining > 0) {
    cache.append(rows(whole.k, 0, remaining), rows(whole.v, 0, remaining));
  }
  // The reference for the decoded rows only: they are the last queries,
  // bottom-right aligned against every key.
  const std::int64_t decoded = c.seqlen - remaining;
  AttentionParams last_rows = full.params();
  last_rows.q = slice(last_rows.q, 1, remaining, decoded);
  last_rows.out = slice(last_rows.out, 1, remaining, decoded);
  last_rows.maybe_lse = slice(last_rows.maybe_lse, 2, remaining, decoded);
  const ReferenceResult reference = reference_attention(last_rows);
  std::int64_t position = remaining;
  for (std::int64_t tokens : steps) {
    cache.append(rows(whole.k, position, tokens), rows(whole.v, position, tokens));
    std::vector<float> out(static_cast<std::size_t>(tokens * spec.heads * dim), NAN);
    std::vector<float> lse(static_cast<std::size_t>(spec.heads * tokens), NAN);
    const TensorView q = world_rank() == 0 ? rows(whole.q, position, tokens) : TensorView{};
    cache.attend({.q = q,
                  .out = make_mutable_view(out.data(), DType::kF32, {tokens, spec.heads, dim}),
                  .maybe_lse = make_mutable_view(lse.data(), DType::kF32, {spec.heads, tokens})},
                 {.scale = spec.scale,
                  .softcap = spec.softcap,
                  .window_left = spec.mask.window_left,
                  .maybe_alibi_slopes = whole.maybe_alibi_slopes},
                 context);
    std::vector<double> expected_out(out.size()), expected_lse(lse.size());
    for (std::int64_t t = 0; t < tokens; ++t) {
      for (std::int64_t h = 0; h < spec.heads; ++h) {
        for (std::int64_t e = 0; e < dim; ++e) {
          expected_out[static_cast<std::size_t>((t * spec.heads + h) * dim + e)] =
              reference.out[static_cast<std::size_t>(
                  ((position - remaining + t) * spec.heads + h) * dim + e)];
        }
        expected_lse[static_cast<std::size_t>(h * tokens + t)] =
            reference.lse[static_cast<std::size_t>(h * decoded + position - remaining + t)];
      }
    }
    EXPECT_TRUE(close_to(out, lse, expected_out, expected_lse, spec.storage))
        << spec.describe() << " segment " << c.segment << " step at " << position;
    // Every rank holds the same bits as rank 0.
    std::vector<float> root_out = out;
    MPI_Bcast(root_out.data(), static_cast<int>(root_out.size()), MPI_FLOAT, 0, MPI_COMM_WORLD);
    EXPECT_EQ(0, std::memcmp(root_out.data(), out.data(), out.size() * sizeof(float)))
        << "rank " << world_rank() << " differs from rank 0";
    position += tokens;
  }
  EXPECT_EQ(cache.length(), c.seqlen);
  std::int64_t total = cache.local_length();
  MPI_Allreduce(MPI_IN_PLACE, &total, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_EQ(total, c.seqlen);
}

INSTANTIATE_TEST_SUITE_P(Sweep, ShardedDecodeTest, ::testing::ValuesIn(decode_cases()));

// One step of a single-process KvCache: out (tokens, heads, dim), lse (heads, tokens).
struct StepRows {
  std::vector<double> out, lse;
};

StepRows single_cache_step(const KvCache& cache, const TensorView& q,
                           const DecodeOptions& options) {
  const std::int64_t tokens = q.shape[0], heads = q.shape[1], dim = q.shape[2];
  std::vector<float> out(static_cast<std::size_t>(tokens * heads * dim));
  std::vector<float> lse(static_cast<std::size_t>(heads * tokens));
  Context context(1);
  cache.attend({.q = q,
                .out = make_mutable_view(out.data(), DType::kF32, {tokens, heads, dim}),
                .maybe_lse = make_mutable_view(lse.data(), DType::kF32, {heads, tokens})},
               options, context);
  return {.out = {out.begin(), out.end()}, .lse = {lse.begin(), lse.end()}};
}

// Learned sink logits through the sharded cache: every step equals a
// single-process KvCache given the same options, on every rank bit for bit,
// and lies far beyond the tolerance from the results with the sinks dropped
// or added twice, so either mistake fails.
TEST(ShardedSinks, EqualASingleProcessCacheWithTheSameSinks) {
  std::vector<DecodeCase> cases;
  ProblemSpec spec{.heads = 4, .kv_heads = 2, .head_dim = 24};
  spec.sinks = true;
  cases.push_back({300, 16, spec});
  spec.mask.window_left = 45;
  spec.softcap = 5.0f;
  spec.alibi = true;
  cases.push_back({1000, 7, spec});
  cases.push_back({1, 4, spec});  // one token, one key
  for (DecodeCase& c : cases) {
    c.spec.seqlen_q = c.spec.seqlen_k = c.seqlen;
    Problem full = make_problem(c.spec, 5000 + static_cast<std::uint64_t>(c.seqlen));
    const ProblemSpec& s = full.spec;
    const CacheConfig config{.kv_heads = s.kv_heads, .head_dim = s.head_dim, .storage = s.storage};
    mpi::ShardedKvCache sharded(config, c.segment, MPI_COMM_WORLD);
    KvCache single(config, c.seqlen);
    Context context(1);
    const AttentionParams whole = full.params();
    const DecodeOptions options{.scale = s.scale,
                                .softcap = s.softcap,
                                .window_left = s.mask.window_left,
                                .maybe_alibi_slopes = whole.maybe_alibi_slopes,
                                .maybe_sink_logits = whole.maybe_sink_logits};
    DecodeOptions dropped = options;
    dropped.maybe_sink_logits = nullptr;
    const Problem doubled = with_sinks_twice(full);
    DecodeOptions twice = options;
    twice.maybe_sink_logits = doubled.sink_logits.data();
    auto rows = [&](const TensorView& view, std::int64_t begin, std::int64_t count) {
      return select(slice(view, 1, begin, count), 0, 0);  // (count, heads, dim)
    };
    const std::int64_t prompt = std::max<std::int64_t>(0, c.seqlen - 4);
    if (prompt > 0) {
      sharded.append(rows(whole.k, 0, prompt), rows(whole.v, 0, prompt));
      single.append(rows(whole.k, 0, prompt), rows(whole.v, 0, prompt));
    }
    for (std::int64_t position = prompt; position < c.seqlen;) {
      const std::int64_t tokens = std::min<std::int64_t>(position % 2 + 1, c.seqlen - position);
      sharded.append(rows(whole.k, position, tokens), rows(whole.v, position, tokens));
      single.append(rows(whole.k, position, tokens), rows(whole.v, position, tokens));
      const TensorView q = rows(whole.q, position, tokens);
      std::vector<float> out(static_cast<std::size_t>(tokens * s.heads * s.head_dim), NAN);
      std::vector<float> lse(static_cast<std::size_t>(s.heads * tokens), NAN);
      sharded.attend(
          {.q = world_rank() == 0 ? q : TensorView{},
           .out = make_mutable_view(out.data(), DType::kF32, {tokens, s.heads, s.head_dim}),
           .maybe_lse = make_mutable_view(lse.data(), DType::kF32, {s.heads, tokens})},
          options, context);
      const StepRows expected = single_cache_step(single, q, options);
      EXPECT_LE(relative_l2(out, expected.out), kF32Tolerance)
          << s.describe() << " at " << position;
      EXPECT_LE(max_abs_difference(lse, expected.lse), kLseTolerance) << s.describe();
      for (const DecodeOptions* wrong : {&dropped, &twice}) {
        const StepRows other = single_cache_step(single, q, *wrong);
        EXPECT_GT(relative_l2(out, other.out), 10 * kF32Tolerance) << s.describe();
        EXPECT_GT(max_abs_difference(lse, other.lse), 10 * kLseTolerance) << s.describe();
      }
      std::vector<float> root_out = out;
      MPI_Bcast(root_out.data(), static_cast<int>(root_out.size()), MPI_FLOAT, 0, MPI_COMM_WORLD);
      EXPECT_EQ(0, std::memcmp(root_out.data(), out.data(), out.size() * sizeof(float)))
          << "rank " << world_rank() << " differs from rank 0";
      position += tokens;
    }
  }
}

TEST(ShardOwnership, GivesEachNewSegmentToTheRankWithFewest) {
  mpi::ShardOwnership ownership(3, 4);
  ownership.grow(10);  // segments 0, 1, 2 to ranks 0, 1, 2 (the last holds 2 tokens)
  EXPECT_EQ(ownership.owner(0), 0);
  EXPECT_EQ(ownership.owner(5), 1);
  EXPECT_EQ(ownership.owner(9), 2);
  ownership.grow(3);  // positions 10, 11 fill segment 2; 12 opens segment 3
  EXPECT_EQ(ownership.owner(11), 2);
  EXPECT_EQ(ownership.owner(12), 0);  // all hold 4: ties go to the lowest rank
  EXPECT_EQ(ownership.tokens_of(0), 5);
}

// ---------------------------------------------------------------------------
// Errors: one rank's bad argument is every rank's error, and nobody hangs.

TEST(Errors, ABadArgumentOnOneRankFailsEveryRankWithTheSameMessage) {
  const int ranks = world_size();
  const int bad = ranks - 1;
  ProblemSpec spec{.seqlen_q = 40, .seqlen_k = 40, .heads = 2, .kv_heads = 1, .head_dim = 8};
  Problem full = make_problem(spec, 5);
  const mpi::ZigzagLayout layout{.seqlen = 40, .ranks = ranks};
  const int rank = world_rank();
  const std::int64_t local = layout.local_seqlen(rank);
  const AttentionParams whole = full.params();
  const std::vector<float> q = mpi::gather_local_rows(whole.q, layout, rank);
  const std::vector<float> k = mpi::gather_local_rows(whole.k, layout, rank);
  std::vector<float> out(q.size());
  Context context(1);
  // The last rank's K has 2 kv heads' worth of columns in a 1-kv-head problem: heads 3.
  const std::int64_t kv_heads = rank == bad ? 3 : 1;
  std::string message;
  try {
    mpi::ring_attend({.q = make_view(q.data(), DType::kF32, {1, local, 2, 8}),
                      .k = make_view(k.data(), DType::kF32, {1, local, kv_heads, 8 / kv_heads}),
                      .v = make_view(k.data(), DType::kF32, {1, local, kv_heads, 8 / kv_heads}),
                      .out = make_mutable_view(out.data(), DType::kF32, {1, local, 2, 8}),
                      .seqlen = 40},
                     MPI_COMM_WORLD, context);
  } catch (const Error& error) {
    message = error.what();
  }
  ASSERT_FALSE(message.empty()) << "rank " << rank << " did not throw";
  if (bad != 0)
    EXPECT_NE(message.find("rank " + std::to_string(bad)), std::string::npos) << message;
  // Every rank has the same message.
  int length = static_cast<int>(message.size());
  int longest = length;
  MPI_Allreduce(&length, &longest, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  std::string root = message;
  root.resize(static_cast<std::size_t>(longest));
  MPI_Bcast(root.data(), longest, MPI_CHAR, 0, MPI_COMM_WORLD);
  EXPECT_EQ(root.substr(0, static_cast<std::size_t>(length)), message);

  // Settings that differ between ranks are an error everywhere, too.
  message.clear();
  try {
    mpi::ShardedKvCache cache({.kv_heads = 1, .head_dim = rank == bad ? 16 : 8}, 4, MPI_COMM_WORLD);
  } catch (const Error& error) {
    message = error.what();
  }
  if (ranks > 1) {
    EXPECT_NE(message.find("head_dim: the ranks disagree"), std::string::npos) << message;
  }
}

// Ring attention places the key blocks itself and takes no sink tokens: it
// refuses them on every rank rather than drop them.
TEST(Errors, RingAttentionRefusesSinkTokens) {
  const int ranks = world_size();
  ProblemSpec spec{.seqlen_q = 40, .seqlen_k = 40, .heads = 2, .kv_heads = 1, .head_dim = 8};
  Problem full = make_problem(spec, 6);
  const mpi::ZigzagLayout layout{.seqlen = 40, .ranks = ranks};
  const int rank = world_rank();
  const std::int64_t local = layout.local_seqlen(rank);
  const AttentionParams whole = full.params();
  const std::vector<float> q = mpi::gather_local_rows(whole.q, layout, rank);
  const std::vector<float> k = mpi::gather_local_rows(whole.k, layout, rank);
  std::vector<float> out(q.size());
  Context context(1);
  std::string message;
  try {
    mpi::ring_attend({.q = make_view(q.data(), DType::kF32, {1, local, 2, 8}),
                      .k = make_view(k.data(), DType::kF32, {1, local, 1, 8}),
                      .v = make_view(k.data(), DType::kF32, {1, local, 1, 8}),
                      .out = make_mutable_view(out.data(), DType::kF32, {1, local, 2, 8}),
                      .seqlen = 40,
                      .mask = {.window_left = 3, .sink_tokens = 2}},
                     MPI_COMM_WORLD, context);
  } catch (const Error& error) {
    message = error.what();
  }
  EXPECT_NE(message.find("sink_tokens: 2"), std::string::npos) << "rank " << rank << ": " << message;
}

// The sharded cache holds its shards unquantized: 8-bit storage is refused on
// every rank, naming the storage and what to use instead.
TEST(Errors, TheShardedCacheRefuses8BitStorage) {
  std::string message;
  try {
    mpi::ShardedKvCache cache({.kv_heads = 1, .head_dim = 8, .storage = DType::kFP8E4M3}, 4,
                              MPI_COMM_WORLD);
  } catch (const Error& error) {
    message = error.what();
  }
  EXPECT_NE(message.find("storage: fp8e4m3 (expected f32, f16 or bf16"), std::string::npos)
      << message;
}

// Sink logits are checked like single-process attention checks them, and
// given on some ranks only they are every rank's error.
TEST(Errors, SinkLogitsAreCheckedAndAgreedOn) {
  const int ranks = world_size();
  const int rank = world_rank();
  ProblemSpec spec{.seqlen_q = 40, .seqlen_k = 40, .heads = 2, .kv_heads = 1, .head_dim = 8};
  Problem full = make_problem(spec, 8);
  const mpi::ZigzagLayout layout{.seqlen = 40, .ranks = ranks};
  const std::int64_t local = layout.local_seqlen(rank);
  const AttentionParams whole = full.params();
  const std::vector<float> q = mpi::gather_local_rows(whole.q, layout, rank);
  const std::vector<float> k = mpi::gather_local_rows(whole.k, layout, rank);
  std::vector<float> out(q.size());
  Context context(1);
  auto ring_message = [&](const float* sinks) {
    try {
      mpi::ring_attend({.q = make_view(q.data(), DType::kF32, {1, local, 2, 8}),
                        .k = make_view(k.data(), DType::kF32, {1, local, 1, 8}),
                        .v = make_view(k.data(), DType::kF32, {1, local, 1, 8}),
                        .out = make_mutable_view(out.data(), DType::kF32, {1, local, 2, 8}),
                        .maybe_sink_logits = sinks,
                        .seqlen = 40},
                       MPI_COMM_WORLD, context);
    } catch (const Error& error) {
      return std::string(error.what());
    }
    return std::string();
  };
  const std::vector<float> finite{0.5f, 1.0f};
  const std::vector<float> not_finite{0.5f, NAN};
  std::string message = ring_message(rank == ranks - 1 ? not_finite.data() : finite.data());
  EXPECT_NE(message.find("sink_logits: logit nan of head 1 (expected finite)"), std::string::npos)
      << "rank " << rank << ": " << message;
  if (ranks == 1) return;
  message = ring_message(rank == 0 ? finite.data() : nullptr);
  EXPECT_NE(message.find("sink_logits: the ranks disagree"), std::string::npos) << message;

  mpi::ShardedKvCache cache({.kv_heads = 1, .head_dim = 8}, 4, MPI_COMM_WORLD);
  cache.append(select(slice(whole.k, 1, 0, 1), 0, 0), select(slice(whole.v, 1, 0, 1), 0, 0));
  std::vector<float> step_out(16);
  message.clear();
  try {
    cache.attend({.q = rank == 0 ? select(slice(whole.q, 1, 0, 1), 0, 0) : TensorView{},
                  .out = make_mutable_view(step_out.data(), DType::kF32, {1, 2, 8})},
                 {.maybe_sink_logits = rank == 0 ? finite.data() : nullptr}, context);
  } catch (const Error& error) {
    message = error.what();
  }
  EXPECT_NE(message.find("sink_logits: the ranks disagree"), std::string::npos) << message;
}

}  // namespace
}  // namespace lookback::testing

// MPI around GoogleTest: every rank runs every test (they are collective);
// rank 0 prints the usual report, the others only their failures.
namespace {

class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (result.failed()) {
      std::fprintf(stderr, "[rank %d] %s:%d: %s\n", rank_,
                   result.file_name() ? result.file_name() : "?", result.line_number(),
                   result.summary());
    }
  }

 private:
  int rank_;
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new FailurePrinter(rank));
  }
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return failed;
}
