#include "sandbox/extract_child.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "sandbox/extract_protocol.h"
#include "upgraded/fs/unique_fd.h"

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

Result<void> write_all(int fd, const std::string& data) {
  std::size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return system_error(errno, "writing the helper's request");
    done += static_cast<std::size_t>(n);
  }
  return {};
}

int wait_child(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return status;
}

struct HelperRun {
  const std::string& helper;
  const char* mode;            // extra argument, or null
  const std::string* request;  // written to fd 0, or null (fd 0 is /dev/null then)
  int artifact_fd;
  int dest_dirfd;                     // -1: none
  int cancel_fd;                      // -1: none
  std::chrono::milliseconds timeout;  // 0: none
};

// Spawns the helper with the fds of extract_protocol.h, feeds it the request, and returns its
// answer. Always reaps it.
Result<std::string> run_helper(const HelperRun& rq) {
  int req[2], resp[2];
  if (::pipe2(req, O_CLOEXEC) != 0) return system_error(errno, "creating a pipe");
  UniqueFd req_r(req[0]), req_w(req[1]);
  if (::pipe2(resp, O_CLOEXEC) != 0) return system_error(errno, "creating a pipe");
  UniqueFd resp_r(resp[0]), resp_w(resp[1]);
  auto c_req = dup_high(req_r.get());
  auto c_resp = dup_high(resp_w.get());
  auto c_art = dup_high(rq.artifact_fd);
  if (!c_req) return c_req.error();
  if (!c_resp) return c_resp.error();
  if (!c_art) return c_art.error();
  UniqueFd c_dest;
  if (rq.dest_dirfd >= 0) {
    auto d = dup_high(rq.dest_dirfd);
    if (!d) return d.error();
    c_dest = std::move(*d);
  }

  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  ::posix_spawn_file_actions_init(&fa);
  ::posix_spawnattr_init(&attr);
  ::posix_spawn_file_actions_adddup2(&fa, c_req->get(), kRequestFd);
  ::posix_spawn_file_actions_adddup2(&fa, c_resp->get(), kResponseFd);
  ::posix_spawn_file_actions_adddup2(&fa, c_art->get(), kArtifactFd);
  if (c_dest) ::posix_spawn_file_actions_adddup2(&fa, c_dest.get(), kDestinationFd);
  ::posix_spawn_file_actions_addclosefrom_np(&fa, c_dest ? kDestinationFd + 1 : kArtifactFd + 1);
  // The daemon blocks the signals it reads from a signalfd; the helper starts clean.
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  ::posix_spawnattr_setsigmask(&attr, &none);
  ::posix_spawnattr_setsigdefault(&attr, &all);
  ::posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  char* argv[] = {const_cast<char*>(kHelperName), const_cast<char*>(rq.mode), nullptr};
  char* envp[] = {nullptr};
  pid_t pid = -1;
  int err = ::posix_spawn(&pid, rq.helper.c_str(), &fa, &attr, argv, envp);
  ::posix_spawn_file_actions_destroy(&fa);
  ::posix_spawnattr_destroy(&attr);
  if (err != 0) return system_error(err, "starting the helper " + rq.helper);
  req_r.reset();
  resp_w.reset();
  c_req->reset();
  c_resp->reset();
  c_art->reset();
  c_dest.reset();

  auto kill_and_reap = [&] {
    ::kill(pid, SIGKILL);
    wait_child(pid);
  };
  // The request is small and the helper reads all of it before anything else; a helper that
  // died meanwhile makes this fail with EPIPE (SIGPIPE is ignored by the daemon).
  if (rq.request) {
    if (auto w = write_all(req_w.get(), *rq.request); !w) {
      kill_and_reap();
      return w.error();
    }
  }
  req_w.reset();

  const auto deadline = std::chrono::steady_clock::now() + rq.timeout;
  std::string answer;
  char buf[4096];
  for (;;) {
    int wait_ms = -1;
    if (rq.timeout.count() > 0) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) {
        kill_and_reap();
        return Error(ErrorCode::kFailed, "the helper did not answer within " +
                                             std::to_string(rq.timeout.count()) + " ms");
      }
      wait_ms = static_cast<int>(left.count());
    }
    pollfd fds[2] = {{resp_r.get(), POLLIN, 0}, {rq.cancel_fd, POLLIN, 0}};
    int n = ::poll(fds, rq.cancel_fd >= 0 ? 2 : 1, wait_ms);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      Error e = system_error(errno, "waiting for the helper");
      kill_and_reap();
      return e;
    }
    if (rq.cancel_fd >= 0 && (fds[1].revents & POLLIN)) {
      kill_and_reap();
      return Error(ErrorCode::kCanceled, "canceled");
    }
    if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t got = ::read(resp_r.get(), buf, sizeof buf);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) break;
      answer.append(buf, static_cast<std::size_t>(got));
      if (answer.size() > kMaxMessage) {
        kill_and_reap();
        return Error(ErrorCode::kFailed, "the helper's answer is too large");
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

Result<ArtifactHead> read_head_in_child(const std::string& helper, int artifact_fd,
                                        std::chrono::milliseconds timeout) {
  auto answer = run_helper({helper, "--read-head", nullptr, artifact_fd, -1, -1, timeout});
  if (!answer) return answer.error().with_context("reading the artifact");
  auto head = decode_head(*answer);
  if (!head) return head.error();
  return ArtifactHead{std::move(head->first), std::move(head->second)};
}

Result<artifact::ExtractStats> extract_in_child(const ExtractRequest& rq) {
  std::string request = encode_request(rq.manifest_bytes, rq.policy);
  auto answer = run_helper({rq.helper, nullptr, &request, rq.artifact_fd, rq.dest_dirfd,
                            rq.cancel_fd, std::chrono::milliseconds(0)});
  if (!answer) {
    if (answer.error().code() == ErrorCode::kCanceled)
      return Error(ErrorCode::kCanceled, "extraction canceled");
    return answer.error().with_context("extraction");
  }
  return decode_response(*answer);
}

}  // namespace upgraded::sandbox
