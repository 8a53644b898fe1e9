#include "upgraded/store/store.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <fstream>
#include <mutex>
#include <random>
#include <thread>

#include "upgraded/artifact/encoding.h"
#include "upgraded/artifact/strict_json.h"
#include "upgraded/artifact/unpack.h"
#include "upgraded/artifact/verifier.h"
#include "upgraded/crash_point.h"
#include "upgraded/fs/durable.h"
#include "upgraded/fs/remove_tree.h"
#include "upgraded/policy/names.h"
#include "upgraded/policy/version.h"

namespace upgraded::store {
namespace {

using nlohmann::json;

constexpr const char* kState = "state.json";
constexpr const char* kJournal = "journal.json";
constexpr const char* kCurrent = "current";
constexpr const char* kCurrentNew = "current.new";
constexpr const char* kDataFormat = "data-format";
constexpr std::size_t kMaxStateSize = 16 << 20;

std::string now_rfc3339() {
  return artifact::format_rfc3339(std::time(nullptr));
}

std::string new_txid() {
  std::random_device rd;
  char buf[32];
  std::snprintf(buf, sizeof buf, "%08x%08x", rd(), rd());
  return buf;
}

std::string manifest_name(const std::string& version) {
  return "manifests/" + version + ".json";
}
std::string release_name(const std::string& version) {
  return "releases/" + version;
}

// mkdir that survives a power cut: a new directory is fsynced into its parent.
Result<void> mkdir_durable(int dirfd, const std::string& name, mode_t mode) {
  if (::mkdirat(dirfd, name.c_str(), mode) != 0) {
    if (errno == EEXIST) return {};
    return system_error(errno, "creating " + policy::quote(name));
  }
  return fs::sync_fd(dirfd, "the parent of " + policy::quote(name));
}

Result<void> mkdir_path_durable(const std::string& path, mode_t mode) {
  auto [parent, name] = fs::split_parent(path);
  auto pfd = fs::open_directory(parent);
  if (!pfd) return pfd.error();
  return mkdir_durable(pfd->get(), name, mode);
}

bool exists_at(int dirfd, const std::string& name) {
  struct stat st {};
  return ::fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0;
}

// Entries of a directory of the app; a missing one is empty.
Result<std::vector<std::string>> list_dir(int dirfd, const std::string& name) {
  auto names = fs::list_names(dirfd, name);
  if (!names && names.error().code() == ErrorCode::kNotFound) return std::vector<std::string>();
  return names;
}

Result<void> sync_dir(int dirfd, const std::string& name) {
  int fd = ::openat(dirfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return system_error(errno, "opening " + policy::quote(name));
  UniqueFd owner(fd);
  return fs::sync_fd(fd, "directory " + policy::quote(name));
}

Result<std::optional<AppState>> read_state(int appfd) {
  auto text = fs::read_file(appfd, kState, kMaxStateSize);
  if (!text) {
    if (text.error().code() == ErrorCode::kNotFound) return std::optional<AppState>();
    return text.error();
  }
  auto st = parse_state(*text);
  if (!st) return st.error();
  return std::optional<AppState>(std::move(*st));
}

Result<void> write_state(int appfd, const AppState& st, bool sync_dir = true) {
  crash_point("state.before_write");
  UPGRADED_TRY(fs::write_file_atomic(appfd, kState, serialize_state(st), 0644, true, sync_dir));
  crash_point("state.after_write");
  return {};
}

// Writes the new state; if that fails, the new file may or may not be in place (a failed
// fsync after the rename), so the previous state is written back before reporting the error.
// `previous` null: there was no state file, so none is left behind either.
Result<void> commit_state(int appfd, const AppState& next, const AppState* previous,
                          bool sync_dir = true) {
  auto r = write_state(appfd, next, sync_dir);
  if (r) return r;
  if (previous) {
    (void)write_state(appfd, *previous);
  } else {
    ::unlinkat(appfd, kState, 0);
    (void)fs::sync_fd(appfd, "app directory");
  }
  return r;
}

// The journal records a stage before its first step, so that recovery knows which version's
// tree to delete if the stage never reached its commit point (state.json). Removals need no
// journal: they commit first and delete after.
struct Journal {
  std::string op;  // "stage"
  std::string txid;
  std::vector<std::string> versions;
};

// The partial tree of a stage lives inside releases/.partial.<txid>/tree (the wrapper stays
// the daemon's, 0700), on the filesystem of releases/; the final rename moves it out of the
// wrapper, and both directories are synced before the state names the release, or a power cut
// could leave two names for one tree.
constexpr const char* kPartialPrefix = ".partial.";
std::string partial_name(const std::string& txid) {
  return "releases/.partial." + txid;
}

Result<void> write_journal(int appfd, const Journal& j) {
  json doc = {{"op", j.op}, {"txid", j.txid}, {"versions", j.versions}};
  return fs::write_file_atomic(appfd, kJournal, doc.dump() + "\n", 0644);
}

Result<void> remove_journal(int appfd) {
  if (::unlinkat(appfd, kJournal, 0) != 0 && errno != ENOENT)
    return system_error(errno, "removing the journal");
  return fs::sync_fd(appfd, "app directory");
}

Result<std::optional<Journal>> read_journal(int appfd) {
  auto text = fs::read_file(appfd, kJournal, 1 << 20);
  if (!text) {
    if (text.error().code() == ErrorCode::kNotFound) return std::optional<Journal>();
    return text.error();
  }
  auto doc = artifact::parse_strict_json(*text, "journal.json");
  auto bad = Error(ErrorCode::kFailed, "journal.json is corrupt");
  if (!doc || !doc->is_object()) return bad;
  Journal j;
  auto op = artifact::json_string(*doc, "op", "journal");
  auto txid = artifact::json_string(*doc, "txid", "journal");
  if (!op || !txid || (*op != "stage" && *op != "remove") || txid->empty() ||
      txid->find('/') != std::string::npos || txid->front() == '.' || *op != "stage")
    return bad;
  j.op = *op;
  j.txid = *txid;
  auto vs = doc->find("versions");
  if (vs == doc->end() || !vs->is_array()) return bad;
  for (const auto& v : *vs) {
    if (!v.is_string() || !policy::validate_version(v.get<std::string>())) return bad;
    j.versions.push_back(v.get<std::string>());
  }
  return std::optional<Journal>(std::move(j));
}

// Makes the `current` symlink name state.current (relative target "releases/<v>"), durably.
Result<void> reconcile_current(int appfd, const AppState& st, bool always_sync = false) {
  char buf[4096];
  ssize_t n = ::readlinkat(appfd, kCurrent, buf, sizeof buf - 1);
  std::optional<std::string> target;
  if (n >= 0)
    target = std::string(buf, static_cast<std::size_t>(n));
  else if (errno != ENOENT && errno != EINVAL)
    return system_error(errno, "reading 'current'");
  else if (errno == EINVAL)
    target = "";  // not a symlink: replace it
  if (!st.current) {
    if (!target) return {};
    if (::unlinkat(appfd, kCurrent, 0) != 0 && errno != ENOENT)
      return system_error(errno, "removing 'current'");
    return fs::sync_fd(appfd, "app directory");
  }
  std::string want = release_name(*st.current);
  if (target == want) return always_sync ? fs::sync_fd(appfd, "app directory") : Result<void>();
  ::unlinkat(appfd, kCurrentNew, 0);
  if (::symlinkat(want.c_str(), appfd, kCurrentNew) != 0)
    return system_error(errno, "creating 'current.new'");
  crash_point("switch.after_symlink_new");
  if (auto r = fs::rename_at(appfd, kCurrentNew, appfd, kCurrent); !r) {
    ::unlinkat(appfd, kCurrentNew, 0);
    return r.error();
  }
  crash_point("switch.after_symlink_rename");
  return fs::sync_fd(appfd, "app directory");
}

// Makes `data-format` (one integer and a newline) say st.finalized_data_format, durably; it
// follows state.json, the commit point, like `current` does.
Result<void> reconcile_data_format(int appfd, const AppState& st) {
  if (!st.finalized_data_format) return {};
  std::string want = std::to_string(*st.finalized_data_format) + "\n";
  auto have = fs::read_file(appfd, kDataFormat, 64);
  if (have && *have == want) return {};
  return fs::write_file_atomic(appfd, kDataFormat, want, 0644);
}

// Deletes a release tree and its manifest.
Result<void> delete_release_files(int appfd, const std::string& tree, const std::string& version) {
  UPGRADED_TRY(fs::remove_tree(appfd, tree));
  if (::unlinkat(appfd, manifest_name(version).c_str(), 0) != 0 && errno != ENOENT)
    return system_error(errno, "removing the manifest of " + version);
  return {};
}

// Brings an app directory back to a consistent state: undoes an uncommitted stage, removes
// leftovers, and makes disk, state.json and `current` agree. Idempotent; safe to interrupt.
// An app with nothing to repair costs a few reads and no write or fsync: every operation on an
// app recovers it first, so this is on the path of every install.
Result<void> recover_app(int appfd, const std::string& app) {
  auto loaded = read_state(appfd);
  if (!loaded) return loaded.error();
  AppState st = loaded->value_or(AppState{app, {}, {}, {}, {}, {}, {}});
  const AppState before = st;
  const bool had_state = loaded->has_value();

  auto journal = read_journal(appfd);
  if (!journal) return journal.error();
  // Set when a release tree, a manifest or a partial tree was deleted: the two directories are
  // then synced, so that a power cut cannot bring back what the state no longer lists.
  bool deleted = false;
  if (*journal)
    for (const auto& v : (*journal)->versions)
      if (!st.releases.count(v)) {
        UPGRADED_TRY(delete_release_files(appfd, release_name(v), v));
        deleted = true;
      }

  // Leftovers: partial extractions, a half-made symlink, temporary files.
  auto trees = list_dir(appfd, "releases");
  if (!trees) return trees.error();
  for (const auto& name : *trees)
    if (name.rfind(kPartialPrefix, 0) == 0) {
      UPGRADED_TRY(fs::remove_tree(appfd, "releases/" + name));
      deleted = true;
    }
  ::unlinkat(appfd, kCurrentNew, 0);
  for (const char* dir : {".", "manifests"}) {
    auto names = list_dir(appfd, dir);
    if (!names) return names.error();
    for (const auto& name : *names)
      if (name.front() == '.' && name.find(".tmp.") != std::string::npos)
        ::unlinkat(appfd, (std::string(dir) + "/" + name).c_str(), 0);
  }

  // Disk and state must agree. Only with a state file to go by: a lost state.json must never
  // make recovery delete releases.
  if (had_state) {
    for (const auto& v : *trees)
      if (v.front() != '.' && !st.releases.count(v)) {
        // Never committed, or removed.
        UPGRADED_TRY(delete_release_files(appfd, release_name(v), v));
        deleted = true;
      }
    auto manifests = list_dir(appfd, "manifests");
    if (!manifests) return manifests.error();
    for (const auto& name : *manifests) {
      if (name.front() == '.' || !name.ends_with(".json")) continue;
      if (!st.releases.count(name.substr(0, name.size() - 5))) {
        ::unlinkat(appfd, ("manifests/" + name).c_str(), 0);
        deleted = true;
      }
    }
    for (auto it = st.releases.begin(); it != st.releases.end();) {
      if (exists_at(appfd, release_name(it->first)) && exists_at(appfd, manifest_name(it->first))) {
        ++it;
        continue;
      }
      const std::string v = it->first;  // half a release cannot be used: drop both halves
      UPGRADED_TRY(delete_release_files(appfd, release_name(v), v));
      deleted = true;
      it = st.releases.erase(it);
      for (auto* ref : {&st.current, &st.previous, &st.last_known_good})
        if (*ref == v) ref->reset();
    }
    if (!st.current && st.previous) std::swap(st.current, st.previous);
  }
  if (deleted) {
    UPGRADED_TRY(sync_dir(appfd, "releases"));
    UPGRADED_TRY(sync_dir(appfd, "manifests"));
  }
  // Apps from before data formats were tracked: the data is in the format the current release
  // writes, as for a first activation.
  if (had_state && st.current && !st.finalized_data_format && st.releases.count(*st.current)) {
    st.finalized_data_format = st.releases.at(*st.current).data_format.writes;
    st.finalized_at = now_rfc3339();
  }
  if (had_state && st != before) UPGRADED_TRY(write_state(appfd, st));
  if (had_state) UPGRADED_TRY(reconcile_current(appfd, st));
  if (had_state) UPGRADED_TRY(reconcile_data_format(appfd, st));
  if (*journal) UPGRADED_TRY(remove_journal(appfd));
  return {};
}

}  // namespace

// Parsed states of the daemon, reused while state.json is the same file. The key alone (device,
// inode, size, times) could match a different file: a rename frees the inode a later write may
// get again, with the same size, within one timestamp tick. So, as Git does with its index
// ("racy clean"), an entry is only cached once its file's ctime is well before the moment it was
// read: any later write then carries a later ctime. Every lock() drops the app's entry too.
struct Store::StateCache {
  struct Entry {
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtime, ctime;
    std::shared_ptr<const AppState> state;
    bool same_file(const struct stat& sb) const;
    /// Known to be what state.json holds without an fstatat(): set by states() once it
    /// inspected the file with the app's directory watched; any event in it clears it.
    bool current = false;
  };
  static constexpr time_t kSettledS = 2;
  std::mutex mutex;
  std::map<std::string, Entry, std::less<>> entries;

