// The contiguous cache: one sequence, `capacity` stored tokens in one buffer.
#include <fmt/format.h>

#include <vector>

#include "kv_cache/cache_common.hpp"
#include "kv_cache/impl.hpp"
#include "lookback/error.hpp"
#include "lookback/kv_cache.hpp"

namespace lookback {

KvCache::KvCache(const CacheConfig& config, std::int64_t capacity) : impl_(std::make_unique<Impl>()) {
  detail::validate_config(config);
  if (capacity < 0) throw Error(fmt::format("capacity: {} (expected >= 0 tokens)", capacity));
  std::int64_t bytes;
  if (__builtin_mul_overflow(capacity, detail::stored_token_bytes(config), &bytes)) {
    throw Error(ErrorCode::kCapacity, fmt::format("capacity: {} tokens overflow a byte count", capacity));
  }
  detail::check_memory("capacity", capacity, "tokens", detail::stored_token_bytes(config));
  impl_->config = config;
  impl_->capacity = capacity;
  // Not zeroed: only rows below the length are ever read or saved.
  impl_->k = detail::CacheStorage(bytes, "capacity");
  impl_->v = detail::CacheStorage(bytes, "capacity");
}

KvCache::~KvCache() = default;
KvCache::KvCache(KvCache&&) noexcept = default;
KvCache& KvCache::operator=(KvCache&&) noexcept = default;

const CacheConfig& KvCache::config() const noexcept { return impl_->config; }
std::int64_t KvCache::length() const noexcept { return impl_->length; }
std::int64_t KvCache::capacity() const noexcept { return impl_->capacity; }
void KvCache::clear() noexcept { impl_->length = 0; }

void KvCache::append(const TensorView& k, const TensorView& v) {
  const std::int64_t tokens = detail::validate_kv(impl_->config, k, v);
  if (impl_->length + tokens > impl_->capacity) {
    throw Error(ErrorCode::kCapacity,
                fmt::format("k: appending {} tokens to a cache holding {} of {} (expected at most "
                            "{} more)",
                            tokens, impl_->length, impl_->capacity, impl_->capacity - impl_->length));
  }
  const std::int64_t offset = impl_->length * detail::stored_padded_dim(impl_->config) *
                             static_cast<std::int64_t>(dtype_size(impl_->config.storage));
  float* k_scales = impl_->k_scales();
  float* v_scales = impl_->v_scales();
  detail::store_tokens(impl_->config, k, 0, tokens, impl_->length, true, impl_->k.data() + offset,
                       impl_->head_stride(), k_scales ? k_scales + impl_->length : nullptr,
                       impl_->capacity);
  detail::store_tokens(impl_->config, v, 0, tokens, impl_->length, false, impl_->v.data() + offset,
                       impl_->head_stride(), v_scales ? v_scales + impl_->length : nullptr,
                       impl_->capacity);
  impl_->length += tokens;
}

void KvCache::attend(const DecodeStep& step, const DecodeOptions& options, Context& context) const {
  const detail::SequenceKv sequence = impl_->sequence();
  detail::run_decode(impl_->config, std::span(&sequence, 1), std::span(&step, 1), options, context);
}

void attend_batch(std::span<const KvCache* const> caches, std::span<const DecodeStep> steps,
                  const DecodeOptions& options, Context& context) {
  if (caches.empty()) return;
  std::vector<detail::SequenceKv> sequences;
  for (std::size_t i = 0; i < caches.size(); ++i) {
    if (caches[i] == nullptr) throw Error(fmt::format("caches[{}]: null (expected a cache)", i));
    const CacheConfig& a = caches[i]->config();
    const CacheConfig& b = caches[0]->config();
    if (a.kv_heads != b.kv_heads || a.head_dim != b.head_dim || a.storage != b.storage ||
        a.rope.has_value() != b.rope.has_value()) {
      throw Error(fmt::format("caches[{}]: a different configuration from caches[0] (expected "
                              "one kv_heads, head_dim, storage and RoPE setting for the batch)",
                              i));
    }
    sequences.push_back(caches[i]->impl_->sequence());
  }
  detail::run_decode(caches[0]->config(), sequences, steps, options, context);
}

}  // namespace lookback
