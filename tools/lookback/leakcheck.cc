// `lookback leakcheck`: finds information leaking from the future in any
// attention implementation, by experiment (docs/leakage.md).
//
// With --exec, the implementation is a user's command: it reads Q, K, V from
// .npy files and writes O, once on base inputs and once per perturbed position
// (N + 1 runs). Without --exec, every path of lookback itself is checked
// in-process. The experiment and its classification live in the library
// (src/diagnostics/leakcheck.hpp); visibility comes from lookback::Mask only.
// This file runs commands, picks the paths and prints.
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "common.hpp"
#include "diagnostics/leakcheck.hpp"
#include "lookback/error.hpp"
#include "lookback/mask.hpp"
#include "lookback/modes.hpp"
#include "lookback/npy.hpp"

extern char** environ;

namespace lookback::cli {
namespace {

using diagnostics::Cell;
using diagnostics::LeakReport;
using diagnostics::LeakShape;
using diagnostics::Pair;

// text and json print every cell (N^2); svg draws a run of cells per class
// and row, which a noisy leak can make N^2 too. Past these the output is too
// large to read, and N + 1 runs of the command would take very long anyway.
constexpr std::int64_t kMaxPrintedLen = 4096;
constexpr std::int64_t kMaxSvgLen = 1024;
// The tail of a failed command's stderr shown in the error line.
constexpr std::size_t kMaxShownStderr = 1500;

// Built-in mode: small enough for 30 checks of N + 1 runs each to take well
// under a second, large enough to cross every boundary the paths have. The
// length is odd on purpose: chunks of 5, pages of 4 and 3 splits all end with
// a partial piece, where off-by-one bugs live.
constexpr LeakShape kBuiltinShape{
    .batch = 2, .seqlen = 23, .heads = 4, .kv_heads = 2, .head_dim = 16};
constexpr std::int64_t kBuiltinChunk = 5;
constexpr std::int64_t kBuiltinBlockSize = 4;
constexpr std::int64_t kBuiltinSplits = 3;
constexpr std::int64_t kBuiltinWindow = 6;

struct LeakcheckOptions {
  std::optional<std::string> exec;
  std::optional<std::int64_t> len, heads, kv_heads, dim, batch, window;
  std::optional<std::string> causal;
  bool per_head = false;
  int jobs = 0;  // 0: one per core
  std::uint64_t seed = 1;
  std::string format = "text";
  std::string out;
  bool progress = false;
};

enum class Format { kText, kJson, kSvg };

Format parse_format(const std::string& text) {
  if (text == "text") return Format::kText;
  if (text == "json") return Format::kJson;
  if (text == "svg") return Format::kSvg;
  throw Error(fmt::format("--format: unknown format '{}' (expected text, json or svg)", text));
}

int default_jobs() {
  const unsigned cores = std::thread::hardware_concurrency();
  return cores == 0 ? 1 : static_cast<int>(cores);
}

// ---- progress ----------------------------------------------------------------

// "run 17/65" on stderr, for runs long enough to wonder about: shown when
// stderr is a terminal (rewritten in place) or with --progress (one line per
// update, at most a few a second), and never otherwise, so scripts and tests
// see a quiet stderr.
class Progress {
 public:
  explicit Progress(bool requested)
      : terminal_(isatty(STDERR_FILENO) == 1), enabled_(requested || terminal_) {}

  void update(std::int64_t done, std::int64_t total) {
    if (!enabled_) return;
    const std::lock_guard lock(mutex_);
    const auto now = std::chrono::steady_clock::now();
    if (done != total && now - last_ < std::chrono::milliseconds(terminal_ ? 100 : 1000)) return;
    last_ = now;
    fmt::print(stderr, "{}lookback leakcheck: run {}/{}{}", terminal_ ? "\r" : "", done, total,
               terminal_ ? "" : "\n");
    std::fflush(stderr);
    shown_ = true;
  }

  // Clears the terminal line, so the report starts on a clean one. Call it
  // before printing; the destructor calls it when an error ends the check.
  void finish() {
    const std::lock_guard lock(mutex_);
    if (terminal_ && shown_) fmt::print(stderr, "\r\033[K");
    std::fflush(stderr);
    shown_ = false;
  }

  ~Progress() { finish(); }

 private:
  bool terminal_;
  bool enabled_;
  bool shown_ = false;
  std::mutex mutex_;
  std::chrono::steady_clock::time_point last_{};
};

// ---- running a command ---------------------------------------------------------

// A private folder for the runs' files, removed with everything in it.
class TempFolder {
 public:
  TempFolder() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "lookback-leakcheck-XXXXXX").string();
    if (mkdtemp(pattern.data()) == nullptr) {
      throw Error(ErrorCode::kIo, fmt::format("leakcheck: cannot create a folder {}: {}", pattern,
                                              std::strerror(errno)));
    }
    path_ = pattern;
  }
  ~TempFolder() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempFolder(const TempFolder&) = delete;
  TempFolder& operator=(const TempFolder&) = delete;
  const std::filesystem::path& path() const noexcept { return path_; }

