#include "upgraded/artifact/extractor.h"

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <vector>

#include "upgraded/fs/beneath.h"
#include "upgraded/fs/durable.h"
#include "upgraded/policy/names.h"

namespace upgraded::artifact {
namespace {

enum class Kind { kFile, kDir, kImplicitDir, kSymlink };

constexpr std::uint64_t kRatioSlack = 1 << 20;  // small payloads may expand beyond the ratio
// Sticky too: the daemon's hand-over refuses it (fs/chown_tree.h), so a release with it never
// installs through the daemon; kept here, it installed offline and was refused there, less
// clearly. (In a release, read-only, it would mean nothing anyway.)
constexpr std::uint64_t kUnsafeBits = S_ISUID | S_ISGID | S_ISVTX | S_IWOTH;

Error refuse(const std::string& why) {
  return Error(ErrorCode::kPolicyRefused, why);
}

// The process umask, read without changing it (umask(2) can only be read by setting it, which
// would race with other threads creating files). All bits set when it cannot be read (a process
// confined away from /proc), so that every file gets an explicit fchmod.
mode_t read_umask() {
  auto status = fs::read_file(AT_FDCWD, "/proc/self/status", 1 << 16);
  if (!status) return 07777;
  auto pos = status->find("\nUmask:\t");
  if (pos == std::string::npos) return 07777;
  return static_cast<mode_t>(std::strtoul(status->c_str() + pos + 8, nullptr, 8));
}

// What the umask takes from the modes of the files created beneath `root`: all bits where
// `root` has a default ACL (acl(5): it then takes the umask's place, and goes down to every
// directory created beneath), or where that cannot be told; the umask otherwise.
mode_t creation_mask(int root, std::optional<mode_t> umask) {
  if (::fgetxattr(root, "system.posix_acl_default", nullptr, 0) >= 0) return 07777;
  if (errno != ENODATA && errno != EOPNOTSUPP) return 07777;
  return umask ? *umask : read_umask();
}

// Creates small files on background threads. File creation is almost all kernel time
// (inode allocation in the open, write, close); two threads on two cores overlap it, which is
// what lets one verified pass beat tar for trees of many small files. The main thread keeps
// every decision (names, duplicates, directories, limits); workers only write what they are
// given, beneath the root fd, with the same confinement (fs/beneath.h).
struct FileJob {
  std::string path;
  std::unique_ptr<char[]> data;  // `size` bytes, read from the archive (not zeroed first)
  std::size_t size;
  mode_t mode;
  bool needs_chmod;
  timespec mtime;
};

class WriterPool {
 public:
  static constexpr std::size_t kMaxFileSize = 1 << 20;
  static constexpr std::size_t kMaxQueuedBytes = 8 << 20;
  static constexpr std::size_t kMaxQueuedJobs = 256;

  explicit WriterPool(int root) : m_root(root) {
    unsigned n = std::clamp(std::thread::hardware_concurrency(), 1u, 4u);
    // Fewer threads (or none: submit() then writes inline) if the system cannot make more.
    try {
      for (unsigned i = 0; i < n; ++i)
        m_threads.emplace_back([this] { work(); });
    } catch (const std::system_error&) {
    }
  }

  ~WriterPool() {
    {
      std::lock_guard lock(m_mutex);
      m_stop = true;
    }
    m_work.notify_all();
    m_space.notify_all();
    for (auto& t : m_threads)
      t.join();
  }

  // Queues a file; blocks while the queue is full. Returns the first error any worker hit.
  Result<void> submit(FileJob job) {
    if (m_threads.empty()) return write_file(job);
    std::unique_lock lock(m_mutex);
    m_space.wait(lock, [&] {
      return m_error || (m_jobs.size() < kMaxQueuedJobs && m_bytes + job.size <= kMaxQueuedBytes);
    });
    if (m_error) return *m_error;
    m_bytes += job.size;
    m_jobs.push_back(std::move(job));
    m_work.notify_one();
    return {};
  }

  // Waits until every queued file is written.
  Result<void> drain() {
    std::unique_lock lock(m_mutex);
    m_idle.wait(lock, [&] { return m_error || (m_jobs.empty() && m_busy == 0); });
    if (m_error) return *m_error;
    return {};
  }

