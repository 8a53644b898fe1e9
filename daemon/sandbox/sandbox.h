#pragma once

// The least privilege the helper can have. Applied by the helper to itself before it reads a
// byte of its input, since posix_spawn cannot set these up for it.

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>

#include "sandbox/landlock.h"
#include "upgraded/result.h"

namespace upgraded::sandbox {

struct SandboxReport {
  uid_t uid = 0;                 ///< the uid it runs as afterwards
  int landlock_abi = 0;          ///< 0: no Landlock (see landlock_missing)
  std::string landlock_missing;  ///< why, when landlock_abi is 0
  bool seccomp = false;          ///< the system call filter is loaded
  bool capabilities_dropped = false;
  int oom_score_adj = 0;  ///< as read back after setting it (0 when /proc was not there)
};

struct Identity {
  uid_t uid;
  gid_t gid;
};

/// Resource limits the helper sets on itself (setrlimit; lowering needs no privilege).
struct ResourceLimits {
  /// RLIMIT_AS: bounds a runaway decompressor well below the unit's MemoryMax (2 GiB, shared
  /// with the daemon and other helpers): zstd's window is at most 128 MiB, xz's dictionary 64 MiB
  /// for -9, the chunk buffers 48 MiB, the writer threads' stacks 32 MiB.
  std::uint64_t address_space = 1ull << 30;
  std::uint64_t file_size = 0;     ///< RLIMIT_FSIZE: the largest file it may write
  std::uint64_t open_files = 128;  ///< RLIMIT_NOFILE
  /// RLIMIT_NPROC, counted per uid: set only when the helper runs as a uid of its own (a
  /// --user instance's helper shares the user's uid, whose count includes every other process
  /// of the user). Threads only, and at most a handful (the extractor's writers).
  std::uint64_t processes = 32;
};

/// In this order:
/// - first in line for the OOM killer (oom_score_adj 1000): a helper that runs away is killed,
///   not the daemon;
/// - the resource limits (RLIMIT_NPROC only with `as`), and no core dumps;
/// - no new privileges, not dumpable, and every capability dropped from the bounding set;
/// - `as` given: supplementary groups cleared, then gid and uid set (real, effective and
///   saved), which leaves no capability at all: a helper that starts as root ends as a uid
///   that owns nothing on the host but the directory it was given;
/// - Landlock, so that files can be created, written, truncated, linked, renamed or removed
///   only beneath `writable_dirfd` (-1: nowhere);
/// - a seccomp filter that allows only what the helper needs (an allowlist; sandbox.cpp): its
///   memory, threads, its own descriptors, the tree beneath its directory, facts about itself.
///   Not allowed, among everything else: running programs, creating processes, sockets and
///   io_uring, anything acting on another process (signals, ptrace, limits, priorities,
///   affinity, I/O priority), mounts, namespaces, uid and gid changes, chown, chmod by path,
///   extended attributes.
/// Landlock being unavailable (probe_landlock) is reported, not an error, when `as` is given:
/// the uid of its own then confines the helper. Without `as` it is an error, since nothing else
/// would keep the helper off the files of the uid it shares. Anything else failing is an error.
Result<SandboxReport> enter_sandbox(int writable_dirfd, std::optional<Identity> as,
                                    const ResourceLimits& limits);

}  // namespace upgraded::sandbox
