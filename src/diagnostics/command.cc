// The black box of the leak check: a user's command, run once per input set
// on .npy files through /bin/sh (include/lookback/leakcheck.hpp).
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
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
// What an output may be: the comparison reads f32 or f64 values.
constexpr DType kOutputDtypes[] = {DType::kF32, DType::kF64};

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
// and N + 2 runs should cost the command's time, not the disk's.
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

// What SIGINT, SIGTERM and SIGHUP do while a SignalCleanup lives: note the
// signal and make the wake pipe readable, which is all a handler may safely
// do. Runs in flight poll the pipe, kill their process groups and throw.
std::atomic<int> g_signal{0};
std::atomic<int> g_wake_read{-1}, g_wake_write{-1};
constexpr int kCleanupSignals[] = {SIGINT, SIGTERM, SIGHUP};

extern "C" void on_cleanup_signal(int signal) {
  int none = 0;
  g_signal.compare_exchange_strong(none, signal);
  const int fd = g_wake_write.load();
  const char byte = 1;
  if (fd >= 0) (void)!write(fd, &byte, 1);  // the pipe stays readable: it is never read
}

enum class Ending { kExited, kTimedOut, kInterrupted };

struct ShellEnd {
  Ending ending = Ending::kExited;
  int status = 0;  // the wait status, for kExited
};

// Kills the run's process group (the shell and everything it started) and
// reaps the shell.
void kill_group(pid_t pid) {
  kill(-pid, SIGKILL);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
}

// Waits for the shell until it exits, `timeout` passes or a cleanup signal
// comes: on a pidfd where the kernel has them, else polling every few ms.
ShellEnd wait_shell(pid_t pid, double timeout_seconds) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_seconds));
  const int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  ShellEnd end;
  while (true) {
    int status = 0;
    const pid_t waited = waitpid(pid, &status, WNOHANG);
    if (waited == pid) {
      end = {.ending = Ending::kExited, .status = status};
      break;
    }
    if (waited < 0 && errno != EINTR) {
      kill_group(pid);
      if (pidfd >= 0) close(pidfd);
      throw Error(ErrorCode::kIo, fmt::format("--exec: waitpid: {}", std::strerror(errno)));
    }
    if (g_signal.load() != 0 || std::chrono::steady_clock::now() >= deadline) {
      kill_group(pid);
      end.ending = g_signal.load() != 0 ? Ending::kInterrupted : Ending::kTimedOut;
      break;
    }
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    pollfd fds[2] = {{.fd = pidfd, .events = POLLIN, .revents = 0},
                     {.fd = g_wake_read.load(), .events = POLLIN, .revents = 0}};
    const auto limit = pidfd >= 0 ? left : std::min(left, std::chrono::milliseconds(5));
    poll(fds, 2, static_cast<int>(std::clamp<std::int64_t>(limit.count(), 0, 1 << 30)));
  }
  if (pidfd >= 0) close(pidfd);
  return end;
}

// Runs `command` through /bin/sh -c in a process group of its own, with
// stdin from /dev/null and stdout and stderr into files. Files, not pipes:
// nothing can block on a full pipe, and a child started by another worker
// cannot hold a pipe of this run open.
ShellEnd run_shell(const std::string& command, const std::string& stdout_path,
                   const std::string& stderr_path, double timeout_seconds) {
  if (g_signal.load() != 0) return {.ending = Ending::kInterrupted};
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, stdout_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, stderr_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawnattr_t attributes;
  posix_spawnattr_init(&attributes);
  posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETPGROUP);
  posix_spawnattr_setpgroup(&attributes, 0);  // a new group, led by the shell
  std::string shell = "/bin/sh", flag = "-c", script = command;
  char* argv[] = {shell.data(), flag.data(), script.data(), nullptr};
  pid_t pid = 0;
  const int error = posix_spawn(&pid, "/bin/sh", &actions, &attributes, argv, environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attributes);
  if (error != 0) {
    throw Error(ErrorCode::kIo,
                fmt::format("--exec: cannot start /bin/sh: {}", std::strerror(error)));
  }
  return wait_shell(pid, timeout_seconds);
}

