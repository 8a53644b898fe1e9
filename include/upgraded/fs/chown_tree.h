#pragma once

// Handing a tree that an unprivileged process built over to its final owner.

#include <sys/types.h>

#include "upgraded/result.h"

namespace upgraded::fs {

/// Changes the owner of `dirfd` and of everything below it (symlinks themselves, never their
/// targets) from `from_uid` to `uid`:`gid`, checking each entry before it is touched; refused
/// (kPolicyRefused) are: an entry owned by anyone but `from_uid` (the builder may not smuggle
/// in a hard link to somebody else's file); anything but directories, regular files and
/// symlinks; setuid, setgid and sticky bits; with `read_only`, any write bit; and a regular file
/// with several names of which not all lie in the tree. Hard links within the tree are kept
/// (the first name hands the file over; the others are recognised by device and inode). So whatever
/// the builder did, the result is what a well-behaved extraction would have produced, or
/// nothing. Directories are opened with O_NOFOLLOW: the walk never leaves the tree.
Result<void> chown_tree(int dirfd, uid_t from_uid, uid_t uid, gid_t gid, bool read_only);

}  // namespace upgraded::fs