 private:
  void work() {
    for (;;) {
      FileJob job;
      {
        std::unique_lock lock(m_mutex);
        m_work.wait(lock, [&] { return m_stop || (!m_jobs.empty() && !m_error); });
        if (m_stop || m_error) return;
        job = std::move(m_jobs.front());
        m_jobs.pop_front();
        m_bytes -= job.size;
        ++m_busy;
      }
      m_space.notify_one();
      auto r = write_file(job);
      {
        std::lock_guard lock(m_mutex);
        --m_busy;
        if (!r && !m_error) m_error = r.error();
      }
      m_idle.notify_all();
      if (!r) m_space.notify_all();
    }
  }

  Result<void> write_file(const FileJob& job) {
    auto fd = fs::open_beneath(m_root, job.path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW,
                               job.needs_chmod ? 0600 : job.mode);
    if (!fd) return fd.error().with_context("extracting");
    if (auto w = fs::write_all(fd->get(), std::as_bytes(std::span(job.data.get(), job.size))); !w)
      return w.error().with_context("extracting " + policy::quote(job.path));
    if (job.needs_chmod && ::fchmod(fd->get(), job.mode) != 0)
      return system_error(errno, "setting mode of " + policy::quote(job.path));
    timespec times[2] = {{0, UTIME_OMIT}, job.mtime};
    if (::futimens(fd->get(), times) != 0)
      return system_error(errno, "setting mtime of " + policy::quote(job.path));
    return {};
  }

  int m_root;
  std::mutex m_mutex;
  std::condition_variable m_work, m_space, m_idle;
  std::deque<FileJob> m_jobs;
  std::size_t m_bytes = 0;
  std::size_t m_busy = 0;
  bool m_stop = false;
  std::optional<Error> m_error;
  std::vector<std::thread> m_threads;
};

struct DirMeta {
  std::string path;
  mode_t mode;
  timespec mtime;
};

class Extractor {
 public:
  Extractor(PayloadSource& source, Compression compression, std::uint64_t payload_size, int root,
            const ExtractPolicy& policy, std::optional<mode_t> umask)
      : m_source(source),
        m_compression(compression),
        m_payload_size(payload_size),
        m_root(root),
        m_policy(policy),
        m_umask(creation_mask(root, umask)) {}

  ~Extractor() {
    if (m_archive) archive_read_free(m_archive);
  }

  Result<ExtractStats> run();

 private:
  static la_ssize_t read_cb(archive* a, void* ud, const void** out);
  Error archive_failure(const std::string& doing);
  Result<void> entry(archive_entry* e);
  Result<std::string> normalize(const char* raw, const char* what);
  Result<mode_t> sanitize_mode(const std::string& path, mode_t mode);
  Result<void> ensure_parent(const std::string& path);
  Result<UniqueFd> open_parent(const std::string& path);
  Result<void> make_file(const std::string& path, archive_entry* e);
  Result<void> make_dir(const std::string& path, archive_entry* e);
  Result<void> make_symlink(const std::string& path, archive_entry* e);
  Result<void> make_hardlink(const std::string& path, archive_entry* e);
  Result<void> reserve_space(std::uint64_t bytes);
  Result<void> check_symlinks();
  Result<void> apply_dir_metadata();

  PayloadSource& m_source;
  Compression m_compression;
  std::uint64_t m_payload_size;
  int m_root;
  const ExtractPolicy& m_policy;
  archive* m_archive = nullptr;
  std::optional<Error> m_source_error;
  bool m_source_done = false;

