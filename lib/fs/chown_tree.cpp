#include "upgraded/fs/chown_tree.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "upgraded/fs/unique_fd.h"
#include "upgraded/policy/names.h"

namespace upgraded::fs {
namespace {

Result<void> check_owner(const struct stat& st, uid_t from_uid, const std::string& path) {
  if (st.st_uid != from_uid)
    return Error(ErrorCode::kPolicyRefused, policy::quote(path) + " is owned by uid " +
                                                std::to_string(st.st_uid) +
                                                ", not by the extraction helper");
  return {};
}

Result<void> chown_contents(int dfd, const std::string& where, uid_t from_uid, uid_t uid,
                            gid_t gid) {
  int dup = ::fcntl(dfd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) return system_error(errno, "duplicating fd for '" + where + "'");
  DIR* dir = ::fdopendir(dup);
  if (!dir) {
    ::close(dup);
    return system_error(errno, "listing '" + where + "'");
  }
  std::vector<std::string> names;
  errno = 0;
  while (dirent* de = ::readdir(dir)) {
    if (!std::strcmp(de->d_name, ".") || !std::strcmp(de->d_name, "..")) continue;
    names.emplace_back(de->d_name);
  }
  int read_errno = errno;
  ::closedir(dir);
  if (read_errno != 0) return system_error(read_errno, "listing '" + where + "'");
  for (const auto& name : names) {
    std::string path = where + "/" + name;
    struct stat st {};
    if (::fstatat(dfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0)
      return system_error(errno, "inspecting " + policy::quote(path));
    UPGRADED_TRY(check_owner(st, from_uid, path));
    if (S_ISDIR(st.st_mode)) {
      int cfd = ::openat(dfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (cfd < 0) return system_error(errno, "opening " + policy::quote(path));
      UniqueFd child(cfd);
      UPGRADED_TRY(chown_contents(cfd, path, from_uid, uid, gid));
      if (::fchown(cfd, uid, gid) != 0) return system_error(errno, "chown " + policy::quote(path));
    } else if (::fchownat(dfd, name.c_str(), uid, gid, AT_SYMLINK_NOFOLLOW) != 0) {
      return system_error(errno, "chown " + policy::quote(path));
    }
  }
  return {};
}

}  // namespace

Result<void> chown_tree(int dirfd, uid_t from_uid, uid_t uid, gid_t gid) {
  struct stat st {};
  if (::fstat(dirfd, &st) != 0) return system_error(errno, "inspecting the tree's root");
  UPGRADED_TRY(check_owner(st, from_uid, "."));
  UPGRADED_TRY(chown_contents(dirfd, ".", from_uid, uid, gid));
  if (::fchown(dirfd, uid, gid) != 0) return system_error(errno, "chown of the tree's root");
  return {};
}

}  // namespace upgraded::fs
