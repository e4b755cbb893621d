// How `lookback leakcheck` prints what the library's leak check found
// (include/lookback/leakcheck.hpp): text, json and svg of one report, and
// the table of the built-in plan.
#pragma once

#include <string>
#include <vector>

#include "lookback/leakcheck.hpp"

namespace lookback::cli {

// The matrix in the notes' notation (S, ., X, blank) and the verdict; with
// `per_head`, each head's matrix too.
std::string render_report_text(const diagnostics::LeakReport& report, bool per_head);
// {len, verdict, leaks, missing, dependency, batch, heads, ...}.
std::string render_report_json(const diagnostics::LeakReport& report, bool per_head);
// The dependency matrix as a picture, one colour per cell class.
std::string render_report_svg(const diagnostics::LeakReport& report);

// The built-in plan's checks (run_builtin_checks) as a table of path rows by
// storage dtype, or as json; `shape` is the problem every check ran.
std::string render_builtin_text(const std::vector<diagnostics::BuiltinCheck>& checks,
                                const diagnostics::LeakShape& shape);
std::string render_builtin_json(const std::vector<diagnostics::BuiltinCheck>& checks,
                                const diagnostics::LeakShape& shape);
// Every check causal.
bool all_causal(const std::vector<diagnostics::BuiltinCheck>& checks);

}  // namespace lookback::cli
