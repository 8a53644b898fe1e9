#include "upgraded/fs/chown_tree.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "upgraded/fs/durable.h"
#include "upgraded/fs/unique_fd.h"
#include "upgraded/policy/names.h"

namespace upgraded::fs {
namespace {

// Non-directories with several names, by (device, inode): how many links they have, and how
// many of their names the walk has met. All of them must be in the tree.
struct Links {
  std::uint64_t nlink = 0;
  std::uint64_t seen = 0;
  std::string first;  // a name of it, for messages
};
using LinkMap = std::map<std::pair<dev_t, ino_t>, Links>;

Result<void> check_entry(const struct stat& st, uid_t owner, bool read_only,
                         const std::string& path) {
  auto refuse = [&](const std::string& why) {
    return Error(ErrorCode::kPolicyRefused, policy::quote(path) + " " + why);
  };
  if (st.st_uid != owner)
    return refuse("is owned by uid " + std::to_string(st.st_uid) +
                  ", not by the extraction helper");
  if (!S_ISDIR(st.st_mode) && !S_ISREG(st.st_mode) && !S_ISLNK(st.st_mode))
    return refuse("is not a directory, regular file or symlink");
  if (S_ISLNK(st.st_mode)) return {};  // a symlink's mode means nothing
  if (st.st_mode & (S_ISUID | S_ISGID | S_ISVTX))
    return refuse("has a setuid, setgid or sticky bit");
  if (read_only && (st.st_mode & 0222)) return refuse("is writable in a read-only release");
  return {};
}

// Every entry beneath `dfd`, depth first, by name (symlinks are entries, never followed):
// `visit(dfd, name, path, st)` for each, and for a directory, once its contents are done,
// `after_dir(its fd, path)`.
template <typename Visit, typename AfterDir>
Result<void> walk(int dfd, const std::string& where, const Visit& visit,
                  const AfterDir& after_dir) {
  auto names = list_names(dfd, ".");
  if (!names) return names.error().with_context("listing '" + where + "'");
  for (const auto& name : *names) {
    std::string path = where + "/" + name;
    struct stat st {};
    if (::fstatat(dfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0)
      return system_error(errno, "inspecting " + policy::quote(path));
    UPGRADED_TRY(visit(dfd, name, path, st));
    if (S_ISDIR(st.st_mode)) {
      int cfd = ::openat(dfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (cfd < 0) return system_error(errno, "opening " + policy::quote(path));
      UniqueFd child(cfd);
      UPGRADED_TRY(walk(cfd, path, visit, after_dir));
      UPGRADED_TRY(after_dir(cfd, path));
    }
  }
  return {};
}

// The first pass: every entry checked, every multiply linked one counted. Nothing is changed.
Result<void> check_contents(int dfd, uid_t owner, bool read_only, LinkMap& links) {
  return walk(
      dfd, ".",
      [&](int, const std::string&, const std::string& path, const struct stat& st) -> Result<void> {
        UPGRADED_TRY(check_entry(st, owner, read_only, path));
        if (!S_ISDIR(st.st_mode) && st.st_nlink > 1) {
          auto [it, first] = links.try_emplace({st.st_dev, st.st_ino});
          if (first) it->second = Links{st.st_nlink, 0, path};
          ++it->second.seen;
        }
        return {};
      },
      [](int, const std::string&) { return Result<void>{}; });
}

// The second pass, over a tree the first one accepted (its builder is gone: nothing changes it
// meanwhile). Symlinks themselves, never their targets; a directory after its contents.
Result<void> chown_contents(int dfd, uid_t uid, gid_t gid) {
  auto chown_failed = [](const std::string& path) {
    return system_error(errno, "chown " + policy::quote(path));
  };
  return walk(
      dfd, ".",
      [&](int parent, const std::string& name, const std::string& path,
          const struct stat& st) -> Result<void> {
        if (!S_ISDIR(st.st_mode) &&
            ::fchownat(parent, name.c_str(), uid, gid, AT_SYMLINK_NOFOLLOW) != 0)
          return chown_failed(path);
        return {};
      },
      [&](int fd, const std::string& path) -> Result<void> {
        if (::fchown(fd, uid, gid) != 0) return chown_failed(path);
        return {};
      });
}

}  // namespace

Result<void> check_tree(int dirfd, uid_t owner, bool read_only) {
  struct stat st {};
  if (::fstat(dirfd, &st) != 0) return system_error(errno, "inspecting the tree's root");
  UPGRADED_TRY(check_entry(st, owner, read_only, "."));
  LinkMap links;
  UPGRADED_TRY(check_contents(dirfd, owner, read_only, links));
  // Every name of a multiply linked file or symlink must lie in the tree: a name elsewhere
  // would be a file of the new owner at a place nobody chose.
  for (const auto& [id, l] : links)
    if (l.seen != l.nlink)
      return Error(ErrorCode::kPolicyRefused, policy::quote(l.first) + " has " +
                                                  std::to_string(l.nlink) + " links, " +
                                                  std::to_string(l.seen) + " of them in the tree");
  return {};
}

Result<void> chown_tree(int dirfd, uid_t from_uid, uid_t uid, gid_t gid, bool read_only) {
  // Check everything first: a refused tree keeps its builder's uid throughout.
  UPGRADED_TRY(check_tree(dirfd, from_uid, read_only));
  UPGRADED_TRY(chown_contents(dirfd, uid, gid));
  if (::fchown(dirfd, uid, gid) != 0) return system_error(errno, "chown of the tree's root");
  return {};
}

}  // namespace upgraded::fs
