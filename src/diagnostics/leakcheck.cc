#include "lookback/leakcheck.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "lookback/attention.hpp"
#include "lookback/context.hpp"
#include "lookback/error.hpp"
#include "lookback/tensor.hpp"

namespace lookback::diagnostics {
namespace {

// Each input tensor holds at most this many elements (1 GiB of f32): every
// run copies the inputs, so `jobs` runs in flight hold several copies.
constexpr std::int64_t kMaxTensorElements = std::int64_t{1} << 28;
// The per-(batch, head) dependency matrices take one byte per cell.
constexpr std::int64_t kMaxMatrixCells = std::int64_t{1} << 28;
constexpr double kInfinity = std::numeric_limits<double>::infinity();

// splitmix64's finaliser: a stateless hash, so that the value of an element
// depends only on (seed, stream, index), never on which thread drew it or in
// which order. That is what makes the report the same for any --jobs.
std::uint64_t mix(std::uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Uniform in [0, 1).
double uniform(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) noexcept {
  const std::uint64_t bits = mix(mix(seed) ^ mix(stream * 0x100000001b3ULL + index));
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

// Streams: 0..2 the base q, k, v; 3 + 3j + t the perturbation of tensor t at
// position j.
enum Tensor : std::uint64_t { kQ = 0, kK = 1, kV = 2 };

// Multiplies sizes that are each >= 1, refusing past `limit`.
std::int64_t checked_product(std::initializer_list<std::int64_t> sizes, std::int64_t limit,
                             const char* what) {
  std::int64_t product = 1;
  for (std::int64_t size : sizes) {
    if (size > limit / product) {
      throw Error(fmt::format("{}: more than {} elements (expected a smaller problem)", what,
                              limit));
    }
    product *= size;
  }
  return product;
}

std::int64_t q_elements(const LeakShape& s) {
  return s.batch * s.seqlen * s.heads * s.head_dim;
}
std::int64_t kv_elements(const LeakShape& s) {
  return s.batch * s.seqlen * s.kv_heads * s.head_dim;
}

LeakInputs make_base_inputs(const LeakShape& shape, std::uint64_t seed) {
  LeakInputs inputs{.shape = shape, .q = {}, .k = {}, .v = {}};
  const auto fill = [&](std::vector<float>& data, std::int64_t count, Tensor tensor) {
    data.resize(static_cast<std::size_t>(count));
    for (std::int64_t e = 0; e < count; ++e) {
      // [-1.5, 1.5): scores stay moderate, so no softmax weight underflows to
      // exactly 0 and hides a dependency.
      data[static_cast<std::size_t>(e)] =
          static_cast<float>(3.0 * uniform(seed, tensor, static_cast<std::uint64_t>(e)) - 1.5);
    }
  };
  fill(inputs.q, q_elements(shape), kQ);
  fill(inputs.k, kv_elements(shape), kK);
  fill(inputs.v, kv_elements(shape), kV);
  return inputs;
}

// Moves every element of the rows at `position` (all batch elements, all
// heads) by 0.5 to 1.5 in a random direction. Not an epsilon: the change must
// survive rounding to bf16/f16 storage (spacing <= 2^-5 below 4) and move the
// output by far more than rounding noise, so every real dependency shows.
void perturb(std::vector<float>& data, std::int64_t seqlen, std::int64_t heads,
             std::int64_t head_dim, std::int64_t position, Tensor tensor, std::uint64_t seed) {
  const std::int64_t row = heads * head_dim;  // elements of one (batch, position)
  const std::int64_t batch = static_cast<std::int64_t>(data.size()) / (seqlen * row);
  const std::uint64_t stream = 3 + 3 * static_cast<std::uint64_t>(position) + tensor;
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t begin = (b * seqlen + position) * row;
    for (std::int64_t e = 0; e < row; ++e) {
      const std::uint64_t index = static_cast<std::uint64_t>(b * row + e);
      const double magnitude = 0.5 + uniform(seed, stream, 2 * index);
      const double sign = uniform(seed, stream, 2 * index + 1) < 0.5 ? -1.0 : 1.0;
      float& value = data[static_cast<std::size_t>(begin + e)];
      value = static_cast<float>(value + sign * magnitude);
    }
  }
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string text = "(";
  for (std::size_t d = 0; d < shape.size(); ++d) {
    text += (d ? ", " : "") + std::to_string(shape[d]);
  }
  return text + (shape.size() == 1 ? ",)" : ")");
}

void check_output(const NpyArray& out, const LeakShape& s, const RunInfo& run,
                  const std::string& name) {
  const std::vector<std::int64_t> expected{s.batch, s.seqlen, s.heads, s.head_dim};
  if (out.shape != expected) {
    throw Error(fmt::format(
        "{} of {}: shape {} (expected (batch, seqlen, heads, head_dim) = {})", name,
        run_name(run), shape_text(out.shape), shape_text(expected)));
  }
  if (out.dtype != DType::kF32 && out.dtype != DType::kF64) {
    throw Error(fmt::format("{} of {}: dtype {} (expected f32 <f4 or f64 <f8)", name,
                            run_name(run), dtype_name(out.dtype)));
  }
}

// Element e of an f32 or f64 output, as a double.
double element(const NpyArray& out, std::size_t e) noexcept {
  if (out.dtype == DType::kF64) {
    double value;
    std::memcpy(&value, out.data.data() + e * sizeof(double), sizeof value);
    return value;
  }
  float value;
  std::memcpy(&value, out.data.data() + e * sizeof(float), sizeof value);
  return value;
}

// How much output row slice `row` (head_dim values from element `first`)
// changed from the base: 0 when every bit is the same, else max |o - base|
// relative to max |base| (infinite where a NaN met a number or base is 0).
// Any changed bit counts as changed, so a tolerance of 0 is a bitwise test.
struct RowChange {
  bool bits = false;   // some bit differs
  double relative = 0;
  bool exceeds(double tolerance) const noexcept {
    return bits && (tolerance == 0 || !(relative <= tolerance));
  }
};

RowChange row_change(const NpyArray& base, const NpyArray& out, std::size_t first,
                     std::int64_t head_dim) {
  const std::size_t size = dtype_size(out.dtype);
  if (std::memcmp(base.data.data() + first * size, out.data.data() + first * size,
                  static_cast<std::size_t>(head_dim) * size) == 0) {
    return {};
  }
  double largest_base = 0, largest_change = 0;
  for (std::int64_t d = 0; d < head_dim; ++d) {
    const double was = element(base, first + static_cast<std::size_t>(d));
    const double now = element(out, first + static_cast<std::size_t>(d));
    if (std::isnan(was) != std::isnan(now)) return {.bits = true, .relative = kInfinity};
    if (std::isnan(was)) continue;
    largest_base = std::max(largest_base, std::abs(was));
    largest_change = std::max(largest_change, std::abs(now - was));
  }
  const double relative = largest_change == 0 ? 0
                          : largest_base == 0 ? kInfinity
                                              : largest_change / largest_base;
  return {.bits = true, .relative = relative};
}

// The first element of output row slice (b, i, h).
std::size_t row_start(const LeakShape& s, std::int64_t b, std::int64_t i, std::int64_t h) {
  return static_cast<std::size_t>(((b * s.seqlen + i) * s.heads + h) * s.head_dim);
}

// Marks column j of every (batch, head) dependency matrix where the output
// row changed by more than the tolerance (with 0: any bit; a NaN differs
// from every number). Each run writes only its own column j, so runs on
// several threads never share a byte.
void record_changes(const NpyArray& base_out, const NpyArray& out, const LeakShape& s,
                    double tolerance, std::int64_t j, std::vector<std::uint8_t>& per_batch_head) {
  for (std::int64_t b = 0; b < s.batch; ++b) {
    for (std::int64_t i = 0; i < s.seqlen; ++i) {
      for (std::int64_t h = 0; h < s.heads; ++h) {
        if (row_change(base_out, out, row_start(s, b, i, h), s.head_dim).exceeds(tolerance)) {
          per_batch_head[static_cast<std::size_t>(((b * s.heads + h) * s.seqlen + i) * s.seqlen +
                                                  j)] = 1;
        }
      }
    }
  }
}

// The repeat of the base run must give the base run's output: otherwise a
// change after a perturbation could be noise, and the check cannot judge.
void check_repeat(const NpyArray& base_out, const NpyArray& repeat_out, const LeakShape& s,
                  const LeakCheckOptions& options) {
  double largest = 0;
  bool changed = false;
  for (std::int64_t b = 0; b < s.batch; ++b) {
    for (std::int64_t i = 0; i < s.seqlen; ++i) {
      for (std::int64_t h = 0; h < s.heads; ++h) {
        const RowChange change = row_change(base_out, repeat_out, row_start(s, b, i, h), s.head_dim);
        changed = changed || change.exceeds(options.tolerance);
        largest = std::max(largest, change.relative);
      }
    }
  }
  if (changed) {
    throw Error(fmt::format(
        "nondeterministic: identical inputs changed outputs by up to {:.3g} (relative to the "
        "output row; the base run and its repeat differ), so a change cannot be told from noise "
        "(expected a deterministic implementation, or for one nondeterministic by design a "
        "tolerance above that, --tolerance; it is {:g})",
        largest, options.tolerance));
  }
}

// Output rows holding NaN. The inputs never hold NaN, so each one is a
// finding: without options.allow_nan it stops the check.
std::int64_t check_nan(const NpyArray& out, const LeakShape& s, const RunInfo& run,
                       const LeakCheckOptions& options) {
  std::int64_t rows = 0;
  std::string first;
  for (std::int64_t b = 0; b < s.batch; ++b) {
    for (std::int64_t i = 0; i < s.seqlen; ++i) {
      for (std::int64_t h = 0; h < s.heads; ++h) {
        const std::size_t start = row_start(s, b, i, h);
        for (std::int64_t d = 0; d < s.head_dim; ++d) {
          if (std::isnan(element(out, start + static_cast<std::size_t>(d)))) {
            if (rows++ == 0) first = fmt::format("row {} of batch element {} head {}", i, b, h);
            break;
          }
        }
      }
    }
  }
  if (rows > 0 && !options.allow_nan) {
    throw Error(fmt::format(
        "{} of {}: NaN in {} of {} output rows (first: {}), though no input held NaN; a NaN "
        "equals no number, so leakcheck cannot judge these rows (expected finite outputs; "
        "--allow-nan checks anyway)",
        options.output_name, run_name(run), rows, s.batch * s.seqlen * s.heads, first));
  }
  return rows;
}

}  // namespace

std::string run_name(const RunInfo& run) {
  if (run.run == 0) return "the base run";
  if (run.position < 0) {
    return fmt::format("the repeat of the base run (run {} of {})", run.run + 1, run.total);
  }
  return fmt::format("run {} of {} (position {} perturbed)", run.run + 1, run.total,
                     run.position);
}

void validate(const LeakShape& shape) {
  const std::pair<const char*, std::int64_t> sizes[] = {
      {"batch", shape.batch},
      {"seqlen", shape.seqlen},
      {"heads", shape.heads},
      {"kv_heads", shape.kv_heads},
      {"head_dim", shape.head_dim}};
  for (const auto& [name, size] : sizes) {
    if (size < 1) throw Error(fmt::format("{}: {} (expected >= 1)", name, size));
  }
  if (shape.heads % shape.kv_heads != 0) {
    throw Error(fmt::format("heads: {} (expected a multiple of kv_heads {})", shape.heads,
                            shape.kv_heads));
  }
  checked_product({shape.batch, shape.seqlen, shape.heads, shape.head_dim}, kMaxTensorElements,
                  "q (batch x seqlen x heads x head_dim)");
  checked_product({shape.batch, shape.heads, shape.seqlen, shape.seqlen}, kMaxMatrixCells,
                  "dependency matrices (batch x heads x seqlen x seqlen)");
}

Cell classify_cell(const Mask& mask, std::int64_t row, std::int64_t position, bool observed) {
  if (mask.visible(row, position)) return observed ? Cell::kObserved : Cell::kMissing;
  return observed ? Cell::kLeak : Cell::kMasked;
}

char cell_symbol(Cell cell) noexcept {
  switch (cell) {
    case Cell::kObserved: return 'S';
    case Cell::kMissing: return '.';
    case Cell::kLeak: return 'X';
    case Cell::kMasked: return ' ';
  }
  return '?';
}

Classification classify(const Mask& mask, const std::vector<std::uint8_t>& dependency) {
  const std::int64_t n = mask.seqlen_q();
  Classification result;
  for (std::int64_t i = 0; i < n; ++i) {
    for (std::int64_t j = 0; j < n; ++j) {
      const bool observed = dependency[static_cast<std::size_t>(i * n + j)] != 0;
      switch (classify_cell(mask, i, j, observed)) {
        case Cell::kLeak: result.leaks.emplace_back(i, j); break;
        case Cell::kMissing: result.missing.emplace_back(i, j); break;
        default: break;
      }
    }
  }
  return result;
}

bool LeakReport::observed(std::int64_t row, std::int64_t position) const noexcept {
  return dependency[static_cast<std::size_t>(row * shape.seqlen + position)] != 0;
}

std::vector<std::uint8_t> LeakReport::head_dependency(std::int64_t head) const {
  const std::int64_t cells = shape.seqlen * shape.seqlen;
  std::vector<std::uint8_t> matrix(static_cast<std::size_t>(cells), 0);
  for (std::int64_t b = 0; b < shape.batch; ++b) {
    const std::uint8_t* source = per_batch_head.data() + (b * shape.heads + head) * cells;
    for (std::int64_t c = 0; c < cells; ++c) matrix[static_cast<std::size_t>(c)] |= source[c];
  }
  return matrix;
}

std::vector<Pair> LeakReport::where_observed(std::int64_t row, std::int64_t position) const {
  const std::int64_t n = shape.seqlen;
  std::vector<Pair> found;
  for (std::int64_t b = 0; b < shape.batch; ++b) {
    for (std::int64_t h = 0; h < shape.heads; ++h) {
      if (per_batch_head[static_cast<std::size_t>(((b * shape.heads + h) * n + row) * n +
                                                  position)]) {
        found.emplace_back(b, h);
      }
    }
  }
  return found;
}

namespace {

// One run: its output, checked for shape, dtype (that of the base run, when
// there is one: comparing f32 with f64 bits would flag every row) and NaN.
NpyArray run_checked(const Implementation& implementation, const LeakInputs& inputs,
                     const RunInfo& run, const LeakCheckOptions& options, const NpyArray* base,
                     std::atomic<std::int64_t>& nan_rows) {
  NpyArray out = implementation(inputs, run);
  check_output(out, inputs.shape, run, options.output_name);
  if (base != nullptr && out.dtype != base->dtype) {
    throw Error(fmt::format("{} of {}: dtype {} (expected {}, as in the base run)",
                            options.output_name, run_name(run), dtype_name(out.dtype),
                            dtype_name(base->dtype)));
  }
  nan_rows += check_nan(out, inputs.shape, run, options);
  return out;
}

// (seqlen, seqlen): the OR of the (batch, heads, seqlen, seqlen) matrices.
std::vector<std::uint8_t> union_over_heads(const std::vector<std::uint8_t>& per_batch_head,
                                           const LeakShape& s) {
  const std::int64_t cells = s.seqlen * s.seqlen;
  std::vector<std::uint8_t> dependency(static_cast<std::size_t>(cells), 0);
  for (std::int64_t bh = 0; bh < s.batch * s.heads; ++bh) {
    const std::uint8_t* source = per_batch_head.data() + bh * cells;
    for (std::int64_t c = 0; c < cells; ++c) dependency[static_cast<std::size_t>(c)] |= source[c];
  }
  return dependency;
}

}  // namespace

LeakReport check_leaks(const Implementation& implementation, const LeakCheckOptions& options) {
  const LeakShape& s = options.shape;
  validate(s);
  const Mask mask(s.seqlen, s.seqlen, options.mask);  // validates the window
  if (options.jobs < 1) throw Error(fmt::format("jobs: {} (expected >= 1)", options.jobs));
  if (!(options.tolerance >= 0 && options.tolerance < kInfinity)) {
    throw Error(fmt::format("tolerance: {} (expected a finite number >= 0)", options.tolerance));
  }

  LeakReport report;
  report.shape = s;
  report.mask_spec = options.mask;
  report.runs = leak_runs(s);
  report.tolerance = options.tolerance;
  report.per_batch_head.assign(static_cast<std::size_t>(s.batch * s.heads * s.seqlen * s.seqlen),
                               0);
  std::atomic<std::int64_t> nan_rows{0};

  // The base run and its repeat, alone: a command that fails at once fails
  // once, and noise is found before it can pass for a dependency.
  const LeakInputs base = make_base_inputs(s, options.seed);
  const NpyArray base_out = run_checked(
      implementation, base, {.run = 0, .total = report.runs, .worker = 0, .position = -1},
      options, nullptr, nan_rows);
  const NpyArray repeat_out = run_checked(
      implementation, base, {.run = 1, .total = report.runs, .worker = 0, .position = -1},
      options, &base_out, nan_rows);
  check_repeat(base_out, repeat_out, s, options);

  std::mutex mutex;  // guards done, first_error and the progress callback
  std::int64_t done = 2;
  if (options.progress) options.progress(done, report.runs);
  std::exception_ptr first_error;
  std::atomic<std::int64_t> next_position{0};
  std::atomic<bool> stop{false};

  const auto work = [&](int worker) {
    while (!stop.load(std::memory_order_relaxed)) {
      const std::int64_t j = next_position.fetch_add(1);
      if (j >= s.seqlen) return;
      try {
        LeakInputs inputs = base;
        perturb(inputs.q, s.seqlen, s.heads, s.head_dim, j, kQ, options.seed);
        perturb(inputs.k, s.seqlen, s.kv_heads, s.head_dim, j, kK, options.seed);
        perturb(inputs.v, s.seqlen, s.kv_heads, s.head_dim, j, kV, options.seed);
        const RunInfo run{.run = j + 2, .total = report.runs, .worker = worker, .position = j};
        const NpyArray out = run_checked(implementation, inputs, run, options, &base_out, nan_rows);
        record_changes(base_out, out, s, options.tolerance, j, report.per_batch_head);
        const std::lock_guard lock(mutex);
        ++done;
        if (options.progress) options.progress(done, report.runs);
      } catch (...) {
        const std::lock_guard lock(mutex);
        if (!first_error) first_error = std::current_exception();
        stop.store(true);
        return;
      }
    }
  };

  const int threads =
      static_cast<int>(std::min<std::int64_t>(options.jobs, std::max<std::int64_t>(s.seqlen, 1)));
  std::vector<std::thread> helpers;
  helpers.reserve(static_cast<std::size_t>(threads - 1));
  for (int worker = 1; worker < threads; ++worker) helpers.emplace_back(work, worker);
  work(0);
  for (std::thread& helper : helpers) helper.join();
  if (first_error) std::rethrow_exception(first_error);

  report.dependency = union_over_heads(report.per_batch_head, s);
  report.nan_rows = nan_rows.load();
  report.result = classify(mask, report.dependency);
  return report;
}

}  // namespace lookback::diagnostics
