#pragma once

// Handing a tree that an unprivileged process built over to its final owner.

#include <sys/types.h>

#include "upgraded/result.h"

namespace upgraded::fs {

/// Changes the owner of `dirfd` and of everything below it (symlinks themselves, never their
/// targets) from `from_uid` to `uid`:`gid`. An entry owned by anyone but `from_uid` is refused
/// (kPolicyRefused) before it is touched: the tree's builder may not smuggle in a hard link to
/// somebody else's file. Directories are opened with O_NOFOLLOW, so the walk never leaves the
/// tree.
Result<void> chown_tree(int dirfd, uid_t from_uid, uid_t uid, gid_t gid);

}  // namespace upgraded::fs
