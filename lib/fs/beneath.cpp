#include "upgraded/fs/beneath.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <deque>
#include <string>
#include <string_view>
#include <vector>

#include "upgraded/fs/unique_fd.h"

namespace upgraded::fs {
namespace {

std::atomic<BeneathImpl> g_impl{BeneathImpl::kAuto};
std::atomic<bool> g_openat2_missing{false};

// The kernel's limit on links followed in one lookup (MAXSYMLINKS).
constexpr int kMaxLinks = 40;

int openat2_retrying(int dirfd, const char* path, const open_how& how) {
  long fd;
  int attempts = 0;
  do {
    fd = ::syscall(SYS_openat2, dirfd, path, &how, sizeof how);
  } while (fd < 0 && (errno == EINTR || errno == EAGAIN) && ++attempts <= 1000);
  return static_cast<int>(fd);
}

// Whether to try openat2 first; false once it is known missing or the walk is forced.
bool try_openat2() {
  auto impl = g_impl.load(std::memory_order_relaxed);
  if (impl == BeneathImpl::kWalk) return false;
  return impl == BeneathImpl::kOpenat2 || !g_openat2_missing.load(std::memory_order_relaxed);
}

// After openat2 failed: true if the walk should be tried instead (ENOSYS under kAuto).
bool fall_back(int err) {
  if (err != ENOSYS || g_impl.load(std::memory_order_relaxed) != BeneathImpl::kAuto) return false;
  g_openat2_missing.store(true, std::memory_order_relaxed);
  return true;
}

int fail(int err) {
  errno = err;
  return -1;
}

// Stands for "what was resolved so far must be a directory": a path (or a link's target) that
// ends in "/", "/." or "/.." says so. No component can be "/".
constexpr const char* kMustBeDirectory = "/";

// Splits a relative path into its components, dropping empty ones and ".", and ending with
// kMustBeDirectory where the path asks for a directory.
void split_into(std::string_view path, std::deque<std::string>& out, bool front) {
  std::vector<std::string> parts;
  std::string_view last;
  while (!path.empty()) {
    auto slash = path.find('/');
    auto part = path.substr(0, slash);
    if (!part.empty() && part != ".") parts.emplace_back(part);
    last = slash == std::string_view::npos ? part : std::string_view();
    if (slash == std::string_view::npos) break;
    path.remove_prefix(slash + 1);
  }
  if (last.empty() || last == "." || last == "..") parts.emplace_back(kMustBeDirectory);
  if (front)
    out.insert(out.begin(), parts.begin(), parts.end());
  else
    out.insert(out.end(), parts.begin(), parts.end());
}

// Is `name` in `dirfd` a symlink? (To tell ELOOP from ENOTDIR after an O_NOFOLLOW open.)
bool is_symlink(int dirfd, const std::string& name) {
  struct stat st {};
  return ::fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode);
}

// The descriptors of the directories walked through, below the starting one; ".." pops one.
class Walk {
 public:
  explicit Walk(int root) : m_root(root) {}
  int current() const { return m_dirs.empty() ? m_root : m_dirs.back().get(); }
  // ".." beneath the start: back one directory; above it: EXDEV.
  bool up() {
    if (m_dirs.empty()) return false;
    m_dirs.pop_back();
    return true;
  }
  void down(UniqueFd dir) { m_dirs.push_back(std::move(dir)); }
  // The directory reached, as a new descriptor opened with `flags`.
  int reopen(int flags) const { return ::openat(current(), ".", flags | O_CLOEXEC); }

