// lookback._lookback: the C++ half of the Python package. Glue only: NumPy
// arrays become tensor views (no copy: any strides), the library validates
// and computes, lookback::Error becomes the matching Python exception. The
// package's __init__.py adds torch tensors, flash_attn_func and the report
// types on top (docs/python.md).
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "lookback/lookback.hpp"

namespace py = pybind11;

namespace lookback::python {
namespace {

// ---- contexts ---------------------------------------------------------------

// Contexts are expensive to create (worker threads) and serve one call at a
// time, so calls borrow one from a pool and give it back: two Python threads
// attending at once (the GIL released) run on two contexts, side by side.
class ContextPool {
 public:
  class Lease {
   public:
    Lease(ContextPool& pool, int threads, std::unique_ptr<Context> context)
        : pool_(pool), threads_(threads), context_(std::move(context)) {}
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() { pool_.give_back(threads_, std::move(context_)); }
    Context& context() { return *context_; }

   private:
    ContextPool& pool_;
    int threads_;
    std::unique_ptr<Context> context_;
  };

  // threads: 0 for every core.
  Lease borrow(int threads) {
    {
      const std::lock_guard lock(mutex_);
      for (auto it = idle_.begin(); it != idle_.end(); ++it) {
        if (it->first == threads) {
          std::unique_ptr<Context> context = std::move(it->second);
          idle_.erase(it);
          return Lease(*this, threads, std::move(context));
        }
      }
    }
    return Lease(*this, threads, std::make_unique<Context>(threads));
  }

 private:
  void give_back(int threads, std::unique_ptr<Context> context) {
    const std::lock_guard lock(mutex_);
    idle_.emplace_back(threads, std::move(context));
  }