  std::unordered_map<std::string, Kind> m_seen;
  std::vector<DirMeta> m_dirs;
  std::vector<std::string> m_symlinks;
  std::optional<DirMeta> m_root_meta;
  ExtractStats m_stats;
  std::uint64_t m_declared_total = 0;
  std::uint64_t m_space_budget = 0;  // bytes we may still write before re-checking statvfs
  std::uint64_t m_inode_budget = 0;  // entries we may still create before re-checking
  std::uint64_t m_path_bytes = 0;
  mode_t m_umask;             // per extraction: the process may change it (creation_mask)
  WriterPool m_pool{m_root};  // last member: its threads stop before anything else goes
};

la_ssize_t Extractor::read_cb(archive* a, void* ud, const void** out) {
  auto* self = static_cast<Extractor*>(ud);
  auto piece = self->m_source.next();
  if (!piece) {
    self->m_source_error = piece.error();
    archive_set_error(a, EIO, "payload source failed");
    return -1;
  }
  if (piece->empty()) self->m_source_done = true;
  *out = piece->data();
  return static_cast<la_ssize_t>(piece->size());
}

Error Extractor::archive_failure(const std::string& doing) {
  if (m_source_error) return *m_source_error;
  const char* msg = archive_error_string(m_archive);
  return refuse("payload is not a valid tar archive (" + doing + ": " +
                (msg ? msg : "unknown libarchive error") + ")");
}

Result<std::string> Extractor::normalize(const char* raw, const char* what) {
  if (!raw) return refuse(std::string(what) + " cannot be represented");
  std::string_view p(raw);
  // "./x" and "x/" are the usual spellings tar produces; nothing else is rewritten.
  while (p.starts_with("./"))
    p.remove_prefix(2);
  if (p == ".") p = {};
  while (p.size() > 1 && p.ends_with('/'))
    p.remove_suffix(1);
  std::string out(p);
  if (out.empty()) return out;  // the root itself
  if (auto r = policy::validate_relative_path(out, m_policy.limits.max_path_length); !r)
    return refuse(std::string(what) + ": " + r.error().message());
  // The extractor remembers every name (duplicates, directory modes): bound that memory.
  m_path_bytes += out.size();
  if (m_path_bytes > m_policy.limits.max_path_bytes)
    return refuse("entry names take more than " + std::to_string(m_policy.limits.max_path_bytes) +
                  " bytes in all");
  if (static_cast<std::size_t>(std::count(out.begin(), out.end(), '/')) + 1 >
      m_policy.limits.max_depth)
    return refuse(std::string(what) + " " + policy::quote(out) + " is nested deeper than " +
                  std::to_string(m_policy.limits.max_depth) + " levels");
  return out;
}

Result<mode_t> Extractor::sanitize_mode(const std::string& path, mode_t mode) {
  mode &= 07777;
  if (mode & kUnsafeBits) {
    if (m_policy.unsafe_modes == UnsafeModes::kRefuse) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "%04o", static_cast<unsigned>(mode));
      return refuse("entry " + policy::quote(path.empty() ? "." : path) + " has mode " + buf +
                    " (setuid, setgid, sticky or world-writable)");
    }
    mode &= ~kUnsafeBits;
  }
  if (m_policy.read_only) mode &= ~static_cast<mode_t>(0222);
  return mode;
}

Result<UniqueFd> Extractor::open_parent(const std::string& path) {
  auto [parent, base] = fs::split_parent(path);
  return fs::open_beneath(m_root, parent, O_PATH | O_DIRECTORY);
}

Result<void> Extractor::ensure_parent(const std::string& path) {
  auto [parent, base] = fs::split_parent(path);
  if (parent == ".") return {};
  auto it = m_seen.find(parent);
  if (it != m_seen.end()) {
    if (it->second == Kind::kDir || it->second == Kind::kImplicitDir) return {};
    return refuse("entry " + policy::quote(path) + " lies beneath " + policy::quote(parent) +
                  ", which is not a directory");
  }
  UPGRADED_TRY(ensure_parent(parent));
  UPGRADED_TRY(reserve_space(0));
  auto pfd = open_parent(parent);
  if (!pfd) return pfd.error();
  auto [pp, pbase] = fs::split_parent(parent);
  if (::mkdirat(pfd->get(), pbase.c_str(), 0700) != 0)
    return system_error(errno, "creating directory " + policy::quote(parent));
  m_seen.emplace(parent, Kind::kImplicitDir);
  return {};
}

