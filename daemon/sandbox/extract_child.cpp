#include "sandbox/extract_child.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <system_error>
#include <thread>
#include <vector>

#include "sandbox/extract_protocol.h"
#include "upgraded/fs/chown_tree.h"
#include "upgraded/fs/durable.h"
#include "upgraded/fs/unique_fd.h"

#ifdef UPGRADED_SANITIZE
#include <sanitizer/common_interface_defs.h>
#endif

#ifndef UPGRADED_LIBEXECDIR
#define UPGRADED_LIBEXECDIR "/usr/libexec/upgraded"
#endif

namespace upgraded::sandbox {
namespace {

constexpr const char* kHelperName = "upgraded-extract";

// Above the numbers the child's fds are moved to, so that no dup2 clobbers another source.
Result<UniqueFd> dup_high(int fd) {
  int d = ::fcntl(fd, F_DUPFD_CLOEXEC, 10);
  if (d < 0) return system_error(errno, "duplicating a descriptor for the helper");
  return UniqueFd(d);
}

int wait_child(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return status;
}

#ifdef UPGRADED_SANITIZE
// Sanitizer builds (tests) only: the helper's environment is ASAN_OPTIONS, with the report to
// stderr (see HelperReports) and without LeakSanitizer, last so that they win. LeakSanitizer
// cannot work in the helper: its exit-time check clones a tracer (without CLONE_THREAD) that
// ptrace-attaches to the threads, and the seccomp filter refuses both (upgraded-extract also
// defaults to detect_leaks=0).
std::vector<std::string> helper_environment() {
  const char* asan = ::secure_getenv("ASAN_OPTIONS");
  return {std::string("ASAN_OPTIONS=") + (asan ? asan : "") + ":log_path=stderr:detect_leaks=0"};
}

// Sanitizer builds (tests) only: where a finding in the helper is reported. Inside its sandbox
// the helper can open no file, and may not write a byte to one (RLIMIT_FSIZE is 0 when it only
// answers), so its sanitizers write to its stderr (GCC's UBSan reads its options only at its
// first report, which the sandbox prevents, and then writes to stderr anyway). That is a pipe
// of 1 MiB, non-blocking so that a longer report cannot stall the helper, which the daemon
// empties once the helper is reaped: into a file next to its own report file (log_path), or
// else into its own stderr. No thread: the daemon's thread count is bounded and tested.
class HelperReports {
 public:
  Result<void> start() {
    int p[2];
    if (::pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) return system_error(errno, "creating a pipe");
    m_read_end = UniqueFd(p[0]);
    m_write_end = UniqueFd(p[1]);
    (void)::fcntl(p[1], F_SETPIPE_SZ, 1 << 20);
    return {};
  }
  int write_end() const { return m_write_end.get(); }
  void close_write_end() { m_write_end.reset(); }
  // Runs once the helper is reaped (every return from run_helper).
  ~HelperReports() {
    m_write_end.reset();
    std::string text;
    char buf[4096];
    for (ssize_t n; (n = ::read(m_read_end.get(), buf, sizeof buf)) > 0;)
      text.append(buf, static_cast<std::size_t>(n));
    if (text.empty()) return;
    const char* own = __sanitizer_get_report_path();  // opens the daemon's own, if it has one
    UniqueFd out(own && *own ? ::open((std::string(own) + ".upgraded-extract").c_str(),
                                      O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640)
                             : ::fcntl(2, F_DUPFD_CLOEXEC, 0));
    for (std::string_view left = text; out && !left.empty();) {
      ssize_t n = ::write(out.get(), left.data(), left.size());
      if (n <= 0) break;
      left.remove_prefix(static_cast<std::size_t>(n));
    }
  }

