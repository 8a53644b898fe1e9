#pragma once

#include <sys/stat.h>
#include <sys/types.h>

// Durable filesystem primitives: everything the store and the extractor need to make a change
// survive a power cut (write, fsync, rename, fsync the parent) and to open paths strictly beneath
// a directory fd, never through symlinks.

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "upgraded/fs/unique_fd.h"
#include "upgraded/result.h"

namespace upgraded::fs {

/// Opens `path` relative to `dirfd`, no component a symlink or leading outside `dirfd`
/// (open_beneath_fd in beneath.h: openat2, or the walk where openat2 is missing). O_CLOEXEC is
/// always added.
Result<UniqueFd> open_beneath(int dirfd, std::string_view path, int flags, unsigned mode = 0);

/// Opens a directory (O_DIRECTORY | O_CLOEXEC) by ordinary path, e.g. from the command line.
Result<UniqueFd> open_directory(const std::string& path);

/// mkdir -p: creates `path` and its missing parents with `mode` (existing ones are left alone).
Result<void> make_directories(const std::string& path, mode_t mode = 0755);

/// fsync(2) on `fd`, naming `what` in the error.
Result<void> sync_fd(int fd, std::string_view what);

/// Writes all of `data` to `fd`.
Result<void> write_all(int fd, std::span<const std::byte> data);

/// Reads a whole regular file of at most `max_size` bytes.
Result<std::string> read_file(int dirfd, const std::string& path, std::uint64_t max_size);
/// The same for an open file whose fstat() the caller has (`path` names it in errors), read
/// from its start with pread() (the descriptor's offset is neither used nor moved).
Result<std::string> read_fd(int fd, const struct stat& st, const std::string& path,
                            std::uint64_t max_size);

/// Writes `data` to `dirfd/name` atomically and durably: a temporary sibling is written and
/// fsynced, renamed over `name`, and `dirfd` is fsynced. The file gets mode `mode`. With
/// `replace` false an existing `name` is an error (kExists) and is left alone. With `sync_dir`
/// false the caller fsyncs `dirfd` itself (to make several renames durable with one fsync).
Result<void> write_file_atomic(int dirfd, const std::string& name, std::string_view data,
                               unsigned mode, bool replace = true, bool sync_dir = true);

/// renameat2(2) with `flags` (e.g. RENAME_NOREPLACE), naming `what` in the error.
Result<void> rename_at(int from_dirfd, const std::string& from, int to_dirfd, const std::string& to,
                       unsigned flags = 0);

/// syncfs(2): flushes the whole filesystem holding `fd`, once, instead of an fsync per file.
Result<void> sync_filesystem(int fd, std::string_view what);

/// Fault injection for tests. Every fsync/syncfs (kSync), rename (kRename) and write (kWrite)
/// made through this module is counted; arm() makes the `nth` call from now on fail with `err`
/// as if the kernel had returned it. Thread-safe; costs one atomic increment per call.
enum class FaultOp { kSync, kRename, kWrite };
struct FaultInjection {
  static void arm(FaultOp op, int nth, int err);
  static void disarm();
  /// Calls of `op` since the last arm()/disarm().
  static int calls(FaultOp op);
};

/// The entries of directory `path` (relative to `dirfd`), without "." and "..", sorted bytewise
/// (locale-independent, so listings and the artifacts built from them are reproducible). A
/// missing directory is kNotFound.
Result<std::vector<std::string>> list_names(int dirfd, const std::string& path);

/// Splits "a/b/c" into {"a/b", "c"}; a bare name gives {".", name}.
std::pair<std::string, std::string> split_parent(const std::string& path);

}  // namespace upgraded::fs