Result<void> Extractor::reserve_space(std::uint64_t bytes) {
  // Every entry costs an inode and at least a block: rounded up to whole blocks plus one for
  // metadata, so that many small files, directories or symlinks are not undercounted.
  std::uint64_t need = (bytes + 4095) / 4096 * 4096 + 4096;
  if (need <= m_space_budget && m_inode_budget > 0) {
    m_space_budget -= need;
    --m_inode_budget;
    return {};
  }
  struct statvfs vfs {};
  if (::fstatvfs(m_root, &vfs) != 0) return system_error(errno, "checking free space");
  std::uint64_t avail = static_cast<std::uint64_t>(vfs.f_bavail) * vfs.f_frsize;
  std::uint64_t reserve = m_policy.limits.free_space_reserve;
  if (avail < reserve + need)
    return Error(ErrorCode::kNoSpace, "not enough free space: " + std::to_string(need) +
                                          " more bytes needed, " + std::to_string(avail) +
                                          " available, " + std::to_string(reserve) +
                                          " must stay free");
  // Filesystems without an inode limit (btrfs, tmpfs with nr_inodes=0) report 0 files.
  std::uint64_t inodes = vfs.f_files == 0 ? UINT64_MAX : vfs.f_favail;
  std::uint64_t inode_reserve = m_policy.limits.free_inode_reserve;
  if (inodes <= inode_reserve)
    return Error(ErrorCode::kNoSpace, "not enough free inodes: " + std::to_string(inodes) +
                                          " available, " + std::to_string(inode_reserve) +
                                          " must stay free");
  // Re-check after at most 64 MiB, 4096 entries, or a quarter of what is left.
  m_space_budget = std::min<std::uint64_t>((avail - reserve - need) / 4, 64ULL << 20);
  m_inode_budget = std::min<std::uint64_t>((inodes - inode_reserve - 1) / 4, 4096);
  return {};
}

Result<void> Extractor::make_file(const std::string& path, archive_entry* e) {
  if (!archive_entry_size_is_set(e) || archive_entry_size(e) < 0)
    return refuse("entry " + policy::quote(path) + " has no size");
  auto size = static_cast<std::uint64_t>(archive_entry_size(e));
  const auto& lim = m_policy.limits;
  if (size > lim.max_file_size)
    return refuse("entry " + policy::quote(path) + " is " + std::to_string(size) +
                  " bytes, the limit is " + std::to_string(lim.max_file_size));
  m_declared_total += size;
  if (m_declared_total > lim.max_total_bytes)
    return refuse("payload holds more than " + std::to_string(lim.max_total_bytes) + " bytes");
  std::uint64_t expanded = static_cast<std::uint64_t>(archive_filter_bytes(m_archive, 0));
  std::uint64_t allowed = m_payload_size * lim.max_expansion_ratio + kRatioSlack;
  if (expanded + size > allowed)
    return refuse("entry " + policy::quote(path) + " (" + std::to_string(size) +
                  " bytes) exceeds the expansion limit: a " + std::to_string(m_payload_size) +
                  "-byte payload may expand to at most " + std::to_string(allowed) + " bytes");
  auto mode = sanitize_mode(path, archive_entry_perm(e));
  if (!mode) return mode.error();
  UPGRADED_TRY(reserve_space(size));

  // Created with its final mode when the umask leaves it intact (saves an fchmod per file,
  // ~5% for many small files); the partial tree is private (0700) until it is complete.
  bool needs_chmod = (*mode & m_umask) != 0;
  timespec mtime{archive_entry_mtime(e), archive_entry_mtime_nsec(e)};
  if (size <= WriterPool::kMaxFileSize && archive_entry_sparse_count(e) == 0) {
    FileJob job{path, std::make_unique_for_overwrite<char[]>(size), size, *mode, needs_chmod,
                mtime};
    std::size_t got = 0;
    while (got < size) {
      la_ssize_t n = archive_read_data(m_archive, job.data.get() + got, size - got);
      if (n < 0) return archive_failure("reading " + policy::quote(path));
      if (n == 0) return refuse("entry " + policy::quote(path) + " is truncated");
      got += static_cast<std::size_t>(n);
    }
    m_seen.emplace(path, Kind::kFile);
    m_stats.bytes += size;
    ++m_stats.files;
    return m_pool.submit(std::move(job));
  }
  auto fd = fs::open_beneath(m_root, path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW,
                             needs_chmod ? 0600 : *mode);
  if (!fd) return fd.error().with_context("extracting");
  m_seen.emplace(path, Kind::kFile);
  std::uint64_t pos = 0;
  for (;;) {
    const void* buf = nullptr;
    std::size_t len = 0;
    la_int64_t offset = 0;
    int r = archive_read_data_block(m_archive, &buf, &len, &offset);
    if (r == ARCHIVE_EOF) break;
    if (r != ARCHIVE_OK) return archive_failure("reading " + policy::quote(path));
    if (offset < 0 || static_cast<std::uint64_t>(offset) + len > size)
      return refuse("entry " + policy::quote(path) + " has data beyond its declared size");
    // Sparse entries arrive with gaps; leave holes instead of writing zeros.
    if (static_cast<std::uint64_t>(offset) != pos && ::lseek(fd->get(), offset, SEEK_SET) != offset)
      return system_error(errno, "seeking in " + policy::quote(path));
    pos = static_cast<std::uint64_t>(offset);
    if (auto w =
            fs::write_all(fd->get(), std::as_bytes(std::span(static_cast<const char*>(buf), len)));
        !w)
      return w.error().with_context("extracting " + policy::quote(path));
    pos += len;
    m_stats.bytes += len;
  }
  if (pos < size && ::ftruncate(fd->get(), static_cast<off_t>(size)) != 0)
    return system_error(errno, "extending " + policy::quote(path));
  if (needs_chmod && ::fchmod(fd->get(), *mode) != 0)
    return system_error(errno, "setting mode of " + policy::quote(path));
  timespec times[2] = {{0, UTIME_OMIT}, mtime};
  if (::futimens(fd->get(), times) != 0)
    return system_error(errno, "setting mtime of " + policy::quote(path));
  ++m_stats.files;
  return {};
}

