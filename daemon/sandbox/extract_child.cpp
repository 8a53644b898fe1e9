#include "sandbox/extract_child.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
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

Result<artifact::ExtractStats> extract_in_child(const ExtractRequest& rq) {
  int req[2], resp[2];
  if (::pipe2(req, O_CLOEXEC) != 0) return system_error(errno, "creating a pipe");
  UniqueFd req_r(req[0]), req_w(req[1]);
  if (::pipe2(resp, O_CLOEXEC) != 0) return system_error(errno, "creating a pipe");
  UniqueFd resp_r(resp[0]), resp_w(resp[1]);
  auto c_req = dup_high(req_r.get());
  auto c_resp = dup_high(resp_w.get());
  auto c_art = dup_high(rq.artifact_fd);
  auto c_dest = dup_high(rq.dest_dirfd);
  for (auto* r : {&c_req, &c_resp, &c_art, &c_dest})
    if (!*r) return r->error();

  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  ::posix_spawn_file_actions_init(&fa);
  ::posix_spawnattr_init(&attr);
  ::posix_spawn_file_actions_adddup2(&fa, c_req->get(), kRequestFd);
  ::posix_spawn_file_actions_adddup2(&fa, c_resp->get(), kResponseFd);
  ::posix_spawn_file_actions_adddup2(&fa, c_art->get(), kArtifactFd);
  ::posix_spawn_file_actions_adddup2(&fa, c_dest->get(), kDestinationFd);
  ::posix_spawn_file_actions_addclosefrom_np(&fa, kDestinationFd + 1);
  // The daemon blocks the signals it reads from a signalfd; the helper starts clean.
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  ::posix_spawnattr_setsigmask(&attr, &none);
  ::posix_spawnattr_setsigdefault(&attr, &all);
  ::posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  char* argv[] = {const_cast<char*>(kHelperName), nullptr};
  char* envp[] = {nullptr};
  pid_t pid = -1;
  int err = ::posix_spawn(&pid, rq.helper.c_str(), &fa, &attr, argv, envp);
  ::posix_spawn_file_actions_destroy(&fa);
  ::posix_spawnattr_destroy(&attr);
  if (err != 0) return system_error(err, "starting the extraction helper " + rq.helper);
  req_r.reset();
  resp_w.reset();
  for (auto* r : {&c_req, &c_resp, &c_art, &c_dest})
    (*r)->reset();

  auto kill_and_reap = [&] {
    ::kill(pid, SIGKILL);
    wait_child(pid);
  };
  // The request is small and the helper reads all of it before anything else; a helper that
  // died meanwhile makes this fail with EPIPE (SIGPIPE is ignored by the daemon).
  if (auto w = write_all(req_w.get(), encode_request(rq.manifest_bytes, rq.policy)); !w) {
    kill_and_reap();
    return w.error();
  }
  req_w.reset();

  std::string answer;
  char buf[4096];
  for (;;) {
    pollfd fds[2] = {{resp_r.get(), POLLIN, 0}, {rq.cancel_fd, POLLIN, 0}};
    int n = ::poll(fds, rq.cancel_fd >= 0 ? 2 : 1, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      Error e = system_error(errno, "waiting for the extraction helper");
      kill_and_reap();
      return e;
    }
    if (rq.cancel_fd >= 0 && (fds[1].revents & POLLIN)) {
      kill_and_reap();
      return Error(ErrorCode::kCanceled, "extraction canceled");
    }
    if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t got = ::read(resp_r.get(), buf, sizeof buf);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) break;
      answer.append(buf, static_cast<std::size_t>(got));
      if (answer.size() > kMaxMessage) {
        kill_and_reap();
        return Error(ErrorCode::kFailed, "the extraction helper's answer is too large");
      }
    }
  }
  int status = wait_child(pid);
  if (WIFSIGNALED(status))
    return Error(ErrorCode::kFailed, "the extraction helper was killed by signal " +
                                         std::to_string(WTERMSIG(status)) + " (" +
                                         strsignal(WTERMSIG(status)) + ")");
  if (answer.empty())
    return Error(ErrorCode::kFailed, "the extraction helper exited with status " +
                                         std::to_string(WEXITSTATUS(status)) + " and no answer");
  return decode_response(answer);
}

}  // namespace upgraded::sandbox
