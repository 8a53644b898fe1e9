#include "upgraded/fs/durable.h"

#include "upgraded/crash_point.h"
#include "upgraded/fs/beneath.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <dirent.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <random>

namespace upgraded::fs {
namespace {

struct Fault {
  std::atomic<int> calls{0};
  std::atomic<int> fail_at{0};  // 0: never
  std::atomic<int> err{0};
};
Fault g_faults[3];

// Counts the call and returns the errno to fake, or 0 to make the real call.
int injected(FaultOp op) {
  Fault& f = g_faults[static_cast<int>(op)];
  int n = f.calls.fetch_add(1, std::memory_order_relaxed) + 1;
  int at = f.fail_at.load(std::memory_order_relaxed);
  return at != 0 && n == at ? f.err.load(std::memory_order_relaxed) : 0;
}

}  // namespace

void FaultInjection::arm(FaultOp op, int nth, int err) {
  disarm();
  Fault& f = g_faults[static_cast<int>(op)];
  f.err = err;
  f.fail_at = nth;
}

void FaultInjection::disarm() {
  for (auto& f : g_faults) {
    f.fail_at = 0;
    f.calls = 0;
  }
}

int FaultInjection::calls(FaultOp op) {
  return g_faults[static_cast<int>(op)].calls;
}

Result<void> rename_at(int from_dirfd, const std::string& from, int to_dirfd, const std::string& to,
                       unsigned flags) {
  int err = injected(FaultOp::kRename);
  if (err == 0 && ::renameat2(from_dirfd, from.c_str(), to_dirfd, to.c_str(), flags) != 0)
    err = errno;
  if (err != 0) return system_error(err, "renaming '" + from + "' to '" + to + "'");
  return {};
}

Result<void> sync_filesystem(int fd, std::string_view what) {
  int err = injected(FaultOp::kSync);
  if (err == 0 && ::syncfs(fd) != 0) err = errno;
  if (err != 0) return system_error(err, "syncing " + std::string(what));
  return {};
}

Result<UniqueFd> open_beneath(int dirfd, std::string_view path, int flags, unsigned mode) {
  std::string p(path);
  int fd = open_beneath_fd(dirfd, p.c_str(), flags, mode);
  if (fd < 0) return system_error(errno, "opening '" + p + "'");
  return UniqueFd(fd);
}

Result<void> make_directories(const std::string& path, mode_t mode) {
  for (std::size_t pos = 0; pos != std::string::npos;) {
    pos = path.find('/', pos + 1);
    std::string partial = path.substr(0, pos);
    if (partial.empty()) continue;
    if (::mkdir(partial.c_str(), mode) != 0 && errno != EEXIST)
      return system_error(errno, "creating " + partial);
  }
  return {};
}

Result<UniqueFd> open_directory(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return system_error(errno, "opening directory '" + path + "'");
  return UniqueFd(fd);
}

Result<void> sync_fd(int fd, std::string_view what) {
  int err = injected(FaultOp::kSync);
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  if (err != 0) return system_error(err, "syncing " + std::string(what));
  return {};
}

Result<void> write_all(int fd, std::span<const std::byte> data) {
  if (int err = injected(FaultOp::kWrite); err != 0) return system_error(err, "writing");
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return system_error(errno, "writing");
    }
    data = data.subspan(static_cast<std::size_t>(n));
  }
  return {};
}

Result<std::string> read_file(int dirfd, const std::string& path, std::uint64_t max_size) {
  // O_NONBLOCK: a FIFO in a file's place opens at once (and read_fd refuses it) instead of
  // blocking until a writer comes; a regular file ignores it.
  int fd = ::openat(dirfd, path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0) return system_error(errno, "opening '" + path + "'");
  UniqueFd owner(fd);
  struct stat st {};
  if (::fstat(fd, &st) != 0) return system_error(errno, "inspecting '" + path + "'");
  return read_fd(fd, st, path, max_size);
}