// The error of a run that did not exit 0.
Error run_failure(const ShellEnd& end, const RunInfo& run, double timeout_seconds,
                  const std::filesystem::path& stdout_path,
                  const std::filesystem::path& stderr_path) {
  if (end.ending == Ending::kInterrupted) {
    return Error(fmt::format("--exec: interrupted by signal {} ({}) during {}; its processes "
                             "were killed",
                             g_signal.load(), strsignal(g_signal.load()), run_name(run)));
  }
  if (end.ending == Ending::kTimedOut) {
    return Error(fmt::format(
        "--exec: the command ran past the timeout of {:g} s on {}; its processes were killed "
        "(expected each run to end in time; --timeout sets the limit)",
        timeout_seconds, run_name(run)));
  }
  std::string said = one_line(read_tail(stderr_path, kMaxShownStderr));
  if (said.empty()) said = one_line(read_tail(stdout_path, kMaxShownStderr));
  const int status = end.status;
  const std::string how =
      WIFEXITED(status) ? fmt::format("failed with exit code {}", WEXITSTATUS(status))
      : WIFSIGNALED(status) ? fmt::format("was killed by signal {}", WTERMSIG(status))
                            : std::string("failed");
  return Error(fmt::format("--exec: the command {} on {}: {}", how, run_name(run),
                           said.empty() ? "(it printed nothing)" : said));
}

