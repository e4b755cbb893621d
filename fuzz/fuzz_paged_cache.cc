// The paged KV pool (include/lookback/kv_cache.hpp) as a state machine:
// random create / fork / release / append / exhaust / attend / attend_batch /
// shuffle_blocks sequences against a small pool, checked after every step
// against a model that keeps each sequence's tokens and its blocks as the
// header documents them (fork shares every block; appending to a shared,
// partly filled last block copies it first). So the model predicts exactly
// which appends must fail with kCapacity, and after a failure (all or
// nothing) every sequence must attend exactly as before.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "fuzz_common.hpp"
#include "lookback/error.hpp"
#include "lookback/kv_cache.hpp"
#include "lookback/reference.hpp"

namespace lookback::fuzz {
namespace {

// What a sequence holds, as the documented behaviour says it should.
struct ModelSequence {
  std::vector<std::size_t> tokens;  // indices into Harness::keys / values
  std::vector<std::int64_t>
      logical_blocks;  // one per block_size tokens; shared ids = shared blocks
};

struct Harness {
  CacheConfig config;
  std::int64_t heads = 1;
  std::int64_t block_size = 1;
  std::int64_t num_blocks = 0;
  DecodeOptions options;
  std::vector<float> slopes;  // (heads,) when ALiBi is on
  int threads = 1;

  std::optional<PagedKvPool> pool;
  std::map<SequenceId, ModelSequence> model;
  std::int64_t next_logical_block = 0;
  std::vector<std::vector<float>> keys, values;  // per token: (kv_heads, head_dim)
  std::mt19937_64 rng;
  std::string trace;  // the operations so far, printed with a finding

  std::int64_t row_floats() const { return config.kv_heads * config.head_dim; }

  std::vector<float> random_values(std::int64_t count) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> result(static_cast<std::size_t>(count));
    for (float& x : result) x = normal(rng);
    return result;
  }

  // Blocks in use, counted the model's way.
  std::int64_t model_used_blocks() const {
    std::set<std::int64_t> used;
    for (const auto& [id, seq] : model)
      used.insert(seq.logical_blocks.begin(), seq.logical_blocks.end());
    return static_cast<std::int64_t>(used.size());
  }

  bool shared(std::int64_t logical_block, SequenceId owner) const {
    for (const auto& [id, seq] : model) {
      if (id == owner) continue;
      if (std::find(seq.logical_blocks.begin(), seq.logical_blocks.end(), logical_block) !=
          seq.logical_blocks.end()) {
        return true;
      }
    }
    return false;
  }

  // Every sequence, length and block table agrees with the model; blocks are
  // shared exactly where the model shares them; free_blocks counts the rest.
  void check_structure() {
    std::vector<SequenceId> expected_ids, ids = pool->sequences();
    for (const auto& [id, seq] : model) expected_ids.push_back(id);
    std::sort(ids.begin(), ids.end());  // the header promises no order
    LOOKBACK_FUZZ_CHECK(ids == expected_ids, "sequences() differs from the model\n%s",
                        trace.c_str());
    std::map<std::int64_t, std::int64_t> physical_of;  // logical -> physical
    std::map<std::int64_t, std::int64_t> logical_of;   // physical -> logical
    for (const auto& [id, seq] : model) {
      const auto length = static_cast<std::int64_t>(seq.tokens.size());
      LOOKBACK_FUZZ_CHECK(pool->length(id) == length, "length(%lld) = %lld, model %lld\n%s",
                          static_cast<long long>(id), static_cast<long long>(pool->length(id)),
                          static_cast<long long>(length), trace.c_str());
      const std::vector<std::int64_t> table = pool->block_table(id);
      LOOKBACK_FUZZ_CHECK(table.size() == seq.logical_blocks.size(),
                          "sequence %lld has %zu blocks for %lld tokens (model: %zu)\n%s",
                          static_cast<long long>(id), table.size(), static_cast<long long>(length),
                          seq.logical_blocks.size(), trace.c_str());
      for (std::size_t b = 0; b < table.size(); ++b) {
        const std::int64_t physical = table[b], logical = seq.logical_blocks[b];
        LOOKBACK_FUZZ_CHECK(physical >= 0 && physical < num_blocks,
                            "block id %lld out of range\n%s", static_cast<long long>(physical),
                            trace.c_str());
        const auto [p, new_logical] = physical_of.emplace(logical, physical);
        const auto [l, new_physical] = logical_of.emplace(physical, logical);
        LOOKBACK_FUZZ_CHECK(p->second == physical && l->second == logical,
                            "block %lld of sequence %lld is shared where the model says it is "
                            "not, or not shared where it is\n%s",
                            static_cast<long long>(b), static_cast<long long>(id), trace.c_str());
      }
    }
    const auto used = static_cast<std::int64_t>(logical_of.size());
    LOOKBACK_FUZZ_CHECK(pool->free_blocks() == num_blocks - used,
                        "free_blocks() = %lld, but %lld of %lld blocks are in block tables\n%s",
                        static_cast<long long>(pool->free_blocks()), static_cast<long long>(used),
                        static_cast<long long>(num_blocks), trace.c_str());
    LOOKBACK_FUZZ_CHECK(used == model_used_blocks(), "block count differs from the model\n%s",
                        trace.c_str());
  }

