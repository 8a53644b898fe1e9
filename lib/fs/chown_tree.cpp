#include "upgraded/fs/chown_tree.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "upgraded/fs/unique_fd.h"
#include "upgraded/policy/names.h"

namespace upgraded::fs {
namespace {

// Non-directories with several names, by (device, inode): how many links they have, and how
// many of their names the walk has met. All of them must be in the tree.
struct Links {
  std::uint64_t nlink = 0;
  std::uint64_t seen = 0;
  std::string first;  // the first of its names in the tree's order, for messages
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

struct Entry {
  std::string name;
  unsigned char type;  // d_type: DT_DIR, DT_REG, ... or DT_UNKNOWN
};

// A directory's entries, without "." and "..", sorted bytewise.
Result<std::vector<Entry>> list_entries(int dirfd, const std::string& path) {
  int fd = ::openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return system_error(errno, "listing " + policy::quote(path));
  DIR* d = ::fdopendir(fd);
  if (!d) {
    int e = errno;
    ::close(fd);
    return system_error(e, "listing " + policy::quote(path));
  }
  std::vector<Entry> out;
  errno = 0;
  while (dirent* de = ::readdir(d))
    if (std::strcmp(de->d_name, ".") != 0 && std::strcmp(de->d_name, "..") != 0)
      out.push_back({de->d_name, de->d_type});
  int e = errno;
  ::closedir(d);
  if (e != 0) return system_error(e, "listing " + policy::quote(path));
  std::sort(out.begin(), out.end(), [](const Entry& a, const Entry& b) { return a.name < b.name; });
  return out;
}

// A directory waiting to be visited: opened from its parent's descriptor (kept open while any of
// its children waits) by name, with O_NOFOLLOW, so the walk never leaves the tree and no path
// grows beyond a name: trees deeper than PATH_MAX are walked like any other.
struct Pending {
  std::shared_ptr<UniqueFd> parent;
  std::string name;
  std::string path;  // "./a/b", for messages
};

// What a walk does in one directory (`fd`, at `path`): appends the subdirectories to visit to
// `subdirs`, in the order they should be visited.
using VisitDir = std::function<Result<void>(int fd, const std::string& path,
                                            std::vector<std::pair<std::string, std::string>>&)>;

// Every directory of the tree under `root`, each visited once, by `threads` threads (at least
// one: the caller's). A stack, so that the open descriptors are those of the directories on
// the threads' current paths, not of the whole tree's frontier. The first failure stops the
// walk; a thread that cannot be started, or an exception from a visit, is handled, never
// left to std::terminate.
Result<void> walk_tree(int root, unsigned threads, const VisitDir& visit) {
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<Pending> stack;
  unsigned busy = 0;
  std::optional<Error> error;
  auto fail = [&](Error e) {
    if (!error) error = std::move(e);
  };
  {
    UniqueFd fd(::fcntl(root, F_DUPFD_CLOEXEC, 3));
    if (fd.get() < 0) return system_error(errno, "opening the tree's root");
    stack.push_back({std::make_shared<UniqueFd>(std::move(fd)), "", "."});
  }
  auto work = [&] {
    for (;;) {
      Pending next;
      {
        std::unique_lock lock(mutex);
        cv.wait(lock, [&] { return error || !stack.empty() || busy == 0; });
        if (error || stack.empty()) return;
        next = std::move(stack.back());
        stack.pop_back();
        ++busy;
      }
      std::optional<Error> failed;
      std::vector<std::pair<std::string, std::string>> subdirs;
      std::shared_ptr<UniqueFd> self;
      try {
        if (next.name.empty()) {
          self = std::move(next.parent);  // the root
        } else {
          int fd = ::openat(next.parent->get(), next.name.c_str(),
                            O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
          if (fd < 0) {
            int e = errno;
            failed = system_error(e, "opening " + policy::quote(next.path));
          } else {
            self = std::make_shared<UniqueFd>(fd);
          }
          next.parent.reset();
        }
        if (!failed)
          if (auto r = visit(self->get(), next.path, subdirs); !r) failed = r.error();
      } catch (const std::exception& e) {
        failed = Error(ErrorCode::kFailed, std::string("walking the tree: ") + e.what());
      } catch (...) {
        failed = Error(ErrorCode::kFailed, "walking the tree: an unknown exception");
      }
      std::lock_guard lock(mutex);
      --busy;
      if (failed) {
        fail(std::move(*failed));
      } else {
        try {
          // Reversed, so that the stack gives them back in the visit's order.
          for (auto it = subdirs.rbegin(); it != subdirs.rend(); ++it)
            stack.push_back({self, std::move(it->first), std::move(it->second)});
        } catch (const std::exception& e) {
          fail(Error(ErrorCode::kFailed, std::string("walking the tree: ") + e.what()));
        } catch (...) {
          fail(Error(ErrorCode::kFailed, "walking the tree: an unknown exception"));
        }
      }
      cv.notify_all();
    }
  };
  std::vector<std::thread> helpers;
  helpers.reserve(threads);
  for (unsigned i = 1; i < threads; ++i) {
    try {
      helpers.emplace_back(work);
    } catch (const std::exception&) {
      break;  // fewer threads (a tasks limit): the walk is the same, only slower
    }
  }
  work();
  for (auto& t : helpers)
    t.join();
  if (error) return *error;
  return {};
}

unsigned default_threads() {
  return std::clamp(std::thread::hardware_concurrency(), 1u, 4u);
}

// The check: every entry stat'ed once and checked, every multiply linked one counted.
// Nothing is changed. `entries`: how many there are below the root.
Result<void> check_contents(int root, uid_t owner, bool read_only, unsigned threads,
                            const TreeLimits& limits, std::uint64_t& entries_seen) {
  std::mutex links_mutex;
  LinkMap links;
  std::atomic<std::uint64_t> count{0};
  auto r =
      walk_tree(root, threads,
                [&](int fd, const std::string& path,
                    std::vector<std::pair<std::string, std::string>>& subdirs) -> Result<void> {
                  auto entries = list_entries(fd, path);
                  if (!entries) return entries.error();
                  count += entries->size();
                  // `path` is "." or "./a/b": its entries are one level deeper.
                  const std::size_t depth =
                      static_cast<std::size_t>(std::count(path.begin(), path.end(), '/')) + 1;
                  if (!entries->empty() && depth > limits.max_depth)
                    return Error(ErrorCode::kPolicyRefused,
                                 policy::quote(path + "/" + entries->front().name) +
                                     " is nested deeper than " + std::to_string(limits.max_depth) +
                                     " levels");
                  for (const auto& e : *entries) {
                    std::string child = path + "/" + e.name;
                    if (child.size() - 2 > limits.max_path_length)
                      return Error(ErrorCode::kPolicyRefused,
                                   policy::quote(child) + " is longer than " +
                                       std::to_string(limits.max_path_length) + " bytes");
                    struct stat st {};
                    if (::fstatat(fd, e.name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
                      int err = errno;
                      return system_error(err, "inspecting " + policy::quote(child));
                    }
                    UPGRADED_TRY(check_entry(st, owner, read_only, child));
                    if (S_ISDIR(st.st_mode)) {
                      subdirs.emplace_back(e.name, std::move(child));
                    } else if (st.st_nlink > 1) {
                      std::lock_guard lock(links_mutex);
                      auto [it, first] =
                          links.try_emplace({st.st_dev, st.st_ino}, Links{st.st_nlink, 0, child});
                      ++it->second.seen;
                      if (!first && child < it->second.first) it->second.first = child;
                    }
                  }
                  return {};
                });
  if (!r) {
    // Several threads: whichever bad entry one met first. Refusals are rare; the same walk by
    // one thread names the first bad entry in the tree's order, the same one every time.
    if (threads > 1) return check_contents(root, owner, read_only, 1, limits, entries_seen);
    return r;
  }
  entries_seen = count;
  // Every name of a multiply linked file or symlink must lie in the tree: a name elsewhere
  // would be a file of the new owner at a place nobody chose.
  for (const auto& [id, l] : links)
    if (l.seen != l.nlink)
      return Error(ErrorCode::kPolicyRefused, policy::quote(l.first) + " has " +
                                                  std::to_string(l.nlink) + " links, " +
                                                  std::to_string(l.seen) + " of them in the tree");
  return {};
}

// The hand-over, over a tree the check accepted: one fchownat per entry, symlinks themselves and
// never their targets. The entries' types come from the listing (d_type, else one fstatat):
// the builder is gone (each extraction runs under a uid of its own and its helper cannot fork),
// so the tree is the one just checked.
Result<void> chown_contents(int root, uid_t uid, gid_t gid, unsigned threads,
                            std::uint64_t& entries_seen) {
  std::atomic<std::uint64_t> count{0};
  auto r = walk_tree(
      root, threads,
      [&](int fd, const std::string& path,
          std::vector<std::pair<std::string, std::string>>& subdirs) -> Result<void> {
        auto entries = list_entries(fd, path);
        if (!entries) return entries.error();
        count += entries->size();
        for (const auto& e : *entries) {
          bool dir = e.type == DT_DIR;
          if (e.type == DT_UNKNOWN) {
            struct stat st {};
            if (::fstatat(fd, e.name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
              int err = errno;
              return system_error(err, "inspecting " + policy::quote(path + "/" + e.name));
            }
            dir = S_ISDIR(st.st_mode);
          }
          if (::fchownat(fd, e.name.c_str(), uid, gid, AT_SYMLINK_NOFOLLOW) != 0) {
            int err = errno;
            return system_error(err, "chown " + policy::quote(path + "/" + e.name));
          }
          if (dir) subdirs.emplace_back(e.name, path + "/" + e.name);
        }
        return {};
      });
  entries_seen = count;
  return r;
}

}  // namespace

namespace {

Result<void> check_root_and_contents(int dirfd, uid_t owner, bool read_only, unsigned threads,
                                     const TreeLimits& limits, std::uint64_t& entries) {
  struct stat st {};
  if (::fstat(dirfd, &st) != 0) return system_error(errno, "inspecting the tree's root");
  UPGRADED_TRY(check_entry(st, owner, read_only, "."));
  return check_contents(dirfd, owner, read_only, threads ? threads : default_threads(), limits,
                        entries);
}

}  // namespace

Result<void> check_tree(int dirfd, uid_t owner, bool read_only, unsigned threads,
                        const TreeLimits& limits) {
  std::uint64_t entries = 0;
  return check_root_and_contents(dirfd, owner, read_only, threads, limits, entries);
}

Result<void> chown_tree(int dirfd, uid_t from_uid, uid_t uid, gid_t gid, bool read_only,
                        unsigned threads, const TreeLimits& limits) {
  if (threads == 0) threads = default_threads();
  // Check everything first: a refused tree keeps its builder's uid throughout.
  std::uint64_t checked = 0, handed = 0;
  UPGRADED_TRY(check_root_and_contents(dirfd, from_uid, read_only, threads, limits, checked));
  UPGRADED_TRY(chown_contents(dirfd, uid, gid, threads, handed));
  // The builder is gone, so the tree cannot have changed; if it did, what was handed over is
  // not what was checked.
  if (handed != checked)
    return Error(ErrorCode::kFailed,
                 "the tree changed while it was handed over: " + std::to_string(checked) +
                     " entries checked, " + std::to_string(handed) + " handed over");
  if (::fchown(dirfd, uid, gid) != 0) return system_error(errno, "chown of the tree's root");
  return {};
}

}  // namespace upgraded::fs
