#include "upgraded/fs/remove_tree.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "upgraded/fs/unique_fd.h"

namespace upgraded::fs {
namespace {

Result<void> remove_contents(int dfd, const std::string& where) {
  int dup = ::fcntl(dfd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) return system_error(errno, "duplicating fd for '" + where + "'");
  DIR* dir = ::fdopendir(dup);
  if (!dir) {
    ::close(dup);
    return system_error(errno, "listing '" + where + "'");
  }
  std::vector<std::pair<std::string, bool>> entries;
  errno = 0;
  while (dirent* de = ::readdir(dir)) {
    if (!std::strcmp(de->d_name, ".") || !std::strcmp(de->d_name, "..")) continue;
    bool is_dir = de->d_type == DT_DIR;
    if (de->d_type == DT_UNKNOWN) {
      struct stat st {};
      if (::fstatat(dfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0) is_dir = S_ISDIR(st.st_mode);
    }
    entries.emplace_back(de->d_name, is_dir);
  }
  int read_errno = errno;
  ::closedir(dir);
  if (read_errno != 0) return system_error(read_errno, "listing '" + where + "'");
  for (const auto& [name, is_dir] : entries) {
    std::string path = where + "/" + name;
    if (is_dir) {
      int cfd = ::openat(dfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (cfd < 0) return system_error(errno, "opening '" + path + "'");
      UniqueFd child(cfd);
      ::fchmod(cfd, 0700);  // a read-only release tree must become deletable
      UPGRADED_TRY(remove_contents(cfd, path));
      if (::unlinkat(dfd, name.c_str(), AT_REMOVEDIR) != 0 && errno != ENOENT)
        return system_error(errno, "removing '" + path + "'");
    } else if (::unlinkat(dfd, name.c_str(), 0) != 0 && errno != ENOENT) {
      return system_error(errno, "removing '" + path + "'");
    }
  }
  return {};
}

}  // namespace

Result<void> remove_tree(int dirfd, const std::string& name) {
  struct stat st {};
  if (::fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
    if (errno == ENOENT) return {};
    return system_error(errno, "inspecting '" + name + "'");
  }
  if (!S_ISDIR(st.st_mode)) {
    if (::unlinkat(dirfd, name.c_str(), 0) != 0 && errno != ENOENT)
      return system_error(errno, "removing '" + name + "'");
    return {};
  }
  int fd = ::openat(dirfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return system_error(errno, "opening '" + name + "'");
  UniqueFd owner(fd);
  ::fchmod(fd, 0700);
  UPGRADED_TRY(remove_contents(fd, name));
  owner.reset();
  if (::unlinkat(dirfd, name.c_str(), AT_REMOVEDIR) != 0 && errno != ENOENT)
    return system_error(errno, "removing '" + name + "'");
  return {};
}

}  // namespace upgraded::fs