 private:
  UniqueFd m_read_end, m_write_end;
};
#else
// None at all.
std::vector<std::string> helper_environment() {
  return {};
}
#endif

struct HelperRun {
  const Helper& helper;
  const char* mode;                   // first argument, or null
  const std::string* request;         // written to fd 0, or null (fd 0 is /dev/null then)
  int artifact_fd;                    // -1: none
  int dest_dirfd;                     // -1: none
  int cancel_fd;                      // -1: none
  std::chrono::milliseconds timeout;  // 0: none
  std::uint64_t max_file_size = 0;    // extraction: its RLIMIT_FSIZE
};

// Spawns the helper with the fds of extract_protocol.h, feeds it the request, and returns its
// answer. The helper cannot create processes (its seccomp filter), so once it is reaped
// nothing of it is left. Always reaps it.
Result<std::string> run_helper(const HelperRun& rq) {
  int req[2], resp[2];
  if (::pipe2(req, O_CLOEXEC) != 0) return system_error(errno, "creating a pipe");
  UniqueFd req_r(req[0]), req_w(req[1]);
  if (::pipe2(resp, O_CLOEXEC) != 0) return system_error(errno, "creating a pipe");
  UniqueFd resp_r(resp[0]), resp_w(resp[1]);
#ifdef UPGRADED_SANITIZE
  HelperReports reports;
  if (auto started = reports.start(); !started) return started.error();
#endif
  std::vector<UniqueFd> sources;  // above the target numbers, so that no dup2 clobbers another
  posix_spawn_file_actions_t fa;
  ::posix_spawn_file_actions_init(&fa);
  auto give = [&](int fd, int target) -> Result<void> {
    auto d = dup_high(fd);
    if (!d) return d.error();
    ::posix_spawn_file_actions_adddup2(&fa, d->get(), target);
    sources.push_back(std::move(*d));
    return {};
  };
  Result<void> given = rq.request ? give(req_r.get(), kRequestFd) : Result<void>();
  if (given) given = give(resp_w.get(), kResponseFd);
  if (given && rq.artifact_fd >= 0) given = give(rq.artifact_fd, kArtifactFd);
  if (given && rq.dest_dirfd >= 0) given = give(rq.dest_dirfd, kDestinationFd);
#ifdef UPGRADED_SANITIZE
  if (given) given = give(reports.write_end(), 2);
#endif
  if (!given) {
    ::posix_spawn_file_actions_destroy(&fa);
    return given.error();
  }
  // Every number the helper knows is something deliberate: /dev/null where it gets nothing.
  if (!rq.request) ::posix_spawn_file_actions_addopen(&fa, kRequestFd, "/dev/null", O_RDONLY, 0);
  if (rq.artifact_fd < 0)
    ::posix_spawn_file_actions_addopen(&fa, kArtifactFd, "/dev/null", O_RDONLY, 0);
  if (rq.dest_dirfd < 0)
    ::posix_spawn_file_actions_addopen(&fa, kDestinationFd, "/dev/null", O_RDONLY, 0);
#ifndef UPGRADED_SANITIZE
  // Not the daemon's stderr (the journal): the helper reports through its answer only.
  ::posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
#endif
  ::posix_spawn_file_actions_addclosefrom_np(&fa, kDestinationFd + 1);
  posix_spawnattr_t attr;
  ::posix_spawnattr_init(&attr);
  // The daemon blocks the signals it reads from a signalfd; the helper starts clean.
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  ::posix_spawnattr_setsigmask(&attr, &none);
  ::posix_spawnattr_setsigdefault(&attr, &all);
  ::posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  std::vector<std::string> args = {kHelperName};
  if (rq.mode) args.push_back(rq.mode);
  if (rq.helper.as) {
    args.push_back("--uid=" + std::to_string(rq.helper.as->first));
    args.push_back("--gid=" + std::to_string(rq.helper.as->second));
  }
  if (rq.max_file_size) args.push_back("--max-file-size=" + std::to_string(rq.max_file_size));
  std::vector<char*> argv;
  for (auto& a : args)
    argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env = helper_environment();
  std::vector<char*> envp;
  for (auto& e : env)
    envp.push_back(e.data());
  envp.push_back(nullptr);
  pid_t pid = -1;
  int err = ::posix_spawn(&pid, rq.helper.path.c_str(), &fa, &attr, argv.data(), envp.data());
  ::posix_spawn_file_actions_destroy(&fa);
  ::posix_spawnattr_destroy(&attr);
  if (err != 0) return system_error(err, "starting the helper " + rq.helper.path);
  req_r.reset();
  resp_w.reset();
  sources.clear();
#ifdef UPGRADED_SANITIZE
  reports.close_write_end();
#endif
  UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));

