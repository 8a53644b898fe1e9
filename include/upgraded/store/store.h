#pragma once

// The release store: versioned, read-only release trees per app, an atomically switched
// `current` symlink, retention, and crash-safe transactions. docs/state.md describes the layout,
// the state model and the recovery rules.

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <sys/stat.h>

#include "upgraded/artifact/extractor.h"
#include "upgraded/artifact/keys.h"
#include "upgraded/artifact/signatures.h"
#include "upgraded/artifact/verifier.h"
#include "upgraded/fs/unique_fd.h"
#include "upgraded/result.h"
#include "upgraded/store/state.h"

namespace upgraded::store {

struct StoreOptions {
  /// Apps without a root of their own live in `<root>/apps/<app>`.
  std::string root;
  /// Apps that declare their own install root (e.g. "/opt/ozone"); the same structure lives
  /// there.
  std::map<std::string, std::string> app_roots;
  /// Extraction policy for stage(); read_only is always forced on.
  artifact::ExtractPolicy extract;
  /// Keep parsed states in memory, each reused while its state.json is the same file (inode,
  /// size, mtime and ctime to the nanosecond: every write replaces the file by a rename). For
  /// the daemon, whose listings of thousands of apps would otherwise parse every state.json on
  /// every call. The memory is the apps' states, a few hundred bytes per release.
  bool cache_states = false;
  /// Keep views() between processes, in `<root>/views.cache` (upgradectl list --offline): an
  /// app's entry is reused while its directory and its state.json are the same (inode, times
  /// to the nanosecond); the file is a cache, written without fsync and ignored when unusable.
  bool persist_views = false;
};

/// Proof that the caller holds an app's lock (flock on `<app root>/.lock`). Released on
/// destruction. Another process or another lock() in this one gets kBusy meanwhile.
class AppLock {
 public:
  const std::string& app() const { return m_app; }

