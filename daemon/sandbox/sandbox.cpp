#include "sandbox/sandbox.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/landlock.h>
#include <sched.h>
#include <seccomp.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "upgraded/fs/unique_fd.h"

// Debian 12's kernel headers (6.1) predate these; the kernel tells which ABI it has.
#ifndef LANDLOCK_ACCESS_FS_TRUNCATE
#define LANDLOCK_ACCESS_FS_TRUNCATE (1ULL << 14)
#endif

namespace upgraded::sandbox {
namespace {

// Confines every file access by path (reading, writing, creating, removing, linking,
// executing) to beneath `dirfd` (-1: nowhere), with the Landlock ABI `abi` (> 0).
// Descriptors opened before (the artifact, the destination) stay usable.
Result<void> restrict_files_beneath(int dirfd, int abi) {
  // Reads too: a helper that could open files elsewhere could also fchmod or futimens them,
  // which Landlock does not cover.
  std::uint64_t writes =
      LANDLOCK_ACCESS_FS_EXECUTE | LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR |
      LANDLOCK_ACCESS_FS_WRITE_FILE | LANDLOCK_ACCESS_FS_REMOVE_DIR |
      LANDLOCK_ACCESS_FS_REMOVE_FILE | LANDLOCK_ACCESS_FS_MAKE_CHAR | LANDLOCK_ACCESS_FS_MAKE_DIR |
      LANDLOCK_ACCESS_FS_MAKE_REG | LANDLOCK_ACCESS_FS_MAKE_SOCK | LANDLOCK_ACCESS_FS_MAKE_FIFO |
      LANDLOCK_ACCESS_FS_MAKE_BLOCK | LANDLOCK_ACCESS_FS_MAKE_SYM;
  if (abi >= 2) writes |= LANDLOCK_ACCESS_FS_REFER;
  if (abi >= 3) writes |= LANDLOCK_ACCESS_FS_TRUNCATE;
  landlock_ruleset_attr attr{};
  attr.handled_access_fs = writes;
  long rs = ::syscall(SYS_landlock_create_ruleset, &attr, sizeof attr, 0);
  if (rs < 0) return system_error(errno, "creating a Landlock ruleset");
  UniqueFd ruleset(static_cast<int>(rs));
  if (dirfd >= 0) {
    landlock_path_beneath_attr beneath{};
    beneath.allowed_access = writes;
    beneath.parent_fd = dirfd;
    if (::syscall(SYS_landlock_add_rule, ruleset.get(), LANDLOCK_RULE_PATH_BENEATH, &beneath, 0) !=
        0)
      return system_error(errno, "adding the Landlock rule");
  }
  if (::syscall(SYS_landlock_restrict_self, ruleset.get(), 0) != 0)
    return system_error(errno, "enforcing Landlock");
  return {};
}

Result<void> drop_bounding_set() {
  for (int cap = 0; cap <= 63; ++cap)
    if (::prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL && errno != EPERM)
      return system_error(errno, "dropping capability " + std::to_string(cap));
  (void)::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
  return {};
}

Result<void> become(const Identity& id) {
  if (::setgroups(0, nullptr) != 0) return system_error(errno, "setgroups");
  if (::setresgid(id.gid, id.gid, id.gid) != 0) return system_error(errno, "setresgid");
  if (::setresuid(id.uid, id.uid, id.uid) != 0) return system_error(errno, "setresuid");
  uid_t r, e, s;
  if (::getresuid(&r, &e, &s) != 0 || r != id.uid || e != id.uid || s != id.uid)
    return Error(ErrorCode::kFailed, "the uid did not change");
  return {};
}

Result<void> clear_capabilities() {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2] = {};
  if (::syscall(SYS_capset, &header, data) != 0) return system_error(errno, "capset");
  return {};
}

using ScmpCtx = std::unique_ptr<void, void (*)(scmp_filter_ctx)>;

// What the helper may call once it has read its first byte of input: an allowlist. Everything
// else fails with ENOSYS, as on a kernel without that call, so that libraries fall back where
// they can (glibc: clone3 -> clone, statx -> fstat). The list was taken from strace of the
// helper in every mode over the test suites (reading heads, verifying with each key type,
// extracting every compression, links, large files), plus the calls glibc makes on rare paths
// that are harmless here. Calls that act on other processes are absent or pinned to this one:
// a subverted parser can touch nothing but its own memory, its own descriptors and, through
// them, the tree beneath fd 4 (Landlock and the uid bound that further).
constexpr const char* kAllowed[] = {
    // memory
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise",
    // threads (clone itself is filtered below: threads only)
    "futex", "set_robust_list", "get_robust_list", "rseq", "set_tid_address", "sched_yield",
    "gettid", "getpid", "getppid", "exit", "exit_group", "nanosleep", "clock_nanosleep",
    "restart_syscall",
    // signals to itself only (kill and tgkill are filtered below)
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
    // time
    "clock_gettime", "clock_getres", "gettimeofday", "time",
    // descriptors it holds
    "read", "write", "pread64", "pwrite64", "readv", "writev", "preadv", "pwritev", "preadv2",
    "pwritev2", "lseek", "close", "dup", "dup3", "fstat", "newfstatat", "statx", "fstatfs",
    "getdents64", "readlinkat", "poll", "ppoll", "eventfd2", "ftruncate", "fsync", "fdatasync",
    "syncfs",
    // whether the tree has a default ACL, which would narrow the modes of what it creates
    "fgetxattr",
    // the tree beneath fd 4 (Landlock and the uid confine where these can reach)
    "openat", "openat2", "mkdirat", "symlinkat", "linkat", "unlinkat", "renameat", "renameat2",
    "fchmod", "utimensat", "faccessat", "faccessat2", "access",
    // facts about itself
    "getrandom", "uname", "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid",
    "sysinfo", "getcwd"};

// Denied with EPERM, so that the probe (and anyone reading an strace) sees a refusal rather
// than a missing call: what an attacker who subverted a parser would reach for first.
constexpr const char* kRefused[] = {"execve",
                                    "execveat",
                                    "fork",
                                    "vfork",
                                    "ptrace",
                                    "process_vm_readv",
                                    "process_vm_writev",
                                    "socket",
                                    "socketpair",
                                    "connect",
                                    "io_uring_setup",
                                    "io_uring_enter",
                                    "io_uring_register",
                                    "setuid",
                                    "setgid",
                                    "setreuid",
                                    "setregid",
                                    "setresuid",
                                    "setresgid",
                                    "setgroups",
                                    "capset",
                                    "chown",
                                    "fchown",
                                    "lchown",
                                    "fchownat",
                                    "chmod",
                                    "fchmodat",
                                    "mknod",
                                    "mknodat",
                                    "truncate",
                                    "setxattr",
                                    "fsetxattr",
                                    "lsetxattr",
                                    "unshare",
                                    "setns",
                                    "mount",
                                    "setpriority",
                                    "sched_setaffinity",
                                    "sched_setscheduler",
                                    "sched_setparam",
                                    "ioprio_set",
                                    "pidfd_open",
                                    "pidfd_send_signal",
                                    "pidfd_getfd",
                                    "kcmp",
                                    "bpf",
                                    "perf_event_open",
                                    "userfaultfd",
                                    "keyctl",
                                    "add_key",
                                    "request_key"};

Result<void> load_seccomp_filter() {
  ScmpCtx ctx(seccomp_init(SCMP_ACT_ERRNO(ENOSYS)), seccomp_release);
  if (!ctx) return Error(ErrorCode::kFailed, "seccomp_init failed");
  auto add = [&](std::uint32_t action, int nr, std::initializer_list<scmp_arg_cmp> args = {}) {
    return seccomp_rule_add_array(ctx.get(), action, nr, static_cast<unsigned>(args.size()),
                                  args.size() ? args.begin() : nullptr) == 0;
  };
  for (const char* name : kAllowed) {
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) continue;  // not on this architecture
    if (!add(SCMP_ACT_ALLOW, nr))
      return Error(ErrorCode::kFailed, std::string("seccomp: cannot allow ") + name);
  }
#ifdef UPGRADED_SANITIZE
  // Sanitizer builds (tests) only: UBSan finds out whether a vtable pointer may be read by
  // writing what it points to into a pipe; without one, every such check reports an invalid vptr.
  if (!add(SCMP_ACT_ALLOW, SCMP_SYS(pipe)) || !add(SCMP_ACT_ALLOW, SCMP_SYS(pipe2)))
    return Error(ErrorCode::kFailed, "seccomp: cannot allow pipe");
#endif
  for (const char* name : kRefused) {
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) continue;
    if (!add(SCMP_ACT_ERRNO(EPERM), nr))
      return Error(ErrorCode::kFailed, std::string("seccomp: cannot refuse ") + name);
  }
  const auto self = static_cast<scmp_datum_t>(::getpid());
  constexpr scmp_datum_t kNamespaces = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER |
                                       CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWCGROUP;
  constexpr std::uint32_t kEperm = SCMP_ACT_ERRNO(EPERM);
  bool ok =
      // Threads only, in no new namespace. clone3's flags are behind a pointer, out of a
      // filter's reach: ENOSYS (the default) makes glibc fall back to clone.
      add(SCMP_ACT_ALLOW, SCMP_SYS(clone),
          {SCMP_A0_64(SCMP_CMP_MASKED_EQ, CLONE_THREAD | kNamespaces, CLONE_THREAD)}) &&
      add(kEperm, SCMP_SYS(clone), {SCMP_A0_64(SCMP_CMP_MASKED_EQ, CLONE_THREAD, 0)}) &&
      // Signals to itself only (raise() and abort() use tgkill on their own process).
      add(SCMP_ACT_ALLOW, SCMP_SYS(kill), {SCMP_A0_32(SCMP_CMP_EQ, self)}) &&
      add(kEperm, SCMP_SYS(kill), {SCMP_A0_32(SCMP_CMP_NE, self)}) &&
      add(SCMP_ACT_ALLOW, SCMP_SYS(tgkill), {SCMP_A0_32(SCMP_CMP_EQ, self)}) &&
      add(kEperm, SCMP_SYS(tgkill), {SCMP_A0_32(SCMP_CMP_NE, self)}) &&
      // Its own limits may be read (glibc does, for thread stacks), never set, nor another's
      // read: prlimit64(0, resource, NULL, &old).
      add(SCMP_ACT_ALLOW, SCMP_SYS(prlimit64),
          {SCMP_A0_32(SCMP_CMP_EQ, 0), SCMP_A2_64(SCMP_CMP_EQ, 0)}) &&
      add(SCMP_ACT_ALLOW, SCMP_SYS(getrlimit)) &&
      // sched_getaffinity (std::thread::hardware_concurrency) of itself only.
      add(SCMP_ACT_ALLOW, SCMP_SYS(sched_getaffinity), {SCMP_A0_32(SCMP_CMP_EQ, 0)});
  for (scmp_datum_t flag = 1; flag != 0 && ok; flag <<= 1)
    if (flag & kNamespaces)
      ok = add(kEperm, SCMP_SYS(clone), {SCMP_A0_64(SCMP_CMP_MASKED_EQ, flag, flag)});
  // fcntl: the commands on its own descriptors that the libraries use. Not F_SETOWN/F_SETSIG:
  // with O_ASYNC they deliver signals to any process of the uid.
  for (scmp_datum_t cmd : {F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD, F_DUPFD_CLOEXEC})
    ok = ok && add(SCMP_ACT_ALLOW, SCMP_SYS(fcntl), {SCMP_A1_32(SCMP_CMP_EQ, cmd)});
  for (scmp_datum_t cmd : {F_SETOWN, F_SETOWN_EX, F_SETSIG})
    ok = ok && add(kEperm, SCMP_SYS(fcntl), {SCMP_A1_32(SCMP_CMP_EQ, cmd)});
  if (!ok) return Error(ErrorCode::kFailed, "seccomp: cannot add the argument filters");
  if (int r = seccomp_load(ctx.get()); r != 0)
    return system_error(-r, "loading the seccomp filter");
  return {};
}

