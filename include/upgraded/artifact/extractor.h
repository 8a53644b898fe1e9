#pragma once

// Safe extraction of a verified payload (docs/artifact-format.md §6). libarchive only reads; all
// files are created by this module relative to a directory fd (fs/beneath.h: openat2 with
// RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS, or a walk with the same guarantees where openat2 is
// missing), so no entry can write outside the destination or through a symlink.

#include <sys/types.h>

#include <cstdint>
#include <optional>

#include "upgraded/artifact/manifest.h"
#include "upgraded/artifact/payload_stream.h"
#include "upgraded/result.h"

namespace upgraded::artifact {

struct ExtractLimits {
  std::uint64_t max_entries = 1'000'000;
  std::uint64_t max_total_bytes = 64ULL << 30;  ///< sum of file sizes
  std::uint64_t max_file_size = 16ULL << 30;
  std::size_t max_path_length = 4095;              ///< bytes, like PATH_MAX - 1
  std::size_t max_depth = 256;                     ///< path components (directory nesting)
  std::uint64_t max_path_bytes = 128ULL << 20;     ///< all entry names together (bounds memory)
  std::uint64_t max_expansion_ratio = 1000;        ///< uncompressed tar bytes per payload byte
  std::uint64_t free_space_reserve = 64ULL << 20;  ///< bytes that must stay free on the target
  std::uint64_t free_inode_reserve = 4096;         ///< inodes that must stay free on the target
};

/// What to do with setuid, setgid, sticky and world-writable mode bits.
enum class UnsafeModes { kRefuse, kStrip };

struct ExtractPolicy {
  ExtractLimits limits;
  UnsafeModes unsafe_modes = UnsafeModes::kRefuse;
  /// Clear every write bit of files and directories, the root included (release trees are
  /// read-only; renaming a directory within its parent needs no write permission on it).
  bool read_only = false;
};

struct ExtractStats {
  std::uint64_t entries = 0;
  std::uint64_t files = 0;
  std::uint64_t directories = 0;
  std::uint64_t symlinks = 0;
  std::uint64_t hardlinks = 0;
  std::uint64_t bytes = 0;  ///< file content bytes written
};

/// Extracts the tar stream delivered by `source` (compressed as `compression`; `payload_size`
/// compressed bytes, for the expansion limit) into the empty directory `dest_dirfd`. Entry
/// refusals and limits are kPolicyRefused; a failing `source` passes its error through. On error
/// the directory holds a partial tree: the caller removes it. Nothing is synced here.
/// Files are created with their final modes where the process umask leaves them intact, and get
/// an fchmod otherwise. `umask` is that umask when the caller knows it (a process that cannot
/// read /proc/self/status: the sandboxed helper); read from /proc otherwise, every file getting
/// its fchmod where that fails. A wrong `umask` gives wrong modes. Every file gets its fchmod
/// too where `dest_dirfd` has a default ACL, which takes the umask's place (acl(5)).
Result<ExtractStats> extract_payload(PayloadSource& source, Compression compression,
                                     std::uint64_t payload_size, int dest_dirfd,
                                     const ExtractPolicy& policy,
                                     std::optional<mode_t> umask = std::nullopt);

}  // namespace upgraded::artifact