 private:
  friend class Store;
  AppLock(std::string app, UniqueFd fd) : m_app(std::move(app)), m_fd(std::move(fd)) {}
  std::string m_app;
  UniqueFd m_fd;
};

struct GcPolicy {
  std::size_t keep = 3;                    ///< releases to keep in all (protected ones included)
  std::optional<std::uint64_t> max_bytes;  ///< and/or a budget for all releases' bytes
};

struct GcReport {
  std::vector<std::string> removed;
  std::uint64_t freed_bytes = 0;
};

/// One line of an app's history (`<app root>/history.jsonl`), for root-cause analysis and for
/// predicting the next downtime window.
struct HistoryEntry {
  std::string time;    ///< RFC 3339 UTC
  std::string op;      ///< "stage", "activate", "rollback", "remove", "gc", ...
  std::string from;    ///< version before (may be empty)
  std::string to;      ///< version after (may be empty)
  std::string result;  ///< "done", "failed", "rolled-back"
  std::string message;
  std::map<std::string, std::uint64_t> downtime_usec;  ///< per unit
  std::string backup;  ///< finalize: the name of the backup taken before it
  /// Per hook that ran: microseconds from its start call to its process running (not sent
  /// over D-Bus; in history.jsonl for bench/downtime --hooks and root-cause analysis).
  std::map<std::string, std::uint64_t> hook_start_usec;
  /// The set (multi-app activation) this entry was part of (PendingSet::id); empty: none.
  std::string transaction;
};

/// Extracts the payload of the artifact being staged into the empty directory `dest_dirfd` and
/// makes it durable (one syncfs). In-process: artifact::extract_verified; the daemon runs the
/// extraction in a sandboxed child process instead.
using ExtractFn = std::function<Result<artifact::ExtractStats>(
    const artifact::ExtractPolicy& policy, int dest_dirfd)>;

/// An activation that started and has not finished (`<app root>/activation.json`, present from
/// before the switch until the outcome is recorded). After a crash the daemon finds it and
/// brings the units back in line with `current`.
struct PendingActivation {
  std::string op;        ///< "activate" or "rollback"
  std::string from;      ///< current before (may be empty)
  std::string to;        ///< the release being activated
  std::string previous;  ///< the rollback target before it (restored if it fails)
  std::string started;   ///< RFC 3339 UTC (empty: now)
  /// Where it got to, for recovery (docs/hooks.md, "Crash safety"): "restart" (a release
  /// without hooks: its units are restarted), "queued" (staged offline; the whole activation
  /// is left to the daemon), "migrate" (units being stopped, `current` switched, the migrate
  /// hook running; "stopping" from earlier builds means the same), "starting" (migrated; units
  /// starting, health gate), "post_upgrade" (the post_upgrade hook running), "rolling_back" (an
  /// automatic rollback under way).
  std::string step = "restart";
  /// Strategies one-by-one and rolling, before each wave is restarted: how many of the units
  /// (in order) have been touched, the wave about to be restarted included. A rollback restores
  /// those and leaves the others running; a resume goes on from the last one. Absent: all of
  /// them (all-at-once, or units stopped for a migrate).
  std::optional<std::uint32_t> units_touched;
  /// The units the activation covers, in order, its templates expanded into the instances it
  /// found ("tablet@1.service"...): recovery restarts and rolls back these, whatever runs or
  /// the policy says by then. Empty in records of earlier builds.
  std::vector<std::string> units;
  /// The same for `from`'s units: what a rollback restores (after a migrate stopped them all,
  /// none may be running any more).
  std::vector<std::string> from_units;
  /// Strategy rolling: instances per wave as the activation started (recovery keeps its waves
  /// whatever the policy says by then). Absent: 1.
  std::optional<std::uint32_t> max_unavailable;
};

/// A multi-app activation (a set) that started and has not finished
/// (`<root>/sets/<id>.json`): its apps, in activation order, each with the release it left and
/// the one it goes to. Written while the set holds every member's lock. After a crash the
/// daemon finishes it if every member had completed, and undoes it otherwise.
struct PendingSet {
  struct Member {
    std::string app;
    std::string from;  ///< current before (may be empty)
    std::string to;
    bool operator==(const Member&) const = default;
  };
  std::string id;               ///< "set-<unix seconds>-<n>"
  std::vector<Member> members;  ///< 1 to 64, distinct apps, in activation order
  std::uint32_t completed = 0;  ///< how many members, in order, have been activated
  bool undoing = false;         ///< a member failed: the completed ones are being rolled back
  std::string started;          ///< RFC 3339 UTC (empty: now)
};

/// One release as a listing shows it.
struct ListedRelease {
  std::string version;
  ReleaseStatus status = ReleaseStatus::kStaged;
  std::string role;  ///< "current", "previous" or empty
  std::string staged_at;
  bool pinned = false;
  std::uint64_t size = 0;
  bool operator==(const ListedRelease&) const = default;
};

/// What a read-only listing knows about an app without recovering it (Store::view).
struct AppView {
  bool has_state = false;  ///< false: its first stage never committed
  bool needs_recovery = false;
  bool pre_finalized = false;           ///< AppState::pre_finalized()
  std::vector<ListedRelease> releases;  ///< oldest first (policy::compare_versions)
  bool operator==(const AppView&) const = default;
};

/// The listing of an app in state `st`.
AppView view_of(const AppState& st);

/// One app of Store::states(): its state, or why it could not be read.
struct ListedState {
  std::string app;
  std::shared_ptr<const AppState> state;  ///< null when `error` is set
  std::optional<Error> error;
};

struct StageResult {
  artifact::Manifest manifest;
  artifact::SignatureReport signatures;
  artifact::ExtractStats stats;
};

class Store {
 public:
  /// Creates the layout under `options.root` if needed. Recovers nothing: each operation
  /// recovers the app it locks (lock()), so its cost does not grow with the number of apps.
  static Result<Store> open(StoreOptions options);
  /// Recovers every app found under the root and in `app_roots` (the daemon, once at start).
  /// An app busy in another process is skipped: its lock holder recovered it when it locked
  /// it. Failures are in recovery_errors().
  Result<void> recover_all();