  void append(SequenceId id, std::int64_t tokens) {
    // Values in f32, the token's rows contiguous: (tokens, kv_heads, head_dim).
    const std::vector<float> k = random_values(tokens * row_floats());
    const std::vector<float> v = random_values(tokens * row_floats());
    const TensorView k_view =
        make_view(k.data(), DType::kF32, {tokens, config.kv_heads, config.head_dim}, "k");
    const TensorView v_view =
        make_view(v.data(), DType::kF32, {tokens, config.kv_heads, config.head_dim}, "v");
    const auto known = model.find(id);
    if (known == model.end()) {
      expect_error([&] { pool->append(id, k_view, v_view); }, "append to an unknown sequence");
      return;
    }
    ModelSequence& seq = known->second;
    const auto length = static_cast<std::int64_t>(seq.tokens.size());
    const bool copy_last = length % block_size != 0 && shared(seq.logical_blocks.back(), id);
    const std::int64_t blocks_after = (length + tokens + block_size - 1) / block_size;
    const std::int64_t new_blocks =
        blocks_after - static_cast<std::int64_t>(seq.logical_blocks.size());
    const std::int64_t needed = new_blocks + (copy_last ? 1 : 0);
    const bool fits = needed <= num_blocks - model_used_blocks();
    try {
      pool->append(id, k_view, v_view);
    } catch (const Error& error) {
      LOOKBACK_FUZZ_CHECK(!fits, "append of %lld tokens that fit threw: %s\n%s",
                          static_cast<long long>(tokens), error.what(), trace.c_str());
      LOOKBACK_FUZZ_CHECK(error.code() == ErrorCode::kCapacity,
                          "a full pool threw code %d (expected kCapacity): %s\n%s",
                          static_cast<int>(error.code()), error.what(), trace.c_str());
      return;  // the model is untouched: check_structure and attends verify the pool is too
    }
    LOOKBACK_FUZZ_CHECK(fits,
                        "append of %lld tokens needing %lld blocks succeeded with %lld free\n%s",
                        static_cast<long long>(tokens), static_cast<long long>(needed),
                        static_cast<long long>(num_blocks - model_used_blocks()), trace.c_str());
    if (copy_last) seq.logical_blocks.back() = next_logical_block++;
    for (std::int64_t b = 0; b < new_blocks; ++b)
      seq.logical_blocks.push_back(next_logical_block++);
    for (std::int64_t t = 0; t < tokens; ++t) {
      const auto row = static_cast<std::size_t>(t * row_floats());
      keys.emplace_back(
          k.begin() + static_cast<std::ptrdiff_t>(row),
          k.begin() + static_cast<std::ptrdiff_t>(row + static_cast<std::size_t>(row_floats())));
      values.emplace_back(
          v.begin() + static_cast<std::ptrdiff_t>(row),
          v.begin() + static_cast<std::ptrdiff_t>(row + static_cast<std::size_t>(row_floats())));
      seq.tokens.push_back(keys.size() - 1);
    }
  }

  template <typename F>
  void expect_error(F&& call, const char* what) {
    try {
      call();
    } catch (const Error&) {
      return;
    }
    fail("%s did not throw lookback::Error\n%s", what, trace.c_str());
  }

  // One step of a (batched) attend: the `tokens` newest positions of `id`.
  struct Step {
    SequenceId id;
    std::int64_t tokens;
    std::vector<float> q;    // (tokens, heads, head_dim)
    std::vector<float> out;  // (tokens, heads, head_dim), NaN until written
    std::vector<float> lse;  // (heads, tokens)
  };

  Step make_step(SequenceId id, std::int64_t tokens) {
    Step step{id, tokens, random_values(tokens * heads * config.head_dim), {}, {}};
    step.out.assign(step.q.size(), std::numeric_limits<float>::quiet_NaN());
    step.lse.assign(static_cast<std::size_t>(heads * tokens),
                    std::numeric_limits<float>::quiet_NaN());
    return step;
  }