 private:
  std::filesystem::path path_;
};

// A path as one shell word: as is when it holds only characters the shell
// leaves alone (the usual case, so '{q}' quoted by the user still works),
// else single-quoted.
std::string shell_word(const std::string& text) {
  const bool plain = std::all_of(text.begin(), text.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || std::strchr("/._-+,=:@%", c) != nullptr;
  });
  if (plain && !text.empty()) return text;
  std::string quoted = "'";
  for (char c : text) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

struct RunFiles {
  std::string q, k, v, out;
};

std::string substitute(const std::string& command, const RunFiles& files) {
  const std::pair<std::string_view, const std::string*> fields[] = {
      {"{q}", &files.q}, {"{k}", &files.k}, {"{v}", &files.v}, {"{out}", &files.out}};
  std::string result;
  for (std::size_t at = 0; at < command.size();) {
    bool replaced = false;
    for (const auto& [field, path] : fields) {
      if (command.compare(at, field.size(), field) == 0) {
        result += shell_word(*path);
        at += field.size();
        replaced = true;
        break;
      }
    }
    if (!replaced) result += command[at++];
  }
  return result;
}

void check_command_template(const std::string& command) {
  std::string missing;
  for (std::string_view field : {"{q}", "{k}", "{v}", "{out}"}) {
    if (command.find(field) == std::string::npos) {
      missing += missing.empty() ? "" : ", ";
      missing += field;
    }
  }
  if (!missing.empty()) {
    throw Error(fmt::format(
        "--exec: '{}' lacks {} (expected a command with {{q}}, {{k}}, {{v}} and {{out}}, which "
        "are replaced by the paths of Q, K, V and of the O it must write)",
        command, missing));
  }
}

// Plain write, no fsync: these files live for one run in a private folder,
// and N + 1 runs should cost the command's time, not the disk's.
void write_input(const std::string& path, const std::vector<float>& data,
                 const std::vector<std::int64_t>& shape) {
  const std::vector<std::byte> bytes = serialize_npy(DType::kF32, shape, data.data());
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  file.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!file.flush()) {
    throw Error(ErrorCode::kIo, fmt::format("leakcheck: cannot write {}", path));
  }
}

std::string read_tail(const std::filesystem::path& path, std::size_t limit) {
  std::ifstream file(path, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (text.size() > limit) text = "..." + text.substr(text.size() - limit);
  return text;
}

// One line out of a command's output: the CLI reports errors on one line.
std::string one_line(std::string text) {
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) text.pop_back();
  std::string line;
  for (std::size_t at = 0; at < text.size(); ++at) {
    if (text[at] == '\r') continue;
    if (text[at] == '\n') {
      line += " | ";
    } else {
      line += text[at];
    }
  }
  return line;
}

// Runs `command` through /bin/sh -c with stdin from /dev/null and stdout and
// stderr into files; returns the wait status. Files, not pipes: nothing can
// block on a full pipe, and a child started by another worker cannot hold a
// pipe of this run open.
int run_shell(const std::string& command, const std::string& stdout_path,
              const std::string& stderr_path) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, stdout_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, stderr_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::string shell = "/bin/sh", flag = "-c", script = command;
  char* argv[] = {shell.data(), flag.data(), script.data(), nullptr};
  pid_t pid = 0;
  const int error = posix_spawn(&pid, "/bin/sh", &actions, nullptr, argv, environ);
  posix_spawn_file_actions_destroy(&actions);
  if (error != 0) {
    throw Error(ErrorCode::kIo,
                fmt::format("--exec: cannot start /bin/sh: {}", std::strerror(error)));
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) {
      throw Error(ErrorCode::kIo, fmt::format("--exec: waitpid: {}", std::strerror(errno)));
    }
  }
  return status;
}

