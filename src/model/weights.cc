// Loading weights: files mapped, headers parsed and checked
// (safetensors.hpp), every tensor's dtype and shape checked against the config.
#include "model/weights.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "lookback/dtype.hpp"
#include "lookback/error.hpp"
#include "model/safetensors.hpp"

namespace lookback::model::detail {
namespace {

[[noreturn]] void io_error(const std::string& path, const std::string& what, int err) {
  throw Error(ErrorCode::kIo, fmt::format("{}: {}: {}", path, what, std::strerror(err)));
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) io_error(path, "cannot open", errno);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// One mapped file and its parsed header.
struct Shard {
  std::string path;
  const MappedFile* file = nullptr;
  SafetensorsHeader header;
};

class TensorSource {
 public:
  TensorSource(const std::string& directory, Weights& weights) : weights_(weights) {
    namespace fs = std::filesystem;
    const std::string single = (fs::path(directory) / "model.safetensors").string();
    const std::string index = (fs::path(directory) / "model.safetensors.index.json").string();
    if (fs::exists(single) || !fs::exists(index)) {
      add_shard(single);
      return;
    }
    // Sharded: {"weight_map": {"tensor name": "model-00001-of-00002.safetensors", ...}}
    const nlohmann::json json = nlohmann::json::parse(read_text(index), nullptr, false);
    if (json.is_discarded() || !json.is_object() || !json.contains("weight_map") ||
        !json["weight_map"].is_object()) {
      throw Error(ErrorCode::kFormat,
                  fmt::format("{}: expected a JSON object with a \"weight_map\" object", index));
    }
    std::map<std::string, std::size_t> shard_of_file;
    for (const auto& [tensor, file] : json["weight_map"].items()) {
      if (!file.is_string()) {
        throw Error(ErrorCode::kFormat,
                    fmt::format("{}: weight_map '{}' is not a file name", index, tensor));
      }
      const std::string name = file.get<std::string>();
      // Shards live beside the index: a path elsewhere is refused.
      if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..") {
        throw Error(ErrorCode::kFormat,
                    fmt::format("{}: weight_map '{}': '{}' (expected a file name in the model "
                                "folder)", index, tensor, name));
      }
      if (!shard_of_file.count(name)) {
        shard_of_file[name] = shards_.size();
        add_shard((fs::path(directory) / name).string());
      }
      shard_of_tensor_[tensor] = shard_of_file[name];
    }
  }

  // Attention and MLP biases (Qwen2's q/k/v biases) are not part of the
  // LLaMA layout: a model that has them would run wrong without them.
  void refuse_biases() const {
    for (const Shard& shard : shards_) {
      for (const SafetensorsEntry& entry : shard.header.tensors) {
        if (entry.name.size() > 10 && entry.name.ends_with("_proj.bias")) {
          throw Error(ErrorCode::kFormat,
                      fmt::format("{}: tensor '{}': linear-layer biases are not supported "
                                  "(expected the LLaMA layout, which has none)",
                                  shard.path, entry.name));
        }
      }
    }
  }

  // The tensor `name` as float32 of exactly `shape`.
  const float* get(const std::string& name, std::initializer_list<std::int64_t> shape) {
    const Shard* shard = nullptr;
    const SafetensorsEntry* entry = nullptr;
    if (const auto it = shard_of_tensor_.find(name); it != shard_of_tensor_.end()) {
      shard = &shards_[it->second];
      entry = shard->header.find(name);
    } else if (shard_of_tensor_.empty()) {
      shard = &shards_.front();
      entry = shard->header.find(name);
    }
    if (shard == nullptr || entry == nullptr) {
      throw Error(ErrorCode::kFormat,
                  fmt::format("{}: tensor '{}' missing", shard ? shard->path : shards_.front().path,
                              name));
    }
    const std::vector<std::int64_t> expected(shape);
    if (entry->shape != expected) {
      throw Error(ErrorCode::kFormat,
                  fmt::format("{}: tensor '{}' has shape [{}] (expected [{}] from config.json)",
                              shard->path, name, fmt::join(entry->shape, ", "),
                              fmt::join(expected, ", ")));
    }
    const std::byte* bytes = shard->file->data() + shard->header.data_offset + entry->begin;
    std::int64_t numel = 1;
    for (std::int64_t extent : expected) numel *= extent;
    weights_.parameters += numel;
    switch (entry->dtype) {
      case SafeDType::kF32:
        if (reinterpret_cast<std::uintptr_t>(bytes) % alignof(float) == 0) {
          return reinterpret_cast<const float*>(bytes);  // in place, no copy
        }
        return convert(bytes, numel, [](const std::byte* p, std::int64_t i) {
          float value;
          std::memcpy(&value, p + 4 * i, 4);
          return value;
        });
      case SafeDType::kF16:
        return convert(bytes, numel, [](const std::byte* p, std::int64_t i) {
          std::uint16_t bits;
          std::memcpy(&bits, p + 2 * i, 2);
          return f16_to_f32(bits);
        });
      case SafeDType::kBF16:
        return convert(bytes, numel, [](const std::byte* p, std::int64_t i) {
          std::uint16_t bits;
          std::memcpy(&bits, p + 2 * i, 2);
          return bf16_to_f32(bits);
        });
      default:
        throw Error(ErrorCode::kFormat,
                    fmt::format("{}: tensor '{}' has dtype {} (expected F32, F16 or BF16)",
                                shard->path, name, safe_dtype_name(entry->dtype)));
    }
  }

