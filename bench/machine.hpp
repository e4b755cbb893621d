// What machine a benchmark ran on, for its report.
#pragma once

#include <string>

namespace lookback::bench {

std::string cpu_model();           // "Intel(R) Xeon(R) Processor"

}  // namespace lookback::bench