// The user's command as an Implementation: each run gets its own folder with
// q.npy, k.npy, v.npy, the command's stdout and stderr, and the out.npy it
// writes; the folder goes as soon as the output has been read.
diagnostics::Implementation command_implementation(const std::string& command,
                                                   const std::filesystem::path& folder) {
  return [command, folder](const diagnostics::LeakInputs& inputs,
                           const diagnostics::RunInfo& run) {
    const LeakShape& s = inputs.shape;
    const std::filesystem::path run_folder = folder / fmt::format("run-{}", run.run);
    std::filesystem::create_directory(run_folder);
    const RunFiles files{.q = (run_folder / "q.npy").string(),
                         .k = (run_folder / "k.npy").string(),
                         .v = (run_folder / "v.npy").string(),
                         .out = (run_folder / "out.npy").string()};
    write_input(files.q, inputs.q, {s.batch, s.seqlen, s.heads, s.head_dim});
    write_input(files.k, inputs.k, {s.batch, s.seqlen, s.kv_heads, s.head_dim});
    write_input(files.v, inputs.v, {s.batch, s.seqlen, s.kv_heads, s.head_dim});
    const std::filesystem::path stdout_path = run_folder / "stdout.txt";
    const std::filesystem::path stderr_path = run_folder / "stderr.txt";
    const int status = run_shell(substitute(command, files), stdout_path, stderr_path);

    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      std::string said = one_line(read_tail(stderr_path, kMaxShownStderr));
      if (said.empty()) said = one_line(read_tail(stdout_path, kMaxShownStderr));
      const std::string how =
          WIFEXITED(status) ? fmt::format("failed with exit code {}", WEXITSTATUS(status))
          : WIFSIGNALED(status) ? fmt::format("was killed by signal {}", WTERMSIG(status))
                                : std::string("failed");
      throw Error(fmt::format("--exec: the command {} on {}: {}", how, diagnostics::run_name(run),
                              said.empty() ? "(it printed nothing)" : said));
    }
    std::error_code missing;
    if (!std::filesystem::is_regular_file(files.out, missing)) {
      throw Error(fmt::format(
          "--exec: the command exited 0 on {} but wrote no output (expected O, (batch, seqlen, "
          "heads, head_dim) <f4, at {{out}})",
          diagnostics::run_name(run)));
    }
    NpyArray out;
    try {
      out = read_npy(files.out);
    } catch (const Error& e) {
      throw Error(e.code(), fmt::format("--exec: output of {}: {}", diagnostics::run_name(run),
                                        e.what()));
    }
    std::error_code ignored;
    std::filesystem::remove_all(run_folder, ignored);
    return out;
  };
}

// ---- rendering one report --------------------------------------------------------

std::string describe_mask(const MaskSpec& spec) {
  std::string text(causal_name(spec.causal));
  if (spec.window_left) {
    text += fmt::format(", window {} ({} keys at most)", *spec.window_left, *spec.window_left + 1);
  } else {
    text += ", no window";
  }
  return text;
}

std::string describe_problem(const LeakReport& report) {
  const LeakShape& s = report.shape;
  return fmt::format("len {}, batch {}, heads {}, kv_heads {}, dim {}, {}; {} runs", s.seqlen,
                     s.batch, s.heads, s.kv_heads, s.head_dim, describe_mask(report.mask_spec),
                     report.runs);
}

// The matrix in the notes' notation, one row per output position i, one cell
// per perturbed position j: S allowed and observed, . allowed but not
// observed, X a leak, blank where masked and clean. Trailing blanks dropped.
std::string render_matrix(const Mask& mask, const std::vector<std::uint8_t>& dependency) {
  const std::int64_t n = mask.seqlen_q();
  const std::size_t label_width = fmt::format("q{}", n - 1).size();
  std::string text;
  for (std::int64_t i = 0; i < n; ++i) {
    std::string line = fmt::format("{:<{}} ", fmt::format("q{}", i), label_width);
    for (std::int64_t j = 0; j < n; ++j) {
      const bool observed = dependency[static_cast<std::size_t>(i * n + j)] != 0;
      line += ' ';
      line += diagnostics::cell_symbol(diagnostics::classify_cell(mask, i, j, observed));
    }
    while (line.back() == ' ') line.pop_back();
    text += line + '\n';
  }
  return text;
}

std::string where_text(const LeakReport& report, const Pair& pair) {
  const std::vector<Pair> where = report.where_observed(pair.first, pair.second);
  const std::int64_t batch = report.shape.batch;
  const std::int64_t heads = report.shape.heads;
  if (static_cast<std::int64_t>(where.size()) == batch * heads) {
    if (batch == 1) return heads == 1 ? "" : "in every head";
    return heads == 1 ? "in every batch element" : "in every batch element and head";
  }
  // Name only what varies: "head 1" when there is one batch element.
  std::string text = "only in ";
  for (std::size_t w = 0; w < where.size() && w < 4; ++w) {
    const auto [b, h] = where[w];
    text += w ? ", " : "";
    if (batch == 1) {
      text += fmt::format("head {}", h);
    } else if (heads == 1) {
      text += fmt::format("batch element {}", b);
    } else {
      text += fmt::format("batch element {} head {}", b, h);
    }
  }
  if (where.size() > 4) text += fmt::format(" and {} more", where.size() - 4);
  return text;
}

std::string verdict_line(const LeakReport& report) {
  const auto& leaks = report.result.leaks;
  if (leaks.empty()) {
    return fmt::format(
        "verdict: causal: no output row changed when a position it must not see changed\n");
  }
  const Pair& first = leaks.front();
  const std::string where = where_text(report, first);
  return fmt::format(
      "verdict: leak: output row {} changed when position {} changed, which it must not see{}{} "
      "({} leaking pair{})\n",
      first.first, first.second, where.empty() ? "" : ", ", where, leaks.size(),
      leaks.size() == 1 ? "" : "s");
}

std::string missing_line(const std::vector<Pair>& missing, std::string_view prefix) {
  if (missing.empty()) return {};
  return fmt::format(
      "{}warning: {} allowed dependenc{} never observed, e.g. output row {} did not change when "
      "position {} changed (not a leak, but an output that ignores a token it may see)\n",
      prefix, missing.size(), missing.size() == 1 ? "y" : "ies", missing.front().first,
      missing.front().second);
}

