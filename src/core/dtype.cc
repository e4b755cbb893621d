#include "lookback/dtype.hpp"

#include <bit>
#include <cstring>
#include <cmath>
#include <string>

#include "lookback/error.hpp"

namespace lookback {

std::size_t dtype_size(DType dtype) noexcept {
  switch (dtype) {
    case DType::kF32: return 4;
    case DType::kF16: return 2;
    case DType::kBF16: return 2;
    case DType::kF64: return 8;
    case DType::kI8:
    case DType::kFP8E4M3:
    case DType::kFP8E5M2: return 1;
    case DType::kI32: return 4;
    case DType::kI64: return 8;
  }
  return 0;
}

std::string_view dtype_name(DType dtype) noexcept {
  switch (dtype) {
    case DType::kF32: return "f32";
    case DType::kF16: return "f16";
    case DType::kBF16: return "bf16";
    case DType::kF64: return "f64";
    case DType::kI8: return "int8";
    case DType::kFP8E4M3: return "fp8e4m3";
    case DType::kFP8E5M2: return "fp8e5m2";
    case DType::kI32: return "i32";
    case DType::kI64: return "i64";
  }
  return "?";
}

DType parse_dtype(std::string_view text, std::string_view argument) {
  if (text == "f32" || text == "float32") return DType::kF32;
  if (text == "f16" || text == "float16") return DType::kF16;
  if (text == "bf16" || text == "bfloat16") return DType::kBF16;
  if (text == "f64" || text == "float64") return DType::kF64;
  if (text == "int8") return DType::kI8;
  if (text == "fp8e4m3" || text == "fp8_e4m3fn") return DType::kFP8E4M3;
  if (text == "fp8e5m2" || text == "fp8_e5m2") return DType::kFP8E5M2;
  throw Error(std::string(argument) + ": unknown dtype '" + std::string(text) +
              "' (expected f32, f16, bf16, f64, int8, fp8e4m3 or fp8e5m2)");
}

double load_as_double(const void* data, DType dtype, std::int64_t index) noexcept {
  switch (dtype) {
    case DType::kF32: return static_cast<const float*>(data)[index];
    case DType::kF64: return static_cast<const double*>(data)[index];
    case DType::kF16: return f16_to_f32(static_cast<const std::uint16_t*>(data)[index]);
    case DType::kBF16: return bf16_to_f32(static_cast<const std::uint16_t*>(data)[index]);
    case DType::kI8:
    case DType::kFP8E4M3:
    case DType::kFP8E5M2: return 0.0;
    case DType::kI32: return static_cast<double>(static_cast<const std::int32_t*>(data)[index]);
    case DType::kI64: return static_cast<double>(static_cast<const std::int64_t*>(data)[index]);
  }
  return 0.0;
}

float load_as_float(const void* data, DType dtype, std::int64_t index) noexcept {
  return static_cast<float>(load_as_double(data, dtype, index));
}

namespace {

template <typename T, typename Convert>
void load_run(const void* data, std::int64_t index, std::int64_t stride, std::int64_t count,
              float* out, Convert convert) noexcept {
  const T* in = static_cast<const T*>(data) + index;
  for (std::int64_t i = 0; i < count; ++i) out[i] = convert(in[i * stride]);
}

}  // namespace

void load_as_floats(const void* data, DType dtype, std::int64_t index, std::int64_t stride,
                    std::int64_t count, float* out) noexcept {
  if (count <= 0) return;
  switch (dtype) {
    case DType::kF32:
      if (stride == 1) {
        std::memcpy(out, static_cast<const float*>(data) + index,
                    static_cast<std::size_t>(count) * sizeof(float));
        return;
      }
      return load_run<float>(data, index, stride, count, out, [](float x) { return x; });
    case DType::kF16:
      return load_run<std::uint16_t>(data, index, stride, count, out,
                                     [](std::uint16_t x) { return f16_to_f32(x); });
    case DType::kBF16:
      return load_run<std::uint16_t>(data, index, stride, count, out,
                                     [](std::uint16_t x) { return bf16_to_f32(x); });
    default:
      for (std::int64_t i = 0; i < count; ++i) {
        out[i] = load_as_float(data, dtype, index + i * stride);
      }
      return;
  }
}

}  // namespace lookback
