#pragma once

// Handing a tree that an unprivileged process built over to its final owner.

#include <sys/types.h>

#include "upgraded/result.h"

namespace upgraded::fs {

/// Checks that the tree beneath `dirfd` is what a well-behaved extraction run as `owner` would
/// have produced, changing nothing; refused (kPolicyRefused) are: an entry owned by anyone but
/// `owner` (the builder may not smuggle in a hard link to somebody else's file); anything but
/// directories, regular files and symlinks; setuid, setgid and sticky bits; with `read_only`,
/// any write bit; and a file or symlink with several names of which not all lie in the tree.
/// Hard links within the tree are fine. Directories are opened with O_NOFOLLOW: the walk never
/// leaves the tree. Used on its own when the builder keeps the caller's uid (a --user daemon).
Result<void> check_tree(int dirfd, uid_t owner, bool read_only);

/// check_tree(dirfd, from_uid, read_only), then changes the owner of `dirfd` and of
/// everything below it (symlinks themselves, never their targets) to `uid`:`gid`. Nothing is
/// changed unless the whole tree passed the check. So whatever the builder did, the result is
/// what a well-behaved extraction would have produced, or nothing.
Result<void> chown_tree(int dirfd, uid_t from_uid, uid_t uid, gid_t gid, bool read_only);

}  // namespace upgraded::fs