std::string render_text(const LeakReport& report, bool per_head) {
  const Mask mask = report.mask();
  std::string text = fmt::format("lookback leakcheck: {}\n", describe_problem(report));
  text += "rows: output position i; columns: perturbed position j (q, k and v rows)\n";
  text += "S allowed and observed, . allowed but not observed, X leak, blank masked and clean\n\n";
  text += render_matrix(mask, report.dependency);
  if (per_head) {
    const std::int64_t group = report.shape.heads / report.shape.kv_heads;
    for (std::int64_t h = 0; h < report.shape.heads; ++h) {
      const std::vector<std::uint8_t> matrix = report.head_dependency(h);
      const diagnostics::Classification result = diagnostics::classify(mask, matrix);
      text += fmt::format("\nhead {} (kv head {}): ", h, h / group);
      text += result.leaks.empty()
                  ? std::string("causal\n")
                  : fmt::format("leak: output row {} changed when position {} changed ({} pair{})\n",
                                result.leaks.front().first, result.leaks.front().second,
                                result.leaks.size(), result.leaks.size() == 1 ? "" : "s");
      text += render_matrix(mask, matrix);
    }
  }
  text += '\n';
  text += missing_line(report.result.missing, "");
  text += verdict_line(report);
  return text;
}

nlohmann::ordered_json pairs_json(const std::vector<Pair>& pairs) {
  nlohmann::ordered_json list = nlohmann::ordered_json::array();
  for (const Pair& pair : pairs) list.push_back({pair.first, pair.second});
  return list;
}

nlohmann::ordered_json matrix_json(const std::vector<std::uint8_t>& matrix, std::int64_t n) {
  nlohmann::ordered_json rows = nlohmann::ordered_json::array();
  for (std::int64_t i = 0; i < n; ++i) {
    nlohmann::ordered_json row = nlohmann::ordered_json::array();
    for (std::int64_t j = 0; j < n; ++j) row.push_back(matrix[static_cast<std::size_t>(i * n + j)]);
    rows.push_back(std::move(row));
  }
  return rows;
}

std::string render_json(const LeakReport& report, bool per_head) {
  const LeakShape& s = report.shape;
  // ordered_json: the documented keys first, in the documented order.
  nlohmann::ordered_json doc;
  doc["len"] = s.seqlen;
  doc["verdict"] = report.result.causal() ? "causal" : "leak";
  doc["leaks"] = pairs_json(report.result.leaks);
  doc["missing"] = pairs_json(report.result.missing);
  doc["dependency"] = matrix_json(report.dependency, s.seqlen);
  doc["batch"] = s.batch;
  doc["heads"] = s.heads;
  doc["kv_heads"] = s.kv_heads;
  doc["dim"] = s.head_dim;
  doc["causal"] = std::string(causal_name(report.mask_spec.causal));
  doc["window"] = report.mask_spec.window_left
                      ? nlohmann::ordered_json(*report.mask_spec.window_left)
                      : nlohmann::ordered_json(nullptr);
  doc["runs"] = report.runs;
  if (per_head) {
    const Mask mask = report.mask();
    auto& heads = doc["per_head"] = nlohmann::ordered_json::array();
    for (std::int64_t h = 0; h < s.heads; ++h) {
      const std::vector<std::uint8_t> matrix = report.head_dependency(h);
      const diagnostics::Classification result = diagnostics::classify(mask, matrix);
      nlohmann::ordered_json head;
      head["head"] = h;
      head["verdict"] = result.causal() ? "causal" : "leak";
      head["leaks"] = pairs_json(result.leaks);
      head["missing"] = pairs_json(result.missing);
      head["dependency"] = matrix_json(matrix, s.seqlen);
      heads.push_back(std::move(head));
    }
  }
  return doc.dump() + "\n";
}

// ---- svg ----------------------------------------------------------------------

constexpr double kSvgPlot = 640;    // the plot's side in px, for long sequences
constexpr double kSvgMaxCell = 32;  // short sequences keep cells this big
constexpr double kSvgLabelCell = 20;
constexpr double kSvgLeft = 72;
constexpr double kSvgTop = 92;

struct CellStyle {
  Cell cell;
  const char* colour;
  const char* label;
};
constexpr CellStyle kCellStyles[] = {
    {Cell::kMasked, "#ececec", "masked, clean"},
    {Cell::kObserved, "#3b6ea8", "S allowed, observed"},
    {Cell::kMissing, "#f2c14e", ". allowed, not observed"},
    {Cell::kLeak, "#d62728", "X leak"},
};

std::string px(double value) {
  std::string text = fmt::format("{:.2f}", value);
  while (text.back() == '0') text.pop_back();
  if (text.back() == '.') text.pop_back();
  return text;
}

std::string xml_escape(std::string_view text) {
  std::string escaped;
  for (char c : text) {
    switch (c) {
      case '&': escaped += "&amp;"; break;
      case '<': escaped += "&lt;"; break;
      case '>': escaped += "&gt;"; break;
      case '"': escaped += "&quot;"; break;
      default: escaped += c;
    }
  }
  return escaped;
}