  auto kill_and_reap = [&] {
    ::kill(pid, SIGKILL);
    wait_child(pid);
  };
  // The request is written as the helper reads it, in the same loop that watches the cancel,
  // the deadline and the helper's exit: a helper that stops reading cannot block the daemon.
  std::string_view to_write = rq.request ? std::string_view(*rq.request) : std::string_view();
  if (to_write.empty()) {
    req_w.reset();
  } else if (::fcntl(req_w.get(), F_SETFL, O_NONBLOCK) != 0) {
    kill_and_reap();
    return system_error(errno, "preparing the helper's request");
  }
  const auto deadline = std::chrono::steady_clock::now() + rq.timeout;
  std::string answer;
  char buf[4096];
  bool eof = false, exited = false;
  while (!eof || !exited) {
    int wait_ms = -1;
    if (rq.timeout.count() > 0) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) {
        kill_and_reap();
        return Error(ErrorCode::kFailed, "the helper did not finish within " +
                                             std::to_string(rq.timeout.count()) + " ms");
      }
      wait_ms = static_cast<int>(left.count());
    }
    // Without a pidfd (kernels before 5.3) the exit is awaited after EOF, without a deadline.
    if (eof && !pidfd) break;
    pollfd fds[4] = {{eof ? -1 : resp_r.get(), POLLIN, 0},
                     {pidfd ? pidfd.get() : -1, POLLIN, 0},
                     {rq.cancel_fd, POLLIN, 0},
                     {req_w ? req_w.get() : -1, POLLOUT, 0}};
    int n = ::poll(fds, 4, wait_ms);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      Error e = system_error(errno, "waiting for the helper");
      kill_and_reap();
      return e;
    }
    if (rq.cancel_fd >= 0 && (fds[2].revents & POLLIN)) {
      kill_and_reap();
      return Error(ErrorCode::kCanceled, "canceled");
    }
    if (fds[1].revents & POLLIN) exited = true;
    if (req_w && (fds[3].revents & (POLLOUT | POLLERR | POLLHUP))) {
      ssize_t w = ::write(req_w.get(), to_write.data(), to_write.size());
      if (w < 0 && errno != EAGAIN && errno != EINTR) {
        req_w.reset();  // the helper is gone (EPIPE): its exit status will tell
      } else if (w > 0) {
        to_write.remove_prefix(static_cast<std::size_t>(w));
        if (to_write.empty()) req_w.reset();
      }
    }
    if (!eof && (fds[0].revents & (POLLIN | POLLHUP | POLLERR))) {
      ssize_t got = ::read(resp_r.get(), buf, sizeof buf);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) {
        eof = true;
      } else {
        answer.append(buf, static_cast<std::size_t>(got));
        if (answer.size() > kMaxMessage) {
          kill_and_reap();
          return Error(ErrorCode::kFailed, "the helper's answer is too large");
        }
      }
    }
  }
  int status = wait_child(pid);
  if (WIFSIGNALED(status))
    return Error(ErrorCode::kFailed, "the helper was killed by signal " +
                                         std::to_string(WTERMSIG(status)) + " (" +
                                         strsignal(WTERMSIG(status)) + ")");
  if (answer.empty())
    return Error(ErrorCode::kFailed, "the helper exited with status " +
                                         std::to_string(WEXITSTATUS(status)) + " and no answer");
  return answer;
}

}  // namespace