  std::mutex mutex_;
  std::vector<std::pair<int, std::unique_ptr<Context>>> idle_;
};

// Never destroyed: joining worker threads while the interpreter shuts down
// gains nothing.
ContextPool* current_pool = new ContextPool;

ContextPool& context_pool() { return *current_pool; }

// In a child process after fork() the pool's contexts have lost their worker
// threads (and its mutex may be held by a thread that is gone): the child
// starts a new pool and leaves the old one alone, never using or destroying
// it. Called by os.register_at_fork (the package's __init__.py).
void forget_contexts_after_fork() { current_pool = new ContextPool; }

int thread_count(const std::optional<int>& threads) {
  if (!threads) return 0;
  if (*threads < 1) {
    throw Error("threads: " + std::to_string(*threads) + " (expected >= 1, or None for every core)");
  }
  return *threads;
}

// ---- arrays -------------------------------------------------------------------

[[noreturn]] void type_error(const std::string& message) { throw py::type_error(message); }

std::string type_name(const py::handle& object) {
  return py::str(py::type::handle_of(object).attr("__name__")).cast<std::string>();
}

// The 16-bit words of a bfloat16 tensor (NumPy has no bfloat16): the
// package wraps a torch bfloat16 tensor's int16 view in it, so that it is
// read in place as bf16.
struct Bf16Array {
  py::array words;  // int16 or uint16, any strides
};

// A NumPy array as a tensor view over its memory: float32, float16 or
// float64 (or a Bf16Array), any strides that are whole elements (others are
// copied). `keep` holds the array the view points into.
template <typename View>
View view_of(const py::handle& object, const char* argument, py::object& keep) {
  if (py::isinstance<Bf16Array>(object)) {
    const py::array& words = object.cast<const Bf16Array&>().words;
    View view = view_of<View>(words.attr("view")(py::dtype("<f2")), argument, keep);
    view.dtype = DType::kBF16;  // the same 16-bit words, read as bfloat16
    return view;
  }
  if (!py::isinstance<py::array>(object)) {
    type_error(std::string(argument) + ": expected a NumPy array or a CPU torch.Tensor, got " +
               type_name(object));
  }
  py::array array = py::reinterpret_borrow<py::array>(object);
  const py::dtype dtype = array.dtype();
  DType element;
  if (dtype.kind() == 'f' && dtype.itemsize() == 4) {
    element = DType::kF32;
  } else if (dtype.kind() == 'f' && dtype.itemsize() == 8) {
    element = DType::kF64;
  } else if (dtype.kind() == 'f' && dtype.itemsize() == 2) {
    element = DType::kF16;
  } else {
    throw Error(std::string(argument) + ": dtype " + dtype.attr("name").cast<std::string>() +
                " (expected float32, float16 or float64)");
  }
  if (array.ndim() < 1 || array.ndim() > kMaxRank) {
    throw Error(std::string(argument) + ": " + std::to_string(array.ndim()) +
                " dimensions (expected 1 to " + std::to_string(kMaxRank) + ")");
  }
  bool whole_elements = dtype.byteorder() != '>';
  for (py::ssize_t axis = 0; axis < array.ndim(); ++axis) {
    whole_elements = whole_elements && array.strides(axis) % dtype.itemsize() == 0;
  }
  if (!whole_elements) {  // e.g. a view into a record array, or big-endian
    array = py::array::ensure(py::module_::import("numpy").attr("ascontiguousarray")(
        array, dtype.attr("newbyteorder")("=")));
  }
  View view;
  view.data = const_cast<void*>(array.data());
  view.dtype = element;
  view.rank = static_cast<int>(array.ndim());
  for (int axis = 0; axis < view.rank; ++axis) {
    view.shape[axis] = array.shape(axis);
    view.strides[axis] = array.strides(axis) / static_cast<py::ssize_t>(dtype.itemsize());
  }
  keep = std::move(array);
  return view;
}

TensorView input_view(const py::handle& object, const char* argument, py::object& keep) {
  return view_of<TensorView>(object, argument, keep);
}

// A float32 C-order array of `shape` and a mutable view over it.
std::pair<py::array_t<float>, MutableTensorView> new_output(const std::vector<py::ssize_t>& shape) {
  py::array_t<float> array(shape);
  MutableTensorView view;
  view.data = array.mutable_data();
  view.dtype = DType::kF32;
  view.rank = static_cast<int>(shape.size());
  for (int axis = 0; axis < view.rank; ++axis) {
    view.shape[axis] = shape[static_cast<std::size_t>(axis)];
    view.strides[axis] = array.strides(axis) / static_cast<py::ssize_t>(sizeof(float));
  }
  return {std::move(array), view};
}

// A per-head input (ALiBi slopes, sink logits) as contiguous float32 (a
// copy: they are few). `noun` names one value in messages ("slope").
std::optional<std::vector<float>> per_head_of(const py::object& object, const char* argument,
                                              const char* noun) {
  if (object.is_none()) return std::nullopt;
  py::array_t<float, py::array::c_style | py::array::forcecast> array;
  try {
    array = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(object);
  } catch (const py::error_already_set&) {
    array = {};
  }
  if (!array) {
    type_error(std::string(argument) + ": expected a 1-dimensional array of floats, got " +
               type_name(object));
  }
  if (array.ndim() != 1) {
    throw Error(std::string(argument) + ": " + std::to_string(array.ndim()) +
                " dimensions (expected 1: one " + noun + " per query head)");
  }
  return std::vector<float>(array.data(), array.data() + array.size());
}

std::optional<std::vector<float>> slopes_of(const py::object& object) {
  return per_head_of(object, "alibi_slopes", "slope");
}

// Learned sink logits (heads,); the library checks that they are finite.
std::optional<std::vector<float>> sink_logits_of(const py::object& object) {
  return per_head_of(object, "sink_logits", "logit");
}

// One value per query head, or a ValueError naming the argument.
void check_per_head(const std::optional<std::vector<float>>& values, std::int64_t heads,
                    const char* argument, const char* noun) {
  if (values && static_cast<std::int64_t>(values->size()) != heads) {
    throw Error(std::string(argument) + ": " + std::to_string(values->size()) + " " + noun +
                "s (expected heads = " + std::to_string(heads) + ")");
  }
}

const float* data_or_null(const std::optional<std::vector<float>>& values) {
  return values ? values->data() : nullptr;
}

// ---- options --------------------------------------------------------------------

Causal causal_of(const py::handle& object) {
  if (py::isinstance<py::bool_>(object)) {
    return object.cast<bool>() ? Causal::kBottomRight : Causal::kNone;
  }
  if (py::isinstance<py::str>(object)) return parse_causal(object.cast<std::string>(), "causal");
  type_error("causal: expected \"bottom-right\", \"top-left\", \"none\", True or False, got " +
             type_name(object));
}

std::optional<std::int64_t> window_of(const py::handle& object) {
  if (object.is_none()) return std::nullopt;
  if (py::isinstance<py::bool_>(object) || !py::isinstance<py::int_>(object)) {
    type_error("window: expected None or an int >= 0, got " + type_name(object));
  }
  int overflow = 0;
  const long long window = PyLong_AsLongLongAndOverflow(object.ptr(), &overflow);
  if (overflow != 0) {
    throw Error("window: " + py::str(object).cast<std::string>() +
                " (expected None or an int >= 0 that fits in 64 bits)");
  }
  return window;
}

// sink_tokens: StreamingLLM sinks; the library checks S >= 0 and the window.
MaskSpec mask_of(const py::handle& causal, const py::handle& window,
                 std::int64_t sink_tokens = 0) {
  return MaskSpec{.causal = causal_of(causal), .window_left = window_of(window),
                  .sink_tokens = sink_tokens};
}

DType storage_of(const std::string& text) {
  const DType storage = parse_dtype(text, "dtype");
  if (storage == DType::kF64) throw Error(
        "dtype: f64 (expected a storage dtype: f32, bf16, f16, int8, fp8e4m3 or fp8e5m2)");
  return storage;
}

// ---- attention ------------------------------------------------------------------

// The score and mask options every attention entry point shares, as the
// library takes them; the vectors own the per-head values params point at.
struct ScoreOptions {
  std::optional<std::vector<float>> slopes;       // (heads,)
  std::optional<std::vector<float>> sink_logits;  // (heads,)
  std::optional<float> scale;
  float softcap = 0.0f;
  MaskSpec mask;
  DType storage = DType::kF32;

