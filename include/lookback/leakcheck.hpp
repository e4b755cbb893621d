// Leak check: which output rows of an attention implementation depend on which
// input positions, found by experiment, and whether that dependency stays
// inside the mask (DESIGN.md §2, §4).
//
// The implementation is a black box: a callback from Q, K, V to O. It runs
// once on random base inputs, then once per position j with the q, k and v
// rows at j (every head, every batch element) replaced by clearly different
// values. Output row i "depends on" j when any bit of it changed. A dependency
// on a key the mask hides from row i is a leak; a visible key whose change was
// never seen is "missing" (a warning: e.g. an output that ignores its own
// token). seqlen_q == seqlen_k == seqlen, so position j is both query j and
// key j. Total runs: seqlen + 2: the base run, its repeat (identical inputs
// must give identical outputs, or the check cannot tell a dependency from
// noise), then one per position, independent of each other.
//
// Two implementations come with it: a user's command run on .npy files
// (command_implementation, the black box of `lookback leakcheck --exec`) and
// lookback's own paths (mode_implementation), and the built-in plan that
// checks every path, storage dtype and window (run_builtin_checks). The CLI,
// the tests and future bindings all call these; docs/leakage.md explains the
// experiment.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "lookback/dtype.hpp"
#include "lookback/mask.hpp"
#include "lookback/modes.hpp"
#include "lookback/npy.hpp"

namespace lookback::diagnostics {

// seqlen_q == seqlen_k == seqlen: position j is both query j and key j.
struct LeakShape {
  std::int64_t batch = 1, seqlen = 1, heads = 1, kv_heads = 1, head_dim = 1;
};

// The runs of one check: the base run, its repeat, one per position.
constexpr std::int64_t leak_runs(const LeakShape& shape) noexcept { return shape.seqlen + 2; }

// Throws lookback::Error naming the field when a size is < 1, heads is not a
// multiple of kv_heads, or a tensor or the dependency matrices would be too
// large to hold.
void validate(const LeakShape& shape);

// One run's inputs, float32, C order.
struct LeakInputs {
  LeakShape shape;
  std::vector<float> q;  // (batch, seqlen, heads,    head_dim)
  std::vector<float> k;  // (batch, seqlen, kv_heads, head_dim)
  std::vector<float> v;  // (batch, seqlen, kv_heads, head_dim)
};

struct RunInfo {
  std::int64_t run = 0;       // 0 the base run, 1 its repeat; run r >= 2 perturbs position r - 2
  std::int64_t total = 0;     // seqlen + 2
  int worker = 0;             // 0 <= worker < jobs; no two runs share one at a time
  std::int64_t position = -1; // the perturbed position, -1 for the base run
};

// "the base run", "the repeat of the base run (run 2 of 10)" or "run 4 of 10
// (position 1 perturbed)", for messages.
std::string run_name(const RunInfo& run);

// Computes O (batch, seqlen, heads, head_dim) as f32 or f64. Called from
// `jobs` threads at once (never twice with the same worker index at a time).
// Throws lookback::Error to stop the check.
using Implementation = std::function<NpyArray(const LeakInputs& inputs, const RunInfo& run)>;

struct LeakCheckOptions {
  LeakShape shape;
  MaskSpec mask;           // what may depend on what
  std::uint64_t seed = 1;  // same seed, same inputs, same report, for any jobs
  int jobs = 1;            // runs in parallel (>= 1)
  // Called after each finished run with (runs done, total runs), from one
  // thread at a time; optional.
  std::function<void(std::int64_t done, std::int64_t total)> progress;
  // Names O in error messages: "output of the base run: shape ...".
  std::string output_name = "output";
  // A row's change counts only when max |o - base| over its head_dim values
  // exceeds tolerance * max |base| (relative); 0: any changed bit counts. The
  // repeat of the base run must stay within it, or check_leaks throws
  // ("nondeterministic: ..."). For implementations nondeterministic by design.
  double tolerance = 0;
  // The inputs never hold NaN, so an output NaN is a finding of its own: a
  // NaN equals no number, and NaN everywhere would hide every dependency.
  // check_leaks throws on the first run whose output holds one, unless
  // allowed; then LeakReport::nan_rows counts them.
  bool allow_nan = false;
};

using Pair = std::pair<std::int64_t, std::int64_t>;  // (output row i, position j)

// A dependency matrix checked against the mask.
struct Classification {
  std::vector<Pair> leaks;    // observed, but j is not visible to i; row-major order
  std::vector<Pair> missing;  // j is visible to i, but no change was observed
  bool causal() const noexcept { return leaks.empty(); }
};

// How one cell of a dependency matrix reads against the mask.
enum class Cell : std::uint8_t {
  kObserved,  // visible and observed            'S'
  kMissing,   // visible, never observed         '.'
  kLeak,      // not visible, observed           'X'
  kMasked,    // not visible, not observed       ' '
};
Cell classify_cell(const Mask& mask, std::int64_t row, std::int64_t position, bool observed);
char cell_symbol(Cell cell) noexcept;

// `dependency` is (seqlen, seqlen), 1 where row i changed with position j.
Classification classify(const Mask& mask, const std::vector<std::uint8_t>& dependency);

struct LeakReport {
  LeakShape shape;
  MaskSpec mask_spec;
  std::int64_t runs = 0;  // seqlen + 2
  double tolerance = 0;   // as in LeakCheckOptions
  // Output rows (run, batch, position, head) holding NaN, summed over the
  // runs; non-zero only with LeakCheckOptions::allow_nan.
  std::int64_t nan_rows = 0;
  // (batch, heads, seqlen, seqlen): 1 where output row i of that batch element
  // and head changed when position j was perturbed.
  std::vector<std::uint8_t> per_batch_head;
  // (seqlen, seqlen): the OR of per_batch_head over batch elements and heads.
  std::vector<std::uint8_t> dependency;
  Classification result;  // of `dependency`

