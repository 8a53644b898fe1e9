#pragma once

// Handing a tree that an unprivileged process built over to its final owner.

#include <sys/types.h>

#include <cstddef>

#include "upgraded/result.h"

namespace upgraded::fs {

/// The shape a well-behaved extraction gives a tree (artifact::ExtractLimits has the same
/// defaults): every path below the root at most `max_path_length` bytes and `max_depth`
/// components long. It also bounds what walking a tree costs: no path held in memory is longer.
struct TreeLimits {
  std::size_t max_path_length = 4095;
  std::size_t max_depth = 256;
};

/// Checks that the tree beneath `dirfd` is what a well-behaved extraction run as `owner` would
/// have produced, changing nothing; refused (kPolicyRefused) are: an entry owned by anyone but
/// `owner` (the builder may not smuggle in a hard link to somebody else's file); anything but
/// directories, regular files and symlinks; setuid, setgid and sticky bits; with `read_only`,
/// any write bit; a file or symlink with several names of which not all lie in the tree; and a
/// path beyond `limits`. Hard links within the tree are fine. Each directory is opened from its
/// parent's descriptor with O_NOFOLLOW: the walk never leaves the tree, at any depth. `threads`
/// share the walk (0: one per CPU, at most 4); a refusal names the first bad entry in the tree's
/// order, whatever the number of threads. Used on its own when the builder keeps the caller's uid
/// (a
/// --user daemon).
Result<void> check_tree(int dirfd, uid_t owner, bool read_only, unsigned threads = 0,
                        const TreeLimits& limits = {});

/// check_tree(dirfd, from_uid, read_only), then changes the owner of `dirfd` and of
/// everything below it (symlinks themselves, never their targets) to `uid`:`gid`, the root
/// last. Nothing is changed unless the whole tree passed the check. So whatever the builder
/// did, the result is what a well-behaved extraction would have produced, or nothing. The
/// builder must be gone: the hand-over trusts the types the check saw, and fails (kFailed) if
/// it meets another number of entries than the check did.
Result<void> chown_tree(int dirfd, uid_t from_uid, uid_t uid, gid_t gid, bool read_only,
                        unsigned threads = 0, const TreeLimits& limits = {});

}  // namespace upgraded::fs
