#pragma once

namespace lookback {
inline constexpr const char* kVersion = "0.1.0";
}  // namespace lookback
