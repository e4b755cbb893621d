// The contiguous cache: one sequence, `capacity` stored tokens in one buffer.
#include <fmt/format.h>

#include <algorithm>
#include <limits>
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

std::int64_t ring_slots(std::int64_t sink_tokens, std::int64_t window_left,
                        std::int64_t chunk) noexcept {
  std::int64_t slots;
  if (__builtin_add_overflow(sink_tokens, window_left, &slots) ||
      __builtin_add_overflow(slots, chunk, &slots)) {
    return std::numeric_limits<std::int64_t>::max();
  }
  return slots;
}

KvCache::KvCache(const CacheConfig& config, std::int64_t capacity, const RingSpec& ring)
    : KvCache(config, capacity) {
  if (ring.sink_tokens < 0 || ring.sink_tokens >= capacity) {
    throw Error(fmt::format("ring sink_tokens: {} (expected 0 to {}: a ring of {} slots needs one "
                            "slot beside its sink tokens)",
                            ring.sink_tokens, capacity - 1, capacity));
  }
  impl_->ring = ring;
}

KvCache::~KvCache() = default;
KvCache::KvCache(KvCache&&) noexcept = default;
KvCache& KvCache::operator=(KvCache&&) noexcept = default;

const CacheConfig& KvCache::config() const noexcept { return impl_->config; }
std::int64_t KvCache::length() const noexcept { return impl_->length; }
std::int64_t KvCache::capacity() const noexcept { return impl_->capacity; }
std::optional<RingSpec> KvCache::ring() const noexcept { return impl_->ring; }
std::int64_t KvCache::first_kept() const noexcept { return impl_->first_kept(); }
void KvCache::clear() noexcept { impl_->length = 0; }

void KvCache::append(const TensorView& k, const TensorView& v) {
  const std::int64_t tokens = detail::validate_kv(impl_->config, k, v);
  Impl& impl = *impl_;
  if (impl.ring && tokens > impl.window_slots()) {
    throw Error(ErrorCode::kCapacity,
                fmt::format("k: appending {} tokens to a ring cache of {} slots, {} of them for "
                            "sink tokens (expected at most {} tokens at once)",
                            tokens, impl.capacity, impl.ring->sink_tokens, impl.window_slots()));
  }
  if (!impl.ring && impl.length + tokens > impl.capacity) {
    throw Error(ErrorCode::kCapacity,
                fmt::format("k: appending {} tokens to a cache holding {} of {} (expected at most "
                            "{} more)",
                            tokens, impl.length, impl.capacity, impl.capacity - impl.length));
  }
  // Stored in runs of consecutive slots: a ring wraps at most once per append.
  for (std::int64_t done = 0; done < tokens;) {
    const std::int64_t position = impl.length + done;
    const std::int64_t slot = impl.slot_of(position);
    const std::int64_t count = std::min(tokens - done, impl.capacity - slot);
    const kernels::KvRun run = impl.run(position, count);
    detail::store_tokens(impl.config, k, done, done + count, position, true,
                         const_cast<void*>(run.k), impl.head_stride(),
                         const_cast<float*>(run.k_scales), impl.capacity);
    detail::store_tokens(impl.config, v, done, done + count, position, false,
                         const_cast<void*>(run.v), impl.head_stride(),
                         const_cast<float*>(run.v_scales), impl.capacity);
    done += count;
  }
  impl.length += tokens;
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