std::string default_helper_path() {
  char self[4096];
  ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
  if (n > 0) {
    std::string dir(self, static_cast<std::size_t>(n));
    dir.erase(dir.rfind('/') + 1);
    std::string candidate = dir + kHelperName;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return std::string(UPGRADED_LIBEXECDIR) + "/" + kHelperName;
}

Result<ArtifactHead> read_head_in_child(const Helper& helper, int artifact_fd,
                                        std::chrono::milliseconds timeout) {
  auto answer = run_helper({helper, "--read-head", nullptr, artifact_fd, -1, -1, timeout});
  if (!answer) return answer.error().with_context("reading the artifact");
  auto head = decode_head(*answer);
  if (!head) return head.error();
  return ArtifactHead{std::move(head->first), std::move(head->second)};
}

Result<artifact::SignatureReport> verify_in_child(const Helper& helper,
                                                  const VerifyRequest& request,
                                                  std::chrono::milliseconds timeout) {
  std::string text = encode_verify_request(request);
  auto answer = run_helper({helper, "--verify", &text, -1, -1, -1, timeout});
  if (!answer) return answer.error().with_context("checking the signatures");
  auto report = decode_verify_response(*answer);
  if (report && report->trusted.size() < request.threshold)
    return Error(ErrorCode::kVerificationFailed, "too few trusted signatures");
  return report;
}

Result<artifact::ExtractStats> extract_in_child(const Helper& helper, const ExtractRequest& rq) {
  if (helper.as && ::fchown(rq.dest_dirfd, helper.as->first, helper.as->second) != 0)
    return system_error(errno, "handing the destination to the helper");
  std::string request = encode_request(rq.manifest_bytes, rq.payload_offset, rq.policy);
  // RLIMIT_FSIZE one byte above the policy's largest file: the extractor refuses larger files
  // from their headers, so only a subverted one would reach it (and die of SIGXFSZ).
  auto answer = run_helper({helper, nullptr, &request, rq.artifact_fd, rq.dest_dirfd, rq.cancel_fd,
                            std::chrono::milliseconds(0), rq.policy.limits.max_file_size + 1});
  if (!answer) {
    if (answer.error().code() == ErrorCode::kCanceled)
      return Error(ErrorCode::kCanceled, "extraction canceled");
    return answer.error().with_context("extraction");
  }
  auto stats = decode_response(*answer);
  if (!stats) return stats;
  // Back to the daemon's uid, so that no later helper run can touch this tree. A helper that
  // kept the daemon's uid (a --user instance) hands nothing over, but its tree is checked the
  // same way: a subverted helper could have left what the extractor never makes (a setuid
  // file, a link out of the tree).
  // Nor a path the extractor's limits refuse.
  const fs::TreeLimits limits{rq.policy.limits.max_path_length, rq.policy.limits.max_depth};
  // The helper's file contents are written back meanwhile: the walk below is system calls on
  // the CPU, the writeback mostly waiting for the disk (50,000 small files, quiet runs: 1.11-1.14
  // of an in-process unpack instead of 1.20-1.39, bench/install; docs/architecture.md has what
  // else was tried). The hand-over changes only inodes, which the syncfs after it writes, with
  // whatever this one did not. Best effort: without a thread, the final syncfs does it all.
  // Through a description of its own: syncfs reports a writeback error once per description,
  // and the final syncfs must see every one.
  std::optional<std::jthread> writeback;
  if (int wfd = ::openat(rq.dest_dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC); wfd >= 0) {
    try {
      writeback.emplace([fd = UniqueFd(wfd)] { (void)::syncfs(fd.get()); });
    } catch (...) {  // no thread: the lambda, and the descriptor with it, are gone
    }
  }
  auto handed = helper.as
                    ? fs::chown_tree(rq.dest_dirfd, helper.as->first, ::geteuid(), ::getegid(),
                                     rq.policy.read_only, 0, limits)
                    : fs::check_tree(rq.dest_dirfd, ::geteuid(), rq.policy.read_only, 0, limits);
  if (!handed) {
    // Refused: not worth waiting for; the thread owns its descriptor.
    if (writeback) writeback->detach();
    return handed.error();
  }
  writeback.reset();  // joined
  // The helper leaves the syncfs to us: contents and owners made durable together.
  UPGRADED_TRY(fs::sync_filesystem(rq.dest_dirfd, "the extracted tree"));
  return stats;
}

}  // namespace upgraded::sandbox
