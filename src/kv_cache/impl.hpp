// The state behind KvCache and PagedKvPool, shared by their implementation
// files and the checkpoint code (which saves and restores exactly this).
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <vector>

#include "core/quant.hpp"
#include "kv_cache/cache_common.hpp"
#include "lookback/error.hpp"
#include "lookback/kv_cache.hpp"

namespace lookback {

struct KvCache::Impl {
  CacheConfig config;
  std::int64_t capacity = 0;
  std::int64_t length = 0;
  // A ring keeps tokens [0, ring_sinks) in slots [0, ring_sinks) and token
  // p >= ring_sinks in slot ring_sinks + (p - ring_sinks) % window_slots().
  std::optional<RingSpec> ring;
  // (kv_heads, capacity, padded_dim) of storage, not zeroed; 8-bit storage
  // then (kv_heads, capacity) f32 scales (detail::scales_offset).
  detail::CacheStorage k;
  detail::CacheStorage v;

  std::int64_t head_stride() const { return capacity * detail::stored_padded_dim(config); }
  float* k_scales() const { return scales(k); }
  float* v_scales() const { return scales(v); }
  float* scales(const detail::CacheStorage& storage) const {
    if (!is_quantized(config.storage)) return nullptr;
    return reinterpret_cast<float*>(const_cast<std::byte*>(storage.data()) +
                                    detail::scales_offset(config, capacity));
  }

  std::int64_t ring_sinks() const { return ring ? ring->sink_tokens : 0; }
  // Slots that take the tokens above the sinks in turn (all of them without a ring).
  std::int64_t window_slots() const { return capacity - ring_sinks(); }
  std::int64_t slot_of(std::int64_t position) const {
    if (!ring || position < ring->sink_tokens) return position;
    return ring->sink_tokens + (position - ring->sink_tokens) % window_slots();
  }
  // The oldest token stored above the sinks (tokens [ring_sinks, first_kept)
  // are overwritten).
  std::int64_t first_kept() const {
    return ring && length > capacity ? length - window_slots() : 0;
  }

  // Tokens [first, first + count) stored in consecutive slots, as a run.
  kernels::KvRun run(std::int64_t first, std::int64_t count) const {
    const std::int64_t slot = slot_of(first);
    const std::int64_t offset = slot * detail::stored_padded_dim(config) *
                                static_cast<std::int64_t>(dtype_size(config.storage));
    float* ks = k_scales();
    float* vs = v_scales();
    return {.k = k.data() + offset,
            .v = v.data() + offset,
            .first_key = first,
            .count = count,
            .head_stride = head_stride(),
            .k_scales = ks ? ks + slot : nullptr,
            .v_scales = vs ? vs + slot : nullptr,
            .scale_head_stride = capacity};
  }

  detail::SequenceKv sequence() const {
    detail::SequenceKv view;
    view.length = length;
    const std::int64_t kept = first_kept();
    if (kept == 0) {
      if (length > 0) view.runs.push_back(run(0, length));
      return view;
    }
    // A wrapped ring: the sinks, then the kept tokens in at most two runs of
    // consecutive slots (up to the last slot, then from the first after the sinks).
    const std::int64_t sinks = ring_sinks();
    if (sinks > 0) view.runs.push_back(run(0, sinks));
    const std::int64_t before_wrap = std::min(length - kept, capacity - slot_of(kept));
    view.runs.push_back(run(kept, before_wrap));
    if (kept + before_wrap < length) view.runs.push_back(run(kept + before_wrap, length - kept - before_wrap));
    view.overwritten = {sinks, kept};
    return view;
  }
};

struct PagedKvPool::Impl {
  struct Sequence {
    std::vector<std::int64_t> blocks;  // block table
    std::int64_t length = 0;
  };

  CacheConfig config;
  std::int64_t block_size = 0;
  std::int64_t num_blocks = 0;
  std::int64_t block_bytes = 0;
  // (num_blocks, kv_heads, block_size, padded_dim), not zeroed (8-bit
  // storage: each block's codes followed by its (kv_heads, block_size) f32
  // scales, detail::scales_offset): a block is
  // zeroed when take_block hands it out, so blocks in use hold no stale or
  // uninitialised bytes (checkpoints save whole blocks).
  detail::CacheStorage k;
  detail::CacheStorage v;
  std::vector<std::int32_t> references;  // per block
  std::vector<std::int64_t> free_list;   // taken from the back
  std::map<SequenceId, Sequence> sequences;
  SequenceId next_id = 0;

  std::int64_t head_stride() const { return block_size * detail::stored_padded_dim(config); }
  std::byte* k_block(std::int64_t block) { return k.data() + block * block_bytes; }
  std::byte* v_block(std::int64_t block) { return v.data() + block * block_bytes; }
  // A block's scales (8-bit storage), or null.
  float* block_scales(std::byte* block) const {
    if (!is_quantized(config.storage)) return nullptr;
    return reinterpret_cast<float*>(block + detail::scales_offset(config, block_size));
  }

  Sequence& find(SequenceId id, const char* argument) {
    const auto it = sequences.find(id);
    if (it == sequences.end()) {
      throw Error(fmt::format("{}: unknown sequence {} (expected an id from create or fork, not "
                              "yet released)",
                              argument, id));
    }
    return it->second;
  }
  const Sequence& find(SequenceId id, const char* argument) const {
    return const_cast<Impl*>(this)->find(id, argument);
  }

  std::int64_t take_block() {
    const std::int64_t block = free_list.back();
    free_list.pop_back();
    references[static_cast<std::size_t>(block)] = 1;
    std::memset(k_block(block), 0, static_cast<std::size_t>(block_bytes));
    std::memset(v_block(block), 0, static_cast<std::size_t>(block_bytes));
    return block;
  }
  void drop_block(std::int64_t block) {
    if (--references[static_cast<std::size_t>(block)] == 0) free_list.push_back(block);
  }

  detail::SequenceKv view(const Sequence& sequence) const {
    detail::SequenceKv kv;
    kv.length = sequence.length;
    for (std::size_t b = 0; b < sequence.blocks.size(); ++b) {
      const std::int64_t first = static_cast<std::int64_t>(b) * block_size;
      const std::int64_t count = std::min(block_size, sequence.length - first);
      if (count <= 0) break;  // never hand out slots past the sequence's length
      const std::int64_t block = sequence.blocks[b];
      std::byte* k_block = const_cast<std::byte*>(k.data()) + block * block_bytes;
      std::byte* v_block = const_cast<std::byte*>(v.data()) + block * block_bytes;
      kv.runs.push_back({.k = k_block,
                         .v = v_block,
                         .first_key = first,
                         .count = count,
                         .head_stride = head_stride(),
                         .k_scales = block_scales(k_block),
                         .v_scales = block_scales(v_block),
                         .scale_head_stride = block_size});
    }
    return kv;
  }
};

}  // namespace lookback