  // Sizes first: the library reads `heads` values through the pointers.
  void check_heads(std::int64_t heads) const {
    check_per_head(slopes, heads, "alibi_slopes", "slope");
    check_per_head(sink_logits, heads, "sink_logits", "logit");
  }
};

ScoreOptions score_options(const py::object& causal, const py::object& window, float softcap,
                           const py::object& alibi_slopes, std::optional<float> scale,
                           const std::string& dtype, std::int64_t sink_tokens,
                           const py::object& sink_logits) {
  return ScoreOptions{.slopes = slopes_of(alibi_slopes),
                      .sink_logits = sink_logits_of(sink_logits),
                      .scale = scale,
                      .softcap = softcap,
                      .mask = mask_of(causal, window, sink_tokens),
                      .storage = storage_of(dtype)};
}

// out=: the caller's array, written in place (attend checks its shape and dtype).
MutableTensorView caller_out(const py::object& out_object, py::object& keep_out) {
  if (py::isinstance<Bf16Array>(out_object)) throw Error("out: dtype bf16 (expected f32)");
  if (py::isinstance<py::array>(out_object) &&
      !py::reinterpret_borrow<py::array>(out_object).writeable()) {
    throw Error("out: a read-only array (expected a writeable float32 array)");
  }
  MutableTensorView view = view_of<MutableTensorView>(out_object, "out", keep_out);
  if (keep_out.ptr() != out_object.ptr()) {
    throw Error("out: strides that are not whole elements, or big-endian data "
                "(expected a native float32 array)");
  }
  return view;
}

// The float64 oracle, rounded to float32 into out and lse (new arrays).
void run_reference(const AttentionParams& params, py::array_t<float>& out,
                   py::array_t<float>& lse, bool return_lse) {
  ReferenceResult result;
  {
    py::gil_scoped_release released;
    result = reference_attention(params);
  }
  float* o = out.mutable_data();
  for (std::size_t i = 0; i < result.out.size(); ++i) o[i] = static_cast<float>(result.out[i]);
  if (return_lse) {
    float* l = lse.mutable_data();
    for (std::size_t i = 0; i < result.lse.size(); ++i) l[i] = static_cast<float>(result.lse[i]);
  }
}

py::object attention(const py::object& q, const py::object& k, const py::object& v,
                     const py::object& causal, const py::object& window, float softcap,
                     const py::object& alibi_slopes, std::optional<float> scale,
                     const std::string& dtype, std::int64_t sink_tokens,
                     const py::object& sink_logits, bool return_lse, std::optional<int> threads,
                     const py::object& out_object, bool reference) {
  py::object keep_q, keep_k, keep_v;
  const ScoreOptions options = score_options(causal, window, softcap, alibi_slopes, scale, dtype,
                                             sink_tokens, sink_logits);
  AttentionParams params{
      .q = input_view(q, "q", keep_q),
      .k = input_view(k, "k", keep_k),
      .v = input_view(v, "v", keep_v),
      .scale = options.scale,
      .softcap = options.softcap,
      .mask = options.mask,
      .storage = options.storage,
  };
  const AttentionShape shape = validate_shapes(params);
  options.check_heads(shape.heads);
  params.maybe_alibi_slopes = data_or_null(options.slopes);
  params.maybe_sink_logits = data_or_null(options.sink_logits);
  validate_shapes(params);  // now with the per-head values (finite)
  py::object keep_out;
  py::array_t<float> out;
  if (out_object.is_none()) {
    std::tie(out, params.out) =
        new_output({shape.batch, shape.seqlen_q, shape.heads, shape.head_dim});
  } else {
    params.out = caller_out(out_object, keep_out);
  }
  py::array_t<float> lse;
  if (return_lse) {
    std::tie(lse, params.maybe_lse) = new_output({shape.batch, shape.heads, shape.seqlen_q});
  }
  if (reference) {
    run_reference(params, out, lse, return_lse);  // reference=True never takes out=
  } else {
    const int thread_number = thread_count(threads);
    py::gil_scoped_release released;
    auto lease = context_pool().borrow(thread_number);
    attend(params, lease.context());
  }
  py::object result = out_object.is_none() ? py::object(std::move(out)) : out_object;
  if (return_lse) return py::make_tuple(result, lse);
  return result;
}

// cu_seqlens_q / cu_seqlens_k: a 1-dimensional int32 or int64 array, read in
// place (the library checks the offsets themselves: start, order, ends).
TensorView offsets_view(const py::handle& object, const char* argument, py::object& keep) {
  if (!py::isinstance<py::array>(object)) {
    type_error(std::string(argument) + ": expected a NumPy array or a CPU torch.Tensor of "
               "int32 or int64, got " + type_name(object));
  }
  py::array array = py::reinterpret_borrow<py::array>(object);
  const py::dtype dtype = array.dtype();
  if (dtype.kind() != 'i' || (dtype.itemsize() != 4 && dtype.itemsize() != 8)) {
    throw Error(std::string(argument) + ": dtype " + dtype.attr("name").cast<std::string>() +
                " (expected int32 or int64)");
  }
  if (array.ndim() != 1) {
    throw Error(std::string(argument) + ": " + std::to_string(array.ndim()) +
                " dimensions (expected 1: batch + 1 offsets)");
  }
  if (dtype.byteorder() == '>' || array.strides(0) % dtype.itemsize() != 0) {
    array = py::array::ensure(py::module_::import("numpy").attr("ascontiguousarray")(
        array, dtype.attr("newbyteorder")("=")));
  }
  TensorView view;
  view.data = array.data();
  view.dtype = dtype.itemsize() == 4 ? DType::kI32 : DType::kI64;
  view.rank = 1;
  view.shape[0] = array.shape(0);
  view.strides[0] = array.strides(0) / static_cast<py::ssize_t>(dtype.itemsize());
  keep = std::move(array);
  return view;
}

// A packed batch (lookback/varlen.hpp): q (total_q, heads, head_dim), k, v
// (total_k, kv_heads, head_dim); out like q, lse (heads, total_q).
py::object attention_varlen(const py::object& q, const py::object& k, const py::object& v,
                            const py::object& cu_seqlens_q, const py::object& cu_seqlens_k,
                            const py::object& causal, const py::object& window, float softcap,
                            const py::object& alibi_slopes, std::optional<float> scale,
                            const std::string& dtype, std::int64_t sink_tokens,
                            const py::object& sink_logits, bool return_lse,
                            std::optional<int> threads) {
  py::object keep_q, keep_k, keep_v, keep_cu_q, keep_cu_k;
  const ScoreOptions options = score_options(causal, window, softcap, alibi_slopes, scale, dtype,
                                             sink_tokens, sink_logits);
  VarlenParams params{
      .q = input_view(q, "q", keep_q),
      .k = input_view(k, "k", keep_k),
      .v = input_view(v, "v", keep_v),
      .cu_seqlens_q = offsets_view(cu_seqlens_q, "cu_seqlens_q", keep_cu_q),
      .cu_seqlens_k = offsets_view(cu_seqlens_k, "cu_seqlens_k", keep_cu_k),
      .scale = options.scale,
      .softcap = options.softcap,
      .mask = options.mask,
      .storage = options.storage,
  };
  const AttentionShape shape = validate_varlen_shapes(params).totals;
  options.check_heads(shape.heads);
  params.maybe_alibi_slopes = data_or_null(options.slopes);
  params.maybe_sink_logits = data_or_null(options.sink_logits);
  validate_varlen_shapes(params);  // now with the per-head values (finite)
  py::array_t<float> out, lse;
  std::tie(out, params.out) = new_output({shape.seqlen_q, shape.heads, shape.head_dim});
  if (return_lse) std::tie(lse, params.maybe_lse) = new_output({shape.heads, shape.seqlen_q});
  {
    const int thread_number = thread_count(threads);
    py::gil_scoped_release released;
    auto lease = context_pool().borrow(thread_number);
    attend_varlen(params, lease.context());
  }
  if (return_lse) return py::make_tuple(out, lse);
  return out;
}

// ---- caches ---------------------------------------------------------------------

// A cache attend's options; options() points into the per-head vectors.
struct DecodeArgs {
  std::optional<std::vector<float>> slopes;       // (heads,)
  std::optional<std::vector<float>> sink_logits;  // (heads,)
  std::optional<float> scale;
  float softcap = 0.0f;
  std::optional<std::int64_t> window;
  std::int64_t sink_tokens = 0;  // the library checks S >= 0 and the window