 private:
  void add_shard(const std::string& path) {
    weights_.files.push_back(std::make_unique<MappedFile>(path));
    const MappedFile& file = *weights_.files.back();
    shards_.push_back(Shard{
        .path = path,
        .file = &file,
        .header = parse_safetensors(std::span<const std::byte>(file.data(), file.size()), path)});
  }

  template <typename Load>
  const float* convert(const std::byte* bytes, std::int64_t numel, Load load) {
    auto values = std::make_unique<float[]>(static_cast<std::size_t>(numel));
    for (std::int64_t i = 0; i < numel; ++i) values[i] = load(bytes, i);
    weights_.converted.push_back(std::move(values));
    return weights_.converted.back().get();
  }

  Weights& weights_;
  std::vector<Shard> shards_;
  std::map<std::string, std::size_t> shard_of_tensor_;
};

}  // namespace

MappedFile::MappedFile(const std::string& path) {
  // O_NONBLOCK: a FIFO must not block open(); it is refused below.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) io_error(path, "cannot open", errno);
  struct stat info {};
  if (::fstat(fd, &info) != 0) {
    const int err = errno;
    ::close(fd);
    io_error(path, "cannot stat", err);
  }
  if (!S_ISREG(info.st_mode)) {
    ::close(fd);
    throw Error(ErrorCode::kIo, fmt::format("{}: not a regular file (expected a safetensors file)", path));
  }
  size_ = static_cast<std::size_t>(info.st_size);
  if (size_ > 0) {
    void* mapped = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (mapped == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      io_error(path, "cannot map", err);
    }
    data_ = static_cast<const std::byte*>(mapped);
  }
  ::close(fd);  // the mapping keeps the file
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), size_);
}

Weights load_weights(const std::string& directory, const ModelConfig& c) {
  Weights weights;
  TensorSource source(directory, weights);
  source.refuse_biases();
  const std::int64_t hidden = c.hidden_size, q_width = c.num_attention_heads * c.head_dim,
                     kv_width = c.num_key_value_heads * c.head_dim, inner = c.intermediate_size;
  weights.embed = source.get("model.embed_tokens.weight", {c.vocab_size, hidden});
  for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = fmt::format("model.layers.{}.", i);
    weights.layers.push_back(LayerWeights{
        .input_norm = source.get(p + "input_layernorm.weight", {hidden}),
        .q = source.get(p + "self_attn.q_proj.weight", {q_width, hidden}),
        .k = source.get(p + "self_attn.k_proj.weight", {kv_width, hidden}),
        .v = source.get(p + "self_attn.v_proj.weight", {kv_width, hidden}),
        .o = source.get(p + "self_attn.o_proj.weight", {hidden, q_width}),
        .post_norm = source.get(p + "post_attention_layernorm.weight", {hidden}),
        .gate = source.get(p + "mlp.gate_proj.weight", {inner, hidden}),
        .up = source.get(p + "mlp.up_proj.weight", {inner, hidden}),
        .down = source.get(p + "mlp.down_proj.weight", {hidden, inner}),
    });
  }
  weights.norm = source.get("model.norm.weight", {hidden});
  weights.lm_head = c.tie_word_embeddings ? weights.embed
                                          : source.get("lm_head.weight", {c.vocab_size, hidden});
  return weights;
}

}  // namespace lookback::model::detail
