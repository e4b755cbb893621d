// The C API: a thin shell over the C++ API that turns exceptions into status
// codes and a thread-local message.
#include "lookback/lookback.h"

#include <exception>
#include <string>

#include "lookback/attention.hpp"
#include "lookback/error.hpp"
#include "lookback/varlen.hpp"
#include "lookback/version.hpp"

struct lookback_context {
  lookback::Context context;
  explicit lookback_context(int threads) : context(threads) {}
};

namespace {

thread_local std::string last_error;

lookback_status fail(lookback_status status, const char* message) {
  last_error = message;
  return status;
}

template <typename Body>
lookback_status guarded(Body&& body) {
  try {
    body();
    last_error.clear();
    return LOOKBACK_OK;
  } catch (const lookback::Error& e) {
    return fail(static_cast<lookback_status>(static_cast<int>(e.code())), e.what());
  } catch (const std::bad_alloc&) {
    return fail(LOOKBACK_ERROR_CAPACITY, "out of memory");
  } catch (const std::exception& e) {
    return fail(LOOKBACK_ERROR_INTERNAL, e.what());
  }
}

lookback::DType to_dtype(lookback_dtype dtype, const char* argument) {
  switch (dtype) {
    case LOOKBACK_F32: return lookback::DType::kF32;
    case LOOKBACK_F16: return lookback::DType::kF16;
    case LOOKBACK_BF16: return lookback::DType::kBF16;
    case LOOKBACK_F64: return lookback::DType::kF64;
    case LOOKBACK_INT8: return lookback::DType::kI8;
    case LOOKBACK_FP8E4M3: return lookback::DType::kFP8E4M3;
    case LOOKBACK_FP8E5M2: return lookback::DType::kFP8E5M2;
  }
  throw lookback::Error(std::string(argument) + ": unknown dtype value (expected LOOKBACK_F32, "
                        "LOOKBACK_F16, LOOKBACK_BF16, LOOKBACK_F64, LOOKBACK_INT8, "
                        "LOOKBACK_FP8E4M3 or LOOKBACK_FP8E5M2)");
}

lookback::TensorView to_view(const lookback_tensor& tensor, const char* argument) {
  lookback::TensorView view;
  view.data = tensor.data;
  view.dtype = to_dtype(tensor.dtype, argument);
  view.rank = 4;
  bool contiguous = true;
  for (int axis = 0; axis < 4; ++axis) {
    view.shape[axis] = tensor.shape[axis];
    contiguous = contiguous && tensor.strides[axis] == 0;
  }
  if (contiguous) {
    view.strides = lookback::contiguous_strides(view.shape, 4);
  } else {
    for (int axis = 0; axis < 4; ++axis) view.strides[axis] = tensor.strides[axis];
  }
  return view;
}

lookback::AttentionParams to_params(const lookback_attention_params* params) {
  lookback::AttentionParams p;
  p.q = to_view(params->q, "q");
  p.k = to_view(params->k, "k");
  p.v = to_view(params->v, "v");
  p.out.data = params->out;
  p.out.dtype = lookback::DType::kF32;
  p.out.rank = 4;
  p.out.shape = p.q.shape;
  p.out.strides = lookback::contiguous_strides(p.out.shape, 4);
  if (params->maybe_lse != nullptr) {
    p.maybe_lse.data = params->maybe_lse;
    p.maybe_lse.dtype = lookback::DType::kF32;
    p.maybe_lse.rank = 3;
    p.maybe_lse.shape = {p.q.shape[0], p.q.shape[2], p.q.shape[1], 0};
    p.maybe_lse.strides = lookback::contiguous_strides(p.maybe_lse.shape, 3);
  }
  p.maybe_alibi_slopes = params->maybe_alibi_slopes;
  p.maybe_sink_logits = params->maybe_sink_logits;
  if (params->has_scale) p.scale = params->scale;
  p.softcap = params->softcap;
  switch (params->causal) {
    case LOOKBACK_CAUSAL_BOTTOM_RIGHT: p.mask.causal = lookback::Causal::kBottomRight; break;
    case LOOKBACK_CAUSAL_TOP_LEFT: p.mask.causal = lookback::Causal::kTopLeft; break;
    case LOOKBACK_CAUSAL_NONE: p.mask.causal = lookback::Causal::kNone; break;
    default:
      throw lookback::Error("causal: unknown value (expected LOOKBACK_CAUSAL_BOTTOM_RIGHT, "
                            "LOOKBACK_CAUSAL_TOP_LEFT or LOOKBACK_CAUSAL_NONE)");
  }
  if (params->window_left < -1) {
    throw lookback::Error("window_left: " + std::to_string(params->window_left) +
                          " (expected -1 for no window, or >= 0)");
  }
  if (params->window_left >= 0) p.mask.window_left = params->window_left;
  p.mask.sink_tokens = params->sink_tokens;  // checked by the library (>= 0, with a window)
  p.storage = to_dtype(params->storage, "storage");
  return p;
}

}  // namespace