Result<void> set_limits(const ResourceLimits& limits, bool own_uid) {
  auto set = [](int resource, std::uint64_t value, const char* name) -> Result<void> {
    rlimit current{};
    if (::getrlimit(resource, &current) != 0) return system_error(errno, name);
    // Never above what the helper was started with.
    rlim_t v = std::min<rlim_t>(static_cast<rlim_t>(value), current.rlim_max);
    rlimit want{v, v};
    if (::setrlimit(resource, &want) != 0) return system_error(errno, name);
    return {};
  };
#ifndef UPGRADED_SANITIZE
  UPGRADED_TRY(set(RLIMIT_AS, limits.address_space, "RLIMIT_AS"));
#else
  // Sanitizer builds (tests) only: ASan has reserved terabytes of address space for its shadow
  // memory before main, so under any RLIMIT_AS its next allocation would fail.
  (void)limits.address_space;
#endif
  UPGRADED_TRY(set(RLIMIT_FSIZE, limits.file_size, "RLIMIT_FSIZE"));
  UPGRADED_TRY(set(RLIMIT_NOFILE, limits.open_files, "RLIMIT_NOFILE"));
  UPGRADED_TRY(set(RLIMIT_CORE, 0, "RLIMIT_CORE"));
  UPGRADED_TRY(set(RLIMIT_MEMLOCK, 0, "RLIMIT_MEMLOCK"));
  if (own_uid) UPGRADED_TRY(set(RLIMIT_NPROC, limits.processes, "RLIMIT_NPROC"));
  return {};
}

}  // namespace