std::string render_svg(const LeakReport& report) {
  const Mask mask = report.mask();
  const std::int64_t n = report.shape.seqlen;
  const double cell = std::min(kSvgMaxCell, kSvgPlot / static_cast<double>(n));
  const double plot = cell * static_cast<double>(n);
  const double width = kSvgLeft + std::max(plot, 560.0) + 24;
  const double height = kSvgTop + plot + 48;
  // Shorter than the text verdict line: it has to fit above the plot.
  const auto& leaks = report.result.leaks;
  const std::string title =
      leaks.empty()
          ? std::string("causal: no row depends on a position it must not see")
          : fmt::format("leak: row {} depends on position {} ({} leaking pair{})",
                        leaks.front().first, leaks.front().second, leaks.size(),
                        leaks.size() == 1 ? "" : "s");

  std::string svg;
  auto out = std::back_inserter(svg);
  fmt::format_to(out,
                 "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
                 "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" "
                 "viewBox=\"0 0 {0} {1}\" font-family=\"sans-serif\">\n"
                 "<title>lookback leakcheck: {2}</title>\n"
                 "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
                 "<text x=\"{3}\" y=\"24\" font-size=\"14\" font-weight=\"bold\" "
                 "fill=\"{4}\">{2}</text>\n"
                 "<text x=\"{3}\" y=\"44\" font-size=\"12\" fill=\"#444\">{5}</text>\n"
                 "<text x=\"{6}\" y=\"66\" font-size=\"12\" text-anchor=\"middle\">"
                 "perturbed position j</text>\n"
                 "<text transform=\"translate(14 {7}) rotate(-90)\" font-size=\"12\" "
                 "text-anchor=\"middle\">output row i</text>\n",
                 px(width), px(height), xml_escape(title), px(kSvgLeft),
                 report.result.causal() ? "#222" : "#d62728",
                 xml_escape(describe_problem(report)), px(kSvgLeft + plot / 2),
                 px(kSvgTop + plot / 2));

  // In cell units: one path per class, one sub-path per run of equal cells in
  // a row, so a clean causal matrix costs a few sub-paths per row.
  fmt::format_to(out, "<g transform=\"translate({} {}) scale({})\">\n", px(kSvgLeft), px(kSvgTop),
                 cell);
  for (const CellStyle& style : kCellStyles) {
    std::string path;
    for (std::int64_t i = 0; i < n; ++i) {
      for (std::int64_t j = 0; j < n;) {
        const auto cell_at = [&](std::int64_t key) {
          return diagnostics::classify_cell(mask, i, key, report.observed(i, key));
        };
        if (cell_at(j) != style.cell) {
          ++j;
          continue;
        }
        std::int64_t end = j + 1;
        while (end < n && cell_at(end) == style.cell) ++end;
        fmt::format_to(std::back_inserter(path), "M{} {}h{}v1h-{}z", j, i, end - j, end - j);
        j = end;
      }
    }
    if (!path.empty()) fmt::format_to(out, "<path fill=\"{}\" d=\"{}\"/>\n", style.colour, path);
  }
  svg += "</g>\n";
  if (cell >= 4) {
    svg += "<path fill=\"none\" stroke=\"white\" stroke-width=\"1\" d=\"";
    for (std::int64_t line = 1; line < n; ++line) {
      const double at = static_cast<double>(line) * cell;
      fmt::format_to(out, "M{} {}V{}M{} {}H{}", px(kSvgLeft + at), px(kSvgTop),
                     px(kSvgTop + plot), px(kSvgLeft), px(kSvgTop + at), px(kSvgLeft + plot));
    }
    svg += "\"/>\n";
  }

  // Labels on every index when cells are big enough, else on every tenth.
  const std::int64_t step = cell >= kSvgLabelCell ? 1 : cell * 5 >= kSvgLabelCell ? 5 : 10;
  svg += "<g font-size=\"11\" fill=\"#222\">\n";
  for (std::int64_t index = 0; index < n; index += step) {
    const double centre = (static_cast<double>(index) + 0.5) * cell;
    fmt::format_to(out,
                   "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n"
                   "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" dominant-baseline=\"middle\">"
                   "{}</text>\n",
                   px(kSvgLeft + centre), px(kSvgTop - 8), index, px(kSvgLeft - 6),
                   px(kSvgTop + centre), index);
  }
  svg += "</g>\n";

  double legend_x = kSvgLeft;
  const double legend_y = kSvgTop + plot + 20;
  for (const CellStyle& style : kCellStyles) {
    fmt::format_to(out,
                   "<rect x=\"{0}\" y=\"{1}\" width=\"12\" height=\"12\" fill=\"{2}\"/>\n"
                   "<text x=\"{3}\" y=\"{4}\" font-size=\"12\">{5}</text>\n",
                   px(legend_x), px(legend_y), style.colour, px(legend_x + 17),
                   px(legend_y + 10.5), style.label);
    legend_x += 17 + 6.5 * static_cast<double>(std::string_view(style.label).size()) + 16;
  }
  svg += "</svg>\n";
  return svg;
}

