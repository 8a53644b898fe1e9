// upgraded-extract: extracts one verified artifact, confined. Spawned by the daemon (see
// extract_protocol.h for its file descriptors); not meant to be run by hand.
//
//   upgraded-extract                  extract (the daemon's use)
//   upgraded-extract --read-head      answer with manifest.json and manifest.sig, unverified
//   upgraded-extract --probe-sandbox  enter the sandbox, try what it must refuse, print JSON
//                                     (for the tests)

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>

#include "sandbox/extract_protocol.h"
#include "sandbox/sandbox.h"
#include "upgraded/artifact/container.h"
#include "upgraded/artifact/unpack.h"

using namespace upgraded;

namespace {

bool write_all(int fd, const std::string& data) {
  std::size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<std::size_t>(n);
  }
  return true;
}

Result<std::string> read_all(int fd, std::size_t max) {
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return system_error(errno, "reading the request");
    if (n == 0) return out;
    if (out.size() + static_cast<std::size_t>(n) > max)
      return Error(ErrorCode::kInvalidArgument, "the request is too large");
    out.append(buf, static_cast<std::size_t>(n));
  }
}

Result<artifact::ExtractStats> extract() {
  auto text = read_all(sandbox::kRequestFd, sandbox::kMaxMessage);
  if (!text) return text.error();
  auto request = sandbox::decode_request(*text);
  if (!request) return request.error();
  auto container = artifact::ContainerReader::open(sandbox::kArtifactFd);
  if (!container) return container.error();
  if ((*container)->manifest_bytes() != request->manifest_bytes)
    return Error(ErrorCode::kVerificationFailed,
                 "the artifact's manifest is not the one that was verified (the file changed)");
  auto manifest = artifact::parse_manifest(request->manifest_bytes);
  if (!manifest) return manifest.error();
  UPGRADED_TRY((*container)->begin_payload(manifest->payload));
  artifact::VerifiedArtifact art{
      std::move(*manifest), std::move(request->manifest_bytes), {}, std::move(*container)};
  return artifact::extract_verified(art, request->policy, sandbox::kDestinationFd);
}

Result<std::pair<std::string, std::string>> read_head() {
  auto container = artifact::ContainerReader::open(sandbox::kArtifactFd);
  if (!container) return container.error();
  return std::make_pair((*container)->manifest_bytes(), (*container)->signature_bytes());
}

// What the sandbox must refuse, tried from inside it.
int probe(const sandbox::SandboxReport& report) {
  nlohmann::json out = {{"landlock_abi", report.landlock_abi},
                        {"seccomp", report.seccomp},
                        {"capabilities_dropped", report.capabilities_dropped}};
  auto result = [](bool ok) { return ok ? std::string("allowed") : std::strerror(errno); };
  int s = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  out["socket"] = result(s >= 0);
  out["kill_init"] = result(::kill(1, 0) == 0);
  char* const argv[] = {const_cast<char*>("/bin/true"), nullptr};
  out["execve"] = result(::execve("/bin/true", argv, nullptr) == 0);
  int outside = ::open("/tmp", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  int f =
      ::openat(outside, "upgraded-probe-outside", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  out["create_outside"] = result(f >= 0);
  if (f >= 0) ::unlinkat(outside, "upgraded-probe-outside", 0);
  int g = ::openat(sandbox::kDestinationFd, "probe-inside", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
                   0600);
  out["create_inside"] = result(g >= 0);
  out["setuid"] = result(::setuid(65534) == 0);
  return write_all(sandbox::kResponseFd, out.dump() + "\n") ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  const bool head = argc == 2 && std::strcmp(argv[1], "--read-head") == 0;
  // Reading the head needs no directory: it may write nothing at all.
  auto report = sandbox::enter_sandbox(head ? -1 : sandbox::kDestinationFd);
  if (!report) {
    (void)write_all(sandbox::kResponseFd,
                    sandbox::encode_response(report.error().with_context("entering the sandbox")));
    return 1;
  }
  if (head) return write_all(sandbox::kResponseFd, sandbox::encode_head(read_head())) ? 0 : 1;
  if (argc == 2 && std::strcmp(argv[1], "--probe-sandbox") == 0) return probe(*report);
  auto stats = extract();
  return write_all(sandbox::kResponseFd, sandbox::encode_response(stats)) ? 0 : 1;
}
