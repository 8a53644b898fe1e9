#include "sandbox/sandbox.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/landlock.h>
#include <sched.h>
#include <seccomp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <memory>

#include "upgraded/fs/unique_fd.h"

// Debian 12's kernel headers (6.1) predate these; the kernel tells which ABI it has.
#ifndef LANDLOCK_ACCESS_FS_TRUNCATE
#define LANDLOCK_ACCESS_FS_TRUNCATE (1ULL << 14)
#endif

namespace upgraded::sandbox {
namespace {

// Confines every file access by path (reading, writing, creating, removing, linking,
// executing) to beneath `dirfd` (-1: nowhere). Returns the Landlock ABI in force (0: the kernel
// has none). Descriptors opened before (the artifact, the destination) stay usable.
Result<int> restrict_files_beneath(int dirfd) {
  long abi = ::syscall(SYS_landlock_create_ruleset, nullptr, 0, LANDLOCK_CREATE_RULESET_VERSION);
  if (abi < 0) {
    if (errno == ENOSYS || errno == EOPNOTSUPP) return 0;
    return system_error(errno, "querying Landlock");
  }
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
  return static_cast<int>(abi);
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

Result<void> load_seccomp_filter() {
  ScmpCtx ctx(seccomp_init(SCMP_ACT_ALLOW), seccomp_release);
  if (!ctx) return Error(ErrorCode::kFailed, "seccomp_init failed");
  const char* denied[] = {
      // other programs and processes
      "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev",
      "process_madvise", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "kcmp", "setsid",
      "setpgid",
      // sockets and io_uring (which can open and connect sockets past this filter)
      "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4", "sendto", "sendmsg",
      "sendmmsg", "io_uring_setup", "io_uring_enter", "io_uring_register",
      // the system
      "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount",
      "fsconfig", "fspick", "mount_setattr", "unshare", "setns", "init_module", "finit_module",
      "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "bpf",
      "perf_event_open", "keyctl", "add_key", "request_key", "acct", "settimeofday",
      "clock_settime", "clock_adjtime", "adjtimex", "quotactl", "quotactl_fd", "syslog",
      "sethostname", "setdomainname", "vhangup", "iopl", "ioperm", "personality", "userfaultfd",
      "open_by_handle_at", "name_to_handle_at", "fanotify_init",
      // identity
      "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setfsuid", "setfsgid",
      "setgroups", "capset",
      // ownership, modes by path (the extractor uses fchmod on what it created), attributes,
      // truncation by path
      "chown", "fchown", "lchown", "fchownat", "chmod", "fchmodat", "mknod", "mknodat", "truncate",
      "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr"};
  for (const char* name : denied) {
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) continue;  // not on this architecture
    if (seccomp_rule_add(ctx.get(), SCMP_ACT_ERRNO(EPERM), nr, 0) != 0)
      return Error(ErrorCode::kFailed, std::string("seccomp: cannot filter ") + name);
  }
  // clone3's flags are behind a pointer, out of a filter's reach: ENOSYS makes glibc fall back
  // to clone, whose flags can be checked: threads only, no new namespaces.
  const auto self = static_cast<scmp_datum_t>(::getpid());
  constexpr scmp_datum_t kNamespaces = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER |
                                       CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWCGROUP;
  bool ok = seccomp_rule_add(ctx.get(), SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0) == 0 &&
            seccomp_rule_add(ctx.get(), SCMP_ACT_ERRNO(EPERM), SCMP_SYS(clone), 1,
                             SCMP_A0_64(SCMP_CMP_MASKED_EQ, CLONE_THREAD, 0)) == 0 &&
            // Signals only to itself (raise() and abort() use tgkill on their own process).
            seccomp_rule_add(ctx.get(), SCMP_ACT_ERRNO(EPERM), SCMP_SYS(kill), 1,
                             SCMP_A0_32(SCMP_CMP_NE, self)) == 0 &&
            seccomp_rule_add(ctx.get(), SCMP_ACT_ERRNO(EPERM), SCMP_SYS(tgkill), 1,
                             SCMP_A0_32(SCMP_CMP_NE, self)) == 0 &&
            seccomp_rule_add(ctx.get(), SCMP_ACT_ERRNO(EPERM), SCMP_SYS(tkill), 0) == 0 &&
            seccomp_rule_add(ctx.get(), SCMP_ACT_ERRNO(EPERM), SCMP_SYS(rt_sigqueueinfo), 1,
                             SCMP_A0_32(SCMP_CMP_NE, self)) == 0 &&
            seccomp_rule_add(ctx.get(), SCMP_ACT_ERRNO(EPERM), SCMP_SYS(rt_tgsigqueueinfo), 1,
                             SCMP_A0_32(SCMP_CMP_NE, self)) == 0;
  for (scmp_datum_t flag = 1; flag != 0 && ok; flag <<= 1)
    if (flag & kNamespaces)
      ok = seccomp_rule_add(ctx.get(), SCMP_ACT_ERRNO(EPERM), SCMP_SYS(clone), 1,
                            SCMP_A0_64(SCMP_CMP_MASKED_EQ, flag, flag)) == 0;
  // fcntl(F_SETOWN/F_SETSIG) + O_ASYNC would deliver signals to any process of the uid.
  for (scmp_datum_t cmd : {F_SETOWN, F_SETOWN_EX, F_SETSIG})
    ok = ok && seccomp_rule_add(ctx.get(), SCMP_ACT_ERRNO(EPERM), SCMP_SYS(fcntl), 1,
                                SCMP_A1_32(SCMP_CMP_EQ, cmd)) == 0;
  // Newer than libseccomp 2.5.4's tables: by number (x86_64, aarch64 and most others).
  constexpr int kFchmodat2 = 452;
  ok = ok && seccomp_rule_add(ctx.get(), SCMP_ACT_ERRNO(EPERM), kFchmodat2, 0) == 0;
  if (!ok) return Error(ErrorCode::kFailed, "seccomp: cannot add the argument filters");
  if (int r = seccomp_load(ctx.get()); r != 0)
    return system_error(-r, "loading the seccomp filter");
  return {};
}

}  // namespace

Result<SandboxReport> enter_sandbox(int writable_dirfd, std::optional<Identity> as) {
  SandboxReport report;
  if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return system_error(errno, "no_new_privs");
  (void)::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  UPGRADED_TRY(drop_bounding_set());
  if (as) UPGRADED_TRY(become(*as));
  UPGRADED_TRY(clear_capabilities());
  report.capabilities_dropped = true;
  report.uid = ::getuid();
  auto abi = restrict_files_beneath(writable_dirfd);
  if (!abi) return abi.error();
  report.landlock_abi = *abi;
  // Under a uid of its own the helper owns nothing outside its tree; under the daemon's uid (a
  // --user instance) only Landlock keeps it off the user's files.
  if (*abi == 0 && !as)
    return Error(ErrorCode::kFailed,
                 "this kernel has no Landlock, which the helper needs when it cannot run as a uid "
                 "of its own (run the daemon as root, or on Linux 5.13 or later with Landlock "
                 "enabled)");
  UPGRADED_TRY(load_seccomp_filter());
  report.seccomp = true;
  return report;
}

}  // namespace upgraded::sandbox