// ---- black-box mode ------------------------------------------------------------

std::int64_t required(const std::optional<std::int64_t>& value, const char* option,
                      const char* meaning) {
  if (!value) throw Error(fmt::format("{}: required with --exec ({})", option, meaning));
  return *value;
}

int run_black_box(const LeakcheckOptions& options) {
  const Format format = parse_format(options.format);
  const std::string& command = *options.exec;
  check_command_template(command);
  LeakShape shape;
  shape.seqlen = required(options.len, "--len", "the sequence length N");
  shape.heads = required(options.heads, "--heads", "the number of query heads");
  shape.head_dim = required(options.dim, "--dim", "the head dimension");
  shape.kv_heads = options.kv_heads.value_or(shape.heads);
  shape.batch = options.batch.value_or(1);
  if (shape.heads % shape.kv_heads != 0) {
    throw Error(fmt::format("--heads: {} (expected a multiple of --kv-heads {})", shape.heads,
                            shape.kv_heads));
  }
  diagnostics::validate(shape);
  const std::int64_t print_limit = format == Format::kSvg ? kMaxSvgLen : kMaxPrintedLen;
  if (shape.seqlen > print_limit) {
    throw Error(fmt::format("--len: {} (expected at most {} for --format {})", shape.seqlen,
                            print_limit, options.format));
  }
  MaskSpec mask{.causal = parse_causal(options.causal.value_or("bottom-right"), "--causal"),
                .window_left = options.window};
  (void)Mask(shape.seqlen, shape.seqlen, mask);  // refuses a window without a causal mask

  TempFolder folder;
  Progress progress(options.progress);
  diagnostics::LeakCheckOptions check{
      .shape = shape,
      .mask = mask,
      .seed = options.seed,
      .jobs = options.jobs > 0 ? options.jobs : default_jobs(),
      .progress = [&progress](std::int64_t done, std::int64_t total) {
        progress.update(done, total);
      },
      .output_name = "--exec: output"};
  const LeakReport report =
      diagnostics::check_leaks(command_implementation(command, folder.path()), check);
  progress.finish();

  std::string output;
  switch (format) {
    case Format::kText: output = render_text(report, options.per_head); break;
    case Format::kJson: output = render_json(report, options.per_head); break;
    case Format::kSvg: output = render_svg(report); break;
  }
  write_output(options.out, output);
  return report.result.causal() ? kExitOk : kExitFailure;
}

// ---- built-in mode ---------------------------------------------------------------

std::string path_label(const ModeOptions& mode) {
  switch (mode.mode) {
    case Mode::kPrefill:
    case Mode::kDecode: return std::string(mode_name(mode.mode));
    case Mode::kChunked: return fmt::format("chunked (chunk {})", mode.chunk);
    case Mode::kPaged: return fmt::format("paged (block {}, chunk {})", mode.block_size, mode.chunk);
    case Mode::kSplit: return fmt::format("split ({} parts)", mode.splits);
  }
  return std::string(mode_name(mode.mode));
}

enum class Verdict { kCausal, kLeak, kUnavailable, kError };

std::string_view verdict_name(Verdict verdict) {
  switch (verdict) {
    case Verdict::kCausal: return "causal";
    case Verdict::kLeak: return "leak";
    case Verdict::kUnavailable: return "unavailable";
    case Verdict::kError: return "error";
  }
  return "?";
}

struct BuiltinCheck {
  std::string path;  // path_label, plus the window
  ModeOptions mode;
  DType storage = DType::kF32;
  std::optional<std::int64_t> window;
  Verdict verdict = Verdict::kCausal;
  std::optional<LeakReport> report;  // when the check ran
  std::string message;               // kUnavailable, kError
};

std::string check_name(const BuiltinCheck& check) {
  return fmt::format("{} {}", check.path, dtype_name(check.storage));
}