Result<void> Extractor::make_dir(const std::string& path, archive_entry* e) {
  auto mode = sanitize_mode(path, archive_entry_perm(e));
  if (!mode) return mode.error();
  DirMeta meta{path, *mode, {archive_entry_mtime(e), archive_entry_mtime_nsec(e)}};
  if (path.empty()) {
    if (m_root_meta) return refuse("the root directory is listed twice");
    m_root_meta = meta;
    return {};
  }
  auto it = m_seen.find(path);
  if (it != m_seen.end()) {
    if (it->second != Kind::kImplicitDir) return refuse("duplicate entry " + policy::quote(path));
    it->second = Kind::kDir;
  } else {
    UPGRADED_TRY(reserve_space(0));
    auto pfd = open_parent(path);
    if (!pfd) return pfd.error();
    auto [parent, base] = fs::split_parent(path);
    // Owner-writable until the end, so that entries can be created inside; the real mode is
    // applied in apply_dir_metadata.
    if (::mkdirat(pfd->get(), base.c_str(), 0700) != 0)
      return system_error(errno, "creating directory " + policy::quote(path));
    m_seen.emplace(path, Kind::kDir);
  }
  m_dirs.push_back(meta);
  ++m_stats.directories;
  return {};
}

Result<void> Extractor::make_symlink(const std::string& path, archive_entry* e) {
  const char* raw = archive_entry_symlink(e);
  std::string target = raw ? raw : "";
  std::string where = "symlink " + policy::quote(path) + " -> " + policy::quote(target);
  if (target.empty()) return refuse(where + " has an empty target");
  if (target.size() > m_policy.limits.max_path_length) return refuse(where + ": target too long");
  if (target.front() == '/') return refuse(where + " points to an absolute path");
  if (!policy::is_valid_utf8(target)) return refuse(where + ": target is not valid UTF-8");
  for (char c : target)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f)
      return refuse(where + ": control character in target");
  // Lexical check first (cheap, clear message); the kernel re-checks the final tree in
  // check_symlinks, which also catches escapes through other symlinks.
  auto [parent, base] = fs::split_parent(path);
  std::vector<std::string_view> stack;
  if (parent != ".") {
    std::string_view pv(parent);
    std::size_t s = 0;
    while (s <= pv.size()) {
      auto end = pv.find('/', s);
      if (end == std::string_view::npos) end = pv.size();
      stack.push_back(pv.substr(s, end - s));
      s = end + 1;
    }
  }
  std::string_view tv(target);
  std::size_t s = 0;
  while (s <= tv.size()) {
    auto end = tv.find('/', s);
    if (end == std::string_view::npos) end = tv.size();
    auto comp = tv.substr(s, end - s);
    if (comp == "..") {
      if (stack.empty()) return refuse(where + " points outside the release");
      stack.pop_back();
    } else if (!comp.empty() && comp != ".") {
      stack.push_back(comp);
    }
    s = end + 1;
  }
  if (m_seen.count(path)) return refuse("duplicate entry " + policy::quote(path));
  UPGRADED_TRY(reserve_space(target.size() > 60 ? target.size() : 0));  // short targets are inline
  auto pfd = open_parent(path);
  if (!pfd) return pfd.error();
  if (::symlinkat(target.c_str(), pfd->get(), base.c_str()) != 0)
    return system_error(errno, "creating " + where);
  timespec times[2] = {{0, UTIME_OMIT}, {archive_entry_mtime(e), archive_entry_mtime_nsec(e)}};
  if (::utimensat(pfd->get(), base.c_str(), times, AT_SYMLINK_NOFOLLOW) != 0)
    return system_error(errno, "setting mtime of " + where);
  m_seen.emplace(path, Kind::kSymlink);
  m_symlinks.push_back(path);
  ++m_stats.symlinks;
  return {};
}