  // What lets states() serve entries without an fstatat() (docs/state.md): inotify watches on
  // the apps directory and on every app directory. The kernel queues an event before the
  // system call that made the change returns, so whatever changed before a listing began is
  // among the events that listing reads first. Used by states() alone, under watch_mutex (held
  // for the whole listing; `mutex` is taken inside it, never the other way round).
  std::mutex watch_mutex;
  UniqueFd inotify;    // non-blocking; invalid: nothing is known current
  int apps_wd = -1;    // the apps directory: names created, removed, renamed
  dev_t apps_dev = 0;  // the directory that watch is on: every listing checks that the apps
  ino_t apps_ino = 0;  // directory it opens is that one
  std::map<int, std::string> app_of;              // an app directory's watch: its app
  std::map<std::string, int, std::less<>> wd_of;  // ... and back
  std::size_t max_app_watches = 0;  // a quarter of the host's limit: others use inotify too
  /// The apps directory's names (list_dir) while no name was created, removed or renamed.
  std::optional<std::vector<std::string>> names;
  std::size_t inspected = 0;  // fstatat() calls of the last states(), for tests

  // No allocation: drain() must not lose events it has read.
  void forget(std::string_view app) {
    std::lock_guard lock(mutex);
    if (auto it = entries.find(app); it != entries.end()) it->second.current = false;
  }
  void unwatch(std::string_view app) {
    if (auto it = wd_of.find(app); it != wd_of.end()) {
      ::inotify_rm_watch(inotify.get(), it->second);
      app_of.erase(it->second);
      wd_of.erase(it);
    }
  }
  void reset() {
    inotify.reset();
    apps_wd = -1;
    app_of.clear();
    wd_of.clear();
    names.reset();
    std::lock_guard lock(mutex);
    for (auto& [app, e] : entries)
      e.current = false;
  }
  void drain();
  bool watch_apps(int appsfd, const struct stat& sb);
  bool watch_app(const std::string& app, int appsfd);
};

namespace {

constexpr std::uint32_t kAppDirEvents = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_CREATE |
                                        IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF |
                                        IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW;
constexpr std::uint32_t kAppsDirEvents = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO |
                                         IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR;

// File systems whose every change is made through this kernel, and so reported by inotify: not
// network or FUSE file systems (a change made elsewhere makes no event here), nor overlayfs (a
// change to a lower layer).
bool watchable_fs(int fd) {
  struct statfs sf {};
  if (::fstatfs(fd, &sf) != 0) return false;
  switch (static_cast<unsigned long>(sf.f_type)) {
    case 0xEF53:      // ext2, ext3, ext4
    case 0x58465342:  // xfs
    case 0x9123683E:  // btrfs
    case 0x01021994:  // tmpfs
    case 0xF2F52010:  // f2fs
    case 0x2FC12FC1:  // zfs
      return true;
    default:
      return false;
  }
}

std::string fd_path(int fd) {
  return "/proc/self/fd/" + std::to_string(fd);
}

}  // namespace

// Every event queued so far: each one makes its app's entry (or, in the apps directory, the
// entry of the name it names, and the list of names) no longer known current. A lost event (the
// queue overflowed), the apps directory gone, or a read error forget everything.
void Store::StateCache::drain() {
  if (!inotify) return;
  alignas(struct inotify_event) char buf[16384];
  for (;;) {
    ssize_t n = ::read(inotify.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return;
    if (n <= 0) {
      reset();
      return;
    }
    for (ssize_t i = 0; i + static_cast<ssize_t>(sizeof(inotify_event)) <= n;) {
      inotify_event header;
      std::memcpy(&header, buf + i, sizeof header);
      const inotify_event* ev = &header;
      const char* name_bytes = buf + i + sizeof header;
      i += static_cast<ssize_t>(sizeof header + header.len);
      if (ev->mask & IN_Q_OVERFLOW) {
        reset();
        return;
      }
      if (ev->wd == apps_wd) {
        if (ev->mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED | IN_UNMOUNT)) {
          reset();
          return;
        }
        names.reset();
        if (ev->len == 0) continue;
        std::string_view name(name_bytes, ::strnlen(name_bytes, ev->len));
        forget(name);
        // Gone from the apps directory (or replaced): a name it gets is watched afresh.
        if (ev->mask & (IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE)) unwatch(name);
      } else if (auto it = app_of.find(ev->wd); it != app_of.end()) {
        forget(it->second);
        if (ev->mask & IN_IGNORED) {  // its directory is gone
          if (auto back = wd_of.find(it->second); back != wd_of.end() && back->second == ev->wd)
            wd_of.erase(back);
          app_of.erase(it);
        }
      }
    }
  }
}

// Watches the apps directory (`appsfd`, `sb` its fstat), starting over if the one watched is no
// longer it. False: nothing can be known current in this listing.
bool Store::StateCache::watch_apps(int appsfd, const struct stat& sb) {
  if (inotify && apps_wd >= 0 && sb.st_dev == apps_dev && sb.st_ino == apps_ino) return true;
  reset();
  if (!watchable_fs(appsfd)) return false;
  // The directory opened, through its descriptor (not whatever its path leads to by now), if
  // /proc/self/fd leads to it: a chroot may have no /proc, or something else there.
  const std::string path = fd_path(appsfd);
  struct stat via {};
  if (::stat(path.c_str(), &via) != 0 || via.st_dev != sb.st_dev || via.st_ino != sb.st_ino)
    return false;
  std::size_t limit = 8192;  // the kernel's smallest default (and /proc/sys may be hidden)
  if (std::ifstream in("/proc/sys/fs/inotify/max_user_watches"); in) in >> limit;
  UniqueFd fd(::inotify_init1(IN_NONBLOCK | IN_CLOEXEC));
  if (!fd) return false;  // no inotify (EMFILE: its per-user limit): every app inspected
  int wd = ::inotify_add_watch(fd.get(), path.c_str(), kAppsDirEvents);
  if (wd < 0) return false;
  inotify = std::move(fd);
  apps_wd = wd;
  apps_dev = sb.st_dev;
  apps_ino = sb.st_ino;
  max_app_watches = limit / 4;
  return true;
}

// Watches an app's directory (in `appsfd`), before its state is inspected: any later change is
// an event. False when it cannot be (a symlink, the watches' budget): the app is inspected every
// time.
bool Store::StateCache::watch_app(const std::string& app, int appsfd) {
  if (wd_of.count(app)) return true;
  if (app_of.size() >= max_app_watches) return false;
  int wd = ::inotify_add_watch(inotify.get(), (fd_path(appsfd) + "/" + app).c_str(), kAppDirEvents);
  if (wd < 0) return false;
  // The same directory under another name (renamed since it was watched): this app's now.
  if (auto it = app_of.find(wd); it != app_of.end() && it->second != app) {
    forget(it->second);
    wd_of.erase(it->second);
  }
  app_of[wd] = app;
  wd_of[app] = wd;
  return true;
}

bool Store::StateCache::Entry::same_file(const struct stat& sb) const {
  return dev == sb.st_dev && ino == sb.st_ino && size == sb.st_size &&
         mtime.tv_sec == sb.st_mtim.tv_sec && mtime.tv_nsec == sb.st_mtim.tv_nsec &&
         ctime.tv_sec == sb.st_ctim.tv_sec && ctime.tv_nsec == sb.st_ctim.tv_nsec;
}

Store::Store(StoreOptions options) : m_options(std::move(options)) {
  if (m_options.cache_states) m_cache = std::make_shared<StateCache>();
}

Result<Store> Store::open(StoreOptions options) {
  if (options.root.empty()) return Error(ErrorCode::kInvalidArgument, "store root is empty");
  for (const auto& [app, root] : options.app_roots)
    if (auto r = policy::validate_app_name(app); !r) return r.error();
  UPGRADED_TRY(mkdir_path_durable(options.root, 0755));
  auto root = fs::open_directory(options.root);
  if (!root) return root.error();
  UPGRADED_TRY(mkdir_durable(root->get(), "apps", 0755));
  options.extract.read_only = true;
  return Store(std::move(options));
}

Result<void> Store::recover_all() {
  m_recovery_errors.clear();
  auto apps = app_dirs();
  if (!apps) return apps.error();
  for (const auto& app : *apps) {
    auto lock = this->lock(app);  // recovers
    // One broken app must not take the others down: it is reported, and lock() keeps
    // refusing it with the same error until it is repaired. A busy app is its lock holder's
    // to recover (every operation recovers the app it locks first).
    if (!lock && lock.error().code() != ErrorCode::kBusy)
      m_recovery_errors.emplace(app, lock.error());
  }
  return {};
}

std::string Store::release_path(const std::string& app, const std::string& version) const {
  return app_root(app) + "/" + release_name(version);
}

std::string Store::app_root(const std::string& app) const {
  auto it = m_options.app_roots.find(app);
  if (it != m_options.app_roots.end()) return it->second;
  return m_options.root + "/apps/" + app;
}

Result<std::vector<std::string>> Store::app_dirs() const {
  std::vector<std::string> out;
  auto root = fs::open_directory(m_options.root);
  if (!root) return root.error();
  auto names = list_dir(root->get(), "apps");
  if (!names) return names.error();
  for (const auto& n : *names)
    if (policy::validate_app_name(n) && !m_options.app_roots.count(n)) out.push_back(n);
  for (const auto& [app, dir] : m_options.app_roots)
    if (struct stat st{}; ::stat(dir.c_str(), &st) == 0) out.push_back(app);
  std::sort(out.begin(), out.end());
  return out;
}

Result<std::vector<std::string>> Store::apps() const {
  auto out = app_dirs();
  if (!out) return out.error();
  std::vector<std::string> with_state;
  for (const auto& app : *out) {
    struct stat st {};
    if (::stat((app_root(app) + "/" + kState).c_str(), &st) == 0 ||
        ::stat((app_root(app) + "/" + kJournal).c_str(), &st) == 0)
      with_state.push_back(app);
  }
  return with_state;
}

Result<AppLock> Store::lock(const std::string& app, std::chrono::milliseconds wait) const {
  UPGRADED_TRY(policy::validate_app_name(app));
  std::string dir = app_root(app);
  UPGRADED_TRY(mkdir_path_durable(dir, 0755));
  auto appfd = fs::open_directory(dir);
  if (!appfd) return appfd.error();
  for (const char* sub : {"releases", "manifests"})
    UPGRADED_TRY(mkdir_durable(appfd->get(), sub, 0755));
  int fd = ::openat(appfd->get(), ".lock", O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return system_error(errno, "opening the lock of " + policy::quote(app));
  UniqueFd lockfd(fd);
  // Waiting polls rather than blocks in flock(): a bounded wait needs no signal or thread, and
  // the lock is taken within a few milliseconds of its release.
  wait = std::clamp(wait, std::chrono::milliseconds(0), std::chrono::milliseconds(86400 * 1000));
  const auto deadline = std::chrono::steady_clock::now() + wait;
  auto pause = std::chrono::milliseconds(1);
  while (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EINTR) continue;
    if (errno != EWOULDBLOCK) return system_error(errno, "locking " + policy::quote(app));
    auto now = std::chrono::steady_clock::now();
    if (now >= deadline) {
      char waited[32] = "";
      if (wait.count() > 0)
        std::snprintf(waited, sizeof waited, " (waited %g s)", wait.count() / 1000.0);
      return Error(ErrorCode::kBusy, "app " + policy::quote(app) +
                                         " is busy: another operation holds its lock" + waited);
    }
    std::this_thread::sleep_for(
        std::min<std::chrono::steady_clock::duration>(pause, deadline - now));
    pause = std::min(pause * 2, std::chrono::milliseconds(50));
  }
  if (m_cache) {  // the lock holder is about to write: never serve it an entry from before
    std::lock_guard cache_lock(m_cache->mutex);
    m_cache->entries.erase(app);
  }
  if (auto r = recover_app(appfd->get(), app); !r)
    return r.error().with_context("recovering " + policy::quote(app));
  return AppLock(app, std::move(lockfd));
}

namespace {

// What an interrupted operation leaves behind that a reader would notice (recover_app repairs
// each): an unfinished stage (its journal), or a `current` that does not name state.current.
// (A leftover `current.new` always comes with the latter: state.json is written before the
// symlink is made, and no symlink is made when `current` already agrees.) Leftover temporary
// files and trees the state does not list are garbage, not inconsistencies: the next recovery
// removes them.
bool interrupted(int dfd, const std::optional<AppState>& st) {
  if (exists_at(dfd, kJournal)) return true;
  if (!st) return false;
  // From before data formats were tracked: recovery records the current release's format.
  if (st->current && !st->finalized_data_format) return true;
  char buf[4096];
  ssize_t n = ::readlinkat(dfd, kCurrent, buf, sizeof buf - 1);
  if (n < 0) return errno != ENOENT || st->current.has_value();
  return !st->current ||
         std::string(buf, static_cast<std::size_t>(n)) != release_name(*st->current);
}

}  // namespace

Result<bool> Store::needs_recovery(const std::string& app) const {
  auto v = view(app);
  if (!v) return v.error();
  return v->needs_recovery;
}

Result<AppView> Store::view(const std::string& app) const {
  UPGRADED_TRY(policy::validate_app_name(app));
  auto appfd = fs::open_directory(app_root(app));
  if (!appfd) {
    if (appfd.error().code() == ErrorCode::kNotFound)
      return Error(ErrorCode::kNotFound, "no app " + policy::quote(app));
    return appfd.error();
  }
  auto st = read_state(appfd->get());
  if (!st) return st.error();
  AppView v = *st ? view_of(**st) : AppView{};
  v.needs_recovery = interrupted(appfd->get(), *st);
  return v;
}

AppView view_of(const AppState& st) {
  AppView v;
  v.has_state = true;
  v.pre_finalized = st.pre_finalized();
  for (const auto& version : st.versions_in_order()) {
    const auto& r = st.releases.at(version);
    v.releases.push_back({version, r.status,
                          st.current == version    ? "current"
                          : st.previous == version ? "previous"
                                                   : "",
                          r.staged_at, r.pinned, r.size});
  }
  return v;
}

Result<AppState> Store::state(const std::string& app) const {
  UPGRADED_TRY(policy::validate_app_name(app));
  auto st = load_state(AT_FDCWD, app_root(app) + "/" + kState, app, nullptr);
  if (!st) return st.error();
  return **st;
}

Result<AppState> Store::state_or_new(const std::string& app, bool* is_new) const {
  auto st = state(app);
  if (is_new) *is_new = !st && st.error().code() == ErrorCode::kNotFound;
  if (st || st.error().code() != ErrorCode::kNotFound) return st;
  AppState fresh;
  fresh.app = app;
  return fresh;
}

// state.json of `app` at `dirfd/path`, from the cache while it is the same file. `sb`: its
// fstatat() if the caller has made one (a cache hit then costs no further system call).
Result<std::shared_ptr<const AppState>> Store::load_state(int dirfd, const std::string& path,
                                                          const std::string& app,
                                                          const struct stat* sb) const {
  if (m_cache && sb) {
    std::lock_guard lock(m_cache->mutex);
    if (auto it = m_cache->entries.find(app);
        it != m_cache->entries.end() && it->second.same_file(*sb))
      return it->second.state;
  }
  // O_NONBLOCK: a FIFO in its place opens at once, and read_fd refuses it.
  int fd = ::openat(dirfd, path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0) {
    if (errno == ENOENT || errno == ENOTDIR)
      return Error(ErrorCode::kNotFound, "no app " + policy::quote(app));
    return system_error(errno, "opening " + policy::quote(path));
  }
  UniqueFd owner(fd);
  struct stat fsb {};
  if (::fstat(fd, &fsb) != 0) return system_error(errno, "inspecting " + policy::quote(path));
  if (m_cache) {
    std::lock_guard lock(m_cache->mutex);
    if (auto it = m_cache->entries.find(app);
        it != m_cache->entries.end() && it->second.same_file(fsb))
      return it->second.state;
  }
  auto text = fs::read_fd(fd, fsb, kState, kMaxStateSize);
  if (!text) return text.error();
  auto parsed = parse_state(*text);
  if (!parsed) return parsed.error();
  auto st = std::make_shared<const AppState>(std::move(*parsed));
  if (m_cache) {
    std::lock_guard lock(m_cache->mutex);
    struct timespec now {};
    ::clock_gettime(CLOCK_REALTIME, &now);
    if (fsb.st_ctim.tv_sec + StateCache::kSettledS < now.tv_sec)
      m_cache->entries.insert_or_assign(app, StateCache::Entry{fsb.st_dev, fsb.st_ino, fsb.st_size,
                                                               fsb.st_mtim, fsb.st_ctim, st});
    else
      m_cache->entries.erase(app);
  }
  return st;
}

Result<std::vector<ListedState>> Store::states() const {
  std::vector<ListedState> out;
  // One fstatat() per app, relative to the apps directory: with the states cached (the
  // daemon), that is all a listing of thousands of apps costs the kernel; and none for an app
  // whose directory is watched and saw no change since (StateCache).
  // An app whose state cannot be inspected or read is listed with the error: one app's broken
  // file never fails the listing of the others.
  std::unique_lock<std::mutex> watching;
  bool watched = false;
  if (m_cache) {
    watching = std::unique_lock(m_cache->watch_mutex);
    m_cache->inspected = 0;
    m_cache->drain();
  }
  UniqueFd apps;
  // An app in the apps directory (`own_root` null; its directory may be watched), or at a root
  // of its own.
  auto add = [&](int dirfd, const std::string& app, const std::string* own_root) -> Result<void> {
    bool watch = watched && own_root == nullptr;
    if (watch) {
      {
        std::lock_guard lock(m_cache->mutex);
        if (auto it = m_cache->entries.find(app);
            it != m_cache->entries.end() && it->second.current) {
          out.push_back({app, it->second.state, std::nullopt});
          return {};
        }
      }
      watch = m_cache->watch_app(app, apps.get());
    }
    if (m_cache) ++m_cache->inspected;
    const std::string path = (own_root ? *own_root : app) + "/" + kState;
    struct stat sb {};
    if (::fstatat(dirfd, path.c_str(), &sb, 0) != 0) {
      if (errno == ENOENT || errno == ENOTDIR) return {};  // no state (yet), or removed
      out.push_back({app, nullptr,
                     system_error(errno, "inspecting " + policy::quote(path)).with_context(app)});
      return {};
    }
    if (!S_ISREG(sb.st_mode)) {  // never opened: a FIFO would block
      out.push_back({app, nullptr,
                     Error(ErrorCode::kFailed, policy::quote(path) + " is not a regular file")
                         .with_context(app)});
      return {};
    }
    auto st = load_state(dirfd, path, app, &sb);
    if (st) {
      // Known current from now on while its directory stays quiet, if it is what is cached (a
      // settled state: a younger one is inspected again by every listing until it settles),
      // and the file is in that directory: not a symlink or a hard link, whose other name's
      // directory no watch covers.
      // On the apps directory's file system: an app directory that is a mount point of its own
      // may be on one whose changes make no event here.
      struct stat lsb {};
      if (watch && sb.st_nlink == 1 && sb.st_dev == m_cache->apps_dev &&
          ::fstatat(dirfd, path.c_str(), &lsb, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(lsb.st_mode) &&
          lsb.st_nlink == 1) {
        std::lock_guard lock(m_cache->mutex);
        // The same file as cached, still (the link count read before it was loaded was 1).
        if (auto it = m_cache->entries.find(app);
            it != m_cache->entries.end() && it->second.state == *st && it->second.same_file(sb) &&
            it->second.same_file(lsb))
          it->second.current = true;
      }
      out.push_back({app, std::move(*st), std::nullopt});
    } else if (st.error().code() != ErrorCode::kNotFound) {  // else removed meanwhile
      out.push_back({app, nullptr, st.error().with_context(app)});
    }
    return {};
  };
  auto root = fs::open_directory(m_options.root);
  if (!root) return root.error();
  int appsfd = ::openat(root->get(), "apps", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (appsfd < 0 && errno != ENOENT) return system_error(errno, "opening the apps directory");
  apps.reset(appsfd);
  if (apps && m_cache) {
    // Watched before it is listed: a name created after the listing is an event.
    struct stat sb {};
    watched = ::fstat(apps.get(), &sb) == 0 && m_cache->watch_apps(apps.get(), sb);
  }
  // The apps in the apps directory (valid names, not at roots of their own), in order.
  std::vector<std::string> listed;
  const std::vector<std::string>* names = &listed;
  if (watched && m_cache->names) {
    names = &*m_cache->names;  // no name created, removed or renamed since
  } else if (apps) {
    auto read = fs::list_names(apps.get(), ".");
    if (!read) return read.error();
    for (auto& n : *read)
      if (policy::validate_app_name(n) && !m_options.app_roots.count(n))
        listed.push_back(std::move(n));
    if (watched) names = &m_cache->names.emplace(std::move(listed));
  }
  out.reserve(names->size() + m_options.app_roots.size());
  for (const auto& n : *names)
    UPGRADED_TRY(add(apps.get(), n, nullptr));
  // Apps at roots of their own are inspected every time: their paths may lead through
  // directories no watch covers.
  for (const auto& [app, dir] : m_options.app_roots)
    UPGRADED_TRY(add(AT_FDCWD, app, &dir));
  auto by_app = [](const auto& a, const auto& b) { return a.app < b.app; };
  if (!std::is_sorted(out.begin(), out.end(), by_app)) std::sort(out.begin(), out.end(), by_app);
  return out;
}

std::size_t Store::states_inspected() const {
  if (!m_cache) return 0;
  std::lock_guard lock(m_cache->watch_mutex);
  return m_cache->inspected;
}

Result<artifact::Manifest> Store::manifest(const std::string& app,
                                           const std::string& version) const {
  UPGRADED_TRY(policy::validate_app_name(app));
  UPGRADED_TRY(policy::validate_version(version));
  auto appfd = fs::open_directory(app_root(app));
  if (!appfd) return appfd.error();
  auto text = fs::read_file(appfd->get(), manifest_name(version), artifact::kMaxManifestSize);
  if (!text) return text.error();
  return artifact::parse_manifest(*text);
}

Result<StageResult> Store::stage(const AppLock& lock, const artifact::VerifiedManifest& verified,
                                 const ExtractFn& extract) const {
  const artifact::VerifiedManifest* art = &verified;
  if (art->manifest.app != lock.app())
    return Error(ErrorCode::kInvalidArgument, "the artifact is for app " +
                                                  policy::quote(art->manifest.app) + ", not " +
                                                  policy::quote(lock.app()));
  const std::string app = lock.app();
  const std::string version = art->manifest.version;
  auto appfd = fs::open_directory(app_root(app));
  if (!appfd) return appfd.error();
  int dfd = appfd->get();
  auto loaded = read_state(dfd);
  if (!loaded) return loaded.error();
  AppState st = loaded->value_or(AppState{app, {}, {}, {}, {}, {}, {}});
  if (auto same = st.installed_as(version))
    return Error(ErrorCode::kExists,
                 app + " " + version + " is already installed" +
                     (*same == version ? "" : " (as " + *same + ", an equal version)"));
  if (st.floor && policy::compare_versions(version, *st.floor) < 0)
    return Error(ErrorCode::kPolicyRefused, app + " " + version +
                                                " is older than the version floor " + *st.floor +
                                                " (downgrade protection)");

  Journal j{"stage", new_txid(), {version}};
  auto undo = [&](const Error& e) -> Result<StageResult> {
    (void)recover_app(dfd, app);  // state.json does not list the release: recovery removes it
    return e;
  };
  if (auto r = write_journal(dfd, j); !r) return undo(r.error());
  crash_point("stage.after_journal");
  // The tree is built in `tree` inside a wrapper that stays the daemon's, mode 0700: whoever
  // builds the tree (the daemon's helper, under a uid of its own, owns `tree` meanwhile) cannot
  // make anything in it reachable by others, whatever modes it sets.
  std::string wrapper = partial_name(j.txid);
  std::string partial = wrapper + "/tree";
  if (::mkdirat(dfd, wrapper.c_str(), 0700) != 0 || ::mkdirat(dfd, partial.c_str(), 0700) != 0)
    return undo(system_error(errno, "creating the partial release directory"));
  auto pfd = fs::open_beneath(dfd, partial, O_RDONLY | O_DIRECTORY);
  if (!pfd) return undo(pfd.error());
  artifact::ExtractPolicy policy = m_options.extract;
  policy.read_only = true;
  auto stats = extract(policy, pfd->get());  // synced
  pfd->reset();
  if (!stats) return undo(stats.error());
  crash_point("stage.after_extract");
  if (auto r = fs::write_file_atomic(dfd, manifest_name(version), art->manifest_bytes, 0644); !r)
    return undo(r.error());
  crash_point("stage.after_manifest");
  if (auto r = fs::rename_at(dfd, partial, dfd, release_name(version), RENAME_NOREPLACE); !r)
    return undo(r.error());
  // Both directories durable before the state names the release: a rename between two
  // directories with only one synced could leave the tree with a name in each after a power
  // cut, and recovery removes whatever is under .partial.*.
  if (auto r = sync_dir(dfd, wrapper); !r) return undo(r.error());
  if (auto r = sync_dir(dfd, "releases"); !r) return undo(r.error());
  ::unlinkat(dfd, wrapper.c_str(), AT_REMOVEDIR);  // empty now; recovery removes it otherwise
  crash_point("stage.after_rename");
  AppState next = st;
  next.releases[version] = ReleaseRecord{ReleaseStatus::kStaged, false, now_rfc3339(), stats->bytes,
                                         art->manifest.data_format};
  if (auto r = commit_state(dfd, next, loaded->has_value() ? &st : nullptr); !r)
    return undo(r.error());
  crash_point("stage.after_state");
  (void)remove_journal(dfd);  // committed; a leftover journal is finished by the next lock()
  return StageResult{art->manifest, art->signatures, *stats};
}

namespace {

// Opens the app directory of a locked app and reads its state.
struct Locked {
  UniqueFd fd;
  AppState state;
};

Result<Locked> open_locked(const std::string& root, const std::string& app) {
  auto appfd = fs::open_directory(root);
  if (!appfd) return appfd.error();
  auto st = read_state(appfd->get());
  if (!st) return st.error();
  if (!*st) return Error(ErrorCode::kNotFound, "no app " + policy::quote(app));
  return Locked{std::move(*appfd), std::move(**st)};
}

Error unknown_release(const std::string& app, const std::string& version) {
  return Error(ErrorCode::kNotFound, "no release " + policy::quote(version) + " of " + app);
}

// Removes releases: state.json first (the commit point), then the trees and manifests in place.
// A crash after the commit leaves trees the state does not list; recovery deletes them.
Result<void> remove_releases(int dfd, AppState st, const std::vector<std::string>& versions) {
  const AppState before = st;
  for (const auto& v : versions) {
    st.releases.erase(v);
    for (auto* ref : {&st.previous, &st.last_known_good})
      if (*ref == v) ref->reset();
  }
  UPGRADED_TRY(commit_state(dfd, st, &before));
  crash_point("remove.after_state");
  // Committed. Cleanup failures are not the caller's: the next lock() finishes the job.
  for (const auto& v : versions) {
    if (!delete_release_files(dfd, release_name(v), v)) return {};
    crash_point("remove.after_delete");
  }
  (void)sync_dir(dfd, "releases");
  (void)sync_dir(dfd, "manifests");
  return {};
}

}  // namespace

Result<void> Store::switch_to(const AppLock& lock, const std::string& version) const {
  return switch_impl(lock, version, std::nullopt);
}

Result<void> Store::switch_back(const AppLock& lock, const std::string& version,
                                const std::string& previous) const {
  return switch_impl(lock, version, previous);
}

Result<void> Store::switch_impl(const AppLock& lock, const std::string& version,
                                const std::optional<std::string>& previous) const {
  auto l = open_locked(app_root(lock.app()), lock.app());
  if (!l) return l.error();
  int dfd = l->fd.get();
  const AppState before = l->state;
  AppState st = before;
  if (!st.releases.count(version)) return unknown_release(st.app, version);
  if (previous && !previous->empty() && !st.releases.count(*previous))
    return unknown_release(st.app, *previous);
  if (st.current == version && !previous) return reconcile_current(dfd, st);
  if (previous)
    st.previous = previous->empty() ? std::nullopt : std::optional<std::string>(*previous);
  else if (st.current)
    st.previous = st.current;
  st.current = version;
  auto& rec = st.releases[version];
  if (rec.status == ReleaseStatus::kStaged) rec.status = ReleaseStatus::kActive;
  st.good_since.reset();
  // The first release an app ever runs creates its data: in the format it writes, with nothing
  // older to go back to (docs/state.md, "Data formats").
  if (!before.current && !st.finalized_data_format) {
    st.finalized_data_format = rec.data_format.writes;
    st.finalized_at = now_rfc3339();
  }
  if (!st.pre_finalized())
    st.pending_since.reset();
  else if (!st.pending_since)
    st.pending_since = now_rfc3339();
  // state.json first (the commit point), then the symlink; one directory fsync makes both
  // renames durable. Recovery makes `current` follow state.json whichever rename survived.
  if (auto r = commit_state(dfd, st, &before, /*sync_dir=*/false); !r) return r.error();
  crash_point("switch.after_state");
  if (auto r = reconcile_current(dfd, st, /*always_sync=*/true); !r) {
    (void)write_state(dfd, before);
    (void)reconcile_current(dfd, before);
    return r.error().with_context("switching " + st.app + " to " + version);
  }
  // Past the commit point: a failure here is repaired by the next recovery, not an error.
  if (st.finalized_data_format != before.finalized_data_format)
    (void)reconcile_data_format(dfd, st);
  return {};
}

Result<void> Store::remove(const AppLock& lock, const std::string& version) const {
  auto l = open_locked(app_root(lock.app()), lock.app());
  if (!l) return l.error();
  const AppState& st = l->state;
  auto it = st.releases.find(version);
  if (it == st.releases.end()) return unknown_release(st.app, version);
  if (st.current == version)
    return Error(ErrorCode::kPolicyRefused, version + " is the current release of " + st.app);
  if (it->second.pinned)
    return Error(ErrorCode::kPolicyRefused,
                 version + " of " + st.app + " is pinned (unpin it first)");
  return remove_releases(l->fd.get(), st, {version});
}

Result<void> Store::forget_app(const AppLock& lock) const {
  auto l = open_locked(app_root(lock.app()), lock.app());
  if (!l) return l.error();
  if (!l->state.releases.empty() || l->state.current)
    return Error(ErrorCode::kPolicyRefused, lock.app() + " still has releases");
  int dfd = l->fd.get();
  // state.json first: without it the app is unknown, whatever else is left.
  if (::unlinkat(dfd, kState, 0) != 0 && errno != ENOENT)
    return system_error(errno, "removing state.json");
  UPGRADED_TRY(fs::sync_fd(dfd, "app directory"));
  for (const char* name : {"history.jsonl", "activation.json"})
    (void)::unlinkat(dfd, name, 0);
  for (const char* name : {"releases", "manifests"})
    (void)::unlinkat(dfd, name, AT_REMOVEDIR);  // empty by now; a leftover is harmless
  return fs::sync_fd(dfd, "app directory");
}

Result<void> Store::set_pinned(const AppLock& lock, const std::string& version, bool pinned) const {
  auto l = open_locked(app_root(lock.app()), lock.app());
  if (!l) return l.error();
  const AppState before = l->state;
  auto it = l->state.releases.find(version);
  if (it == l->state.releases.end()) return unknown_release(l->state.app, version);
  if (it->second.pinned == pinned) return {};
  it->second.pinned = pinned;
  return commit_state(l->fd.get(), l->state, &before);
}

Result<void> Store::set_status(const AppLock& lock, const std::string& version,
                               ReleaseStatus status) const {
  auto l = open_locked(app_root(lock.app()), lock.app());
  if (!l) return l.error();
  const AppState before = l->state;
  AppState& st = l->state;
  auto it = st.releases.find(version);
  if (it == st.releases.end()) return unknown_release(st.app, version);
  it->second.status = status;
  if (status == ReleaseStatus::kGood) st.last_known_good = version;
  if (status == ReleaseStatus::kGood && st.current == version && !st.good_since)
    st.good_since = now_rfc3339();
  if (status != ReleaseStatus::kGood && st.current == version) st.good_since.reset();
  if (status == ReleaseStatus::kBad && st.last_known_good == version) st.last_known_good.reset();
  return commit_state(l->fd.get(), st, &before);
}

Result<void> Store::raise_floor(const AppLock& lock, const std::string& version) const {
  UPGRADED_TRY(policy::validate_version(version));
  auto l = open_locked(app_root(lock.app()), lock.app());
  if (!l) return l.error();
  // An interrupted activation's outcome may yet switch back to the release it replaced, which
  // the new floor could be above: it is finished first (the daemon does that when it starts).
  if (auto pending = pending_activation(lock.app()); !pending || *pending)
    return pending ? Error(ErrorCode::kPolicyRefused,
                           "an interrupted activation of " + lock.app() + " " + (*pending)->to +
                               " is not finished yet; the floor can be raised once it is")
                   : pending.error();
  const AppState before = l->state;
  AppState& st = l->state;
  if (st.floor && policy::compare_versions(version, *st.floor) < 0)
    return Error(ErrorCode::kPolicyRefused, "the version floor of " + st.app + " is " + *st.floor +
                                                " and never goes down (asked for " + version + ")");
  if (st.floor && policy::compare_versions(version, *st.floor) == 0) return {};
  if (st.current && policy::compare_versions(*st.current, version) < 0)
    return Error(ErrorCode::kPolicyRefused, "the current release of " + st.app + ", " +
                                                *st.current + ", is below " + version +
                                                "; activate a release at or above it first");
  st.floor = version;
  return commit_state(l->fd.get(), st, &before);
}

Result<void> Store::record_finalized_data_format(const AppLock& lock, std::uint64_t format,
                                                 const std::string& backup) const {
  auto l = open_locked(app_root(lock.app()), lock.app());
  if (!l) return l.error();
  const AppState before = l->state;
  AppState& st = l->state;
  if (st.finalized_data_format && format < *st.finalized_data_format)
    return Error(ErrorCode::kPolicyRefused, "the finalized data format of " + st.app + " is " +
                                                std::to_string(*st.finalized_data_format) +
                                                " and never goes down");
  if (st.finalized_data_format == format) return {};
  st.finalized_data_format = format;
  st.finalized_at = now_rfc3339();
  st.last_backup = backup.empty() ? std::nullopt : std::optional<std::string>(backup);
  if (!st.pre_finalized()) st.pending_since.reset();
  UPGRADED_TRY(commit_state(l->fd.get(), st, &before));
  // Past the commit point: a failure here is repaired by the next recovery, not an error.
  (void)reconcile_data_format(l->fd.get(), st);
  return {};
}

Result<GcReport> Store::gc(const AppLock& lock, const GcPolicy& policy) const {
  auto l = open_locked(app_root(lock.app()), lock.app());
  if (!l) return l.error();
  const AppState& st = l->state;
  auto is_protected = [&](const std::string& v) {
    return st.current == v || st.previous == v || st.last_known_good == v ||
           st.releases.at(v).pinned;
  };
  std::uint64_t total = 0;
  for (const auto& [v, r] : st.releases)
    total += r.size;
  std::size_t count = st.releases.size();
  GcReport report;
  for (const auto& v : st.versions_in_order()) {  // oldest first
    bool over_count = count > policy.keep;
    bool over_bytes = policy.max_bytes && total > *policy.max_bytes;
    if (!over_count && !over_bytes) break;
    if (is_protected(v)) continue;
    report.removed.push_back(v);
    report.freed_bytes += st.releases.at(v).size;
    total -= st.releases.at(v).size;
    --count;
  }
  if (report.removed.empty()) return report;
  crash_point("gc.before_remove");
  UPGRADED_TRY(remove_releases(l->fd.get(), st, report.removed));
  return report;
}

namespace {

constexpr std::size_t kMaxHistory = 10000;

json history_to_json(const HistoryEntry& e) {
  json downtime = json::object();
  for (const auto& [unit, usec] : e.downtime_usec)
    downtime[unit] = usec;
  json doc = {
      {"time", e.time},     {"op", e.op},           {"from", e.from},           {"to", e.to},
      {"result", e.result}, {"message", e.message}, {"downtime_usec", downtime}};
  if (!e.backup.empty()) doc["backup"] = e.backup;
  if (!e.hook_start_usec.empty()) doc["hook_start_usec"] = e.hook_start_usec;
  if (!e.transaction.empty()) doc["transaction"] = e.transaction;
  return doc;
}

std::optional<HistoryEntry> history_from_json(const std::string& line) {
  auto doc = json::parse(line, nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) return std::nullopt;
  HistoryEntry e;
  auto str = [&](const char* k) {
    return doc.contains(k) && doc[k].is_string() ? doc[k].get<std::string>() : "";
  };
  e.time = str("time");
  e.op = str("op");
  e.from = str("from");
  e.to = str("to");
  e.result = str("result");
  e.message = str("message");
  e.backup = str("backup");
  e.transaction = str("transaction");
  if (doc.contains("downtime_usec") && doc["downtime_usec"].is_object())
    for (const auto& [unit, v] : doc["downtime_usec"].items())
      if (v.is_number_unsigned()) e.downtime_usec[unit] = v.get<std::uint64_t>();
  return e;
}

}  // namespace

Result<void> Store::append_history(const AppLock& lock, const HistoryEntry& entry) const {
  auto appfd = fs::open_directory(app_root(lock.app()));
  if (!appfd) return appfd.error();
  HistoryEntry e = entry;
  if (e.time.empty()) e.time = now_rfc3339();
  std::string line = history_to_json(e).dump() + "\n";
  // Appends are atomic enough for a log: a torn last line after a crash is skipped on reading.
  int fd = ::openat(appfd->get(), "history.jsonl", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return system_error(errno, "opening the history of " + lock.app());
  UniqueFd owner(fd);
  UPGRADED_TRY(fs::write_all(fd, artifact::as_bytes(line)));
  UPGRADED_TRY(fs::sync_fd(fd, "the history of " + lock.app()));
  struct stat st {};
  if (::fstat(fd, &st) == 0 && st.st_size > static_cast<off_t>(kMaxHistory * 400)) {
    auto all = history(lock.app(), kMaxHistory);
    if (all) {
      std::string text;
      for (const auto& h : *all)
        text += history_to_json(h).dump() + "\n";
      UPGRADED_TRY(fs::write_file_atomic(appfd->get(), "history.jsonl", text, 0644));
    }
  }
  return {};
}

Result<std::vector<HistoryEntry>> Store::history(const std::string& app, std::size_t limit) const {
  UPGRADED_TRY(policy::validate_app_name(app));
  auto appfd = fs::open_directory(app_root(app));
  if (!appfd) return appfd.error();
  auto text = fs::read_file(appfd->get(), "history.jsonl", 64ULL << 20);
  std::vector<HistoryEntry> out;
  if (!text) {
    if (text.error().code() == ErrorCode::kNotFound) return out;
    return text.error();
  }
  std::size_t start = 0;
  while (start < text->size()) {
    auto end = text->find('\n', start);
    if (end == std::string::npos) break;  // a torn last line
    if (auto e = history_from_json(text->substr(start, end - start))) out.push_back(std::move(*e));
    start = end + 1;
  }
  if (out.size() > limit) out.erase(out.begin(), out.end() - static_cast<std::ptrdiff_t>(limit));
  return out;
}

namespace {
constexpr const char* kActivation = "activation.json";
constexpr std::uint64_t kMaxActivationUnits = 256;  // activation::kMaxExpandedUnits
}  // namespace

Result<void> Store::begin_activation(const AppLock& lock, const PendingActivation& p) const {
  auto appfd = fs::open_directory(app_root(lock.app()));
  if (!appfd) return appfd.error();
  json doc = {{"op", p.op},     {"from", p.from},
              {"to", p.to},     {"previous", p.previous},
              {"step", p.step}, {"started", p.started.empty() ? now_rfc3339() : p.started}};
  if (p.units_touched) doc["units_touched"] = *p.units_touched;
  if (!p.units.empty()) doc["units"] = p.units;
  if (!p.from_units.empty()) doc["from_units"] = p.from_units;
  if (p.max_unavailable && *p.max_unavailable != 1) doc["max_unavailable"] = *p.max_unavailable;
  return fs::write_file_atomic(appfd->get(), kActivation, doc.dump() + "\n", 0644);
}

Result<void> Store::end_activation(const AppLock& lock) const {
  auto appfd = fs::open_directory(app_root(lock.app()));
  if (!appfd) return appfd.error();
  if (::unlinkat(appfd->get(), kActivation, 0) != 0) {
    if (errno == ENOENT) return {};
    return system_error(errno, "removing activation.json");
  }
  return fs::sync_fd(appfd->get(), "app directory");
}

Result<std::optional<PendingActivation>> Store::pending_activation(const std::string& app) const {
  UPGRADED_TRY(policy::validate_app_name(app));
  auto appfd = fs::open_directory(app_root(app));
  if (!appfd) return appfd.error();
  // Twice 256 units of at most 255 bytes, each byte escaped at worst, and the rest.
  auto text = fs::read_file(appfd->get(), kActivation, 1 << 19);
  if (!text) {
    if (text.error().code() == ErrorCode::kNotFound) return std::optional<PendingActivation>();
    return text.error();
  }
  auto doc = artifact::parse_strict_json(*text, kActivation);
  auto bad = Error(ErrorCode::kFailed, app + ": activation.json is corrupt");
  if (!doc || !doc->is_object()) return bad;
  auto op = artifact::json_string(*doc, "op", kActivation);
  auto from = artifact::json_string(*doc, "from", kActivation);
  auto to = artifact::json_string(*doc, "to", kActivation);
  auto previous = artifact::json_string(*doc, "previous", kActivation);
  auto started = artifact::json_string(*doc, "started", kActivation);
  if (!op || !from || !to || !previous || !started || (*op != "activate" && *op != "rollback"))
    return bad;
  std::string step = "restart";  // absent in records written before steps were journaled
  if (doc->contains("step")) {
    auto s = artifact::json_string(*doc, "step", kActivation);
    if (!s) return bad;
    step = *s;
  }
  if (step != "queued" && step != "rolling_back" && step != "restart" && step != "stopping" &&
      step != "migrate" && step != "starting" && step != "post_upgrade")
    return bad;
  if ((!from->empty() && !policy::validate_version(*from)) || !policy::validate_version(*to) ||
      (!previous->empty() && !policy::validate_version(*previous)))
    return bad;
  PendingActivation p{*op, *from, *to, *previous, *started, step, {}};
  if (doc->contains("units_touched")) {
    // At most 256 units once templates are expanded.
    auto n = artifact::json_uint(*doc, "units_touched", kActivation, kMaxActivationUnits);
    if (!n || *n == 0) return bad;
    p.units_touched = static_cast<std::uint32_t>(*n);
  }
  for (auto [key, list] : {std::pair("units", &p.units), std::pair("from_units", &p.from_units)})
    if (auto it = doc->find(key); it != doc->end()) {
      if (!it->is_array() || it->empty() || it->size() > kMaxActivationUnits) return bad;
      for (const auto& u : *it) {
        if (!u.is_string() || !policy::validate_unit_name(u.get<std::string>())) return bad;
        list->push_back(u.get<std::string>());
      }
    }
  if (doc->contains("max_unavailable")) {
    auto n = artifact::json_uint(*doc, "max_unavailable", kActivation, kMaxActivationUnits);
    if (!n || *n == 0) return bad;
    p.max_unavailable = static_cast<std::uint32_t>(*n);
  }
  return std::optional<PendingActivation>(std::move(p));
}

namespace {
constexpr const char* kSets = "sets";
constexpr std::size_t kMaxSetMembers = 64;

Result<PendingSet> read_set(int dirfd, const std::string& name);

bool valid_set_id(const std::string& id) {
  if (!id.starts_with("set-") || id.size() > 64) return false;
  return std::all_of(id.begin() + 4, id.end(),
                     [](char c) { return (c >= '0' && c <= '9') || c == '-'; });
}
}  // namespace

Result<void> Store::begin_set(const PendingSet& set) const {
  if (!valid_set_id(set.id) || set.members.empty() || set.members.size() > kMaxSetMembers ||
      set.completed > set.members.size())
    return Error(ErrorCode::kInvalidArgument, "not a valid set record");
  auto root = fs::open_directory(m_options.root);
  if (!root) return root.error();
  if (::mkdirat(root->get(), kSets, 0755) != 0 && errno != EEXIST)
    return system_error(errno, "creating " + m_options.root + "/" + kSets);
  auto dir = fs::open_beneath(root->get(), kSets, O_RDONLY | O_DIRECTORY);
  if (!dir) return dir.error();
  json members = json::array();
  for (const auto& m : set.members)
    members.push_back({{"app", m.app}, {"from", m.from}, {"to", m.to}});
  json doc = {{"id", set.id},
              {"members", members},
              {"completed", set.completed},
              {"undoing", set.undoing},
              {"started", set.started.empty() ? now_rfc3339() : set.started}};
  UPGRADED_TRY(fs::write_file_atomic(dir->get(), set.id + ".json", doc.dump() + "\n", 0644));
  // The directory's own entry, the first time.
  return fs::sync_fd(root->get(), "the store root");
}

Result<void> Store::end_set(const std::string& id) const {
  if (!valid_set_id(id)) return Error(ErrorCode::kInvalidArgument, "not a set id");
  auto root = fs::open_directory(m_options.root);
  if (!root) return root.error();
  auto dir = fs::open_beneath(root->get(), kSets, O_RDONLY | O_DIRECTORY);
  if (!dir) return dir.error().code() == ErrorCode::kNotFound ? Result<void>() : dir.error();
  if (::unlinkat(dir->get(), (id + ".json").c_str(), 0) != 0) {
    if (errno == ENOENT) return {};
    return system_error(errno, "removing the record of " + id);
  }
  return fs::sync_fd(dir->get(), "the sets directory");
}

Result<std::vector<PendingSet>> Store::pending_sets(std::vector<Error>* corrupt) const {
  std::vector<PendingSet> out;
  auto root = fs::open_directory(m_options.root);
  if (!root) return root.error();
  auto dir = fs::open_beneath(root->get(), kSets, O_RDONLY | O_DIRECTORY);
  if (!dir) {
    if (dir.error().code() == ErrorCode::kNotFound) return out;
    return dir.error();
  }
  auto names = fs::list_names(dir->get(), ".");
  if (!names) return names.error();
  std::sort(names->begin(), names->end());
  for (const auto& name : *names) {
    // Temporary files of an interrupted write are not records.
    if (!name.ends_with(".json") || !valid_set_id(name.substr(0, name.size() - 5))) continue;
    auto set = read_set(dir->get(), name);
    if (set)
      out.push_back(std::move(*set));
    else if (corrupt)
      corrupt->push_back(set.error());
  }
  return out;
}

namespace {
Result<PendingSet> read_set(int dirfd, const std::string& name) {
  auto bad = Error(ErrorCode::kFailed, "sets/" + name + " is corrupt");
  auto fd = fs::open_beneath(dirfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK);
  if (!fd) return bad;
  struct stat st {};
  if (::fstat(fd->get(), &st) != 0 || !S_ISREG(st.st_mode)) return bad;
  auto text = fs::read_fd(fd->get(), st, name, 1 << 16);
  if (!text) return bad;
  auto doc = artifact::parse_strict_json(*text, name);
  if (!doc || !doc->is_object()) return bad;
  for (const auto& [key, value] : doc->items())
    if (key != "id" && key != "members" && key != "completed" && key != "undoing" &&
        key != "started")
      return bad;
  PendingSet p;
  auto id = artifact::json_string(*doc, "id", name);
  auto started = artifact::json_string(*doc, "started", name);
  auto completed = artifact::json_uint(*doc, "completed", name, kMaxSetMembers);
  auto undoing = doc->find("undoing");
  auto members = doc->find("members");
  if (!id || *id + ".json" != name || !started || !completed || undoing == doc->end() ||
      !undoing->is_boolean() || members == doc->end() || !members->is_array() || members->empty() ||
      members->size() > kMaxSetMembers || *completed > members->size())
    return bad;
  p.id = *id;
  p.started = *started;
  p.completed = static_cast<std::uint32_t>(*completed);
  p.undoing = undoing->get<bool>();
  for (const auto& m : *members) {
    if (!m.is_object() || m.size() != 3) return bad;
    auto app = artifact::json_string(m, "app", name);
    auto from = artifact::json_string(m, "from", name);
    auto to = artifact::json_string(m, "to", name);
    if (!app || !from || !to || !policy::validate_app_name(*app) ||
        (!from->empty() && !policy::validate_version(*from)) || !policy::validate_version(*to))
      return bad;
    for (const auto& earlier : p.members)
      if (earlier.app == *app) return bad;
    p.members.push_back({*app, *from, *to});
  }
  return p;
}
}  // namespace

}  // namespace upgraded::store