  DecodeOptions options() const {
    return DecodeOptions{
        .scale = scale,
        .softcap = softcap,
        .window_left = window,
        .sink_tokens = sink_tokens,
        .maybe_alibi_slopes = data_or_null(slopes),
        .maybe_sink_logits = data_or_null(sink_logits),
    };
  }
};

DecodeArgs decode_args(std::optional<float> scale, float softcap, const py::object& window,
                       const py::object& alibi_slopes, std::int64_t sink_tokens,
                       const py::object& sink_logits) {
  return DecodeArgs{.slopes = slopes_of(alibi_slopes),
                    .sink_logits = sink_logits_of(sink_logits),
                    .scale = scale,
                    .softcap = softcap,
                    .window = window_of(window),
                    .sink_tokens = sink_tokens};
}

CacheConfig cache_config(std::int64_t kv_heads, std::int64_t head_dim, const std::string& dtype,
                         std::optional<float> rope_theta) {
  CacheConfig config{.kv_heads = kv_heads, .head_dim = head_dim, .storage = storage_of(dtype)};
  if (rope_theta) config.rope = RopeSpec{.theta = *rope_theta};
  return config;
}

// Runs `attend_step(step)` for the newest q.shape[0] tokens and returns out
// (tokens, heads, head_dim) and, when asked, lse (heads, tokens).
template <typename AttendStep>
py::object decode(const py::object& q, bool return_lse, const DecodeArgs& args,
                  AttendStep&& attend_step) {
  py::object keep_q;
  DecodeStep step{.q = input_view(q, "q", keep_q)};
  validate_view(step.q, 3, "q");
  check_per_head(args.slopes, step.q.shape[1], "alibi_slopes", "slope");
  check_per_head(args.sink_logits, step.q.shape[1], "sink_logits", "logit");
  auto [out, out_view] = new_output({step.q.shape[0], step.q.shape[1], step.q.shape[2]});
  step.out = out_view;
  py::array_t<float> lse;
  if (return_lse) {
    auto [array, view] = new_output({step.q.shape[1], step.q.shape[0]});
    lse = std::move(array);
    step.maybe_lse = view;
  }
  {
    py::gil_scoped_release released;
    attend_step(step);
  }
  if (return_lse) return py::make_tuple(out, lse);
  return std::move(out);
}

// One sequence's contiguous cache. The lock keeps appends and clears from
// running under an attend of another Python thread (the GIL is released).
class PyKvCache {
 public:
  PyKvCache(std::int64_t capacity, std::int64_t kv_heads, std::int64_t head_dim,
            const std::string& dtype, std::optional<float> rope_theta,
            std::optional<std::int64_t> ring_sink_tokens)
      : cache_(ring_sink_tokens
                   ? KvCache(cache_config(kv_heads, head_dim, dtype, rope_theta), capacity,
                             RingSpec{.sink_tokens = *ring_sink_tokens})
                   : KvCache(cache_config(kv_heads, head_dim, dtype, rope_theta), capacity)) {}
  explicit PyKvCache(KvCache&& cache) : cache_(std::move(cache)) {}

