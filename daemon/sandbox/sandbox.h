#pragma once

// The least privilege the helper can have. Applied by the helper to itself before it reads a
// byte of its input, since posix_spawn cannot set these up for it.

#include <sys/types.h>

#include <optional>
#include <string>

#include "upgraded/result.h"

namespace upgraded::sandbox {

struct SandboxReport {
  uid_t uid = 0;         ///< the uid it runs as afterwards
  int landlock_abi = 0;  ///< 0: the kernel has no Landlock (writes not confined by it)
  bool seccomp = false;  ///< the system call filter is loaded
  bool capabilities_dropped = false;
};

struct Identity {
  uid_t uid;
  gid_t gid;
};

/// In this order:
/// - no new privileges, not dumpable, and every capability dropped from the bounding set;
/// - `as` given: supplementary groups cleared, then gid and uid set (real, effective and
///   saved), which leaves no capability at all: a helper that starts as root ends as a uid
///   that owns nothing on the host but the directory it was given;
/// - Landlock, so that files can be created, written, truncated, linked, renamed or removed
///   only beneath `writable_dirfd` (-1: nowhere);
/// - a seccomp filter that refuses what the helper never needs: running programs, creating
///   processes (threads only), sockets and io_uring (no D-Bus, no network), other processes
///   (ptrace, their memory or fds, signals), mounts, namespaces, modules, keyrings, bpf, uid
///   and gid changes, chown, extended attributes, truncation by path, reboot and clocks.
/// Landlock missing from the kernel is reported, not an error; anything else failing is.
Result<SandboxReport> enter_sandbox(int writable_dirfd, std::optional<Identity> as);

}  // namespace upgraded::sandbox
