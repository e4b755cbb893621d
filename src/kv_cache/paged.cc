// The paged pool: fixed-size blocks, a block table per sequence, reference
// counts for blocks shared by forks, copy-on-write of a shared partial block.
// Every append is all or nothing: blocks are counted and reserved before any
// sequence or block changes.
#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <new>
#include <numeric>
#include <random>
#include <vector>

#include "kv_cache/cache_common.hpp"
#include "kv_cache/impl.hpp"
#include "lookback/error.hpp"
#include "lookback/kv_cache.hpp"

namespace lookback {
namespace {

// Bookkeeping per block: its reference count and its place in the free list.
constexpr std::int64_t kTableBytesPerBlock = sizeof(std::int32_t) + sizeof(std::int64_t);

}  // namespace

PagedKvPool::PagedKvPool(const CacheConfig& config, std::int64_t block_size,
                         std::int64_t num_blocks)
    : impl_(std::make_unique<Impl>()) {
  detail::validate_config(config);
  if (block_size < 1) throw Error(fmt::format("block_size: {} (expected >= 1)", block_size));
  if (num_blocks < 0) throw Error(fmt::format("num_blocks: {} (expected >= 0)", num_blocks));
  std::int64_t block_bytes, total;
  if (__builtin_mul_overflow(block_size, detail::stored_token_bytes(config), &block_bytes) ||
      __builtin_mul_overflow(block_bytes, num_blocks, &total)) {
    throw Error(ErrorCode::kCapacity,
                fmt::format("num_blocks: {} blocks of {} tokens overflow a byte count", num_blocks,
                            block_size));
  }
  // Before any allocation: one block alone, then the whole pool.
  detail::check_memory("block_size", block_size, "tokens per block",
                       detail::stored_token_bytes(config));
  detail::check_memory("num_blocks", num_blocks, fmt::format("blocks of {} tokens", block_size),
                       block_bytes, kTableBytesPerBlock);
  Impl& pool = *impl_;
  pool.config = config;
  pool.block_size = block_size;
  pool.num_blocks = num_blocks;
  pool.block_bytes = block_bytes;
  pool.k = detail::CacheStorage(total, "num_blocks");
  pool.v = detail::CacheStorage(total, "num_blocks");
  try {
    pool.references.assign(static_cast<std::size_t>(num_blocks), 0);
    // Hand out block 0 first.
    pool.free_list.resize(static_cast<std::size_t>(num_blocks));
  } catch (const std::bad_alloc&) {
    throw Error(ErrorCode::kCapacity,
                fmt::format("num_blocks: out of memory allocating the tables of {} blocks",
                            num_blocks));
  }
  std::iota(pool.free_list.rbegin(), pool.free_list.rend(), 0);
}

PagedKvPool::~PagedKvPool() = default;
PagedKvPool::PagedKvPool(PagedKvPool&&) noexcept = default;
PagedKvPool& PagedKvPool::operator=(PagedKvPool&&) noexcept = default;

const CacheConfig& PagedKvPool::config() const noexcept { return impl_->config; }
std::int64_t PagedKvPool::block_size() const noexcept { return impl_->block_size; }
std::int64_t PagedKvPool::num_blocks() const noexcept { return impl_->num_blocks; }
std::int64_t PagedKvPool::free_blocks() const noexcept {
  return static_cast<std::int64_t>(impl_->free_list.size());
}

SequenceId PagedKvPool::create() {
  const SequenceId id = impl_->next_id++;
  impl_->sequences[id] = {};
  return id;
}

SequenceId PagedKvPool::fork(SequenceId parent) {
  const Impl::Sequence copy = impl_->find(parent, "parent");
  for (std::int64_t block : copy.blocks) ++impl_->references[static_cast<std::size_t>(block)];
  const SequenceId id = impl_->next_id++;
  impl_->sequences[id] = copy;
  return id;
}

void PagedKvPool::release(SequenceId sequence) {
  Impl::Sequence& seq = impl_->find(sequence, "sequence");
  for (std::int64_t block : seq.blocks) impl_->drop_block(block);
  impl_->sequences.erase(sequence);
}

std::int64_t PagedKvPool::length(SequenceId sequence) const {
  return impl_->find(sequence, "sequence").length;
}

std::vector<std::int64_t> PagedKvPool::block_table(SequenceId sequence) const {
  return impl_->find(sequence, "sequence").blocks;
}

std::vector<SequenceId> PagedKvPool::sequences() const {
  std::vector<SequenceId> ids;
  for (const auto& [id, seq] : impl_->sequences) ids.push_back(id);
  return ids;
}

void PagedKvPool::append(SequenceId sequence, const TensorView& k, const TensorView& v) {
  Impl& pool = *impl_;
  Impl::Sequence& seq = pool.find(sequence, "sequence");
  const std::int64_t tokens = detail::validate_kv(pool.config, k, v);
  if (tokens == 0) return;
  const std::int64_t bs = pool.block_size;
  const std::int64_t filled_in_last = seq.length % bs;
  // A shared, partly filled last block is copied before it is written.
  const bool copy_last = filled_in_last != 0 &&
                         pool.references[static_cast<std::size_t>(seq.blocks.back())] > 1;
  const std::int64_t blocks_after = (seq.length + tokens + bs - 1) / bs;
  const std::int64_t new_blocks = blocks_after - static_cast<std::int64_t>(seq.blocks.size());
  const std::int64_t needed = new_blocks + (copy_last ? 1 : 0);
  if (needed > static_cast<std::int64_t>(pool.free_list.size())) {
    throw Error(ErrorCode::kCapacity,
                fmt::format("k: appending {} tokens needs {} free blocks, the pool has {} of {} "
                            "(expected a larger pool, or release sequences first); nothing was "
                            "appended",
                            tokens, needed, static_cast<std::int64_t>(pool.free_list.size()), pool.num_blocks));
  }
  if (copy_last) {
    const std::int64_t shared = seq.blocks.back();
    const std::int64_t copy = pool.take_block();
    const auto bytes = static_cast<std::size_t>(pool.block_bytes);
    std::memcpy(pool.k_block(copy), pool.k_block(shared), bytes);
    std::memcpy(pool.v_block(copy), pool.v_block(shared), bytes);
    pool.drop_block(shared);
    seq.blocks.back() = copy;
  }
  for (std::int64_t b = 0; b < new_blocks; ++b) seq.blocks.push_back(pool.take_block());
  // Write the tokens block by block.
  const std::int64_t slot_bytes = detail::stored_padded_dim(pool.config) *
                                 static_cast<std::int64_t>(dtype_size(pool.config.storage));
  std::int64_t written = 0;
  while (written < tokens) {
    const std::int64_t position = seq.length + written;
    const std::int64_t block = seq.blocks[static_cast<std::size_t>(position / bs)];
    const std::int64_t slot = position % bs;
    const std::int64_t count = std::min(tokens - written, bs - slot);
    float* k_scales = pool.block_scales(pool.k_block(block));
    float* v_scales = pool.block_scales(pool.v_block(block));
    detail::store_tokens(pool.config, k, written, written + count, position, true,
                         pool.k_block(block) + slot * slot_bytes, pool.head_stride(),
                         k_scales ? k_scales + slot : nullptr, bs);
    detail::store_tokens(pool.config, v, written, written + count, position, false,
                         pool.v_block(block) + slot * slot_bytes, pool.head_stride(),
                         v_scales ? v_scales + slot : nullptr, bs);
    written += count;
  }
  seq.length += tokens;
}

void PagedKvPool::attend(SequenceId sequence, const DecodeStep& step, const DecodeOptions& options,
                         Context& context) const {
  attend_batch(std::span(&sequence, 1), std::span(&step, 1), options, context);
}

void PagedKvPool::attend_batch(std::span<const SequenceId> sequences,
                               std::span<const DecodeStep> steps, const DecodeOptions& options,
                               Context& context) const {
  std::vector<detail::SequenceKv> views;
  views.reserve(sequences.size());
  for (SequenceId id : sequences) views.push_back(impl_->view(impl_->find(id, "sequence")));
  detail::run_decode(impl_->config, views, steps, options, context);
}

void PagedKvPool::shuffle_blocks(std::uint64_t seed) {
  Impl& pool = *impl_;
  std::vector<std::int64_t> new_id(static_cast<std::size_t>(pool.num_blocks));
  std::iota(new_id.begin(), new_id.end(), 0);
  std::shuffle(new_id.begin(), new_id.end(), std::mt19937_64(seed));
  detail::CacheStorage k(pool.k.size(), "num_blocks"), v(pool.v.size(), "num_blocks");
  std::vector<std::int32_t> references(pool.references.size());
  for (std::int64_t old = 0; old < pool.num_blocks; ++old) {
    const std::int64_t now = new_id[static_cast<std::size_t>(old)];
    references[static_cast<std::size_t>(now)] = pool.references[static_cast<std::size_t>(old)];
    if (references[static_cast<std::size_t>(now)] == 0) continue;  // free: nothing to keep
    const auto bytes = static_cast<std::size_t>(pool.block_bytes);
    std::memcpy(k.data() + now * pool.block_bytes, pool.k_block(old), bytes);
    std::memcpy(v.data() + now * pool.block_bytes, pool.v_block(old), bytes);
  }
  pool.k = std::move(k);
  pool.v = std::move(v);
  pool.references = std::move(references);
  for (auto& block : pool.free_list) block = new_id[static_cast<std::size_t>(block)];
  for (auto& [id, seq] : pool.sequences) {
    for (auto& block : seq.blocks) block = new_id[static_cast<std::size_t>(block)];
  }
}

}  // namespace lookback
