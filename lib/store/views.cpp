#include <chrono>
// Store::views(): every app's listing, and the cache that keeps it between processes.
//
// A listing of thousands of apps (upgradectl list --offline) would otherwise open, read and
// parse every state.json and check every app for an interrupted operation: some 7 system calls
// and one strict JSON parse per app. The cache (`<root>/views.cache`) keeps each app's view
// with what identified its files when it was read: the app directory's and state.json's device,
// inode, size and change and modification times to the nanosecond. Everything a view depends on
// changes one of them: state.json is only ever replaced by a rename (a new inode, and a new
// mtime on the directory), and so are `current` and the journal, which decide needs_recovery;
// an in-place edit of state.json changes its own times. A reused entry therefore costs two
// fstatat() calls, relative to the apps directory.
//
// Two writes within one timestamp tick can leave a file's times as they were (the kernel's
// clock is coarse): so, as Git does with its index ("racy clean"), an entry is only kept if the
// times it was keyed on are well before the moment it was read. A younger app is read again on
// the next listing.
//
// The file is a cache: it is written without fsync (a listing syncs nothing), replaced by a
// rename, trusted only if its owner is root or the caller and no one else may write it, and
// ignored, whole, if it cannot be read or parsed or is of another format.

#include <fcntl.h>
#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <ctime>
#include <exception>
#include <functional>
#include <map>
#include <random>
#include <system_error>
#include <thread>

#include "upgraded/fs/durable.h"
#include "upgraded/fs/unique_fd.h"
#include "upgraded/policy/names.h"
#include "upgraded/store/store.h"
#include "upgraded/store/views_cache.h"

