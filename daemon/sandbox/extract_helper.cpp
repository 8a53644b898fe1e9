// upgraded-extract: the daemon's sandboxed helper. It reads artifacts, checks signatures and
// extracts payloads, so that the daemon itself parses nothing an artifact contains. Spawned
// by the daemon with the file descriptors of extract_protocol.h; not meant to be run by hand.
//
//   upgraded-extract [--uid=N --gid=N]                  extract (fds 0, 1, 3, 4)
//   upgraded-extract --read-head [--uid=N --gid=N]      manifest.json + manifest.sig (fds 1, 3)
//   upgraded-extract --verify [--uid=N --gid=N]         check signatures (fds 0, 1)
//   upgraded-extract --probe-sandbox [--uid=N --gid=N]  try what the sandbox must refuse, print
//                                                       JSON (fds 1, 4; for the tests)

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <clocale>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>

#include "sandbox/extract_protocol.h"
#include "sandbox/sandbox.h"
#include "upgraded/artifact/container.h"
#include "upgraded/artifact/keys.h"
#include "upgraded/artifact/unpack.h"

#ifdef UPGRADED_SANITIZE
#include <sanitizer/common_interface_defs.h>

// Sanitizer builds (tests) only. LeakSanitizer's exit-time check clones a tracer (without
// CLONE_THREAD) that ptrace-attaches to every thread: the seccomp filter refuses both, so in
// here the check could only fail. It is off by default, also when the helper is spawned with no
// environment at all (the daemon turns it off as well: extract_child.cpp). The helper runs the
// engine's code, which the engine's unit tests leak-check in their own processes.
extern "C" const char* __asan_default_options() {
  return "detect_leaks=0";
}
#endif

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
  // The manifest is the one whose signatures the daemon checked; the head of the file is not
  // read again. Only the payload is: at the offset the daemon computed, its header compared
  // with the canonical bytes, every chunk hashed before libarchive sees it.
  auto manifest = artifact::parse_manifest(request->manifest_bytes);
  if (!manifest) return manifest.error();
  auto container = artifact::ContainerReader::payload_at(
      sandbox::kArtifactFd, request->payload_offset, manifest->payload);
  if (!container) return container.error();
  artifact::VerifiedArtifact art{
      std::move(*manifest), std::move(request->manifest_bytes), {}, std::move(*container)};
  // The daemon syncs once, after handing the tree back to root: one syncfs instead of two.
  // The umask is 0 (main), which the extractor could not read from /proc in here.
  return artifact::extract_verified(art, request->policy, sandbox::kDestinationFd,
                                    /*sync=*/false, /*umask=*/0);
}

Result<std::pair<std::string, std::string>> read_head() {
  auto container = artifact::ContainerReader::open(sandbox::kArtifactFd);
  if (!container) return container.error();
  return std::make_pair((*container)->manifest_bytes(), (*container)->signature_bytes());
}

Result<std::vector<artifact::PublicKey>> parse_keys(const std::vector<sandbox::PemFile>& files) {
  std::vector<artifact::PublicKey> keys;
  for (const auto& f : files) {
    auto file_keys = artifact::parse_public_keys_pem(f.pem, f.source);  // every key of a file
    if (!file_keys) return file_keys.error();
    for (auto& k : *file_keys)
      keys.push_back(std::move(k));
  }
  return keys;
}

Result<artifact::SignatureReport> verify() {
  auto text = read_all(sandbox::kRequestFd, sandbox::kMaxMessage);
  if (!text) return text.error();
  auto request = sandbox::decode_verify_request(*text);
  if (!request) return request.error();
  auto trusted = parse_keys(request->keys);
  if (!trusted) return trusted.error();
  if (trusted->empty()) return Error(ErrorCode::kNotFound, "no trusted keys are installed");
  auto revoked = parse_keys(request->revoked);
  if (!revoked) return revoked.error();
  std::set<std::string> revoked_ids;
  for (const auto& k : *revoked)
    revoked_ids.insert(k.id);
  auto keyring = artifact::Keyring::from_keys(std::move(*trusted), std::move(revoked_ids));
  return artifact::verify_signatures(request->manifest_bytes, request->signature_bytes, keyring,
                                     artifact::TrustPolicy{request->threshold});
}

