#include "upgraded/fs/chown_tree.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "upgraded/fs/durable.h"
#include "upgraded/fs/unique_fd.h"
#include "upgraded/policy/names.h"

namespace upgraded::fs {
namespace {

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
                            bool read_only) {
  auto names = list_names(dfd, ".");
  if (!names) return names.error().with_context("listing '" + where + "'");
  for (const auto& name : *names) {
    std::string path = where + "/" + name;
    struct stat st {};
    if (::fstatat(dfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0)
      return system_error(errno, "inspecting " + policy::quote(path));
    UPGRADED_TRY(check_entry(st, from_uid, read_only, path));
    if (S_ISDIR(st.st_mode)) {
      int cfd = ::openat(dfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (cfd < 0) return system_error(errno, "opening " + policy::quote(path));
      UniqueFd child(cfd);
      UPGRADED_TRY(chown_contents(cfd, path, from_uid, uid, gid, read_only));
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
  UPGRADED_TRY(chown_contents(dirfd, ".", from_uid, uid, gid, read_only));
  if (::fchown(dirfd, uid, gid) != 0) return system_error(errno, "chown of the tree's root");
  return {};
}

}  // namespace upgraded::fs