namespace upgraded::store {
namespace {

using views_cache::Entries;
using views_cache::Entry;
using views_cache::FileKey;

constexpr const char* kViewsCache = "views.cache";
constexpr std::size_t kMaxViewsCacheSize = 256 << 20;
constexpr time_t kSettledS = 2;

// Settled: changed long enough before `now` that any later change carries a later time.
bool settled(const FileKey& k, const struct timespec& now) {
  return k.ino == 0 || (k.ctime_s + kSettledS < now.tv_sec && k.mtime_s + kSettledS < now.tv_sec);
}

// What derives a view from an app's files: the code of view(), view_of() and the version
// ordering (a hash of their sources, from lib/CMakeLists.txt). A cache written by other code is
// dropped: its entries could mean something else (an interrupted operation it did not know).
constexpr const char* kDerivation = UPGRADED_VIEWS_DERIVATION;

// The cache's entries; empty if there is no usable cache.
Entries load(int rootfd, const struct timespec& now) {
  int fd = ::openat(rootfd, kViewsCache, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
  if (fd < 0) return {};
  UniqueFd owner(fd);
  struct stat sb {};
  if (::fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode) || (sb.st_mode & 022) != 0 ||
      (sb.st_uid != 0 && sb.st_uid != ::geteuid()))
    return {};
  auto text = fs::read_fd(fd, sb, kViewsCache, kMaxViewsCacheSize);
  if (!text) return {};
  auto doc = views_cache::decode(
      std::span(reinterpret_cast<const std::uint8_t*>(text->data()), text->size()));
  // Written by other code, or "later" than now: a clock stepped back could give a file the
  // times an entry was keyed on, after it changed.
  if (!doc || doc->derivation != kDerivation || doc->written > now.tv_sec) return {};
  return std::move(doc->entries);
}

// Removes what a listing killed while writing the cache left behind: its temporary file, once
// it is old enough not to be another listing's, still being written.
void remove_leftovers(int rootfd, const struct timespec& now) {
  auto names = fs::list_names(rootfd, ".");
  if (!names) return;
  const std::string prefix = std::string(".") + kViewsCache + ".";
  for (const auto& name : *names) {
    struct stat sb {};
    if (name.rfind(prefix, 0) == 0 &&
        ::fstatat(rootfd, name.c_str(), &sb, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(sb.st_mode) &&
        sb.st_mtim.tv_sec + 60 < now.tv_sec)
      ::unlinkat(rootfd, name.c_str(), 0);
  }
}

// Replaces the cache; best effort (a caller who may not write the store lists without it).
void save(int rootfd, Entries entries, const struct timespec& now) {
  remove_leftovers(rootfd, now);
  auto bytes = views_cache::encode({kDerivation, now.tv_sec, std::move(entries)});
  std::random_device rd;
  char tmp[64];
  std::snprintf(tmp, sizeof tmp, ".%s.%08x%08x", kViewsCache, rd(), rd());
  // Readable by its owner only: it lists apps whose own roots others may not be able to reach.
  int fd = ::openat(rootfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return;
  UniqueFd owner(fd);
  if (!fs::write_all(fd, std::as_bytes(std::span(bytes.data(), bytes.size()))) ||
      ::fchmod(fd, 0600) != 0 || ::renameat(rootfd, tmp, rootfd, kViewsCache) != 0)
    ::unlinkat(rootfd, tmp, 0);
}

// What identifies an app's files (the header above), taken before anything of it is read.
struct Keys {
  FileKey dir, state;   // state: all zero without a state.json
  int dir_error = 0;    // errno of the directory's fstatat (ENOENT: the app was removed meanwhile)
  int state_error = 0;  // errno of state.json's, other than ENOENT
};

Keys keys_of(std::pair<int, const std::string*> where) {
  auto [dirfd, dir] = where;
  Keys k;
  struct stat sb {};
  if (::fstatat(dirfd, dir->c_str(), &sb, 0) != 0) {
    k.dir_error = errno;
    return k;
  }
  k.dir = views_cache::key_of(sb);
  if (::fstatat(dirfd, (*dir + "/state.json").c_str(), &sb, 0) == 0)
    k.state = views_cache::key_of(sb);
  else if (errno != ENOENT)
    k.state_error = errno;
  return k;
}

// take(0) .. take(n - 1), in any order, and `meanwhile()` once. A listing of thousands of apps is
// mostly its two fstatat() calls per app: with more than one CPU, a second thread takes a share
// of them and loads the cache meanwhile. What it throws is thrown here, as if this thread had.
void take_keys(std::size_t n, const std::function<void(std::size_t)>& take,
               const std::function<void()>& meanwhile) {
  constexpr std::size_t kChunk = 32, kAlone = 128;
  std::atomic<std::size_t> next{0};
  auto share = [&] {
    for (std::size_t i; (i = next.fetch_add(kChunk)) < n;)
      for (std::size_t j = i; j < std::min(i + kChunk, n); ++j)
        take(j);
  };
  std::exception_ptr thrown;
  std::thread helper;
  // The CPUs this process may run on (its affinity), not those the host has; a host with more
  // than a cpu_set_t holds (EINVAL) has more than one.
  cpu_set_t cpus;
  CPU_ZERO(&cpus);
  const bool several =
      ::sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? CPU_COUNT(&cpus) > 1 : errno == EINVAL;
  if (n >= kAlone && several) {
    try {
      helper = std::thread([&] {
        try {
          meanwhile();
          share();
        } catch (...) {
          thrown = std::current_exception();
        }
      });
    } catch (const std::system_error&) {
      // No thread to be had (a tasks limit): this one does everything.
    }
  }
  if (!helper.joinable()) meanwhile();
  try {
    share();
  } catch (...) {
    if (helper.joinable()) helper.join();
    throw;
  }
  if (helper.joinable()) helper.join();
  if (thrown) std::rethrow_exception(thrown);
}

}  // namespace

Result<std::vector<std::pair<std::string, AppView>>> Store::views() const {
  std::vector<std::pair<std::string, AppView>> out;
  UPGRADED_TRY(for_each_view(
      [&](const std::string& app, const AppView& view) { out.emplace_back(app, view); }));
  return out;
}

Result<void> Store::for_each_view(
    const std::function<void(const std::string&, const AppView&)>& fn) const {
  auto names = app_dirs();
  if (!names) return names.error();
  auto read = [&](const std::string& app) -> Result<std::optional<AppView>> {
    auto v = view(app);
    if (!v) {
      if (v.error().code() == ErrorCode::kNotFound)  // removed meanwhile
        return std::optional<AppView>();
      return v.error().with_context(app);
    }
    return std::optional<AppView>(std::move(*v));
  };
  auto listed = [](const AppView& v) { return v.has_state || v.needs_recovery; };
  if (!m_options.persist_views) {
    for (const auto& app : *names) {
      auto v = read(app);
      if (!v) return v.error();
      if (*v && listed(**v)) fn(app, **v);
    }
    return {};
  }

  auto root = fs::open_directory(m_options.root);
  if (!root) return root.error();
  int fd = ::openat(root->get(), "apps", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0 && errno != ENOENT) return system_error(errno, "opening the apps directory");
  UniqueFd apps(fd);
  struct timespec now {};
  ::clock_gettime(CLOCK_REALTIME, &now);
  // The app's directory and state.json, as in the apps directory or at the app's own root.
  auto where = [&](const std::string& app) -> std::pair<int, const std::string*> {
    auto own = m_options.app_roots.find(app);
    if (own == m_options.app_roots.end()) return {apps.get(), &app};
    return {AT_FDCWD, &own->second};
  };
  Entries cached;
  std::vector<Keys> keys(names->size());
  take_keys(
      names->size(), [&](std::size_t i) { keys[i] = keys_of(where((*names)[i])); },
      [&] { cached = load(root->get(), now); });
  Entries kept;
  bool changed = false;
  AppView decoded;  // the view of an app from the cache; its memory serves every app in turn
  for (std::size_t i = 0; i < names->size(); ++i) {
    const std::string& app = (*names)[i];
    const Keys& k = keys[i];
    if (k.dir_error == ENOENT) continue;  // removed meanwhile
    if (k.dir_error != 0)
      return system_error(k.dir_error, "inspecting " + policy::quote(*where(app).second));
    if (k.state_error != 0)
      return system_error(k.state_error, "inspecting the state of " + policy::quote(app));
    const FileKey &dkey = k.dir, &skey = k.state;
    if (auto it = cached.find(app);
        it != cached.end() && it->second.dir == dkey && it->second.state == skey &&
        views_cache::decode_releases(it->second.releases, decoded.releases)) {
      const Entry& e = it->second;
      decoded.has_state = e.has_state;
      decoded.needs_recovery = e.needs_recovery;
      decoded.pre_finalized = e.pre_finalized;
      if (listed(decoded)) fn(app, decoded);
      kept.insert(cached.extract(it));
      continue;
    }
    // Read after the keys were taken: the view is at least as new as its keys, so a change
    // in between makes the next listing read the app again, never keep an older view.
    auto v = read(app);
    if (!v) return v.error();
    if (!*v) continue;
    const AppView& view = **v;
    if (settled(dkey, now) && settled(skey, now)) {
      kept.insert_or_assign(
          app, Entry{dkey, skey, view.has_state, view.needs_recovery, view.pre_finalized,
                     views_cache::encode_releases(view.releases)});
      changed = true;
    }
    if (listed(view)) fn(app, view);
  }
  // Left in `cached`: apps gone, changed (and too young to be kept), or undecodable.
  if (changed || !cached.empty()) save(root->get(), std::move(kept), now);
  return {};
}

}  // namespace upgraded::store