extern "C" {

lookback_status lookback_context_create(int threads, lookback_context** context) {
  if (context == nullptr) return fail(LOOKBACK_ERROR_INVALID_ARGUMENT, "context: NULL (expected a pointer to receive the context)");
  return guarded([&] { *context = new lookback_context(threads); });
}

void lookback_context_destroy(lookback_context* context) { delete context; }

lookback_status lookback_attend(lookback_context* context,
                                const lookback_attention_params* params) {
  if (context == nullptr) return fail(LOOKBACK_ERROR_INVALID_ARGUMENT, "context: NULL (expected one from lookback_context_create)");
  if (params == nullptr) return fail(LOOKBACK_ERROR_INVALID_ARGUMENT, "params: NULL (expected attention parameters)");
  return guarded([&] {
    const lookback::AttentionParams p = to_params(params);
    lookback::attend(p, context->context);
  });
}

lookback_status lookback_attend_varlen(lookback_context* context,
                                       const lookback_attention_params* params,
                                       const int64_t* cu_seqlens_q, const int64_t* cu_seqlens_k,
                                       int64_t batch) {
  if (context == nullptr) return fail(LOOKBACK_ERROR_INVALID_ARGUMENT, "context: NULL (expected one from lookback_context_create)");
  if (params == nullptr) return fail(LOOKBACK_ERROR_INVALID_ARGUMENT, "params: NULL (expected attention parameters)");
  return guarded([&] {
    const lookback::AttentionParams p = to_params(params);
    // The packed batch is batch row 0 of the 4-d views: (total, heads, head_dim).
    if (p.q.shape[0] != 1 || p.k.shape[0] != 1 || p.v.shape[0] != 1) {
      throw lookback::Error(
          "q: a packed batch has batch 1 in q, k and v (expected (1, total_q, heads, head_dim) "
          "and (1, total_k, kv_heads, head_dim))");
    }
    if (batch < 1 || cu_seqlens_q == nullptr || cu_seqlens_k == nullptr) {
      throw lookback::Error("cu_seqlens: NULL or batch " + std::to_string(batch) +
                            " (expected batch >= 1 and two arrays of batch + 1 offsets)");
    }
    lookback::VarlenParams v;
    v.q = lookback::select(p.q, 0, 0);
    v.k = lookback::select(p.k, 0, 0);
    v.v = lookback::select(p.v, 0, 0);
    v.out = lookback::select(p.out, 0, 0);
    if (!p.maybe_lse.empty()) v.maybe_lse = lookback::select(p.maybe_lse, 0, 0);
    v.cu_seqlens_q = lookback::make_view(cu_seqlens_q, lookback::DType::kI64, {batch + 1}, "cu_seqlens_q");
    v.cu_seqlens_k = lookback::make_view(cu_seqlens_k, lookback::DType::kI64, {batch + 1}, "cu_seqlens_k");
    v.maybe_alibi_slopes = p.maybe_alibi_slopes;
    v.maybe_sink_logits = p.maybe_sink_logits;
    v.scale = p.scale;
    v.softcap = p.softcap;
    v.mask = p.mask;
    v.storage = p.storage;
    lookback::attend_varlen(v, context->context);
  });
}

const char* lookback_last_error(void) { return last_error.c_str(); }

const char* lookback_version(void) { return lookback::kVersion; }

}  // extern "C"
