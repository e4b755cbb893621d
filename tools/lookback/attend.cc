// lookback attend: attention on NumPy files.
#include <fmt/format.h>

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <future>
#include <optional>
#include <vector>

#include "attend_distributed.hpp"
#include "common.hpp"
#include "lookback/attention.hpp"
#include "lookback/error.hpp"
#include "lookback/modes.hpp"
#include "lookback/npy.hpp"
#include "lookback/reference.hpp"
#include "lookback/varlen.hpp"

namespace lookback::cli {

namespace {

struct AttendOptions {
  std::string q_path, k_path, v_path, out_path, lse_path, alibi_path, sink_path;
  std::string cu_q_path, cu_k_path;  // a packed variable-length batch
  std::optional<float> scale;
  std::string causal = "bottom-right";
  std::optional<std::int64_t> window;
  std::int64_t sink_tokens = 0;  // StreamingLLM, with --window
  float softcap = 0.0f;
  int threads = 0;
  std::string dtype = "f32";
  std::string mode = "prefill";
  std::optional<std::int64_t> chunk;       // chunked (required), paged (default 1)
  std::optional<std::int64_t> block_size;  // paged (default 16)
  std::optional<std::int64_t> splits;      // split (default 2)
  bool ring_cache = false;                 // decode, chunked: caches as rings
  std::optional<std::int64_t> segment;     // sharded-decode (default 256)
  bool reference = false;
  bool timings = false;
};

// "(3,)", "(1, 7, 2, 8)": Python's spelling, as in the .npy header.
std::string tuple_text(const std::vector<std::int64_t>& shape) {
  std::string text = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    text += (i ? ", " : "") + std::to_string(shape[i]);
  }
  return text + (shape.size() == 1 ? ",)" : ")");
}

// An input's header, its rank checked; no data is read.
NpyHeader read_header(const std::string& path, const std::string& option, int rank) {
  NpyHeader header = read_npy_header(path);
  if (static_cast<int>(header.shape.size()) != rank) {
    throw Error(fmt::format("{} {}: shape {} has {} dimension{} (expected {})", option, path,
                            tuple_text(header.shape), header.shape.size(),
                            header.shape.size() == 1 ? "" : "s",
                            rank == 4   ? "4: (batch, seqlen, heads, head_dim)"
                            : rank == 3 ? "3: (total_tokens, heads, head_dim) with --cu-seqlens-q"
                                        : "1: (heads,)"));
  }
  return header;
}

// The inputs are mapped (map_npy): a file that shrinks while mapped makes
// the next read of a page past its new end raise SIGBUS. Those reads are
// turned into the one-line error every other bad input gets (exit code 2);
// nothing has been written yet (outputs come after the compute).
struct MappedInput {
  const std::byte* begin = nullptr;
  const std::byte* end = nullptr;
  char message[512] = {};
};
std::array<MappedInput, 5> mapped_inputs;  // q, k, v, [alibi], [sink logits]

void on_sigbus(int, siginfo_t* info, void*) {
  const auto* address = static_cast<const std::byte*>(info->si_addr);
  const char* message = "lookback: an input file shrank while it was read (expected it unchanged)\n";
  for (const MappedInput& input : mapped_inputs) {
    if (input.begin <= address && address < input.end) message = input.message;
  }
  ssize_t ignored = ::write(STDERR_FILENO, message, std::strlen(message));
  (void)ignored;
  ::_exit(kExitUsage);
}

void guard_mapping(std::size_t slot, const std::string& option, const std::string& path,
                   const LoadedNpy& array) {
  MappedInput& input = mapped_inputs.at(slot);
  std::snprintf(input.message, sizeof input.message,
                "lookback: %s %s: the file shrank while it was read (expected it unchanged "
                "until lookback attend finishes)\n",
                option.c_str(), path.c_str());
  input.begin = array.data.data();
  input.end = array.data.data() + array.data.size();
  static const bool installed = [] {
    struct sigaction action {};
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    return sigaction(SIGBUS, &action, nullptr) == 0;
  }();
  (void)installed;
}

// The data of an input whose header was checked: the file must still be
// what its header said, or every check made on the header would be void.
LoadedNpy read_checked(const std::string& path, const std::string& option,
                       const NpyHeader& header) {
  LoadedNpy array = map_npy(path);
  if (array.shape != header.shape || array.dtype != header.dtype) {
    throw Error(ErrorCode::kIo, fmt::format("{} {}: the file changed while it was read (shape "
                                            "{}, expected {} as its header said)",
                                            option, path, tuple_text(array.shape),
                                            tuple_text(header.shape)));
  }
  return array;
}

// Fails before any work when an output could not be written at the end.
void check_output_folder(const std::string& path, const std::string& option) {
  const std::filesystem::path parent = std::filesystem::absolute(path).parent_path();
  std::error_code error;
  if (!std::filesystem::is_directory(parent, error)) {
    throw Error(ErrorCode::kIo, fmt::format("{} {}: folder {} does not exist", option, path,
                                            parent.string()));
  }
}

// Two outputs on one path would leave only the one written last.
void check_distinct_outputs(const std::string& out_path, const std::string& lse_path) {
  std::error_code error;
  const bool same = out_path == lse_path ||
                    (out_path != "-" && lse_path != "-" &&
                     std::filesystem::weakly_canonical(out_path, error) ==
                         std::filesystem::weakly_canonical(lse_path, error) &&
                     !error);
  if (same) {
    throw Error(fmt::format("--lse {}: the same file as --out {} (expected a different path: "
                            "the LSE would replace O)",
                            lse_path, out_path));
  }
}

void check_outputs(const AttendOptions& options) {
  check_output_folder(options.out_path, "--out");
  if (!options.lse_path.empty()) {
    check_output_folder(options.lse_path, "--lse");
    check_distinct_outputs(options.out_path, options.lse_path);
  }
}

// --chunk, --block-size and --splits each steer some modes only; given to
// another they would be ignored, so they are refused.
ModeOptions parse_mode_options(const AttendOptions& options) {
  const Mode mode = parse_mode(options.mode, "--mode");
  const auto refuse_unless = [mode](const auto& value, std::string_view option,
                                    std::initializer_list<Mode> users, std::string_view names) {
    if (value && std::find(users.begin(), users.end(), mode) == users.end()) {
      throw Error(fmt::format("{} {}: --mode {} does not use it (expected {} only with --mode {})",
                              option, *value, mode_name(mode), option, names));
    }
  };
  refuse_unless(options.chunk, "--chunk", {Mode::kChunked, Mode::kPaged}, "chunked or paged");
  refuse_unless(options.block_size, "--block-size", {Mode::kPaged}, "paged");
  refuse_unless(options.splits, "--splits", {Mode::kSplit}, "split");
  if (options.ring_cache && mode != Mode::kDecode && mode != Mode::kChunked) {
    throw Error(fmt::format("--ring-cache: --mode {} does not use it (expected --ring-cache only "
                            "with --mode decode or chunked)",
                            mode_name(mode)));
  }
  if (mode == Mode::kChunked && !options.chunk) {
    throw Error("--chunk: missing (expected the tokens per step with --mode chunked)");
  }
  if (options.ring_cache && !options.window) {
    throw Error("--ring-cache: without --window (expected --window W: a ring keeps the sink "
                "tokens and the window's keys)");
  }
  return {.mode = mode,
          .chunk = options.chunk.value_or(1),
          .block_size = options.block_size.value_or(16),
          .splits = options.splits.value_or(2),
          .ring = options.ring_cache};
}

// Where the sink logits are among the inputs (q, k, v, [alibi], [sinks]).
std::size_t sink_index(const AttendOptions& options) { return options.alibi_path.empty() ? 3 : 4; }

// Sink tokens keep keys 0..S-1 visible beside a window: without one they
// mean nothing, and the flag that is missing is named.
void check_sink_tokens(const AttendOptions& options) {
  if (options.sink_tokens > 0 && !options.window) {
    throw Error(fmt::format("--sink-tokens: {} without --window (expected --window W with sink "
                            "tokens)",
                            options.sink_tokens));
  }
}

// Every option and every input header, checked before any data is read: a
// mismatched k next to a 4 GiB q fails in milliseconds, not after reading q.
// Returns the params with shape-only q, k and v views (null data).
AttentionParams check_before_reading(const AttendOptions& options, const ModeOptions& modes,
                                     const std::vector<NpyHeader>& inputs) {
  AttentionParams params;
  params.q = inputs[0].view("--q");
  params.k = inputs[1].view("--k");
  params.v = inputs[2].view("--v");
  params.scale = options.scale;
  params.softcap = options.softcap;
  check_sink_tokens(options);
  params.mask = {.causal = parse_causal(options.causal, "--causal"),
                 .window_left = options.window,
                 .sink_tokens = options.sink_tokens};
  params.storage = parse_dtype(options.dtype, "--dtype");
  if (params.storage == DType::kF64) {
    throw Error("--dtype: f64 (expected f32, bf16, f16, int8, fp8e4m3 or fp8e5m2)");
  }
  validate_shapes(params, modes);
  if (!options.alibi_path.empty() && inputs[3].shape[0] != inputs[0].shape[2]) {
    throw Error(fmt::format("--alibi {}: {} slopes (expected {}, one per query head)",
                            options.alibi_path, inputs[3].shape[0], inputs[0].shape[2]));
  }
  const std::size_t sinks = sink_index(options);
  if (!options.sink_path.empty() && inputs[sinks].shape[0] != inputs[0].shape[2]) {
    throw Error(fmt::format("--sink-logits {}: {} logits (expected {}, one per query head)",
                            options.sink_path, inputs[sinks].shape[0], inputs[0].shape[2]));
  }
  return params;
}

// The input files in order: q, k, v and, when given, the ALiBi slopes.
struct Input {
  std::string path;
  std::string option;
  int rank;
};

std::vector<Input> inputs_of(const AttendOptions& options) {
  std::vector<Input> inputs{
      {options.q_path, "--q", 4}, {options.k_path, "--k", 4}, {options.v_path, "--v", 4}};
  if (!options.alibi_path.empty()) inputs.push_back({options.alibi_path, "--alibi", 1});
  if (!options.sink_path.empty()) inputs.push_back({options.sink_path, "--sink-logits", 1});
  return inputs;
}

// A (heads,) input (ALiBi slopes, sink logits) as f32, one value per head.
std::vector<float> per_head(const LoadedNpy& array) {
  std::vector<float> values;
  for (std::int64_t h = 0; h < array.shape[0]; ++h) {
    values.push_back(load_as_float(array.data.data(), array.dtype, h));
  }
  return values;
}

// Refuses what a packed batch cannot run with: it needs both offsets files,
// runs as prefill, and has no reference path.
void check_varlen_options(const AttendOptions& options) {
  if (options.cu_q_path.empty() || options.cu_k_path.empty()) {
    throw Error(fmt::format("{}: missing (expected --cu-seqlens-q and --cu-seqlens-k together)",
                            options.cu_q_path.empty() ? "--cu-seqlens-q" : "--cu-seqlens-k"));
  }
  if (options.mode != "prefill" || options.chunk || options.block_size || options.splits ||
      options.ring_cache) {
    throw Error(fmt::format("--mode {}: a packed batch runs as prefill (expected no --mode, "
                            "--chunk, --block-size, --splits or --ring-cache with --cu-seqlens-q)",
                            options.mode));
  }
  if (options.reference) {
    throw Error("--reference: not with --cu-seqlens-q (expected one of them; run each "
                "sequence alone for the reference)");
  }
}

// The offsets of a packed batch, each (batch + 1,) as <i4 or <i8.
struct VarlenOffsets {
  NpyArray cu_q, cu_k;
};

VarlenOffsets read_offsets(const AttendOptions& options) {
  const DType offsets[] = {DType::kI32, DType::kI64};
  VarlenOffsets result{.cu_q = read_npy(options.cu_q_path, offsets),
                       .cu_k = read_npy(options.cu_k_path, offsets)};
  for (const auto& [array, option] :
       {std::pair{&result.cu_q, "--cu-seqlens-q"}, std::pair{&result.cu_k, "--cu-seqlens-k"}}) {
    if (array->shape.size() != 1) {
      throw Error(fmt::format("{}: shape {} (expected (batch + 1,) offsets)", option,
                              tuple_text(array->shape)));
    }
  }
  return result;
}

// Every option and input header of a packed batch checked with the offsets:
// the params with views of null data for q, k and v.
VarlenParams check_varlen_headers(const AttendOptions& options,
                                  const std::vector<NpyHeader>& headers,
                                  const VarlenOffsets& offsets) {
  VarlenParams params;
  params.q = headers[0].view("--q");
  params.k = headers[1].view("--k");
  params.v = headers[2].view("--v");
  params.cu_seqlens_q = offsets.cu_q.view("--cu-seqlens-q");
  params.cu_seqlens_k = offsets.cu_k.view("--cu-seqlens-k");
  params.scale = options.scale;
  params.softcap = options.softcap;
  check_sink_tokens(options);
  params.mask = {.causal = parse_causal(options.causal, "--causal"),
                 .window_left = options.window,
                 .sink_tokens = options.sink_tokens};
  params.storage = parse_dtype(options.dtype, "--dtype");
  if (params.storage == DType::kF64) {
    throw Error("--dtype: f64 (expected f32, bf16, f16, int8, fp8e4m3 or fp8e5m2)");
  }
  validate_varlen_shapes(params);
  const std::int64_t heads = headers[0].shape[1];
  const std::size_t sinks = sink_index(options);
  if (!options.alibi_path.empty() && headers[3].shape[0] != heads) {
    throw Error(fmt::format("--alibi {}: {} slopes (expected {}, one per query head)",
                            options.alibi_path, headers[3].shape[0], heads));
  }
  if (!options.sink_path.empty() && headers[sinks].shape[0] != heads) {
    throw Error(fmt::format("--sink-logits {}: {} logits (expected {}, one per query head)",
                            options.sink_path, headers[sinks].shape[0], heads));
  }
  return params;
}

// A packed batch read and checked: the params point into the rest.
struct VarlenInputs {
  VarlenOffsets offsets;
  std::vector<LoadedNpy> arrays;  // mapped, in the order of inputs_of()
  std::vector<float> slopes, sink_logits;
  VarlenParams params;
};

// Reads the offsets (small) first, then checks every header with them before
// q, k and v are read.
VarlenInputs read_varlen_inputs(const AttendOptions& options) {
  VarlenInputs result;
  result.offsets = read_offsets(options);
  std::vector<Input> inputs = inputs_of(options);
  for (Input& input : inputs) {
    if (input.rank == 4) input.rank = 3;
  }
  std::vector<NpyHeader> headers;
  for (const Input& input : inputs) {
    headers.push_back(read_header(input.path, input.option, input.rank));
  }
  VarlenParams& params = result.params;
  params = check_varlen_headers(options, headers, result.offsets);
  std::vector<LoadedNpy>& arrays = result.arrays;
  for (const Input& input : inputs) {
    arrays.push_back(read_checked(input.path, input.option, headers[arrays.size()]));
    guard_mapping(arrays.size() - 1, input.option, input.path, arrays.back());
  }
  params.q = arrays[0].view("--q");
  params.k = arrays[1].view("--k");
  params.v = arrays[2].view("--v");
  if (!options.alibi_path.empty()) {
    result.slopes = per_head(arrays[3]);
    params.maybe_alibi_slopes = result.slopes.data();
  }
  if (!options.sink_path.empty()) {
    result.sink_logits = per_head(arrays[sink_index(options)]);
    params.maybe_sink_logits = result.sink_logits.data();
  }
  return result;
}

// A packed variable-length batch: q (total_q, heads, head_dim), k and v
// (total_k, kv_heads, head_dim), the offsets (batch + 1,) as <i4 or <i8.
int run_attend_varlen(const AttendOptions& options) {
  check_varlen_options(options);
  check_outputs(options);
  VarlenInputs inputs = read_varlen_inputs(options);
  VarlenParams& params = inputs.params;
  const std::vector<std::int64_t>& shape = inputs.arrays[0].shape;  // (total_q, heads, head_dim)
  // The sequences cover every row, and each row of O and LSE is written (an
  // empty one gets zeros), so their memory is not filled first.
  LargeBuffer out(static_cast<std::size_t>(inputs.arrays[0].numel()) * sizeof(float), "--out");
  auto* out_data = reinterpret_cast<float*>(out.data());
  params.out = make_mutable_view(out_data, DType::kF32, {shape[0], shape[1], shape[2]}, "out");
  const std::int64_t lse_count = options.lse_path.empty() ? 0 : shape[0] * shape[1];
  LargeBuffer lse(static_cast<std::size_t>(lse_count) * sizeof(float), "--lse");
  auto* lse_data = reinterpret_cast<float*>(lse.data());
  if (lse_count > 0) {
    params.maybe_lse = make_mutable_view(lse_data, DType::kF32, {shape[1], shape[0]}, "lse");
  }
  Context context(options.threads);
  attend_varlen(params, context);
  write_npy(options.out_path, DType::kF32, shape, out_data);
  if (lse_count > 0) {
    const std::vector<std::int64_t> lse_shape{shape[1], shape[0]};
    write_npy(options.lse_path, DType::kF32, lse_shape, lse_data);
  }
  return kExitOk;
}

// Seconds since `start`, for --timings.
double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Checks every option and input header, then maps the inputs (also rank
// 0's part of a distributed run).
AttendInputs read_inputs(const AttendOptions& options, const ModeOptions& modes) {
  check_outputs(options);
  std::vector<NpyHeader> headers;
  for (const Input& input : inputs_of(options)) {
    headers.push_back(read_header(input.path, input.option, input.rank));
  }
  AttendInputs result;
  result.params = check_before_reading(options, modes, headers);

  // The files are mapped, not copied: no fresh memory for the kernel to
  // zero (on a VM the most expensive part of reading) and no copy. Their
  // pages are faulted in at once, one file per thread; errors surface in
  // input order.
  std::vector<std::future<LoadedNpy>> reads;
  const std::vector<Input> files = inputs_of(options);
  for (std::size_t i = 0; i < files.size(); ++i) {
    reads.push_back(std::async(std::launch::async, [&files, &headers, i] {
      return read_checked(files[i].path, files[i].option, headers[i]);
    }));
  }
  for (auto& read : reads) {
    result.arrays.push_back(read.get());
    const std::size_t slot = result.arrays.size() - 1;
    guard_mapping(slot, files[slot].option, files[slot].path, result.arrays.back());
  }
  AttentionParams& params = result.params;
  params.q = result.arrays[0].view("--q");
  params.k = result.arrays[1].view("--k");
  params.v = result.arrays[2].view("--v");
  if (!options.alibi_path.empty()) {
    result.slopes = per_head(result.arrays[3]);
    params.maybe_alibi_slopes = result.slopes.data();
  }
  if (!options.sink_path.empty()) {
    result.sink_logits = per_head(result.arrays[sink_index(options)]);
    params.maybe_sink_logits = result.sink_logits.data();
  }
  return result;
}

// --mode ring and sharded-decode: across the ranks of an MPI job.
int run_distributed(const AttendOptions& options) {
  const auto refuse = [&options](bool given, std::string_view option) {
    if (given) {
      throw Error(fmt::format("{}: --mode {} does not use it", option, options.mode));
    }
  };
  refuse(options.chunk.has_value(), "--chunk");
  refuse(options.block_size.has_value(), "--block-size");
  refuse(options.splits.has_value(), "--splits");
  refuse(options.ring_cache, "--ring-cache");
  refuse(options.reference, "--reference");
  refuse(options.segment.has_value() && options.mode != "sharded-decode", "--segment");
  return run_distributed_attend({.mode = options.mode,
                                 .segment = options.segment.value_or(256),
                                 .threads = options.threads,
                                 .out_path = options.out_path,
                                 .lse_path = options.lse_path},
                                [&options] { return read_inputs(options, ModeOptions{}); });
}

int run_attend(const AttendOptions& options) {
  if (!options.cu_q_path.empty() || !options.cu_k_path.empty()) return run_attend_varlen(options);
  if (is_distributed_mode(options.mode)) return run_distributed(options);
  if (options.segment) throw Error("--segment: only --mode sharded-decode uses it");
  const auto started = std::chrono::steady_clock::now();
  const ModeOptions modes = parse_mode_options(options);
  AttendInputs inputs = read_inputs(options, modes);
  AttentionParams& params = inputs.params;
  const LoadedNpy& q = inputs.arrays[0];
  // Every element of O and LSE is written by the kernels (an empty row gets
  // zeros), so their memory is not filled first.
  LargeBuffer out(static_cast<std::size_t>(q.numel()) * sizeof(float), "--out");
  auto* out_data = reinterpret_cast<float*>(out.data());
  params.out = make_mutable_view(out_data, DType::kF32,
                                 {q.shape[0], q.shape[1], q.shape[2], q.shape[3]}, "out");
  const std::int64_t lse_count = options.lse_path.empty() ? 0 : q.shape[0] * q.shape[2] * q.shape[1];
  LargeBuffer lse(static_cast<std::size_t>(lse_count) * sizeof(float), "--lse");
  auto* lse_data = reinterpret_cast<float*>(lse.data());
  if (lse_count > 0) {
    params.maybe_lse =
        make_mutable_view(lse_data, DType::kF32, {q.shape[0], q.shape[2], q.shape[1]}, "lse");
  }
  const double read_seconds = seconds_since(started);

  const auto compute_started = std::chrono::steady_clock::now();
  if (options.reference) {
    const ReferenceResult result = reference_attention(params);
    for (std::size_t i = 0; i < result.out.size(); ++i) out_data[i] = static_cast<float>(result.out[i]);
    for (std::int64_t i = 0; i < lse_count; ++i) {
      lse_data[i] = static_cast<float>(result.lse[static_cast<std::size_t>(i)]);
    }
  } else {
    Context context(options.threads);
    attend_with_mode(params, modes, context);
  }
  const double compute_seconds = seconds_since(compute_started);

  const auto write_started = std::chrono::steady_clock::now();
  write_npy(options.out_path, DType::kF32, q.shape, out_data);
  if (!options.lse_path.empty()) {
    const std::vector<std::int64_t> lse_shape{q.shape[0], q.shape[2], q.shape[1]};
    write_npy(options.lse_path, DType::kF32, lse_shape, lse_data);
  }
  if (options.timings) {
    const double write_seconds = seconds_since(write_started);
    std::fprintf(stderr,
                 "timings: read %.1f ms, compute %.1f ms, write %.1f ms, total %.1f ms\n",
                 read_seconds * 1e3, compute_seconds * 1e3, write_seconds * 1e3,
                 seconds_since(started) * 1e3);
  }
  return kExitOk;
}

}  // namespace

// --mode and the options that steer some paths only (checked against the
// mode in parse_mode_options and run_distributed).
void add_path_options(CLI::App& command, AttendOptions& options) {
  command.add_option("--mode", options.mode,
                      "path (all compute the same function): prefill (one call), decode (cache "
                      "the first seqlen_k - seqlen_q tokens, then one token at a time), chunked "
                      "(--chunk tokens at a time), paged (decode or chunked over a paged cache "
                      "of --block-size blocks), split (key range cut into --splits parts, merged "
                      "through their LSEs); under mpirun: ring (one sequence cut across the "
                      "ranks, K/V passed around a ring; 8-bit --dtype travels as f32) or "
                      "sharded-decode (decode over a KV cache spread across the ranks; f32, "
                      "bf16 or f16 only); see docs/distributed.md")
      ->check(CLI::IsMember({"prefill", "decode", "chunked", "paged", "split", "ring",
                             "sharded-decode"}));
  command.add_option("--chunk", options.chunk, "tokens per step for chunked and paged (>= 1)")
      ->check(kPositive);
  command.add_option("--block-size", options.block_size,
                      "tokens per block of the paged cache (>= 1, default 16)")
      ->check(kPositive);
  command.add_option("--splits", options.splits, "parts of the key range for split (>= 1, default 2)")
      ->check(kPositive);
  command.add_flag("--ring-cache", options.ring_cache,
                    "decode, chunked: run each cache as a ring of S + W + chunk slots that "
                    "overwrites what the window no longer sees (needs --window; S = "
                    "--sink-tokens)");
  command.add_option("--segment", options.segment,
                      "tokens per segment of the sharded cache for sharded-decode (>= 1, "
                      "default 256): each new segment goes to the rank holding the fewest")
      ->check(kPositive);
}

void add_attend_command(CLI::App& app, Runner& runner) {
  auto options = std::make_shared<AttendOptions>();
  CLI::App* command = app.add_subcommand(
      "attend",
      "Compute causal attention on NumPy files.");
  command->footer(
      "Q is (batch, seqlen_q, heads, head_dim); K and V are (batch, seqlen_k, kv_heads, head_dim),\n"
      "as <f4, <f2 or <f8. Writes O (batch, seqlen_q, heads, head_dim) and, with --lse, the\n"
      "natural-log sum-exp (batch, heads, seqlen_q), both <f4. heads must be a multiple of\n"
      "kv_heads (grouped-query attention). Query i sees keys j <= i + seqlen_k - seqlen_q\n"
      "(bottom-right alignment; see docs/semantics.md).");
  command->add_option("--q", options->q_path, "queries, (batch, seqlen_q, heads, head_dim)")->required();
  command->add_option("--k", options->k_path, "keys, (batch, seqlen_k, kv_heads, head_dim)")->required();
  command->add_option("--v", options->v_path, "values, (batch, seqlen_k, kv_heads, head_dim)")->required();
  command->add_option("--out", options->out_path, "output file for O (<f4); - for standard output")
      ->required()
      ->check(kOutputPath);
  command->add_option("--lse", options->lse_path,
                      "also write LSE (batch, heads, seqlen_q), natural log; - for standard output")
      ->check(kOutputPath);
  command->add_option("--scale", options->scale, "score scale (default 1/sqrt(head_dim))")
      ->check(kFloat);
  command->add_option("--causal", options->causal,
                      "mask alignment: bottom-right (default), top-left (PyTorch is_causal) or "
                      "none (bidirectional)")
      ->check(CLI::IsMember({"bottom-right", "top-left", "none"}));
  command->add_option("--window", options->window,
                      "left window W: query at position p sees keys p-W..p (W+1 keys)")
      ->check(kNonNegative);
  command->add_option("--sink-tokens", options->sink_tokens,
                      "StreamingLLM sink tokens S (with --window): keys 0..S-1 stay visible "
                      "beside the window (those <= p)")
      ->check(kNonNegative);
  command->add_option("--softcap", options->softcap, "softcap c > 0: s = c*tanh(s/c) (0: off)")
      ->check(kNonNegativeFloat);
  command->add_option("--alibi", options->alibi_path, "ALiBi slopes, (heads,) .npy");
  command->add_option("--cu-seqlens-q", options->cu_q_path,
                      "a packed variable-length batch (FlashAttention's varlen): offsets "
                      "(batch + 1,) <i4 or <i8 from 0 to total_q; --q, --k, --v are then "
                      "(total, heads, head_dim), O (total_q, heads, head_dim), LSE (heads, total_q)");
  command->add_option("--cu-seqlens-k", options->cu_k_path,
                      "the packed batch's key offsets (batch + 1,), 0 to total_k; sequence b is "
                      "q[cu_q[b]:cu_q[b+1]] against k, v[cu_k[b]:cu_k[b+1]], masked on its own");
  command->add_option("--sink-logits", options->sink_path,
                      "learned attention sinks (gpt-oss), (heads,) .npy: one more term "
                      "e^sink in each row's softmax denominator, with no value");
  command->add_option("--threads", options->threads, "worker threads (default: all cores)")
      ->check(kPositive);
  command->add_option("--dtype", options->dtype,
                      "storage dtype of Q/K/V: f32 (default), bf16, f16; or K/V in 8 bits with "
                      "an f32 scale per row (Q stays f32): int8, fp8e4m3, fp8e5m2")
      ->check(CLI::IsMember({"f32", "bf16", "f16", "int8", "fp8e4m3", "fp8e5m2"}));
  add_path_options(*command, *options);
  command->add_flag("--timings", options->timings,
                    "print the time spent reading (and checking) the inputs, computing and "
                    "writing the outputs on standard error");
  command->add_flag("--reference", options->reference,
                    "use the float64 reference instead of the fast kernel (slow; for checking)");
  command->callback([&runner, options] { runner = [options] { return run_attend(*options); }; });
}

}  // namespace lookback::cli
