#pragma once

// Opening paths beneath a directory descriptor, never outside it.
//
// The kernel's openat2(2) with RESOLVE_BENEATH does this in one call. Where it is missing —
// ENOSYS from an old kernel, or from a seccomp filter that cannot inspect openat2's arguments
// (systemd's RestrictSUIDSGID=, systemd-nspawn's default filter) — the same guarantees come from
// a walk, one component at a time, each opened with O_NOFOLLOW relative to the descriptor of the
// directory before it (as systemd's chase() does). The switch happens once per process, at the
// first ENOSYS. docs/architecture.md, "Paths beneath a directory".

namespace upgraded::fs {

enum class BeneathImpl {
  kAuto,     ///< openat2, and the walk from the first ENOSYS on (the default)
  kOpenat2,  ///< openat2 only (its ENOSYS is returned)
  kWalk,     ///< the walk only
};

/// Chooses the implementation for this process: tests run every case under both.
void set_beneath_impl(BeneathImpl impl);

/// True once openat2 answered ENOSYS in this process (so the walk is in use).
bool openat2_missing();

/// Opens `path` beneath `dirfd` like openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
/// RESOLVE_NO_MAGICLINKS) with `flags | O_CLOEXEC`: a symlink anywhere in the path is ELOOP, an
/// absolute path or a ".." above `dirfd` is EXDEV. A descriptor, or -1 with errno set.
int open_beneath_fd(int dirfd, const char* path, int flags, unsigned mode = 0);

/// Resolves `path` beneath `dirfd` following symlinks, like openat2(O_PATH, RESOLVE_BENEATH |
/// RESOLVE_NO_MAGICLINKS): a link (or "..") that leads above `dirfd`, or an absolute link, is
/// EXDEV; more than 40 links is ELOOP; a dangling link is ENOENT. An O_PATH descriptor, or -1
/// with errno set.
int resolve_beneath(int dirfd, const char* path);

}  // namespace upgraded::fs