  Mask mask() const { return Mask(shape.seqlen, shape.seqlen, mask_spec); }
  bool observed(std::int64_t row, std::int64_t position) const noexcept;
  // (seqlen, seqlen) for one head, OR over batch elements.
  std::vector<std::uint8_t> head_dependency(std::int64_t head) const;
  // The (batch, head) pairs in which row i was seen to depend on position j.
  std::vector<Pair> where_observed(std::int64_t row, std::int64_t position) const;
};

// Runs `implementation` seqlen + 2 times (the base run and its repeat first
// and alone, so a command that fails at once fails once) and builds the
// report. Rethrows the first error of a run, after the runs in flight have
// finished; throws lookback::Error when the repeat differs from the base run
// by more than the tolerance, or an output holds NaN (unless allowed).
LeakReport check_leaks(const Implementation& implementation, const LeakCheckOptions& options);

// lookback's own attention through one path (attend_with_mode), as an
// Implementation for check_leaks: storage dtype `storage`, mask `mask`
// (sink tokens included), one single-threaded Context per worker (so `jobs`
// runs can share it). sink_logits: learned sink logits, one per query head
// (the inputs' heads), or empty for none.
Implementation mode_implementation(const ModeOptions& mode, DType storage, MaskSpec mask,
                                   int jobs, std::vector<float> sink_logits = {});

// ---- the black box: a user's command --------------------------------------

// Throws lookback::Error naming --exec unless `command` holds each of {q},
// {k}, {v} and {out}.
void check_command_template(const std::string& command);

struct CommandOptions {
  // Each run's limit. Past it the run's process group is killed and the run
  // throws lookback::Error naming it. Must be > 0.
  double timeout_seconds = 300;
};

// The user's command as an Implementation: each run writes q.npy, k.npy and
// v.npy (<f4) into a folder of its own, runs `command` through /bin/sh -c
// with {q}, {k}, {v} and {out} replaced by those paths (quoted for the
// shell), and reads the O it wrote at {out}. A command that fails, is killed
// or writes no readable output throws lookback::Error with the tail of what
// it printed. Each run is a process group of its own (the shell and all it
// starts), killed as a whole on timeout or on a signal (SignalCleanup). The
// folders live in a private temporary folder that goes with the last copy of
// the returned Implementation. The command should be deterministic.
Implementation command_implementation(const std::string& command,
                                      const CommandOptions& options = {});

// While one lives, SIGINT, SIGTERM and SIGHUP do not end the process at once:
// every command run in flight has its process group killed and throws
// lookback::Error, no new run starts, so check_leaks throws after the runs in
// flight and the temporary folders go with the Implementation as usual. The
// caller then calls reraise() to end as the signal asked. The previous
// handlers come back with the destructor. One at a time per process.
class SignalCleanup {
 public:
  SignalCleanup();
  ~SignalCleanup();
  SignalCleanup(const SignalCleanup&) = delete;
  SignalCleanup& operator=(const SignalCleanup&) = delete;

  int received() const noexcept;  // the first signal caught, or 0
  // Restores the default action of received() and raises it; returns only
  // when no signal was received.
  void reraise() const;

