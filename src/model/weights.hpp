// The weights of a loaded model: float32 matrices either used in place from
// the memory-mapped safetensors file (F32 at an aligned offset) or converted
// once (F16, BF16) into owned storage.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lookback/model.hpp"

namespace lookback::model::detail {

// A read-only memory map of a whole regular file.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }

 private:
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

struct LayerWeights {
  const float* input_norm = nullptr;  // (hidden)
  const float* q = nullptr;           // (heads * head_dim, hidden)
  const float* k = nullptr;           // (kv_heads * head_dim, hidden)
  const float* v = nullptr;           // (kv_heads * head_dim, hidden)
  const float* o = nullptr;           // (hidden, heads * head_dim)
  const float* post_norm = nullptr;   // (hidden)
  const float* gate = nullptr;        // (intermediate, hidden)
  const float* up = nullptr;          // (intermediate, hidden)
  const float* down = nullptr;        // (hidden, intermediate)
};

struct Weights {
  const float* embed = nullptr;    // (vocab, hidden)
  std::vector<LayerWeights> layers;
  const float* norm = nullptr;     // (hidden)
  const float* lm_head = nullptr;  // (vocab, hidden); embed when tied
  std::int64_t parameters = 0;

  std::vector<std::unique_ptr<MappedFile>> files;       // what the pointers may point into
  std::vector<std::unique_ptr<float[]>> converted;      // F16/BF16 weights as f32
};

// Reads DIR/model.safetensors (or the shards of DIR/model.safetensors.index.json)
// and checks every tensor against `config`.
Weights load_weights(const std::string& directory, const ModelConfig& config);

}  // namespace lookback::model::detail
