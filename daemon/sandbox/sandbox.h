#pragma once

// The least privilege the extraction helper can have. Applied by the helper to itself before it
// reads a byte of its request, since posix_spawn cannot set these up for it.

#include <string>

#include "upgraded/result.h"

namespace upgraded::sandbox {

struct SandboxReport {
  bool landlock = false;  ///< writes confined to the destination (kernel support needed)
  int landlock_abi = 0;   ///< 0: Landlock not available
  bool seccomp = false;   ///< the system call filter is loaded
  bool capabilities_dropped = false;
};

/// In this order: no new privileges and not dumpable; Landlock, so that files can be created,
/// written, renamed or removed only beneath `writable_dirfd` (-1: nowhere); every capability
/// dropped (bounding, effective, permitted, inheritable, ambient); a seccomp filter that refuses
/// (EPERM) what an extractor never needs: executing programs, sockets (no D-Bus, no network),
/// ptrace and other processes' memory and file descriptors, signals to other processes, mounts,
/// namespaces, modules, keyrings, bpf, uid/gid changes, reboot and clock changes. Landlock missing
/// from the kernel is reported, not an error; anything else failing is.
Result<SandboxReport> enter_sandbox(int writable_dirfd);

}  // namespace upgraded::sandbox
