// `lookback cache`: KV-cache checkpoints from the command line.
//
//   lookback cache save     fills a cache from K and V .npy files and saves it
//   lookback cache inspect  prints a checkpoint's header and verifies its
//                           checksums: exit 0 intact, 1 damaged, 2 unreadable
//
// The format and its guarantees: docs/checkpoint.md.
#include <fmt/format.h>

#include <algorithm>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>

#include "common.hpp"
#include "lookback/checkpoint.hpp"
#include "lookback/error.hpp"
#include "lookback/kv_cache.hpp"
#include "lookback/npy.hpp"
#include "output_format.hpp"

namespace lookback::cli {
namespace {

// Block tables longer than this are elided in text output (json has them all).
constexpr std::size_t kShownBlocks = 16;

struct SaveOptions {
  std::string k_path;
  std::string v_path;
  std::string out;
  std::string dtype = "f32";
  std::int64_t capacity = 0;  // only read when --capacity was given
  float rope_theta = 0.0f;    // only read when --rope-theta was given
  bool rope_interleaved = false;
  bool paged = false;
  std::int64_t block_size = 16;
  std::int64_t num_blocks = 0;  // only read when --num-blocks was given
  std::int64_t ring_sink_tokens = 0;  // only read when --ring-sink-tokens was given
  CLI::Option* capacity_option = nullptr;
  CLI::Option* ring_option = nullptr;
  CLI::Option* block_size_option = nullptr;
  CLI::Option* num_blocks_option = nullptr;
  CLI::Option* rope_theta_option = nullptr;
};

struct InspectOptions {
  std::string path;
  OutputFormat format = OutputFormat::kText;
};

LoadedNpy read_kv(const std::string& path, const char* option) {
  LoadedNpy array = load_npy(path);  // read once, into memory not zero-filled first
  if (array.shape.size() != 3) {
    throw Error(fmt::format("{} {}: {} dimension{} (expected 3: (tokens, kv_heads, head_dim))",
                            option, path, array.shape.size(),
                            array.shape.size() == 1 ? "" : "s"));
  }
  return array;
}

// --capacity sizes a contiguous cache, --block-size and --num-blocks a paged
// pool: given to the other kind they would be ignored, so they are refused.
void check_kind_options(const SaveOptions& options) {
  const std::pair<const CLI::Option*, const char*> paged_only[] = {
      {options.block_size_option, "--block-size"}, {options.num_blocks_option, "--num-blocks"}};
  for (const auto& [option, name] : paged_only) {
    if (!options.paged && *option) {
      throw Error(fmt::format("{}: given without --paged (expected it only with --paged: a "
                              "contiguous cache has no blocks; its size is --capacity)",
                              name));
    }
  }
  if (*options.ring_option && (options.paged || !*options.capacity_option)) {
    throw Error(fmt::format("--ring-sink-tokens: given {} (expected it with --capacity, the ring's "
                            "slots, and without --paged)",
                            options.paged ? "with --paged" : "without --capacity"));
  }
  if (options.paged && *options.capacity_option) {
    throw Error("--capacity: given with --paged (expected --num-blocks and --block-size to size "
                "a paged pool; --capacity sizes a contiguous cache)");
  }
}

// A ring of --capacity slots holding --ring-sink-tokens sink tokens, fed the
// tokens of --k and --v in steps it can take (capacity - sink tokens each).
void save_ring(const SaveOptions& options, const CacheConfig& config, const LoadedNpy& k,
               const LoadedNpy& v) {
  if (options.ring_sink_tokens >= options.capacity) {
    throw Error(fmt::format("--ring-sink-tokens: {} (expected less than --capacity {}: the ring "
                            "needs a slot beside its sink tokens)",
                            options.ring_sink_tokens, options.capacity));
  }
  KvCache ring(config, options.capacity, RingSpec{.sink_tokens = options.ring_sink_tokens});
  const std::int64_t tokens = k.shape[0];
  const std::int64_t step = options.capacity - options.ring_sink_tokens;
  for (std::int64_t done = 0; done < tokens; done += step) {
    const std::int64_t count = std::min(step, tokens - done);
    ring.append(slice(k.view("--k"), 0, done, count), slice(v.view("--v"), 0, done, count));
  }
  save_checkpoint(ring, options.out);
  if (options.out == "-") return;  // stdout holds the checkpoint
  std::cout << fmt::format(
      "saved a ring cache of {} slots ({} sink tokens) holding {} of {} tokens to {}\n",
      options.capacity, options.ring_sink_tokens, std::min(tokens, options.capacity), tokens,
      options.out);
}

int run_save(const SaveOptions& options) {
  check_kind_options(options);
  const DType storage = parse_dtype(options.dtype, "--dtype");
  if (storage == DType::kF64) {
    throw Error("--dtype: f64 (expected f32, bf16, f16, int8, fp8e4m3 or fp8e5m2)");
  }
  const LoadedNpy k = read_kv(options.k_path, "--k");
  const LoadedNpy v = read_kv(options.v_path, "--v");
  if (v.shape != k.shape) {
    throw Error(fmt::format("--v {}: shape ({}, {}, {}) (expected ({}, {}, {}), the shape of --k)",
                            options.v_path, v.shape[0], v.shape[1], v.shape[2], k.shape[0],
                            k.shape[1], k.shape[2]));
  }
  const std::int64_t tokens = k.shape[0];
  CacheConfig config{
      .kv_heads = k.shape[1], .head_dim = k.shape[2], .storage = storage, .rope = std::nullopt};
  if (*options.rope_theta_option) {
    config.rope = RopeSpec{.theta = options.rope_theta, .interleaved = options.rope_interleaved};
  } else if (options.rope_interleaved) {
    throw Error("--rope-interleaved: given without --rope-theta (expected both, or neither)");
  }
  if (options.paged) {
    const std::int64_t needed = (tokens + options.block_size - 1) / options.block_size;
    const std::int64_t num_blocks = *options.num_blocks_option ? options.num_blocks : needed;
    if (num_blocks < needed) {
      throw Error(
          fmt::format("--num-blocks: {} (expected at least {} blocks of {} tokens for the "
                      "{} tokens of --k)",
                      num_blocks, needed, options.block_size, tokens));
    }
    PagedKvPool pool(config, options.block_size, num_blocks);
    const SequenceId sequence = pool.create();
    pool.append(sequence, k.view("--k"), v.view("--v"));
    save_checkpoint(pool, options.out);
    if (options.out == "-") return kExitOk;  // stdout holds the checkpoint
    std::cout << fmt::format(
        "saved a paged pool of {} blocks of {} tokens, one sequence of {} "
        "tokens, to {}\n",
        num_blocks, options.block_size, tokens, options.out);
  } else if (*options.ring_option) {
    save_ring(options, config, k, v);
  } else {
    const std::int64_t capacity = *options.capacity_option ? options.capacity : tokens;
    if (capacity < tokens) {
      throw Error(fmt::format("--capacity: {} (expected at least {}, the tokens of --k)", capacity,
                              tokens));
    }
    KvCache cache(config, capacity);
    cache.append(k.view("--k"), v.view("--v"));
    save_checkpoint(cache, options.out);
    if (options.out == "-") return kExitOk;  // stdout holds the checkpoint
    std::cout << fmt::format("saved a contiguous cache of {} of {} tokens to {}\n", tokens,
                             capacity, options.out);
  }
  return kExitOk;
}

std::string rope_text(const std::optional<RopeSpec>& rope) {
  if (!rope) return "off";
  return fmt::format("theta {}, {}", rope->theta,
                     rope->interleaved ? "interleaved pairs" : "half rotation (NeoX)");
}

std::string blocks_text(const std::vector<std::int64_t>& blocks) {
  std::string text = "[";
  for (std::size_t i = 0; i < blocks.size() && i < kShownBlocks; ++i) {
    text += (i ? ", " : "") + std::to_string(blocks[i]);
  }
  if (blocks.size() > kShownBlocks)
    text += fmt::format(", ... {} more", blocks.size() - kShownBlocks);
  return text + "]";
}

std::string render_text(const CheckpointInfo& info) {
  std::string text = fmt::format("checkpoint: {} ({} bytes)\n", info.path, info.file_bytes);
  if (info.kind) {
    text += fmt::format("format: version {}, {}\n", info.version, checkpoint_kind_name(*info.kind));
  }
  if (info.config) {
    const CacheConfig& config = *info.config;
    text += fmt::format("kv_heads: {}\nhead_dim: {}\nstorage: {}\nrope: {}\n", config.kv_heads,
                        config.head_dim, dtype_name(config.storage), rope_text(config.rope));
    if (info.kind != CheckpointKind::kPaged) {
      text += fmt::format("capacity: {} tokens\nlength: {} tokens\n", info.capacity, info.length);
      if (info.kind == CheckpointKind::kRing)
        text += fmt::format("sink_tokens: {}\n", info.sink_tokens);
    } else {
      text += fmt::format("block_size: {} tokens\nblocks: {} ({} used, {} free)\nnext_id: {}\n",
                          info.block_size, info.num_blocks, info.used_blocks,
                          info.num_blocks - info.used_blocks, info.next_id);
      text += fmt::format("sequences: {}\n", info.sequences.size());
      for (const CheckpointSequence& sequence : info.sequences) {
        text += fmt::format("  sequence {}: {} tokens, blocks {}\n", sequence.id, sequence.length,
                            blocks_text(sequence.blocks));
      }
    }
  }
  if (!info.sections.empty()) text += "sections:\n";
  for (const CheckpointSection& section : info.sections) {
    std::string status;
    if (!section.present) {
      status = "MISSING (the file ends first)";
    } else if (section.crc_ok()) {
      status = "ok";
    } else {
      status = fmt::format("BAD (computed {:#010x})", section.computed_crc);
    }
    text += fmt::format("  {:<7} offset {:>10}  {:>12} bytes  crc32 {:#010x}  {}\n", section.name,
                        section.offset, section.bytes, section.stored_crc, status);
  }
  text += info.intact() ? "status: intact\n" : "status: DAMAGED\n";
  for (const std::string& problem : info.problems) text += fmt::format("  {}\n", problem);
  return text;
}

std::string render_json(const CheckpointInfo& info) {
  using Json = nlohmann::ordered_json;
  Json doc;
  doc["path"] = info.path;
  doc["file_bytes"] = info.file_bytes;
  doc["version"] = info.version;
  doc["kind"] = info.kind ? Json(std::string(checkpoint_kind_name(*info.kind))) : Json(nullptr);
  if (info.config) {
    const CacheConfig& config = *info.config;
    doc["kv_heads"] = config.kv_heads;
    doc["head_dim"] = config.head_dim;
    doc["storage"] = std::string(dtype_name(config.storage));
    doc["rope"] =
        config.rope ? Json{{"theta", config.rope->theta}, {"interleaved", config.rope->interleaved}}
                    : Json(nullptr);
    if (info.kind != CheckpointKind::kPaged) {
      doc["capacity"] = info.capacity;
      doc["length"] = info.length;
      if (info.kind == CheckpointKind::kRing) doc["sink_tokens"] = info.sink_tokens;
    } else {
      doc["block_size"] = info.block_size;
      doc["num_blocks"] = info.num_blocks;
      doc["used_blocks"] = info.used_blocks;
      doc["next_id"] = info.next_id;
      Json& sequences = doc["sequences"] = Json::array();
      for (const CheckpointSequence& sequence : info.sequences) {
        sequences.push_back(
            {{"id", sequence.id}, {"length", sequence.length}, {"blocks", sequence.blocks}});
      }
    }
  }
  Json& sections = doc["sections"] = Json::array();
  for (const CheckpointSection& section : info.sections) {
    sections.push_back({{"name", section.name},
                        {"offset", section.offset},
                        {"bytes", section.bytes},
                        {"crc32", fmt::format("{:#010x}", section.stored_crc)},
                        {"present", section.present},
                        {"crc_ok", section.crc_ok()}});
  }
  doc["intact"] = info.intact();
  doc["problems"] = info.problems;
  return doc.dump(2) + "\n";
}

int run_inspect(const InspectOptions& options) {
  const CheckpointInfo info = inspect_checkpoint(options.path);
  std::cout << (options.format == OutputFormat::kJson ? render_json(info) : render_text(info))
            << std::flush;
  if (info.intact()) return kExitOk;
  std::string problems;
  for (const std::string& problem : info.problems)
    problems += (problems.empty() ? "" : "; ") + problem;
  std::cerr << fmt::format("lookback: {}: damaged checkpoint: {}\n", options.path, problems);
  return kExitFailure;
}

}  // namespace

void add_cache_command(CLI::App& app, Runner& runner) {
  CLI::App* command = app.add_subcommand(
      "cache", "Save KV-cache checkpoints and verify them (inspect exits 1 if damaged).");
  command->require_subcommand(1);
  command->footer(
      "A checkpoint holds a KV cache (or a paged pool with its block tables) so that a prompt\n"
      "prefilled once can be resumed in another process. Each section carries a CRC32; files\n"
      "are written atomically (temporary file, fsync, rename). Format: docs/checkpoint.md.\n"
      "\n"
      "Examples:\n"
      "  lookback cache save --k k.npy --v v.npy --out prompt.lbkv --dtype bf16\n"
      "  lookback cache save --k k.npy --v v.npy --out pool.lbkv --paged --block-size 16\n"
      "  lookback cache save --k k.npy --v v.npy --out ring.lbkv --capacity 64 \\\n"
      "      --ring-sink-tokens 4\n"
      "  lookback cache inspect prompt.lbkv\n"
      "  lookback cache inspect pool.lbkv --format json");

  auto save = std::make_shared<SaveOptions>();
  CLI::App* save_command = command->add_subcommand(
      "save", "Fill a cache from K and V .npy files (tokens, kv_heads, head_dim) and save it.");
  save_command->add_option("--k", save->k_path, "keys, (tokens, kv_heads, head_dim) .npy")
      ->required();
  save_command->add_option("--v", save->v_path, "values, the shape of --k")->required();
  save_command
      ->add_option("--out", save->out, "checkpoint file to write (atomically); - for standard output")
      ->required()
      ->check(kOutputPath);
  save_command->add_option("--dtype", save->dtype,
                           "storage dtype: f32 (default), bf16, f16, or 8 bits with an f32 scale "
                           "per row: int8, fp8e4m3, fp8e5m2");
  save->capacity_option =
      save_command
          ->add_option("--capacity", save->capacity,
                       "contiguous cache capacity in tokens (default: the tokens given)")
          ->check(kNonNegative);
  save->rope_theta_option =
      save_command
          ->add_option("--rope-theta", save->rope_theta,
                       "rotate keys by RoPE with this base on the way in")
          ->check(kFloat);
  save_command->add_flag("--rope-interleaved", save->rope_interleaved,
                         "RoPE on pairs (2e, 2e + 1) instead of halves (e, e + d/2)");
  save->ring_option =
      save_command
          ->add_option("--ring-sink-tokens", save->ring_sink_tokens,
                       "save a ring cache of --capacity slots keeping this many sink tokens "
                       "(the newest tokens fill the other slots)")
          ->check(kNonNegative);
  save_command->add_flag("--paged", save->paged, "save a paged pool with one sequence");
  save->block_size_option =
      save_command
          ->add_option("--block-size", save->block_size, "paged: tokens per block (default 16)")
          ->check(kPositive);
  save->num_blocks_option =
      save_command
          ->add_option("--num-blocks", save->num_blocks,
                       "paged: blocks in the pool (default: as many as the tokens need)")
          ->check(kNonNegative);
  save_command->callback([save, &runner] { runner = [save] { return run_save(*save); }; });

  auto inspect = std::make_shared<InspectOptions>();
  CLI::App* inspect_command = command->add_subcommand(
      "inspect", "Print a checkpoint's header and verify its checksums (exit 1 if damaged).");
  inspect_command->add_option("FILE", inspect->path, "checkpoint file")->required();
  add_format_option(*inspect_command, inspect->format, {OutputFormat::kText, OutputFormat::kJson});
  inspect_command->callback(
      [inspect, &runner] { runner = [inspect] { return run_inspect(*inspect); }; });
}

}  // namespace lookback::cli