Result<std::string> read_fd(int fd, const struct stat& st, const std::string& path,
                            std::uint64_t max_size) {
  if (!S_ISREG(st.st_mode))
    return Error(ErrorCode::kInvalidArgument, "'" + path + "' is not a regular file");
  auto too_large = [&] {
    return Error(ErrorCode::kInvalidArgument,
                 "'" + path + "' is larger than " + std::to_string(max_size) + " bytes");
  };
  if (st.st_size > 0 && static_cast<std::uint64_t>(st.st_size) > max_size) return too_large();
  // Read straight into the string, sized as fstat() said (one allocation, no copy); a file
  // that reports no size (procfs) or grows is read on in steps.
  std::string out;
  std::size_t used = 0;
  out.resize(st.st_size > 0 ? static_cast<std::size_t>(st.st_size) : 4096);
  for (;;) {
    if (used == out.size()) {
      // As large as fstat() said: done, without a read() to see the end. (A file that grows
      // meanwhile is read as it was; files that change are replaced by a rename here.)
      if (st.st_size > 0 && used >= static_cast<std::uint64_t>(st.st_size)) break;
      out.resize(std::min<std::uint64_t>(out.size() * 2, max_size + 1));
    }
    // pread: from the start, whatever the descriptor's offset (one shared with others, as the
    // daemon's listing is, may be anywhere).
    ssize_t n = ::pread(fd, out.data() + used, out.size() - used, static_cast<off_t>(used));
    if (n < 0) {
      if (errno == EINTR) continue;
      return system_error(errno, "reading '" + path + "'");
    }
    if (n == 0) break;
    used += static_cast<std::size_t>(n);
    if (used > max_size) return too_large();
  }
  out.resize(used);
  return out;
}

Result<void> write_file_atomic(int dirfd, const std::string& name, std::string_view data,
                               unsigned mode, bool replace, bool sync_dir) {
  auto [parent, base] = split_parent(name);
  std::random_device rd;
  std::string tmp =
      (parent == "." ? "" : parent + "/") + "." + base + ".tmp." + std::to_string(rd() & 0xffffffu);
  int fd = ::openat(dirfd, tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return system_error(errno, "creating '" + tmp + "'");
  UniqueFd owner(fd);
  auto fail = [&](Error e) -> Result<void> {
    ::unlinkat(dirfd, tmp.c_str(), 0);
    return e;
  };
  if (auto r = write_all(fd, std::as_bytes(std::span(data.data(), data.size()))); !r)
    return fail(r.error().with_context("writing '" + tmp + "'"));
  if (::fchmod(fd, mode) != 0) return fail(system_error(errno, "setting mode of '" + tmp + "'"));
  if (auto r = sync_fd(fd, "'" + tmp + "'"); !r) return fail(r.error());
  owner.reset();
  crash_point("write_file_atomic.before_rename");
  if (auto r = rename_at(dirfd, tmp, dirfd, name, replace ? 0 : RENAME_NOREPLACE); !r)
    return fail(r.error());
  if (!sync_dir) return {};
  int pfd = ::openat(dirfd, parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (pfd < 0) return system_error(errno, "opening '" + parent + "'");
  UniqueFd pown(pfd);
  return sync_fd(pfd, "directory of '" + name + "'");
}

Result<std::vector<std::string>> list_names(int dirfd, const std::string& path) {
  int fd = ::openat(dirfd, path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return system_error(errno, "opening directory '" + path + "'");
  DIR* d = ::fdopendir(fd);
  if (!d) {
    ::close(fd);
    return system_error(errno, "listing '" + path + "'");
  }
  std::vector<std::string> out;
  errno = 0;
  while (dirent* de = ::readdir(d))
    if (std::strcmp(de->d_name, ".") != 0 && std::strcmp(de->d_name, "..") != 0)
      out.emplace_back(de->d_name);
  int err = errno;
  ::closedir(d);
  if (err != 0) return system_error(err, "listing '" + path + "'");
  std::sort(out.begin(), out.end());
  return out;
}

std::pair<std::string, std::string> split_parent(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return {".", path};
  if (slash == 0) return {"/", path.substr(1)};
  return {path.substr(0, slash), path.substr(slash + 1)};
}

}  // namespace upgraded::fs
