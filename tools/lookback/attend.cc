// lookback attend: attention on NumPy files.
#include <fmt/format.h>

#include <filesystem>
#include <optional>
#include <vector>

#include "common.hpp"
#include "lookback/attention.hpp"
#include "lookback/error.hpp"
#include "lookback/modes.hpp"
#include "lookback/npy.hpp"
#include "lookback/reference.hpp"

namespace lookback::cli {

namespace {

struct AttendOptions {
  std::string q_path, k_path, v_path, out_path, lse_path, alibi_path;
  std::optional<float> scale;
  std::string causal = "bottom-right";
  std::optional<std::int64_t> window;
  float softcap = 0.0f;
  int threads = 0;
  std::string dtype = "f32";
  std::string mode = "prefill";
  std::int64_t chunk = 0;  // 0: not given
  std::int64_t block_size = 16;
  std::int64_t splits = 2;
  bool reference = false;
};

NpyArray read_input(const std::string& path, const std::string& option, int rank) {
  NpyArray array = read_npy(path);
  if (static_cast<int>(array.shape.size()) != rank) {
    std::string shape = "(";
    for (std::size_t i = 0; i < array.shape.size(); ++i) {
      shape += (i ? ", " : "") + std::to_string(array.shape[i]);
    }
    shape += array.shape.size() == 1 ? ",)" : ")";
    throw Error(fmt::format("{} {}: shape {} has {} dimensions (expected {})", option, path, shape,
                            array.shape.size(),
                            rank == 4 ? "4: (batch, seqlen, heads, head_dim)" : "1: (heads,)"));
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

int run_attend(const AttendOptions& options) {
  const Causal causal = parse_causal(options.causal, "--causal");
  const DType storage = parse_dtype(options.dtype, "--dtype");
  if (storage == DType::kF64) throw Error("--dtype: f64 (expected f32, bf16 or f16)");
  check_output_folder(options.out_path, "--out");
  if (!options.lse_path.empty()) {
    check_output_folder(options.lse_path, "--lse");
    check_distinct_outputs(options.out_path, options.lse_path);
  }

  const NpyArray q = read_input(options.q_path, "--q", 4);
  const NpyArray k = read_input(options.k_path, "--k", 4);
  const NpyArray v = read_input(options.v_path, "--v", 4);
  std::vector<float> slopes;
  if (!options.alibi_path.empty()) {
    const NpyArray alibi = read_input(options.alibi_path, "--alibi", 1);
    if (alibi.shape[0] != q.shape[2]) {
      throw Error(fmt::format("--alibi {}: {} slopes (expected {}, one per query head)",
                              options.alibi_path, alibi.shape[0], q.shape[2]));
    }
    for (std::int64_t h = 0; h < alibi.shape[0]; ++h) {
      slopes.push_back(load_as_float(alibi.data.data(), alibi.dtype, h));
    }
  }

  AttentionParams params;
  params.q = q.view("--q");
  params.k = k.view("--k");
  params.v = v.view("--v");
  std::vector<float> out(static_cast<std::size_t>(q.numel()));
  params.out = make_mutable_view(out.data(), DType::kF32,
                                 {q.shape[0], q.shape[1], q.shape[2], q.shape[3]}, "out");
  std::vector<float> lse;
  if (!options.lse_path.empty()) {
    lse.resize(static_cast<std::size_t>(q.shape[0] * q.shape[2] * q.shape[1]));
    params.maybe_lse =
        make_mutable_view(lse.data(), DType::kF32, {q.shape[0], q.shape[2], q.shape[1]}, "lse");
  }
  params.maybe_alibi_slopes = slopes.empty() ? nullptr : slopes.data();
  params.scale = options.scale;
  params.softcap = options.softcap;
  params.mask = {.causal = causal, .window_left = options.window};
  params.storage = storage;
  validate(params);

  const Mode mode = parse_mode(options.mode, "--mode");
  ModeOptions mode_options{.mode = mode,
                           .chunk = options.chunk > 0 ? options.chunk : 1,
                           .block_size = options.block_size,
                           .splits = options.splits};
  if (mode == Mode::kDecode && options.chunk > 1) {
    throw Error("--chunk: decode appends one token at a time (expected --mode chunked or paged for "
                "chunks)");
  }
  if (mode == Mode::kChunked && options.chunk == 0) {
    throw Error("--chunk: missing (expected the tokens per step with --mode chunked)");
  }

  if (options.reference) {
    const ReferenceResult result = reference_attention(params);
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(result.out[i]);
    for (std::size_t i = 0; i < lse.size(); ++i) lse[i] = static_cast<float>(result.lse[i]);
  } else {
    Context context(options.threads);
    attend_with_mode(params, mode_options, context);
  }

  write_npy(options.out_path, DType::kF32, q.shape, out.data());
  if (!options.lse_path.empty()) {
    const std::vector<std::int64_t> lse_shape{q.shape[0], q.shape[2], q.shape[1]};
    write_npy(options.lse_path, DType::kF32, lse_shape, lse.data());
  }
  return kExitOk;
}

}  // namespace

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
  command->add_option("--scale", options->scale, "score scale (default 1/sqrt(head_dim))");
  command->add_option("--causal", options->causal,
                      "mask alignment: bottom-right (default), top-left (PyTorch is_causal) or "
                      "none (bidirectional)")
      ->check(CLI::IsMember({"bottom-right", "top-left", "none"}));
  command->add_option("--window", options->window,
                      "left window W: query at position p sees keys p-W..p (W+1 keys)")
      ->check(kNonNegative);
  command->add_option("--softcap", options->softcap, "softcap c > 0: s = c*tanh(s/c) (0: off)")
      ->check(CLI::NonNegativeNumber);
  command->add_option("--alibi", options->alibi_path, "ALiBi slopes, (heads,) .npy");
  command->add_option("--threads", options->threads, "worker threads (default: all cores)")
      ->check(kPositive);
  command->add_option("--dtype", options->dtype, "storage dtype of Q/K/V: f32 (default), bf16, f16")
      ->check(CLI::IsMember({"f32", "bf16", "f16"}));
  command->add_option("--mode", options->mode,
                      "path (all compute the same function): prefill (one call), decode (cache "
                      "the first seqlen_k - seqlen_q tokens, then one token at a time), chunked "
                      "(--chunk tokens at a time), paged (decode or chunked over a paged cache "
                      "of --block-size blocks), split (key range cut into --splits parts, merged "
                      "through their LSEs)")
      ->check(CLI::IsMember({"prefill", "decode", "chunked", "paged", "split"}));
  command->add_option("--chunk", options->chunk, "tokens per step for chunked and paged (>= 1)")
      ->check(kPositive);
  command->add_option("--block-size", options->block_size,
                      "tokens per block of the paged cache (>= 1, default 16)")
      ->check(kPositive);
  command->add_option("--splits", options->splits, "parts of the key range for split (>= 1, default 2)")
      ->check(kPositive);
  command->add_flag("--reference", options->reference,
                    "use the float64 reference instead of the fast kernel (slow; for checking)");
  command->callback([&runner, options] { runner = [options] { return run_attend(*options); }; });
}

}  // namespace lookback::cli
