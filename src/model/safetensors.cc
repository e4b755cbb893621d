// The safetensors codec: every field of the header is checked before any of
// it is trusted (safetensors.hpp).
#include "model/safetensors.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <limits>
#include <nlohmann/json.hpp>

#include "core/little_endian.hpp"
#include "lookback/error.hpp"

namespace lookback::model {
namespace {

struct DTypeInfo {
  SafeDType dtype;
  std::string_view name;
  std::size_t size;
};

constexpr std::array<DTypeInfo, 15> kDTypes{{
    {SafeDType::kF64, "F64", 8},      {SafeDType::kF32, "F32", 4},
    {SafeDType::kF16, "F16", 2},      {SafeDType::kBF16, "BF16", 2},
    {SafeDType::kI64, "I64", 8},      {SafeDType::kI32, "I32", 4},
    {SafeDType::kI16, "I16", 2},      {SafeDType::kI8, "I8", 1},
    {SafeDType::kU64, "U64", 8},      {SafeDType::kU32, "U32", 4},
    {SafeDType::kU16, "U16", 2},      {SafeDType::kU8, "U8", 1},
    {SafeDType::kBool, "BOOL", 1},    {SafeDType::kF8E4M3, "F8_E4M3", 1},
    {SafeDType::kF8E5M2, "F8_E5M2", 1},
}};

[[noreturn]] void fail(std::string_view name, const std::string& what) {
  throw Error(ErrorCode::kFormat, fmt::format("{}: {}", name, what));
}

// A JSON number that is a non-negative integer (not 1.0, not -1, not 1e30).
bool as_count(const nlohmann::json& value, std::uint64_t& out) {
  if (!value.is_number_unsigned()) return false;
  out = value.get<std::uint64_t>();
  return true;
}

SafetensorsEntry parse_entry(std::string_view name, const std::string& key,
                             const nlohmann::json& value, std::uint64_t data_bytes) {
  const std::string where = fmt::format("tensor '{}'", key);
  if (!value.is_object()) fail(name, where + ": expected an object with dtype, shape, data_offsets");
  for (const auto& [field, _] : value.items()) {
    if (field != "dtype" && field != "shape" && field != "data_offsets") {
      fail(name, fmt::format("{}: unknown field '{}' (expected dtype, shape, data_offsets)", where,
                             field));
    }
  }
  SafetensorsEntry entry{.name = key};

  const auto dtype = value.find("dtype");
  if (dtype == value.end() || !dtype->is_string()) fail(name, where + ": dtype missing (expected a string such as \"F32\")");
  const std::string& dtype_text = dtype->get_ref<const std::string&>();
  const auto info = std::find_if(kDTypes.begin(), kDTypes.end(),
                                 [&](const DTypeInfo& d) { return d.name == dtype_text; });
  if (info == kDTypes.end()) {
    fail(name, fmt::format("{}: dtype '{}' (expected one of F32, F16, BF16, F64, I64, I32, I16, "
                           "I8, U64, U32, U16, U8, BOOL, F8_E4M3, F8_E5M2)",
                           where, dtype_text.substr(0, 32)));
  }
  entry.dtype = info->dtype;

  const auto shape = value.find("shape");
  if (shape == value.end() || !shape->is_array()) fail(name, where + ": shape missing (expected an array of integers)");
  if (shape->size() > 8) fail(name, fmt::format("{}: shape of {} dimensions (expected at most 8)", where, shape->size()));
  // The byte count, checked for overflow at every step (it must equal end - begin).
  std::uint64_t bytes = info->size;
  bool overflow = false;
  for (const nlohmann::json& extent : *shape) {
    std::uint64_t n = 0;
    if (!as_count(extent, n) || n > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      fail(name, where + ": shape holds a value that is not a non-negative integer");
    }
    entry.shape.push_back(static_cast<std::int64_t>(n));
    if (n != 0 && bytes > std::numeric_limits<std::uint64_t>::max() / n) overflow = true;
    bytes *= n;
  }
  if (overflow) fail(name, where + ": shape's byte count overflows 64 bits");

  const auto offsets = value.find("data_offsets");
  if (offsets == value.end() || !offsets->is_array() || offsets->size() != 2 ||
      !as_count((*offsets)[0], entry.begin) || !as_count((*offsets)[1], entry.end)) {
    fail(name, where + ": data_offsets missing (expected [begin, end], non-negative integers)");
  }
  if (entry.begin > entry.end) {
    fail(name, fmt::format("{}: data_offsets [{}, {}] (expected begin <= end)", where, entry.begin,
                           entry.end));
  }
  if (entry.end > data_bytes) {
    fail(name, fmt::format("{}: data_offsets [{}, {}] lie past the end of the data ({} bytes; "
                           "the file is truncated or the offsets are wrong)",
                           where, entry.begin, entry.end, data_bytes));
  }
  if (entry.end - entry.begin != bytes) {
    fail(name, fmt::format("{}: data_offsets [{}, {}] hold {} bytes (expected {} for {} of shape "
                           "[{}])",
                           where, entry.begin, entry.end, entry.end - entry.begin, bytes,
                           info->name, fmt::join(entry.shape, ", ")));
  }
  return entry;
}

}  // namespace

std::string_view safe_dtype_name(SafeDType dtype) noexcept {
  for (const DTypeInfo& d : kDTypes) {
    if (d.dtype == dtype) return d.name;
  }
  return "?";
}

std::size_t safe_dtype_size(SafeDType dtype) noexcept {
  for (const DTypeInfo& d : kDTypes) {
    if (d.dtype == dtype) return d.size;
  }
  return 0;
}

const SafetensorsEntry* SafetensorsHeader::find(std::string_view name) const noexcept {
  for (const SafetensorsEntry& entry : tensors) {
    if (entry.name == name) return &entry;
  }
  return nullptr;
}

SafetensorsHeader parse_safetensors(std::span<const std::byte> file, std::string_view name) {
  if (file.size() < 8) {
    fail(name, fmt::format("{} bytes (expected at least 8: a safetensors file starts with its "
                           "header length)",
                           file.size()));
  }
  const std::uint64_t header_bytes = detail::get_le(file.data(), 8);
  if (header_bytes > kMaxSafetensorsHeader) {
    fail(name, fmt::format("header length {} (expected at most {})", header_bytes,
                           kMaxSafetensorsHeader));
  }
  if (header_bytes > file.size() - 8) {
    fail(name, fmt::format("header length {} runs past the end of the file ({} bytes; expected "
                           "at most {})",
                           header_bytes, file.size(), file.size() - 8));
  }
  SafetensorsHeader header;
  header.data_offset = 8 + header_bytes;
  header.data_bytes = file.size() - header.data_offset;

  const char* text = reinterpret_cast<const char*>(file.data() + 8);
  // allow_exceptions = false: a parse error is a discarded value, not a throw.
  const nlohmann::json json = nlohmann::json::parse(text, text + header_bytes, nullptr, false);
  if (json.is_discarded()) fail(name, "header is not valid JSON");
  if (!json.is_object()) fail(name, "header is not a JSON object (expected {\"name\": {...}})");

  for (const auto& [key, value] : json.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) fail(name, "__metadata__ is not an object (expected strings to strings)");
      for (const auto& [meta_key, meta_value] : value.items()) {
        if (!meta_value.is_string()) {
          fail(name, fmt::format("__metadata__ '{}' is not a string", meta_key.substr(0, 64)));
        }
      }
      continue;
    }
    header.tensors.push_back(parse_entry(name, key, value, header.data_bytes));
  }

  // No two tensors may share bytes (a writer bug, or a file crafted so that
  // writing one weight changes another).
  std::sort(header.tensors.begin(), header.tensors.end(),
            [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
              return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
            });
  for (std::size_t i = 1; i < header.tensors.size(); ++i) {
    const SafetensorsEntry& previous = header.tensors[i - 1];
    const SafetensorsEntry& entry = header.tensors[i];
    if (entry.begin < previous.end && entry.begin != entry.end && previous.begin != previous.end) {
      fail(name, fmt::format("tensors '{}' [{}, {}] and '{}' [{}, {}] overlap", previous.name,
                             previous.begin, previous.end, entry.name, entry.begin, entry.end));
    }
  }
  return header;
}

std::vector<std::byte> serialize_safetensors(
    const std::vector<std::pair<SafetensorsEntry, std::span<const std::byte>>>& tensors) {
  nlohmann::ordered_json json = nlohmann::ordered_json::object();
  std::uint64_t offset = 0;
  for (const auto& [entry, bytes] : tensors) {
    json[entry.name] = {{"dtype", safe_dtype_name(entry.dtype)},
                        {"shape", entry.shape},
                        {"data_offsets", {offset, offset + bytes.size()}}};
    offset += bytes.size();
  }
  std::string text = json.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  std::vector<std::byte> out;
  out.reserve(8 + text.size() + offset);
  detail::put_le(out, text.size(), 8);
  for (char c : text) out.push_back(static_cast<std::byte>(c));
  for (const auto& [entry, bytes] : tensors) out.insert(out.end(), bytes.begin(), bytes.end());
  return out;
}

}  // namespace lookback::model