  void append(const py::object& k, const py::object& v) {
    py::object keep_k, keep_v;
    const TensorView kv = input_view(k, "k", keep_k), vv = input_view(v, "v", keep_v);
    py::gil_scoped_release released;
    const std::unique_lock lock(mutex_);
    cache_.append(kv, vv);
  }

  py::object attend(const py::object& q, std::optional<float> scale, float softcap,
                    const py::object& window, const py::object& alibi_slopes,
                    std::int64_t sink_tokens, const py::object& sink_logits, bool return_lse,
                    std::optional<int> threads) {
    const DecodeArgs args =
        decode_args(scale, softcap, window, alibi_slopes, sink_tokens, sink_logits);
    const DecodeOptions options = args.options();
    const int thread_number = thread_count(threads);
    return decode(q, return_lse, args, [&](const DecodeStep& step) {
      auto lease = context_pool().borrow(thread_number);
      const std::shared_lock lock(mutex_);
      cache_.attend(step, options, lease.context());
    });
  }

  std::int64_t length() const { return cache_.length(); }
  std::int64_t capacity() const { return cache_.capacity(); }
  std::optional<std::int64_t> ring_sink_tokens() const {
    if (!cache_.ring()) return std::nullopt;
    return cache_.ring()->sink_tokens;
  }
  std::int64_t first_kept() const { return cache_.first_kept(); }
  const CacheConfig& config() const { return cache_.config(); }
  void clear() {
    py::gil_scoped_release released;
    const std::unique_lock lock(mutex_);
    cache_.clear();
  }
  void save(const std::string& path) {
    py::gil_scoped_release released;
    const std::shared_lock lock(mutex_);
    save_checkpoint(cache_, path);
  }

 private:
  KvCache cache_;
  mutable std::shared_mutex mutex_;
};

class PyPagedPool {
 public:
  PyPagedPool(std::int64_t num_blocks, std::int64_t block_size, std::int64_t kv_heads,
              std::int64_t head_dim, const std::string& dtype, std::optional<float> rope_theta)
      : pool_(cache_config(kv_heads, head_dim, dtype, rope_theta), block_size, num_blocks) {}
  explicit PyPagedPool(PagedKvPool&& pool) : pool_(std::move(pool)) {}