Result<void> Extractor::make_hardlink(const std::string& path, archive_entry* e) {
  auto target = normalize(archive_entry_hardlink(e), "hardlink target");
  if (!target) return target.error();
  std::string where = "hardlink " + policy::quote(path) + " -> " + policy::quote(*target);
  if (archive_entry_size_is_set(e) && archive_entry_size(e) > 0)
    return refuse(where + " carries data");
  auto it = m_seen.find(*target);
  if (target->empty() || it == m_seen.end() || it->second != Kind::kFile)
    return refuse(where + ": the target is not a regular file extracted earlier");
  if (m_seen.count(path)) return refuse("duplicate entry " + policy::quote(path));
  UPGRADED_TRY(m_pool.drain());  // the target may still be queued
  auto from = open_parent(*target);
  if (!from) return from.error();
  auto to = open_parent(path);
  if (!to) return to.error();
  auto [tp, tbase] = fs::split_parent(*target);
  auto [pp, base] = fs::split_parent(path);
  if (::linkat(from->get(), tbase.c_str(), to->get(), base.c_str(), 0) != 0)
    return system_error(errno, "creating " + where);
  m_seen.emplace(path, Kind::kFile);
  ++m_stats.hardlinks;
  return {};
}

Result<void> Extractor::entry(archive_entry* e) {
  if (++m_stats.entries > m_policy.limits.max_entries)
    return refuse("payload has more than " + std::to_string(m_policy.limits.max_entries) +
                  " entries");
  std::uint64_t expanded = static_cast<std::uint64_t>(archive_filter_bytes(m_archive, 0));
  if (expanded > m_payload_size * m_policy.limits.max_expansion_ratio + kRatioSlack)
    return refuse("payload expands beyond " + std::to_string(m_policy.limits.max_expansion_ratio) +
                  " times its size");
  auto path = normalize(archive_entry_pathname(e), "entry name");
  if (!path) return path.error();
  mode_t type = archive_entry_filetype(e);
  if (archive_entry_hardlink(e)) {
    if (path->empty()) return refuse("hardlink entry for the root directory");
    UPGRADED_TRY(ensure_parent(*path));
    return make_hardlink(*path, e);
  }
  if (path->empty() && type != AE_IFDIR) return refuse("root entry is not a directory");
  if (!path->empty()) UPGRADED_TRY(ensure_parent(*path));
  switch (type) {
    case AE_IFREG:
      if (m_seen.count(*path)) return refuse("duplicate entry " + policy::quote(*path));
      return make_file(*path, e);
    case AE_IFDIR:
      return make_dir(*path, e);
    case AE_IFLNK:
      return make_symlink(*path, e);
    case AE_IFCHR:
      return refuse("entry " + policy::quote(*path) + " is a character device");
    case AE_IFBLK:
      return refuse("entry " + policy::quote(*path) + " is a block device");
    case AE_IFIFO:
      return refuse("entry " + policy::quote(*path) + " is a FIFO");
    case AE_IFSOCK:
      return refuse("entry " + policy::quote(*path) + " is a socket");
    default:
      return refuse("entry " + policy::quote(*path) + " has an unsupported type");
  }
}

