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

// Regular files with several names, by (device, inode): how many links they have, and how many
// of their names the walk has met. The first name hands a file over; the later ones find it
// already owned by the new owner, which is fine exactly for a file handed over by this walk.
struct Links {
  std::uint64_t nlink = 0;
  std::uint64_t seen = 0;
  std::string first;  // a name of it, for messages
};
using LinkMap = std::map<std::pair<dev_t, ino_t>, Links>;

Result<void> check_entry(const struct stat& st, uid_t from_uid, bool read_only,
                         const std::string& path) {
  auto refuse = [&](const std::string& why) {
    return Error(ErrorCode::kPolicyRefused, policy::quote(path) + " " + why);
  };
  if (st.st_uid != from_uid)
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

Result<void> chown_contents(int dfd, const std::string& where, uid_t from_uid, uid_t uid, gid_t gid,
                            bool read_only, LinkMap& links) {
  auto names = list_names(dfd, ".");
  if (!names) return names.error().with_context("listing '" + where + "'");
  for (const auto& name : *names) {
    std::string path = where + "/" + name;
    struct stat st {};
    if (::fstatat(dfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0)
      return system_error(errno, "inspecting " + policy::quote(path));
    if (S_ISREG(st.st_mode) && st.st_nlink > 1) {
      auto [it, first] = links.try_emplace({st.st_dev, st.st_ino});
      if (!first) {
        // Another name of a file this walk already handed over (a hard link in the release).
        if (st.st_uid != uid)
          return Error(ErrorCode::kPolicyRefused,
                       policy::quote(path) + " is a name of a file the walk did not hand over");
        ++it->second.seen;
        continue;
      }
      it->second = Links{st.st_nlink, 1, path};
    }
    UPGRADED_TRY(check_entry(st, from_uid, read_only, path));
    if (S_ISDIR(st.st_mode)) {
      int cfd = ::openat(dfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (cfd < 0) return system_error(errno, "opening " + policy::quote(path));
      UniqueFd child(cfd);
      UPGRADED_TRY(chown_contents(cfd, path, from_uid, uid, gid, read_only, links));
      if (::fchown(cfd, uid, gid) != 0) return system_error(errno, "chown " + policy::quote(path));
    } else if (::fchownat(dfd, name.c_str(), uid, gid, AT_SYMLINK_NOFOLLOW) != 0) {
      return system_error(errno, "chown " + policy::quote(path));
    }
  }
  return {};
}

}  // namespace

Result<void> chown_tree(int dirfd, uid_t from_uid, uid_t uid, gid_t gid, bool read_only) {
  struct stat st {};
  if (::fstat(dirfd, &st) != 0) return system_error(errno, "inspecting the tree's root");
  UPGRADED_TRY(check_entry(st, from_uid, read_only, "."));
  LinkMap links;
  UPGRADED_TRY(chown_contents(dirfd, ".", from_uid, uid, gid, read_only, links));
  // Every name of a multiply linked file must lie in the tree: a link elsewhere (outside the
  // release) would leave a name the new owner's file has that nobody accounted for.
  for (const auto& [id, l] : links)
    if (l.seen != l.nlink)
      return Error(ErrorCode::kPolicyRefused, policy::quote(l.first) + " has " +
                                                  std::to_string(l.nlink) + " links, " +
                                                  std::to_string(l.seen) + " of them in the tree");
  if (::fchown(dirfd, uid, gid) != 0) return system_error(errno, "chown of the tree's root");
  return {};
}

}  // namespace upgraded::fs