  SequenceId create() {
    const std::unique_lock lock(mutex_);
    return pool_.create();
  }
  SequenceId fork(SequenceId parent) {
    const std::unique_lock lock(mutex_);
    return pool_.fork(parent);
  }
  void release(SequenceId sequence) {
    const std::unique_lock lock(mutex_);
    pool_.release(sequence);
  }
  void append(SequenceId sequence, const py::object& k, const py::object& v) {
    py::object keep_k, keep_v;
    const TensorView kv = input_view(k, "k", keep_k), vv = input_view(v, "v", keep_v);
    py::gil_scoped_release released;
    const std::unique_lock lock(mutex_);
    pool_.append(sequence, kv, vv);
  }
  py::object attend(SequenceId sequence, const py::object& q, std::optional<float> scale,
                    float softcap, const py::object& window, const py::object& alibi_slopes,
                    std::int64_t sink_tokens, const py::object& sink_logits, bool return_lse,
                    std::optional<int> threads) {
    const DecodeArgs args =
        decode_args(scale, softcap, window, alibi_slopes, sink_tokens, sink_logits);
    const DecodeOptions options = args.options();
    const int thread_number = thread_count(threads);
    return decode(q, return_lse, args, [&](const DecodeStep& step) {
      auto lease = context_pool().borrow(thread_number);
      const std::shared_lock lock(mutex_);
      pool_.attend(sequence, step, options, lease.context());
    });
  }
  std::int64_t length(SequenceId sequence) const {
    const std::shared_lock lock(mutex_);
    return pool_.length(sequence);
  }
  std::vector<std::int64_t> block_table(SequenceId sequence) const {
    const std::shared_lock lock(mutex_);
    return pool_.block_table(sequence);
  }
  std::vector<SequenceId> sequences() const {
    const std::shared_lock lock(mutex_);
    return pool_.sequences();
  }
  std::int64_t free_blocks() const {
    const std::shared_lock lock(mutex_);
    return pool_.free_blocks();
  }
  std::int64_t num_blocks() const { return pool_.num_blocks(); }
  std::int64_t block_size() const { return pool_.block_size(); }
  const CacheConfig& config() const { return pool_.config(); }
  void save(const std::string& path) {
    py::gil_scoped_release released;
    const std::shared_lock lock(mutex_);
    save_checkpoint(pool_, path);
  }