  DecodeStep view_of(Step& step) const {
    return {
        .q = make_view(step.q.data(), DType::kF32, {step.tokens, heads, config.head_dim}, "q"),
        .out = make_mutable_view(step.out.data(), DType::kF32,
                                 {step.tokens, heads, config.head_dim}, "out"),
        .maybe_lse = make_mutable_view(step.lse.data(), DType::kF32, {heads, step.tokens}, "lse")};
  }

  // The reference on the model's tokens, as the cache holds them: K rotated
  // at its position and rounded to storage, Q rounded, rotated, rounded.
  void check_step(const Step& step) {
    const ModelSequence& seq = model.at(step.id);
    const auto length = static_cast<std::int64_t>(seq.tokens.size());
    const std::int64_t dim = config.head_dim;
    std::vector<float> k_eff, v_eff, q_eff(step.q);
    for (std::int64_t j = 0; j < length; ++j) {
      std::vector<float> k_row = keys[seq.tokens[static_cast<std::size_t>(j)]];
      if (config.rope) apply_rope(k_row.data(), 1, config.kv_heads, dim, j, *config.rope);
      k_eff.insert(k_eff.end(), k_row.begin(), k_row.end());
      const std::vector<float>& v_row = values[seq.tokens[static_cast<std::size_t>(j)]];
      v_eff.insert(v_eff.end(), v_row.begin(), v_row.end());
    }
    for (float& x : q_eff) x = round_to_storage(x, config.storage);
    if (config.rope)
      apply_rope(q_eff.data(), step.tokens, heads, dim, length - step.tokens, *config.rope);
    auto as_reference = [&](const std::vector<float>& values) {
      std::vector<double> result(values.size());
      for (std::size_t i = 0; i < values.size(); ++i)
        result[i] = round_to_storage(values[i], config.storage);
      return result;
    };
    const std::vector<double> q64 = as_reference(q_eff), k64 = as_reference(k_eff),
                              v64 = as_reference(v_eff);
    std::vector<double> v64_abs(v64);
    for (double& x : v64_abs) x = std::fabs(x);
    std::vector<float> scratch(step.out.size());
    auto reference = [&](const std::vector<double>& v) {
      AttentionParams params{
          .q = make_view(q64.data(), DType::kF64, {1, step.tokens, heads, dim}, "q"),
          .k = make_view(k64.data(), DType::kF64, {1, length, config.kv_heads, dim}, "k"),
          .v = make_view(v.data(), DType::kF64, {1, length, config.kv_heads, dim}, "v"),
          .out =
              make_mutable_view(scratch.data(), DType::kF32, {1, step.tokens, heads, dim}, "out"),
          .maybe_alibi_slopes = slopes.empty() ? nullptr : slopes.data(),
          .scale = options.scale,
          .softcap = options.softcap,
          .mask = {.causal = Causal::kBottomRight, .window_left = options.window_left},
      };
      return reference_attention(params);
    };
    const ReferenceResult expected = reference(v64), expected_abs = reference(v64_abs);
    Comparison comparison(config.storage);
    for (std::int64_t t = 0; t < step.tokens; ++t) {
      for (std::int64_t h = 0; h < heads; ++h) {
        const auto row = static_cast<std::size_t>((t * heads + h) * dim);
        const auto lse = static_cast<std::size_t>(h * step.tokens + t);
        comparison.add_row({&step.out[row], &step.lse[lse]}, &expected.out[row],
                           &expected_abs.out[row], expected.lse[lse], dim, trace.c_str(), 0, t, h);
      }
    }
    comparison.finish(trace.c_str());
  }

  Context& context() const {
    static Context one(1), two(2), three(3);  // reused: threads are costly to start
    return threads == 1 ? one : threads == 2 ? two : three;
  }