 private:
  struct Saved;
  std::unique_ptr<Saved> saved_;
};

// ---- the built-in plan: every path of lookback itself ---------------------

// Small enough for 30 checks of N + 2 runs each to take well under a second,
// large enough to cross every boundary the paths have. The length is odd on
// purpose: chunks of 5, pages of 4 and 3 splits all end with a partial piece,
// where off-by-one bugs live.
inline constexpr LeakShape kBuiltinShape{
    .batch = 2, .seqlen = 23, .heads = 4, .kv_heads = 2, .head_dim = 16};
inline constexpr std::int64_t kBuiltinChunk = 5;
inline constexpr std::int64_t kBuiltinBlockSize = 4;
inline constexpr std::int64_t kBuiltinSplits = 3;
inline constexpr std::int64_t kBuiltinWindow = 6;
// StreamingLLM sinks beside the window: keys 0 and 1 stay visible to every row.
inline constexpr std::int64_t kBuiltinSinkTokens = 2;

// The learned sink logit of query head h in the built-in checks: finite,
// different per head, some above and some below the scores' scale.
float builtin_sink_logit(std::int64_t head) noexcept;

enum class Verdict { kCausal, kLeak, kError };
std::string_view verdict_name(Verdict verdict) noexcept;  // "causal", "leak", "error"

// One path x storage dtype x mask configuration of the plan, and how its
// check went.
struct BuiltinCheck {
  std::string label;  // "paged (block 4, chunk 5), window 6, 2 sink tokens"
  ModeOptions mode;
  DType storage = DType::kF32;
  std::optional<std::int64_t> window;
  std::int64_t sink_tokens = 0;  // StreamingLLM sinks (with the window)
  bool sink_logits = false;      // learned sink logits, builtin_sink_logit(h)
  Verdict verdict = Verdict::kCausal;
  std::optional<LeakReport> report;  // when the check ran to the end
  std::string message;               // what a path threw (kError)
};

// "paged (block 4, chunk 5)": the path and the sizes that shape it.
std::string path_label(const ModeOptions& mode);

// Every path (all_modes()) in four configurations: no window; `window`;
// `window` with `sink_tokens` sink tokens; learned sink logits (no window).
// Each in every storage dtype (f32, bf16, f16, int8, fp8e4m3, fp8e5m2), in
// that order: one check per dtype for each path row.
std::vector<BuiltinCheck> builtin_plan(std::int64_t window = kBuiltinWindow,
                                       std::int64_t sink_tokens = kBuiltinSinkTokens);

struct BuiltinOptions {
  LeakShape shape = kBuiltinShape;
  std::int64_t window = kBuiltinWindow;
  std::int64_t sink_tokens = kBuiltinSinkTokens;  // >= 1
  std::uint64_t seed = 1;
  int jobs = 1;
  // (runs done, runs in all the checks), as in LeakCheckOptions; optional.
  std::function<void(std::int64_t done, std::int64_t total)> progress;
};

// Runs the plan with bottom-right masks (the alignment the cache paths use).
// A path that throws is a check with Verdict::kError, not an exception.
std::vector<BuiltinCheck> run_builtin_checks(const BuiltinOptions& options);

// ---- whole models: token ids in, logits out -------------------------------

// A model is checked by the same experiment: position j is input token j and
// output row j holds the logits that follow it; a run perturbs token j (of
// every batch element) and output row i depends on j when any bit of its
// logits changed. The report's shape is heads = kv_heads = 1 and head_dim =
// vocab (one "head" whose row is the logits), so verdicts, exit codes and
// renderers are those of attention. docs/leakage.md.
LeakShape model_leak_shape(std::int64_t batch, std::int64_t seqlen, std::int64_t vocab);

// The token ids (batch, seqlen) of a run: random in [0, vocab) from `seed`
// for the base run (position -1); run j changes token j of every batch
// element to another id. Needs vocab >= 2.
std::vector<std::int32_t> leak_tokens(const LeakShape& shape, std::uint64_t seed,
                                      std::int64_t position);

// A model as the check sees it: token ids (batch, seqlen) in, logits
// (batch, seqlen, vocab) out, f32 or f64.
using TokenModel = std::function<NpyArray(const std::vector<std::int32_t>& tokens,
                                          const LeakShape& shape, const RunInfo& run)>;

// Adapts a TokenModel to an Implementation for check_leaks with a
// model_leak_shape(): it ignores Q, K and V and feeds leak_tokens(run).
Implementation token_implementation(TokenModel model, std::uint64_t seed);

// Throws lookback::Error naming --exec-model unless `command` holds {tokens}
// and {logits}.
void check_model_command_template(const std::string& command);

// A user's model command as a TokenModel: each run writes tokens.npy (<i4,
// (batch, seqlen)) into a folder of its own, runs `command` through /bin/sh
// -c with {tokens} and {logits} replaced by paths, and reads the logits
// (batch, seqlen, vocab), <f4 or <f8, it wrote at {logits}. Process groups,
// timeouts, signals and temporary folders as command_implementation.
TokenModel model_command(const std::string& command, const CommandOptions& options = {});

}  // namespace lookback::diagnostics