// What the sandbox must refuse, tried from inside it.
int probe(const sandbox::SandboxReport& report) {
  nlohmann::json out = {{"uid", report.uid},
                        {"landlock_abi", report.landlock_abi},
                        {"landlock_missing", report.landlock_missing},
                        {"seccomp", report.seccomp},
                        {"capabilities_dropped", report.capabilities_dropped}};
  auto result = [](bool ok) { return ok ? std::string("allowed") : std::strerror(errno); };
  out["socket"] = result(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0) >= 0);
  out["io_uring"] = result(::syscall(SYS_io_uring_setup, 1, nullptr) >= 0 || errno == EFAULT);
  out["kill_init"] = result(::kill(1, 0) == 0);
  out["fork"] = result([] {
    pid_t p = ::fork();
    if (p == 0) ::_exit(0);
    return p > 0;
  }());
  char* const argv[] = {const_cast<char*>("/bin/true"), nullptr};
  out["execve"] = result(::execve("/bin/true", argv, nullptr) == 0);
  out["read_shadow"] = result(::open("/etc/shadow", O_RDONLY | O_CLOEXEC) >= 0);
  int f = ::open("/tmp/upgraded-probe-outside", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  out["create_outside"] = result(f >= 0);
  if (f >= 0) ::unlink("/tmp/upgraded-probe-outside");
  out["read_outside"] = result(::open("/etc/hostname", O_RDONLY | O_CLOEXEC) >= 0);
  int g = ::openat(sandbox::kDestinationFd, "probe-inside", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
                   0600);
  out["create_inside"] = result(g >= 0);
  out["setuid"] = result(::setuid(0) == 0);
  // The daemon (its parent) is another process, possibly of the same uid (a --user instance):
  // nothing may change its limits, priority, CPUs or I/O priority.
  const pid_t parent = ::getppid();
  rlimit one{1, 1};
  out["prlimit_other"] = result(::prlimit(parent, RLIMIT_NOFILE, &one, nullptr) == 0);
  out["prlimit_self_set"] = result(::setrlimit(RLIMIT_NOFILE, &one) == 0);
  out["setpriority_other"] =
      result(::setpriority(PRIO_PROCESS, static_cast<id_t>(parent), 19) == 0);
  cpu_set_t cpus;
  CPU_ZERO(&cpus);
  CPU_SET(0, &cpus);
  out["affinity_other"] = result(::sched_setaffinity(parent, sizeof cpus, &cpus) == 0);
  constexpr int kIoprioWhoProcess = 1, kIoprioIdle = 3 << 13;
  out["ioprio_other"] =
      result(::syscall(SYS_ioprio_set, kIoprioWhoProcess, parent, kIoprioIdle) == 0);
  out["not_listed"] = result(::syscall(SYS_acct, nullptr) == 0);  // outside the allowlist
  rlimit as{}, fsize{}, nofile{};
  ::getrlimit(RLIMIT_AS, &as);
  ::getrlimit(RLIMIT_FSIZE, &fsize);
  ::getrlimit(RLIMIT_NOFILE, &nofile);
  out["rlimit_as"] = as.rlim_cur;
  out["rlimit_fsize"] = fsize.rlim_cur;
  out["rlimit_nofile"] = nofile.rlim_cur;
  out["oom_score_adj"] = report.oom_score_adj;
  out["chown_inside"] = result(g >= 0 && ::fchown(g, 0, 0) == 0);
  return write_all(sandbox::kResponseFd, out.dump() + "\n") ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  // Files are created with the modes the extractor gives them (sanitized; no write bit in a
  // release), not what the daemon's umask leaves of them: nothing gets an fchmod of its own
  // (50,000 of them for a tree of 50,000 files). The tree stays private meanwhile: the helper's
  // uid, in the daemon's 0700 wrapper. Set before any thread exists, so no file races it.
  ::umask(0);
  // libarchive converts entry names through the locale: in "C" (the helper starts with an empty
  // environment) a UTF-8 name such as "café" cannot be converted and the payload is refused.
  // C.UTF-8 is built into glibc (2.35 and later): no locale file is opened.
  std::setlocale(LC_CTYPE, "C.UTF-8");
  std::string mode;
  std::optional<uid_t> uid;
  std::optional<gid_t> gid;
  sandbox::ResourceLimits limits;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--uid=", 0) == 0)
      uid = static_cast<uid_t>(std::stoul(a.substr(6)));
    else if (a.rfind("--gid=", 0) == 0)
      gid = static_cast<gid_t>(std::stoul(a.substr(6)));
    else if (a.rfind("--max-file-size=", 0) == 0)
      limits.file_size = std::stoull(a.substr(16));
    else
      mode = a;
  }
  std::optional<sandbox::Identity> as;
  if (uid && gid) as = sandbox::Identity{*uid, *gid};
  // Extraction writes beneath fd 4; nothing else writes anywhere.
  const bool writes = mode.empty() || mode == "--probe-sandbox";
#ifdef UPGRADED_SANITIZE
  // A report reads /proc/self/maps, which Landlock will refuse: cached now.
  __sanitizer_sandbox_on_notify(nullptr);
#endif
  // Only the extraction writes files (of at most the size the daemon passed); the other modes
  // answer through a pipe, which RLIMIT_FSIZE does not limit.
  if (!writes) limits.file_size = 0;
  if (mode == "--probe-sandbox") limits.file_size = 4096;
  auto report = sandbox::enter_sandbox(writes ? sandbox::kDestinationFd : -1, as, limits);
  if (!report) {
    (void)write_all(sandbox::kResponseFd,
                    sandbox::encode_response(report.error().with_context("entering the sandbox")));
    return 1;
  }
  if (mode == "--read-head")
    return write_all(sandbox::kResponseFd, sandbox::encode_head(read_head())) ? 0 : 1;
  if (mode == "--verify")
    return write_all(sandbox::kResponseFd, sandbox::encode_verify_response(verify())) ? 0 : 1;
  if (mode == "--probe-sandbox") return probe(*report);
  if (!mode.empty()) return 2;
  auto stats = extract();
  return write_all(sandbox::kResponseFd, sandbox::encode_response(stats)) ? 0 : 1;
}