 private:
  PagedKvPool pool_;
  mutable std::shared_mutex mutex_;
};

// ---- diagnostics ------------------------------------------------------------------

py::array_t<float> float_array(const std::vector<float>& values,
                               const std::vector<py::ssize_t>& shape) {
  py::array_t<float> array(shape);
  std::memcpy(array.mutable_data(), values.data(), values.size() * sizeof(float));
  return array;
}

// fn(q, k, v) -> NumPy array; the run's inputs are fresh float32 arrays. An
// exception raised by fn propagates unchanged (check_leaks rethrows it).
py::dict leakcheck(const py::function& fn, std::int64_t length, std::int64_t heads,
                   std::int64_t kv_heads, std::int64_t dim, std::int64_t batch,
                   const py::object& causal, const py::object& window, std::int64_t sink_tokens,
                   std::uint64_t seed) {
  diagnostics::LeakCheckOptions options{
      .shape = {.batch = batch, .seqlen = length, .heads = heads, .kv_heads = kv_heads,
                .head_dim = dim},
      .mask = mask_of(causal, window, sink_tokens),
      .seed = seed,
      .jobs = 1,  // fn runs under the GIL, on this thread
      .output_name = "output of fn",
  };
  const auto implementation = [&fn](const diagnostics::LeakInputs& in,
                                    const diagnostics::RunInfo&) {
    const auto& s = in.shape;
    py::object result = fn(float_array(in.q, {s.batch, s.seqlen, s.heads, s.head_dim}),
                           float_array(in.k, {s.batch, s.seqlen, s.kv_heads, s.head_dim}),
                           float_array(in.v, {s.batch, s.seqlen, s.kv_heads, s.head_dim}));
    if (!py::isinstance<py::array>(result)) {
      type_error("fn: returned " + type_name(result) + " (expected an array)");
    }
    const py::array out = py::module_::import("numpy").attr("ascontiguousarray")(result);
    NpyArray array;
    const py::dtype dtype = out.dtype();
    if (dtype.is(py::dtype::of<float>())) {
      array.dtype = DType::kF32;
    } else if (dtype.is(py::dtype::of<double>())) {
      array.dtype = DType::kF64;
    } else {
      throw Error("output of fn: dtype " + dtype.attr("name").cast<std::string>() +
                  " (expected float32 or float64)");
    }
    for (py::ssize_t axis = 0; axis < out.ndim(); ++axis) array.shape.push_back(out.shape(axis));
    const auto* bytes = static_cast<const std::byte*>(out.data());
    array.data.assign(bytes, bytes + out.nbytes());
    return array;
  };
  const diagnostics::LeakReport report = diagnostics::check_leaks(implementation, options);
  const std::int64_t n = report.shape.seqlen;
  py::array_t<bool> dependency({n, n});
  for (std::int64_t c = 0; c < n * n; ++c) {
    dependency.mutable_data()[c] = report.dependency[static_cast<std::size_t>(c)] != 0;
  }
  py::array_t<bool> per_head({report.shape.batch, report.shape.heads, n, n});
  for (std::size_t c = 0; c < report.per_batch_head.size(); ++c) {
    per_head.mutable_data()[c] = report.per_batch_head[c] != 0;
  }
  py::dict result;
  result["leaks"] = report.result.leaks;
  result["missing"] = report.result.missing;
  result["dependency"] = dependency;
  result["per_batch_head"] = per_head;
  result["runs"] = report.runs;
  return result;
}

py::array_t<bool> visible_mask(std::int64_t seqlen_q, const std::optional<std::int64_t>& seqlen_k,
                               const py::object& causal, const py::object& window,
                               std::int64_t sink_tokens) {
  const Mask mask(seqlen_q, seqlen_k.value_or(seqlen_q), mask_of(causal, window, sink_tokens));
  py::array_t<bool> result({mask.seqlen_q(), mask.seqlen_k()});
  bool* cells = result.mutable_data();
  for (std::int64_t i = 0; i < mask.seqlen_q(); ++i) {
    for (std::int64_t j = 0; j < mask.seqlen_k(); ++j) {
      cells[i * mask.seqlen_k() + j] = mask.visible(i, j);
    }
  }
  return result;
}

// acc_out (rows, dim) and acc_lse (rows,), float32 C order, merged in place
// with other_out, other_lse (the package's merge_states arranges the rows).
void merge_rows(py::array_t<float, py::array::c_style> acc_out,
                py::array_t<float, py::array::c_style> acc_lse,
                py::array_t<float, py::array::c_style | py::array::forcecast> other_out,
                py::array_t<float, py::array::c_style | py::array::forcecast> other_lse) {
  if (acc_out.ndim() != 2 || other_out.ndim() != 2 || acc_lse.ndim() != 1 ||
      other_lse.ndim() != 1 || other_out.shape(0) != acc_out.shape(0) ||
      other_out.shape(1) != acc_out.shape(1) || acc_lse.shape(0) != acc_out.shape(0) ||
      other_lse.shape(0) != acc_out.shape(0)) {
    throw Error("merge_states: internal shape mismatch");
  }
  merge_attention(acc_out.mutable_data(), acc_lse.mutable_data(), other_out.data(),
                  other_lse.data(), acc_out.shape(0), acc_out.shape(1));
}

py::dict kernel_info() {
  const KernelCaps caps = kernel_caps();
  py::dict info;
  info["description"] = describe_kernels();
  info["target"] = caps.target;
  info["targets"] = caps.targets;
  info["simd_cap"] = caps.simd_cap;
  info["avx512"] = caps.avx512;
  info["avx512_bf16"] = caps.avx512_bf16;
  info["amx_bf16"] = caps.amx_bf16;
  info["amx_disabled"] = caps.amx_disabled;
  info["amx_prefill"] = caps.amx_prefill;
  info["bf16_decode_dots"] = caps.bf16_decode_dots;
  return info;
}

py::dict config_dict(const CacheConfig& config) {
  py::dict result;
  result["kv_heads"] = config.kv_heads;
  result["head_dim"] = config.head_dim;
  result["dtype"] = std::string(dtype_name(config.storage));
  result["rope_theta"] = config.rope ? py::cast(config.rope->theta) : py::none();
  return result;
}

}  // namespace
}  // namespace lookback::python