// Each run gets its own folder in `folder` with q.npy, k.npy, v.npy, the
// command's stdout and stderr, and the out.npy it writes; that folder goes as
// soon as the output has been read.
Implementation run_in_folder(const std::string& command, double timeout_seconds,
                             std::shared_ptr<const TempFolder> folder) {
  return [command, timeout_seconds, folder](const LeakInputs& inputs, const RunInfo& run) {
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
    const ShellEnd end =
        run_shell(substitute(command, files), stdout_path, stderr_path, timeout_seconds);
    if (end.ending != Ending::kExited || !WIFEXITED(end.status) || WEXITSTATUS(end.status) != 0) {
      throw run_failure(end, run, timeout_seconds, stdout_path, stderr_path);
    }
    std::error_code missing;
    if (!std::filesystem::is_regular_file(files.out, missing)) {
      throw Error(fmt::format(
          "--exec: the command exited 0 on {} but wrote no output (expected O, (batch, seqlen, "
          "heads, head_dim) <f4 or <f8, at {{out}})",
          run_name(run)));
    }
    NpyArray out;
    try {
      out = read_npy(files.out, kOutputDtypes);
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

Implementation command_implementation(const std::string& command,
                                      const CommandOptions& options) {
  check_command_template(command);
  if (!(options.timeout_seconds > 0 && options.timeout_seconds < 1e9)) {
    throw Error(fmt::format("--timeout: {} (expected seconds > 0 and < 1e9)",
                            options.timeout_seconds));
  }
  return run_in_folder(command, options.timeout_seconds, std::make_shared<const TempFolder>());
}

struct SignalCleanup::Saved {
  struct sigaction previous[std::size(kCleanupSignals)];
  int pipe[2] = {-1, -1};
};

SignalCleanup::SignalCleanup() : saved_(std::make_unique<Saved>()) {
  if (g_wake_write.load() >= 0) throw Error("SignalCleanup: one is already in place");
  if (pipe2(saved_->pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
    throw Error(ErrorCode::kIo, fmt::format("leakcheck: pipe: {}", std::strerror(errno)));
  }
  g_signal.store(0);
  g_wake_read.store(saved_->pipe[0]);
  g_wake_write.store(saved_->pipe[1]);
  struct sigaction action {};
  action.sa_handler = on_cleanup_signal;
  sigemptyset(&action.sa_mask);
  for (std::size_t i = 0; i < std::size(kCleanupSignals); ++i) {
    sigaction(kCleanupSignals[i], &action, &saved_->previous[i]);
  }
}

SignalCleanup::~SignalCleanup() {
  for (std::size_t i = 0; i < std::size(kCleanupSignals); ++i) {
    sigaction(kCleanupSignals[i], &saved_->previous[i], nullptr);
  }
  g_wake_write.store(-1);
  g_wake_read.store(-1);
  close(saved_->pipe[0]);
  close(saved_->pipe[1]);
}

int SignalCleanup::received() const noexcept { return g_signal.load(); }

void SignalCleanup::reraise() const {
  const int signal = received();
  if (signal == 0) return;
  struct sigaction action {};
  action.sa_handler = SIG_DFL;
  sigemptyset(&action.sa_mask);
  sigaction(signal, &action, nullptr);
  sigset_t unblock;
  sigemptyset(&unblock);
  sigaddset(&unblock, signal);
  pthread_sigmask(SIG_UNBLOCK, &unblock, nullptr);
  raise(signal);
  _exit(128 + signal);  // not reached: the default action of these signals ends the process
}

// ---- whole models: {tokens} in, {logits} out -------------------------------

namespace {

// tokens.npy: format 1.0, <i4, C order; the header padded to 64 bytes as
// NumPy writes it.
void write_tokens(const std::string& path, const std::vector<std::int32_t>& tokens,
                  std::int64_t batch, std::int64_t seqlen) {
  std::string header = fmt::format("{{'descr': '<i4', 'fortran_order': False, 'shape': ({}, {}), }}",
                                   batch, seqlen);
  header.append(63 - (10 + header.size()) % 64, ' ');
  header += '\n';
  std::string bytes = "\x93NUMPY";
  bytes += '\x01';
  bytes += '\x00';
  bytes += static_cast<char>(header.size() & 0xff);
  bytes += static_cast<char>(header.size() >> 8);
  bytes += header;
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  file.write(reinterpret_cast<const char*>(tokens.data()),
             static_cast<std::streamsize>(tokens.size() * sizeof(std::int32_t)));
  if (!file.flush()) throw Error(ErrorCode::kIo, fmt::format("leakcheck: cannot write {}", path));
}

std::string substitute_model(const std::string& command, const std::string& tokens,
                             const std::string& logits) {
  std::string result;
  for (std::size_t at = 0; at < command.size();) {
    if (command.compare(at, 8, "{tokens}") == 0) {
      result += shell_word(tokens);
      at += 8;
    } else if (command.compare(at, 8, "{logits}") == 0) {
      result += shell_word(logits);
      at += 8;
    } else {
      result += command[at++];
    }
  }
  return result;
}

// The command runner's messages name --exec; here the option is --exec-model.
Error as_model_error(const Error& e) {
  std::string message = e.what();
  if (message.rfind("--exec:", 0) == 0) message = "--exec-model:" + message.substr(7);
  return Error(e.code(), message);
}

}  // namespace

void check_model_command_template(const std::string& command) {
  std::string missing;
  for (std::string_view field : {"{tokens}", "{logits}"}) {
    if (command.find(field) == std::string::npos) {
      missing += missing.empty() ? "" : ", ";
      missing += field;
    }
  }
  if (!missing.empty()) {
    throw Error(fmt::format(
        "--exec-model: '{}' lacks {} (expected a command with {{tokens}} and {{logits}}, which "
        "are replaced by the paths of the token ids it reads and of the logits it must write)",
        command, missing));
  }
}

TokenModel model_command(const std::string& command, const CommandOptions& options) {
  check_model_command_template(command);
  if (!(options.timeout_seconds > 0 && options.timeout_seconds < 1e9)) {
    throw Error(fmt::format("--timeout: {} (expected seconds > 0 and < 1e9)",
                            options.timeout_seconds));
  }
  auto folder = std::make_shared<const TempFolder>();
  const double timeout_seconds = options.timeout_seconds;
  return [command, timeout_seconds, folder](const std::vector<std::int32_t>& tokens,
                                            const LeakShape& s, const RunInfo& run) {
    const std::filesystem::path run_folder = folder->path() / fmt::format("run-{}", run.run);
    std::filesystem::create_directory(run_folder);
    const std::string tokens_path = (run_folder / "tokens.npy").string();
    const std::string logits_path = (run_folder / "logits.npy").string();
    write_tokens(tokens_path, tokens, s.batch, s.seqlen);
    const std::filesystem::path stdout_path = run_folder / "stdout.txt";
    const std::filesystem::path stderr_path = run_folder / "stderr.txt";
    const ShellEnd end = run_shell(substitute_model(command, tokens_path, logits_path),
                                   stdout_path, stderr_path, timeout_seconds);
    if (end.ending != Ending::kExited || !WIFEXITED(end.status) || WEXITSTATUS(end.status) != 0) {
      throw as_model_error(run_failure(end, run, timeout_seconds, stdout_path, stderr_path));
    }
    std::error_code missing;
    if (!std::filesystem::is_regular_file(logits_path, missing)) {
      throw Error(fmt::format(
          "--exec-model: the command exited 0 on {} but wrote no output (expected logits, "
          "(batch, seqlen, vocab) <f4 or <f8, at {{logits}})",
          run_name(run)));
    }
    NpyArray out;
    try {
      out = read_npy(logits_path, kOutputDtypes);
    } catch (const Error& e) {
      throw Error(e.code(), fmt::format("--exec-model: output of {}: {}", run_name(run), e.what()));
    }
    std::error_code ignored;
    std::filesystem::remove_all(run_folder, ignored);
    return out;
  };
}

}  // namespace lookback::diagnostics
