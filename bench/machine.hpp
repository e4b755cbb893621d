// What machine a benchmark ran on, for its report.
#pragma once

#include <string>

namespace lookback::bench {

std::string cpu_model();           // "Intel(R) Xeon(R) Processor"
bool cpu_has_flag(const std::string& flag);  // a flag from /proc/cpuinfo, e.g. "avx512f"

}  // namespace lookback::bench
