// The black box of the leak check: a user's command, run once per input set
// on .npy files through /bin/sh (include/lookback/leakcheck.hpp).
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "lookback/error.hpp"
#include "lookback/leakcheck.hpp"
#include "lookback/npy.hpp"

extern char** environ;

namespace lookback::diagnostics {
namespace {

// The tail of a failed command's stderr shown in the error line.
constexpr std::size_t kMaxShownStderr = 1500;

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

// Each run gets its own folder in `folder` with q.npy, k.npy, v.npy, the
// command's stdout and stderr, and the out.npy it writes; that folder goes as
// soon as the output has been read.
Implementation run_in_folder(const std::string& command, std::shared_ptr<const TempFolder> folder) {
  return [command, folder](const LeakInputs& inputs, const RunInfo& run) {
    const LeakShape& s = inputs.shape;
    const std::filesystem::path run_folder = folder->path() / fmt::format("run-{}", run.run);
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
      throw Error(fmt::format("--exec: the command {} on {}: {}", how, run_name(run),
                              said.empty() ? "(it printed nothing)" : said));
    }
    std::error_code missing;
    if (!std::filesystem::is_regular_file(files.out, missing)) {
      throw Error(fmt::format(
          "--exec: the command exited 0 on {} but wrote no output (expected O, (batch, seqlen, "
          "heads, head_dim) <f4, at {{out}})",
          run_name(run)));
    }
    NpyArray out;
    try {
      out = read_npy(files.out);
    } catch (const Error& e) {
      throw Error(e.code(), fmt::format("--exec: output of {}: {}", run_name(run),
                                        e.what()));
    }
    std::error_code ignored;
    std::filesystem::remove_all(run_folder, ignored);
    return out;
  };
}

}  // namespace

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

Implementation command_implementation(const std::string& command) {
  check_command_template(command);
  return run_in_folder(command, std::make_shared<const TempFolder>());
}

}  // namespace lookback::diagnostics