int run_builtin(const LeakcheckOptions& options) {
  const Format format = parse_format(options.format);
  if (options.causal) {
    throw Error(
        "--causal: only with --exec (built-in mode checks bottom-right alignment, the one the "
        "cache paths use)");
  }
  if (options.per_head) throw Error("--per-head: only with --exec (expected --exec 'CMD')");
  if (format == Format::kSvg) {
    throw Error("--format: svg needs --exec (built-in mode prints a table; expected text or json)");
  }
  LeakShape shape = kBuiltinShape;
  shape.seqlen = options.len.value_or(shape.seqlen);
  shape.heads = options.heads.value_or(shape.heads);
  shape.kv_heads = options.kv_heads.value_or(options.heads ? shape.heads : shape.kv_heads);
  shape.head_dim = options.dim.value_or(shape.head_dim);
  shape.batch = options.batch.value_or(shape.batch);
  if (shape.heads % shape.kv_heads != 0) {
    throw Error(fmt::format("--heads: {} (expected a multiple of --kv-heads {})", shape.heads,
                            shape.kv_heads));
  }
  diagnostics::validate(shape);
  const std::int64_t window = options.window.value_or(kBuiltinWindow);
  const int jobs = options.jobs > 0 ? options.jobs : default_jobs();

  std::vector<BuiltinCheck> checks;
  for (Mode mode : all_modes()) {
    const ModeOptions mode_options{.mode = mode,
                                   .chunk = kBuiltinChunk,
                                   .block_size = kBuiltinBlockSize,
                                   .splits = kBuiltinSplits};
    for (std::optional<std::int64_t> path_window : {std::optional<std::int64_t>{},
                                                   std::optional<std::int64_t>{window}}) {
      for (DType storage : {DType::kF32, DType::kBF16, DType::kF16}) {
        BuiltinCheck check;
        check.path = path_label(mode_options) +
                     (path_window ? fmt::format(", window {}", *path_window) : std::string());
        check.mode = mode_options;
        check.storage = storage;
        check.window = path_window;
        checks.push_back(std::move(check));
      }
    }
  }

  Progress progress(options.progress);
  const std::int64_t total_runs = static_cast<std::int64_t>(checks.size()) * (shape.seqlen + 1);
  std::int64_t runs_before = 0;
  for (BuiltinCheck& check : checks) {
    const MaskSpec mask{.causal = Causal::kBottomRight, .window_left = check.window};
    diagnostics::LeakCheckOptions leak_options{
        .shape = shape,
        .mask = mask,
        .seed = options.seed,
        .jobs = jobs,
        .progress = [&](std::int64_t done, std::int64_t) {
          progress.update(runs_before + done, total_runs);
        }};
    try {
      check.report = diagnostics::check_leaks(
          diagnostics::mode_implementation(check.mode, check.storage, mask, jobs), leak_options);
      check.verdict = check.report->result.causal() ? Verdict::kCausal : Verdict::kLeak;
    } catch (const Error& e) {
      // A path another part of lookback has not delivered yet is not a
      // failure of this check; anything else the path throws is.
      const bool unavailable = std::string_view(e.what()).find("not available yet") !=
                               std::string_view::npos;
      check.verdict = unavailable ? Verdict::kUnavailable : Verdict::kError;
      check.message = e.what();
    }
    runs_before += shape.seqlen + 1;
    progress.update(runs_before, total_runs);
  }

  progress.finish();

  std::size_t failed = 0, unavailable = 0;
  bool any_leak = false;
  const BuiltinCheck* first_failure = nullptr;
  for (const BuiltinCheck& check : checks) {
    if (check.verdict == Verdict::kUnavailable) ++unavailable;
    if (check.verdict == Verdict::kLeak || check.verdict == Verdict::kError) {
      ++failed;
      any_leak = any_leak || check.verdict == Verdict::kLeak;
      if (!first_failure) first_failure = &check;
    }
  }
  const bool all_causal = failed == 0;
  // A leak outweighs an error in the overall verdict: it is what was asked.
  const std::string_view overall = all_causal ? "causal" : any_leak ? "leak" : "error";

  std::string output;
  if (format == Format::kJson) {
    nlohmann::ordered_json doc;
    doc["len"] = shape.seqlen;
    doc["verdict"] = std::string(overall);
    doc["batch"] = shape.batch;
    doc["heads"] = shape.heads;
    doc["kv_heads"] = shape.kv_heads;
    doc["dim"] = shape.head_dim;
    doc["runs_per_check"] = shape.seqlen + 1;
    auto& list = doc["checks"] = nlohmann::ordered_json::array();
    for (const BuiltinCheck& check : checks) {
      nlohmann::ordered_json item;
      item["path"] = std::string(mode_name(check.mode.mode));
      item["label"] = check.path;  // with the path's chunk, block size or splits
      item["storage"] = std::string(dtype_name(check.storage));
      item["window"] = check.window ? nlohmann::ordered_json(*check.window)
                                    : nlohmann::ordered_json(nullptr);
      item["verdict"] = std::string(verdict_name(check.verdict));
      if (check.report) {
        item["leaks"] = pairs_json(check.report->result.leaks);
        item["missing"] = pairs_json(check.report->result.missing);
      } else {
        item["message"] = check.message;
      }
      list.push_back(std::move(item));
    }
    output = doc.dump() + "\n";
  } else {
    auto out = std::back_inserter(output);
    fmt::format_to(out,
                   "lookback leakcheck: every path x storage dtype, with and without a window\n"
                   "len {}, batch {}, heads {}, kv_heads {}, dim {}, bottom-right; {} runs per "
                   "check\n\n",
                   shape.seqlen, shape.batch, shape.heads, shape.kv_heads, shape.head_dim,
                   shape.seqlen + 1);
    std::size_t width = 4;
    for (const BuiltinCheck& check : checks) width = std::max(width, check.path.size());
    fmt::format_to(out, "{:<{}}  {:<12} {:<12} {}\n", "path", width, "f32", "bf16", "f16");
    // Checks come in threes (f32, bf16, f16) per path row.
    for (std::size_t row = 0; row < checks.size(); row += 3) {
      std::string line = fmt::format("{:<{}} ", checks[row].path, width);
      for (std::size_t c = row; c < row + 3; ++c) {
        line += fmt::format(" {:<12}", verdict_name(checks[c].verdict));
      }
      while (line.back() == ' ') line.pop_back();
      output += line + '\n';
    }
    output += '\n';
    for (const BuiltinCheck& check : checks) {
      if (check.verdict == Verdict::kLeak) {
        const Pair& first = check.report->result.leaks.front();
        fmt::format_to(out, "{}: leak: output row {} changed when position {} changed ({} pairs)\n",
                       check_name(check), first.first, first.second,
                       check.report->result.leaks.size());
      } else if (check.verdict == Verdict::kError) {
        fmt::format_to(out, "{}: error: {}\n", check_name(check), check.message);
      }
      if (check.report) output += missing_line(check.report->result.missing, check_name(check) + ": ");
    }
    if (all_causal) {
      fmt::format_to(out, "verdict: causal: all {} available checks are causal{}\n",
                     checks.size() - unavailable,
                     unavailable ? fmt::format(" ({} of {} not available yet)", unavailable,
                                               checks.size())
                                 : std::string());
    } else {
      fmt::format_to(out, "verdict: {}: {} of {} checks failed, the first: {}\n", overall, failed,
                     checks.size(), check_name(*first_failure));
    }
  }
  write_output(options.out, output);
  return all_causal ? kExitOk : kExitFailure;
}

}  // namespace