 private:
  int m_root;
  std::vector<UniqueFd> m_dirs;
};

int walk_open(int dirfd, std::string_view path, int flags, unsigned mode) {
  if (path.empty()) return fail(ENOENT);
  if (path.size() >= PATH_MAX) return fail(ENAMETOOLONG);
  if (path.front() == '/') return fail(EXDEV);
  std::deque<std::string> parts;
  split_into(path, parts, false);
  // Creating something that must be a directory fails before anything is looked at, as in the
  // kernel: a final "." or ".." exists already (EEXIST with O_EXCL), a trailing "/" is EISDIR.
  if ((flags & O_CREAT) && parts.back() == kMustBeDirectory) {
    std::string_view last = path.substr(path.rfind('/') + 1);
    return fail((last == "." || last == "..") && (flags & O_EXCL) ? EEXIST : EISDIR);
  }
  Walk walk(dirfd);
  while (!parts.empty()) {
    std::string part = std::move(parts.front());
    parts.pop_front();
    if (part == kMustBeDirectory) continue;  // the components before it were opened as such
    if (part == "..") {
      if (!walk.up()) return fail(EXDEV);
      continue;
    }
    if (!parts.empty()) {
      // O_DIRECTORY | O_NOFOLLOW: a symlink is not followed and is not a directory (ENOTDIR).
      int fd =
          ::openat(walk.current(), part.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (fd < 0) {
        int err = errno;
        return fail(err == ENOTDIR && is_symlink(walk.current(), part) ? ELOOP : err);
      }
      walk.down(UniqueFd(fd));
      continue;
    }
    int fd = ::openat(walk.current(), part.c_str(), flags | O_NOFOLLOW | O_CLOEXEC, mode);
    if (fd < 0) {
      int err = errno;
      // O_NOFOLLOW gives ELOOP for a link, except with O_DIRECTORY (ENOTDIR) or O_CREAT|O_EXCL
      // (EEXIST, as openat2 says too).
      return fail(err == ENOTDIR && is_symlink(walk.current(), part) ? ELOOP : err);
    }
    if (flags & O_PATH) {
      // O_PATH | O_NOFOLLOW opens the link itself: refuse it, as openat2 does.
      struct stat st {};
      if (::fstat(fd, &st) != 0 || S_ISLNK(st.st_mode)) {
        int err = S_ISLNK(st.st_mode) ? ELOOP : errno;
        ::close(fd);
        return fail(err);
      }
    }
    return fd;
  }
  // Ended on a directory (".", "..", a trailing "/"): the directory reached.
  if (flags & O_CREAT) return fail(EISDIR);
  return walk.reopen(flags);
}

int walk_resolve(int dirfd, std::string_view path) {
  if (path.empty()) return fail(ENOENT);
  if (path.size() >= PATH_MAX) return fail(ENAMETOOLONG);
  if (path.front() == '/') return fail(EXDEV);
  std::deque<std::string> parts;
  split_into(path, parts, false);
  Walk walk(dirfd);
  int links = 0;
  while (!parts.empty()) {
    std::string part = std::move(parts.front());
    parts.pop_front();
    if (part == kMustBeDirectory) continue;  // the components before it were opened as such
    if (part == "..") {
      if (!walk.up()) return fail(EXDEV);
      continue;
    }
    UniqueFd fd(::openat(walk.current(), part.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
    if (!fd) return -1;
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) return -1;
    if (S_ISLNK(st.st_mode)) {
      // A magic link (/proc/self/exe, /proc/PID/fd/N) reads as text that is not where it leads
      // ("pipe:[123]"): never followed, as RESOLVE_NO_MAGICLINKS says.
      struct statfs fs {};
      if (::fstatfs(fd.get(), &fs) != 0) return -1;
      if (fs.f_type == PROC_SUPER_MAGIC) return fail(ELOOP);
      if (++links > kMaxLinks) return fail(ELOOP);
      // readlinkat on an O_PATH descriptor of the link itself, with an empty name.
      std::string target(PATH_MAX, '\0');
      ssize_t n = ::readlinkat(fd.get(), "", target.data(), target.size());
      if (n < 0) return -1;
      if (static_cast<std::size_t>(n) >= target.size()) return fail(ENAMETOOLONG);
      target.resize(static_cast<std::size_t>(n));
      if (target.empty()) return fail(ENOENT);
      // An absolute link leaves the tree, whatever it names (RESOLVE_BENEATH says EXDEV too).
      if (target.front() == '/') return fail(EXDEV);
      split_into(target, parts, true);
      continue;
    }
    if (parts.empty()) return fd.release();
    if (!S_ISDIR(st.st_mode)) return fail(ENOTDIR);
    walk.down(std::move(fd));
  }
  return walk.reopen(O_PATH);
}

}  // namespace

void set_beneath_impl(BeneathImpl impl) {
  g_impl.store(impl, std::memory_order_relaxed);
}

bool openat2_missing() {
  return g_openat2_missing.load(std::memory_order_relaxed);
}

int open_beneath_fd(int dirfd, const char* path, int flags, unsigned mode) {
  if (try_openat2()) {
    open_how how{};
    how.flags = static_cast<std::uint64_t>(flags | O_CLOEXEC);
    how.mode = (flags & (O_CREAT | O_TMPFILE)) ? mode : 0;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
    int fd = openat2_retrying(dirfd, path, how);
    if (fd >= 0 || !fall_back(errno)) return fd;
  }
  return walk_open(dirfd, path, flags, mode);
}

int resolve_beneath(int dirfd, const char* path) {
  if (try_openat2()) {
    open_how how{};
    how.flags = O_PATH | O_CLOEXEC;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
    int fd = openat2_retrying(dirfd, path, how);
    if (fd >= 0 || !fall_back(errno)) return fd;
  }
  return walk_resolve(dirfd, path);
}

}  // namespace upgraded::fs