  void attend(const std::vector<std::pair<SequenceId, std::int64_t>>& requests) {
    std::vector<Step> steps;
    bool valid = true;  // an empty batch is a no-op
    for (const auto& [id, tokens] : requests) {
      const auto known = model.find(id);
      if (known == model.end() || tokens < 1 ||
          tokens > static_cast<std::int64_t>(known->second.tokens.size())) {
        valid = false;
      }
      // A bad request still gets a well-formed step (at least one row).
      steps.push_back(make_step(id, std::max<std::int64_t>(tokens, 1)));
      if (tokens < 1) {
        steps.back().tokens = 0;
        steps.back().q.clear();
      }
    }
    std::vector<SequenceId> ids;
    std::vector<DecodeStep> views;
    for (Step& step : steps) {
      ids.push_back(step.id);
      if (step.tokens == 0) {
        // Zero tokens: a valid (empty) view that the pool must reject.
        DecodeStep empty;
        empty.q = make_view(nullptr, DType::kF32, {0, heads, config.head_dim}, "q");
        empty.out = make_mutable_view(nullptr, DType::kF32, {0, heads, config.head_dim}, "out");
        views.push_back(empty);
      } else {
        views.push_back(view_of(step));
      }
    }
    try {
      if (ids.size() == 1 && (rng() & 1) != 0) {
        pool->attend(ids[0], views[0], options, context());
      } else {
        pool->attend_batch(ids, views, options, context());
      }
    } catch (const Error& error) {
      LOOKBACK_FUZZ_CHECK(!valid, "valid attend threw: %s\n%s", error.what(), trace.c_str());
      return;
    }
    LOOKBACK_FUZZ_CHECK(valid,
                        "invalid attend (unknown id, 0 tokens or more than the length) "
                        "did not throw\n%s",
                        trace.c_str());
    for (const Step& step : steps) check_step(step);
  }
};

void run(FuzzedDataProvider& in) {
  Harness h;
  h.block_size = in.ConsumeIntegralInRange<std::int64_t>(1, 8);
  h.num_blocks = in.ConsumeIntegralInRange<std::int64_t>(0, 12);
  h.config.kv_heads = in.ConsumeIntegralInRange<std::int64_t>(1, 2);
  h.heads = h.config.kv_heads * in.ConsumeIntegralInRange<std::int64_t>(1, 2);
  h.config.head_dim = in.ConsumeIntegralInRange<std::int64_t>(1, 24);
  constexpr DType kStorages[] = {DType::kF32, DType::kF32, DType::kBF16, DType::kF16};
  h.config.storage = kStorages[in.ConsumeIntegralInRange(0, 3)];
  if (in.ConsumeIntegralInRange(0, 3) == 3) {
    h.config.rope =
        RopeSpec{.theta = in.ConsumeBool() ? 100.0f : 10000.0f, .interleaved = in.ConsumeBool()};
  }
  if (in.ConsumeIntegralInRange(0, 3) == 3)
    h.options.window_left = in.ConsumeIntegralInRange(0, 12);
  if (in.ConsumeIntegralInRange(0, 3) == 3)
    h.options.softcap = static_cast<float>(in.ConsumeIntegralInRange(1, 80)) / 4.0f;
  if (in.ConsumeIntegralInRange(0, 3) == 3) {
    h.options.scale = static_cast<float>(in.ConsumeIntegralInRange(-32, 32) / 16.0 /
                                         std::sqrt(static_cast<double>(h.config.head_dim)));
  }
  if (in.ConsumeIntegralInRange(0, 3) == 3) {
    for (std::int64_t head = 0; head < h.heads; ++head) {
      h.slopes.push_back(static_cast<float>(in.ConsumeIntegralInRange(0, 64)) / 128.0f);
    }
    h.options.maybe_alibi_slopes = h.slopes.data();
  }
  h.options.splits = in.ConsumeIntegralInRange(0, 5);  // 0: the pool picks
  h.threads = in.ConsumeIntegralInRange(1, 3);
  h.rng.seed(in.ConsumeIntegral<std::uint64_t>());
  h.trace = "pool: block_size=" + std::to_string(h.block_size) +
            " num_blocks=" + std::to_string(h.num_blocks) +
            " kv_heads=" + std::to_string(h.config.kv_heads) + " heads=" + std::to_string(h.heads) +
            " head_dim=" + std::to_string(h.config.head_dim) +
            " storage=" + std::string(dtype_name(h.config.storage)) + " rope=" +
            (h.config.rope ? std::to_string(h.config.rope->theta) +
                                 (h.config.rope->interleaved ? "/interleaved" : "/neox")
                           : "no") +
            " window=" + (h.options.window_left ? std::to_string(*h.options.window_left) : "none") +
            " softcap=" + std::to_string(h.options.softcap) +
            " alibi=" + (h.slopes.empty() ? "no" : "yes") +
            " splits=" + std::to_string(h.options.splits) +
            " threads=" + std::to_string(h.threads) + "\n";
  h.pool.emplace(h.config, h.block_size, h.num_blocks);
  h.check_structure();

  // An id that was never handed out (ids count up from 0).
  constexpr SequenceId kUnknown = 1'000'000;
  auto pick_id = [&]() -> SequenceId {
    if (h.model.empty() || in.ConsumeIntegralInRange(0, 15) == 15) return kUnknown;
    auto it = h.model.begin();
    std::advance(it, in.ConsumeIntegralInRange<std::size_t>(0, h.model.size() - 1));
    return it->first;
  };
  for (int op = 0; op < 48 && in.remaining_bytes() > 0; ++op) {
    switch (in.ConsumeIntegralInRange(0, 9)) {
      case 0: {
        if (h.model.size() >= 8) break;
        const SequenceId id = h.pool->create();
        LOOKBACK_FUZZ_CHECK(h.model.count(id) == 0, "create reused live id %lld\n%s",
                            static_cast<long long>(id), h.trace.c_str());
        h.model[id] = {};
        h.trace += "create -> " + std::to_string(id) + "\n";
        break;
      }
      case 1: {
        if (h.model.size() >= 8) break;
        const SequenceId parent = pick_id();
        h.trace += "fork " + std::to_string(parent) + "\n";
        if (h.model.count(parent) == 0) {
          h.expect_error([&] { h.pool->fork(parent); }, "fork of an unknown sequence");
          break;
        }
        const SequenceId id = h.pool->fork(parent);
        LOOKBACK_FUZZ_CHECK(h.model.count(id) == 0, "fork reused live id %lld\n%s",
                            static_cast<long long>(id), h.trace.c_str());
        h.model[id] = h.model[parent];
        h.trace += "  -> " + std::to_string(id) + "\n";
        break;
      }
      case 2: {
        const SequenceId id = pick_id();
        h.trace += "release " + std::to_string(id) + "\n";
        if (h.model.count(id) == 0) {
          h.expect_error([&] { h.pool->release(id); }, "release of an unknown sequence");
          break;
        }
        h.pool->release(id);
        h.model.erase(id);
        break;
      }
      case 3:
      case 4:
      case 5: {
        const SequenceId id = pick_id();
        const std::int64_t tokens = in.ConsumeIntegralInRange<std::int64_t>(1, h.block_size + 4);
        h.trace += "append " + std::to_string(id) + " x" + std::to_string(tokens) + "\n";
        h.append(id, tokens);
        break;
      }
      case 6: {  // exhaust: more tokens than the pool can hold, usually
        const SequenceId id = pick_id();
        const std::int64_t tokens = in.ConsumeIntegralInRange<std::int64_t>(1, 100);
        h.trace += "append (exhaust) " + std::to_string(id) + " x" + std::to_string(tokens) + "\n";
        h.append(id, tokens);
        break;
      }
      case 7:
      case 8: {
        const std::size_t count = in.ConsumeIntegralInRange<std::size_t>(1, 4);
        std::vector<std::pair<SequenceId, std::int64_t>> requests;
        h.trace += "attend";
        for (std::size_t s = 0; s < count; ++s) {
          const SequenceId id = pick_id();
          const auto known = h.model.find(id);
          const std::int64_t length =
              known == h.model.end() ? 1 : static_cast<std::int64_t>(known->second.tokens.size());
          // Mostly 1..length tokens; sometimes 0 or one too many.
          const int pick = in.ConsumeIntegralInRange(0, 15);
          const std::int64_t tokens = pick == 14 ? 0
                                      : pick == 15
                                          ? length + 1
                                          : 1 + in.ConsumeIntegralInRange<std::int64_t>(
                                                    0, std::max<std::int64_t>(length - 1, 0));
          requests.emplace_back(id, tokens);
          h.trace += " " + std::to_string(id) + ":" + std::to_string(tokens);
        }
        h.trace += "\n";
        h.attend(requests);
        break;
      }
      case 9: {
        const auto seed = in.ConsumeIntegral<std::uint32_t>();
        h.trace += "shuffle_blocks " + std::to_string(seed) + "\n";
        h.pool->shuffle_blocks(seed);
        break;
      }
    }
    h.check_structure();
  }
  // Finally every live sequence attends its newest token: a failed append or
  // a shuffle that moved the wrong data shows here even if no attend came after.
  std::vector<std::pair<SequenceId, std::int64_t>> last;
  for (const auto& [id, seq] : h.model) {
    if (!seq.tokens.empty()) last.emplace_back(id, 1);
  }
  h.trace += "final attend\n";
  h.attend(last);
  // LOOKBACK_FUZZ_PRINT=1 prints each run's operations, to triage or pick seeds.
  static const bool print = std::getenv("LOOKBACK_FUZZ_PRINT") != nullptr;
  if (print) std::fprintf(stderr, "%s---\n", h.trace.c_str());
}

}  // namespace
}  // namespace lookback::fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  lookback::fuzz::run(in);
  return 0;
}