void add_leakcheck_command(CLI::App& app, Runner& runner) {
  auto options = std::make_shared<LeakcheckOptions>();
  CLI::App* command = app.add_subcommand(
      "leakcheck", "Find future tokens leaking into past outputs of any attention implementation.");
  command->footer(
      "Black-box mode (--exec): CMD runs through /bin/sh with {q} {k} {v} {out} replaced by .npy\n"
      "paths: Q (batch, len, heads, dim), K and V (batch, len, kv_heads, dim), <f4; CMD writes\n"
      "O (batch, len, heads, dim) as <f4 or <f8 at {out}. It runs once on random inputs, then\n"
      "once per position j with the q, k and v rows at j changed: len + 1 runs. Output row i\n"
      "depends on j when any bit of it changed. A leak is a dependency on a position the mask\n"
      "hides from row i (--causal, --window; docs/semantics.md).\n"
      "\n"
      "Matrix (text): S allowed and observed, . allowed but not observed (a warning), X leak,\n"
      "blank masked and clean. json: {len, verdict, leaks, missing, dependency, ...}.\n"
      "\n"
      "Built-in mode (no --exec): checks every lookback path, storage dtype, with and without\n"
      "a window, in-process, and prints a table.\n"
      "\n"
      "Exit codes: 0 no leak, 1 leak found, 2 usage error, CMD failed or wrote a wrong output.\n"
      "\n"
      "Examples:\n"
      "  lookback leakcheck --exec 'python3 attn.py {q} {k} {v} {out}' --len 8 --heads 2 --dim 16\n"
      "  lookback leakcheck --exec './attn {q} {k} {v} {out}' --len 64 --heads 8 --kv-heads 2 \\\n"
      "      --dim 64 --jobs 8 --format json --out leaks.json\n"
      "  lookback leakcheck\n"
      "More: docs/leakage.md.");
  command->add_option("--exec", options->exec,
                      "command to check, with {q} {k} {v} {out} (omit: check lookback's own paths)");
  command->add_option("--len", options->len, "sequence length N (>= 1)")->check(kPositive);
  command->add_option("--heads", options->heads, "query heads H (>= 1)")->check(kPositive);
  command->add_option("--kv-heads", options->kv_heads, "key/value heads HK (default: --heads)")
      ->check(kPositive);
  command->add_option("--dim", options->dim, "head dimension D (>= 1)")->check(kPositive);
  command->add_option("--batch", options->batch, "batch size B (default 1)")->check(kPositive);
  command->add_option("--causal", options->causal,
                      "what may be seen: bottom-right (default), top-left, none")
      ->check(CLI::IsMember({"bottom-right", "top-left", "none"}));
  command->add_option("--window", options->window,
                      "left window W >= 0: row i may see positions i-W..i")
      ->check(kNonNegative);
  command->add_flag("--per-head", options->per_head, "also report the matrix of each head");
  command->add_option("--jobs", options->jobs, "runs in parallel (default: one per core)")
      ->check(kPositive);
  command->add_option("--seed", options->seed, "seed of the random inputs (default 1)");
  command->add_option("--format", options->format, "text (default), json or svg")
      ->check(CLI::IsMember({"text", "json", "svg"}));
  command->add_option("--out", options->out, "write to this file instead of stdout (- is stdout)")
      ->check(kOutputPath);
  command->add_flag("--progress", options->progress,
                    "show 'run i/n' on stderr (default: only when stderr is a terminal)");
  command->callback([options, &runner] {
    runner = [options] {
      return options->exec ? run_black_box(*options) : run_builtin(*options);
    };
  });
}

}  // namespace lookback::cli