Result<SandboxReport> enter_sandbox(int writable_dirfd, std::optional<Identity> as,
                                    const ResourceLimits& limits) {
  SandboxReport report;
  // Raising one's own oom_score_adj needs no privilege; where /proc is not there, it is only
  // the limits below that bound the helper.
  if (int fd = ::open("/proc/self/oom_score_adj", O_RDWR | O_CLOEXEC); fd >= 0) {
    char back[16] = {};
    if (::write(fd, "1000", 4) == 4 && ::pread(fd, back, sizeof back - 1, 0) > 0)
      report.oom_score_adj = std::atoi(back);
    ::close(fd);
  }
  UPGRADED_TRY(set_limits(limits, as.has_value()));
  if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return system_error(errno, "no_new_privs");
  (void)::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  UPGRADED_TRY(drop_bounding_set());
  if (as) UPGRADED_TRY(become(*as));
  UPGRADED_TRY(clear_capabilities());
  report.capabilities_dropped = true;
  report.uid = ::getuid();
  auto landlock = probe_landlock();
  if (landlock.error) return Error(ErrorCode::kFailed, "Landlock: " + landlock.reason);
  // Under a uid of its own the helper owns nothing outside its tree; under the daemon's uid (a
  // --user instance) only Landlock keeps it off the user's files.
  if (landlock.abi == 0 && !as)
    return Error(ErrorCode::kFailed,
                 "Landlock is not available (" + landlock.reason +
                     "), and the helper needs it when it cannot run as a uid of its own: run the "
                     "daemon as root, or where Landlock is enabled (Linux 5.13 or later) and, in "
                     "a container, let its system calls through the container's filter");
  if (landlock.abi > 0) UPGRADED_TRY(restrict_files_beneath(writable_dirfd, landlock.abi));
  report.landlock_abi = landlock.abi;
  report.landlock_missing = landlock.reason;
  UPGRADED_TRY(load_seccomp_filter());
  report.seccomp = true;
  return report;
}

}  // namespace upgraded::sandbox