  /// Takes an app's lock (kBusy if another holds it for longer than `wait`; zero: do not
  /// wait), then recovers the app, so that every operation starts from a consistent state even
  /// after another process crashed. Never touches another app.
  Result<AppLock> lock(const std::string& app,
                       std::chrono::milliseconds wait = std::chrono::milliseconds(0)) const;
  /// Whether an interrupted operation left the app for recovery (an unfinished stage, a
  /// half-switched `current`), which its next lock() does. Reads only; takes no lock.
  Result<bool> needs_recovery(const std::string& app) const;
  /// An app's state (none: its first stage never committed) and whether it needs recovery, in
  /// one pass, for listings. Reads only; takes no lock; kNotFound for an unknown app.
  Result<AppView> view(const std::string& app) const;
  /// view() of every app there is (with a state, or left for recovery), sorted by name. With
  /// options.persist_views, an app unchanged since the cache was written costs two fstatat()
  /// calls (its directory, its state.json) and no read.
  Result<std::vector<std::pair<std::string, AppView>>> views() const;
  /// The same, one app at a time, in name order: `fn` gets each app's view, which lives only
  /// for the call (a listing of thousands of apps never holds them all). On an error, `fn` may
  /// already have been called for the apps before it.
  Result<void> for_each_view(
      const std::function<void(const std::string&, const AppView&)>& fn) const;

  std::string app_root(const std::string& app) const;
  /// The absolute path of a release's tree.
  std::string release_path(const std::string& app, const std::string& version) const;
  /// Apps whose recovery failed in recover_all() (e.g. a corrupt state.json), with the reason.
  /// The other apps are usable.
  const std::map<std::string, Error>& recovery_errors() const { return m_recovery_errors; }
  /// Apps that have a state file, sorted.
  Result<std::vector<std::string>> apps() const;
  /// An app's state as on disk (kNotFound for an unknown app). Needs no lock: state.json is
  /// replaced atomically.
  Result<AppState> state(const std::string& app) const;
  /// state(), or for an app the store does not know an empty state of that name (what its
  /// first install starts from); `is_new`, if given, says which. Other errors (a state.json
  /// that cannot be read) are returned.
  Result<AppState> state_or_new(const std::string& app, bool* is_new = nullptr) const;
  /// Every app's state, sorted by name (apps without one are left out), for listings. With
  /// options.cache_states, a state still cached costs one fstatat() and no copy, and none while
  /// the app's directory, watched with inotify, saw no change (docs/state.md). An app whose
  /// state.json cannot be read or parsed is listed with the error instead (its name in it).
  Result<std::vector<ListedState>> states() const;
  /// With options.cache_states: how many apps the last states() inspected (fstatat), for tests.
  std::size_t states_inspected() const;
  /// The signed manifest a release was installed from.
  Result<artifact::Manifest> manifest(const std::string& app, const std::string& version) const;

  /// Verifies the artifact and installs it as a new, staged release. Takes the app's lock.
  /// Refused: a version already installed, or one equal to an installed one by
  /// policy::compare_versions (kExists), one below the app's floor (kPolicyRefused).
  Result<StageResult> stage(int artifact_fd, const artifact::Keyring& keyring,
                            const artifact::TrustPolicy& trust) const;
  /// The same, for a caller that already holds the app's lock (to stage and activate under one
  /// lock). An artifact of another app is refused (kInvalidArgument).
  Result<StageResult> stage(const AppLock& lock, int artifact_fd, const artifact::Keyring& keyring,
                            const artifact::TrustPolicy& trust) const;
  /// The same, for an artifact the caller has opened and verified (artifact::open_verified).
  Result<StageResult> stage(const AppLock& lock, artifact::VerifiedArtifact& artifact) const;
  /// The same, for a verified manifest whose payload `extract` extracts. An artifact of another
  /// app is refused. (The three overloads above live in stage_in_process.cpp, so that a program
  /// using only this one links no archive code.)
  Result<StageResult> stage(const AppLock& lock, const artifact::VerifiedManifest& verified,
                            const ExtractFn& extract) const;