PYBIND11_MODULE(_lookback, m) {
  using namespace lookback::python;
  using lookback::Error;
  using lookback::ErrorCode;
  namespace lb = lookback;

  m.doc() = "lookback's C++ half; use the lookback package, not this module.";
  m.attr("__version__") = lb::kVersion;

  // The library's message as the Python exception a caller expects.
  py::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const Error& e) {
      switch (e.code()) {
        case ErrorCode::kIo:
        case ErrorCode::kFormat: PyErr_SetString(PyExc_OSError, e.what()); return;
        case ErrorCode::kInternal: PyErr_SetString(PyExc_RuntimeError, e.what()); return;
        default: PyErr_SetString(PyExc_ValueError, e.what()); return;
      }
    } catch (const std::bad_alloc&) {
      PyErr_SetString(PyExc_MemoryError, "out of memory");
    }
  });

  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::kw_only(),
        py::arg("causal"), py::arg("window"), py::arg("softcap"), py::arg("alibi_slopes"),
        py::arg("scale"), py::arg("dtype"), py::arg("sink_tokens"), py::arg("sink_logits"),
        py::arg("return_lse"), py::arg("threads"), py::arg("out"), py::arg("reference"));
  m.def("attention_varlen", &attention_varlen, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::kw_only(), py::arg("causal"),
        py::arg("window"), py::arg("softcap"), py::arg("alibi_slopes"), py::arg("scale"),
        py::arg("dtype"), py::arg("sink_tokens"), py::arg("sink_logits"), py::arg("return_lse"),
        py::arg("threads"));

  py::class_<PyKvCache>(m, "KvCache")
      .def(py::init<std::int64_t, std::int64_t, std::int64_t, const std::string&,
                    std::optional<float>, std::optional<std::int64_t>>(),
           py::arg("capacity"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("dtype"),
           py::arg("rope_theta"), py::arg("ring_sink_tokens"))
      .def_static("load", [](const std::string& path) {
        lb::KvCache cache = [&] {
          py::gil_scoped_release released;
          return lb::load_kv_cache(path);
        }();
        return std::make_unique<PyKvCache>(std::move(cache));
      })
      .def("append", &PyKvCache::append)
      .def("attend", &PyKvCache::attend, py::arg("q"), py::kw_only(), py::arg("scale"),
           py::arg("softcap"), py::arg("window"), py::arg("alibi_slopes"), py::arg("sink_tokens"),
           py::arg("sink_logits"), py::arg("return_lse"), py::arg("threads"))
      .def("__len__", &PyKvCache::length)
      .def_property_readonly("capacity", &PyKvCache::capacity)
      .def_property_readonly("ring_sink_tokens", &PyKvCache::ring_sink_tokens)
      .def_property_readonly("first_kept", &PyKvCache::first_kept)
      .def_property_readonly("config", [](const PyKvCache& c) { return config_dict(c.config()); })
      .def("clear", &PyKvCache::clear)
      .def("save", &PyKvCache::save);

  py::class_<PyPagedPool>(m, "PagedKvPool")
      .def(py::init<std::int64_t, std::int64_t, std::int64_t, std::int64_t, const std::string&,
                    std::optional<float>>(),
           py::arg("num_blocks"), py::arg("block_size"), py::arg("kv_heads"),
           py::arg("head_dim"), py::arg("dtype"), py::arg("rope_theta"))
      .def_static("load", [](const std::string& path) {
        lb::PagedKvPool pool = [&] {
          py::gil_scoped_release released;
          return lb::load_paged_pool(path);
        }();
        return std::make_unique<PyPagedPool>(std::move(pool));
      })
      .def("create", &PyPagedPool::create)
      .def("fork", &PyPagedPool::fork)
      .def("release", &PyPagedPool::release)
      .def("append", &PyPagedPool::append)
      .def("attend", &PyPagedPool::attend, py::arg("sequence"), py::arg("q"), py::kw_only(),
           py::arg("scale"), py::arg("softcap"), py::arg("window"), py::arg("alibi_slopes"),
           py::arg("sink_tokens"), py::arg("sink_logits"), py::arg("return_lse"),
           py::arg("threads"))
      .def("length", &PyPagedPool::length)
      .def("block_table", &PyPagedPool::block_table)
      .def("sequences", &PyPagedPool::sequences)
      .def_property_readonly("free_blocks", &PyPagedPool::free_blocks)
      .def_property_readonly("num_blocks", &PyPagedPool::num_blocks)
      .def_property_readonly("block_size", &PyPagedPool::block_size)
      .def_property_readonly("config", [](const PyPagedPool& p) { return config_dict(p.config()); })
      .def("save", &PyPagedPool::save);

  m.def("leakcheck", &leakcheck, py::arg("fn"), py::arg("length"), py::arg("heads"),
        py::arg("kv_heads"), py::arg("dim"), py::kw_only(), py::arg("batch"), py::arg("causal"),
        py::arg("window"), py::arg("sink_tokens"), py::arg("seed"));
  m.def("visible_mask", &visible_mask, py::arg("seqlen_q"), py::arg("seqlen_k"),
        py::arg("causal"), py::arg("window"), py::arg("sink_tokens"));
  m.def("merge_rows", &merge_rows);
  py::class_<Bf16Array>(m, "Bf16Array")
      .def(py::init([](py::array words) {
        if (words.itemsize() != 2) throw Error("Bf16Array: expected 16-bit words");
        return Bf16Array{std::move(words)};
      }));
  m.def("kernel_info", &kernel_info);
  m.def("forget_contexts_after_fork", &forget_contexts_after_fork);
}