Result<void> Extractor::check_symlinks() {
  for (const auto& path : m_symlinks) {
    // Follow the link as the kernel would at run time, but confined to the release: EXDEV means
    // it leads outside (possibly through other links), ELOOP a cycle. A dangling link stays
    // dangling, because nothing can be added to a release later.
    if (int fd = fs::resolve_beneath(m_root, path.c_str()); fd >= 0) {
      ::close(fd);
      continue;
    }
    if (errno == ENOENT || errno == ENOTDIR) continue;
    if (errno == EXDEV)
      return refuse("symlink " + policy::quote(path) + " resolves outside the release");
    if (errno == ELOOP) return refuse("symlink " + policy::quote(path) + " is part of a loop");
    return system_error(errno, "resolving symlink " + policy::quote(path));
  }
  return {};
}

Result<void> Extractor::apply_dir_metadata() {
  std::vector<DirMeta> all = m_dirs;
  for (const auto& [path, kind] : m_seen)
    if (kind == Kind::kImplicitDir)
      all.push_back(
          DirMeta{path, static_cast<mode_t>(m_policy.read_only ? 0555 : 0755), {0, UTIME_OMIT}});
  // Deepest first, so that making a directory read-only never blocks a later change below it.
  std::stable_sort(all.begin(), all.end(), [](const DirMeta& a, const DirMeta& b) {
    return std::count(a.path.begin(), a.path.end(), '/') >
           std::count(b.path.begin(), b.path.end(), '/');
  });
  DirMeta root = m_root_meta.value_or(DirMeta{"", 0755, {0, UTIME_OMIT}});
  if (m_policy.read_only) root.mode &= ~static_cast<mode_t>(0222);
  all.push_back(root);
  for (const auto& d : all) {
    auto fd = d.path.empty() ? fs::open_beneath(m_root, ".", O_RDONLY | O_DIRECTORY)
                             : fs::open_beneath(m_root, d.path, O_RDONLY | O_DIRECTORY);
    if (!fd) return fd.error();
    timespec times[2] = {{0, UTIME_OMIT}, d.mtime};
    if (::futimens(fd->get(), times) != 0 || ::fchmod(fd->get(), d.mode) != 0)
      return system_error(errno, "setting metadata of directory " + policy::quote(d.path));
  }
  return {};
}

Result<ExtractStats> Extractor::run() {
  m_archive = archive_read_new();
  if (!m_archive) return Error(ErrorCode::kFailed, "allocating archive reader");
  // No bidding: the signed manifest says what the payload is, and only that is accepted.
  int filter = ARCHIVE_FILTER_NONE;
  switch (m_compression) {
    case Compression::kZstd:
      filter = ARCHIVE_FILTER_ZSTD;
      break;
    case Compression::kXz:
      filter = ARCHIVE_FILTER_XZ;
      break;
    case Compression::kGzip:
      filter = ARCHIVE_FILTER_GZIP;
      break;
    case Compression::kNone:
      break;
  }
  if (filter != ARCHIVE_FILTER_NONE && archive_read_append_filter(m_archive, filter) != ARCHIVE_OK)
    return archive_failure("selecting decompressor");
  if (archive_read_set_format(m_archive, ARCHIVE_FORMAT_TAR) != ARCHIVE_OK)
    return archive_failure("selecting tar format");
  if (archive_read_open(m_archive, this, nullptr, &read_cb, nullptr) != ARCHIVE_OK)
    return archive_failure("opening payload");
  for (;;) {
    archive_entry* e = nullptr;
    int r = archive_read_next_header(m_archive, &e);
    if (r == ARCHIVE_EOF) break;
    // Warnings (e.g. names that do not convert) are refusals: nothing half-understood is written.
    if (r != ARCHIVE_OK) return archive_failure("reading entry header");
    UPGRADED_TRY(entry(e));
  }
  // Drain the verified stream: the final checks (whole SHA-256, container end) run at its end.
  while (!m_source_done) {
    auto piece = m_source.next();
    if (!piece) return piece.error();
    if (piece->empty()) break;
  }
  UPGRADED_TRY(m_pool.drain());
  UPGRADED_TRY(check_symlinks());
  UPGRADED_TRY(apply_dir_metadata());
  return m_stats;
}

}  // namespace

Result<ExtractStats> extract_payload(PayloadSource& source, Compression compression,
                                     std::uint64_t payload_size, int dest_dirfd,
                                     const ExtractPolicy& policy, std::optional<mode_t> umask) {
  Extractor x(source, compression, payload_size, dest_dirfd, policy, umask);
  return x.run();
}

}  // namespace upgraded::artifact