  /// Records (durably) that an activation is starting, before anything is touched.
  Result<void> begin_activation(const AppLock& lock, const PendingActivation& pending) const;
  /// Removes the record once the outcome is committed.
  Result<void> end_activation(const AppLock& lock) const;
  /// The unfinished activation of an app, if any.
  Result<std::optional<PendingActivation>> pending_activation(const std::string& app) const;

  /// Records (durably, replacing any earlier record of the same id) a set's progress; the
  /// caller holds every member's lock.
  Result<void> begin_set(const PendingSet& set) const;
  /// Removes a set's record once its outcome is committed.
  Result<void> end_set(const std::string& id) const;
  /// The unfinished sets, oldest id first. A record that cannot be trusted is left out, its
  /// error added to `corrupt` (if given): one bad record never hides the others.
  Result<std::vector<PendingSet>> pending_sets(std::vector<Error>* corrupt = nullptr) const;

  /// Points `current` at `version`, durably (state.json, then the symlink, one directory fsync).
  /// The old current becomes the rollback target (previous).
  Result<void> switch_to(const AppLock& lock, const std::string& version) const;
  /// Undoes a switch: points `current` at `version` and makes `previous` (empty: none) the
  /// rollback target again, instead of the release being left (which just failed).
  Result<void> switch_back(const AppLock& lock, const std::string& version,
                           const std::string& previous) const;
  /// Forgets an app that has no releases left (its state and history), as if it had never
  /// been installed; the app directory and its lock stay. Refused (kPolicyRefused) while it
  /// has releases.
  Result<void> forget_app(const AppLock& lock) const;
  /// Removes a release. Refused for the current release and pinned ones.
  Result<void> remove(const AppLock& lock, const std::string& version) const;
  Result<void> set_pinned(const AppLock& lock, const std::string& version, bool pinned) const;
  /// Marking good also makes the release the last known-good one; marking bad clears that.
  Result<void> set_status(const AppLock& lock, const std::string& version,
                          ReleaseStatus status) const;
  /// Raises the version floor; lowering it is refused (kPolicyRefused), and so is a floor above
  /// the current release (it would leave the app running a release below its floor).
  Result<void> raise_floor(const AppLock& lock, const std::string& version) const;
  /// Records the finalized data format (and the backup taken before it; empty: none), the
  /// commit point of a finalize, then `<app root>/data-format`; lowering it is refused
  /// (kPolicyRefused).
  Result<void> record_finalized_data_format(const AppLock& lock, std::uint64_t format,
                                            const std::string& backup = "") const;
  /// Removes the oldest unprotected releases until `policy` holds. Never removes the current
  /// release, the rollback target, pinned releases or the last known-good one.
  Result<GcReport> gc(const AppLock& lock, const GcPolicy& policy) const;

  /// Appends one history line (fsynced). At most the last 10,000 lines are kept.
  Result<void> append_history(const AppLock& lock, const HistoryEntry& entry) const;
  /// The app's history, oldest first; at most `limit` newest entries.
  Result<std::vector<HistoryEntry>> history(const std::string& app, std::size_t limit = 1000) const;

 private:
  explicit Store(StoreOptions options);
  struct StateCache;
  /// Every app directory there is, with or without a state file (for recovery).
  Result<std::vector<std::string>> app_dirs() const;
  Result<std::shared_ptr<const AppState>> load_state(int dirfd, const std::string& path,
                                                     const std::string& app,
                                                     const struct stat* sb) const;
  Result<void> switch_impl(const AppLock& lock, const std::string& version,
                           const std::optional<std::string>& previous) const;
  StoreOptions m_options;
  std::map<std::string, Error> m_recovery_errors;
  std::shared_ptr<StateCache> m_cache;  ///< null unless options.cache_states
};

}  // namespace upgraded::store
