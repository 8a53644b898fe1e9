#pragma once

// org.upgraded1.Manager: every handler has one shape - read the arguments, reject unknown
// options, authorize, claim the app, start a job, reply with its path. The work itself is the
// engine's (lib/); this layer only translates.

#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>

#include "bus_options.h"
#include "config.h"
#include "event_loop.h"
#include "job.h"
#include "org.upgraded1.Manager.adaptor.h"
#include "sandbox/extract_child.h"
#include "trust_root.h"
#include "upgraded/activation/activator.h"
#include "upgraded/artifact/verifier.h"
#include "upgraded/fs/unique_fd.h"
#include "upgraded/store/store.h"
#include "upgraded/units/unit_control.h"

namespace upgraded::daemon {

class Authorizer;

/// An artifact whose signatures were checked: its manifest, and where its payload starts.
struct VerifiedHead {
  std::shared_ptr<artifact::VerifiedManifest> art;
  std::uint64_t payload_offset = 0;
};

class Manager final : public sdbus::AdaptorInterfaces<org::upgraded1::Manager_adaptor> {
 public:
  Manager(sdbus::IConnection& bus, EventLoop& loop, Config config, const store::Store& store,
          units::UnitControl& units, units::HookRunner& hooks, sandbox::Helper helper,
          bool user_instance);
  ~Manager();

  /// How extraction helpers are confined here (the HelperSandbox property), decided at start.
  const std::string& helper_sandbox() const { return m_helper_sandbox; }
  /// Starts a "recover" job for every app whose activation a crash interrupted.
  void recover_interrupted();
  /// Starts the finalize jobs that auto-finalize ([apps.<app>] auto_finalize_after_s) calls
  /// for now. The daemon calls it every few seconds.
  void auto_finalize();
  /// SIGTERM: refuse new jobs, cancel the running ones that can still be canceled, and call
  /// `idle` (on the loop) once the last job has ended.
  void shut_down(std::function<void()> idle);

 private:
  /// Gives the heap of a bulk reply back once it is sent (loop thread only).
  void trim_after_reply();
  std::vector<std::pair<std::string, std::shared_ptr<const store::AppState>>> readable_states()
      const;
  bool m_trim_posted = false;
  /// ListAllReleasesByFileDescriptor's last listing (loop thread only): the states it was made
  /// of (held, so that an address is never reused for another state), each app's releases
  /// encoded, the sealed memfd and the one read-only description of it that callers get dups
  /// of.
  struct ListingEntry {
    std::shared_ptr<const store::AppState> state;
    bool pre_finalized = false;
    std::vector<std::uint8_t> releases;
  };
  struct Listing {
    std::vector<std::pair<std::string, std::shared_ptr<const store::AppState>>> states;
    std::map<std::string, ListingEntry> apps;
    UniqueFd memfd;   ///< read-write: emptied when the next listing replaces it
    UniqueFd reader;  ///< O_RDONLY, handed out
    off_t size = 0;
  };
  Listing m_listing;
  using Options = BusOptions;
  using PathResult = sdbus::Result<sdbus::ObjectPath>;
  using ProgressFn = std::function<void(const std::string&, int)>;
  /// Work run on the job's thread. It gets the app's lock for its whole life.
  using Work =
      std::function<Result<void>(Job& job, const store::AppLock& lock, const ProgressFn& progress)>;
  /// The same for a job holding several apps: their locks, in the set's order.
  using SetWork = std::function<Result<void>(Job& job, const std::vector<store::AppLock>& locks,
                                             const ProgressFn& progress)>;

  void Install(PathResult&& result, sdbus::UnixFd artifact, Options options) override;
  void InstallSet(PathResult&& result, std::vector<sdbus::UnixFd> artifacts,
                  Options options) override;
  void Activate(PathResult&& result, std::string app, std::string version,
                Options options) override;
  void ActivateSet(PathResult&& result, std::vector<sdbus::Struct<std::string, std::string>> sets,
                   Options options) override;
  void Rollback(PathResult&& result, std::string app, Options options) override;
  void Remove(PathResult&& result, std::string app, std::string version, Options options) override;
  void SetPinned(PathResult&& result, std::string app, std::string version, bool pinned,
                 Options options) override;
  void GarbageCollect(PathResult&& result, std::string app, Options options) override;
  void SetFloor(PathResult&& result, std::string app, std::string version,
                Options options) override;
  void Finalize(PathResult&& result, std::string app, Options options) override;
  std::map<std::string, std::map<std::string, sdbus::Variant>> FinalizationStatus(
      const std::string& app) override;
  std::map<std::string, sdbus::Variant> GetApp(const std::string& app) override;
  std::map<std::string, std::map<std::string, sdbus::Variant>> GetApps() override;

  std::vector<sdbus::Struct<std::string, std::string, std::string, std::string, std::string, bool,
                            uint64_t, bool>>
  ListAllReleases() override;
  sdbus::UnixFd ListAllReleasesByFileDescriptor() override;
  std::tuple<std::string, std::string, std::string> GetJobResult(const uint32_t& id) override;
  std::vector<sdbus::Struct<std::string, std::string, std::string, std::string>> ListApps()
      override;
  std::vector<sdbus::Struct<std::string, std::string, std::string, std::string, bool, uint64_t>>
  ListReleases(const std::string& app) override;
  std::vector<sdbus::Struct<uint32_t, std::string, std::string, std::string, std::string,
                            sdbus::ObjectPath>>
  ListJobs() override;
  std::vector<sdbus::Struct<std::string, std::string, std::string, std::string, std::string,
                            std::string, std::map<std::string, uint64_t>, std::string>>
  GetHistory(const std::string& app, const Options& options) override;
  void Plan(sdbus::Result<std::string>&& result, std::string app, std::string version,
            Options options) override;
  void PlanSet(sdbus::Result<std::string>&& result,
               std::vector<sdbus::Struct<std::string, std::string>> members,
               Options options) override;
  void PlanInstall(sdbus::Result<std::string>&& result, std::vector<sdbus::UnixFd> artifacts,
                   Options options) override;
  std::string Version() override;
  std::string HelperSandbox() override;

  /// Authorizes the current call for `action`, then runs `then`, which replies (now or later);
  /// if it throws sdbus::Error, that is the reply.
  /// `decided`, if given, runs first once the decision is known, whatever it is.
  void authorized(std::shared_ptr<PathResult> reply, const std::string& action,
                  std::function<void(uid_t caller)> then, std::function<void()> decided = {});
  /// The same for several actions, each needed, asked in order.
  void authorized(std::shared_ptr<PathResult> reply, std::vector<std::string> actions,
                  std::function<void(uid_t caller)> then, std::function<void()> decided = {});
  void check_actions(std::shared_ptr<PathResult> reply, const std::string& sender,
                     std::vector<std::string> actions, std::size_t i,
                     std::function<void(uid_t caller)> then, std::function<void()> decided);
  struct QueuedInstall {
    std::shared_ptr<PathResult> reply;
    std::vector<std::shared_ptr<sdbus::UnixFd>> fds;  // one, unless `set`
    bool activate;
    uid_t caller;
    bool set;  // InstallSet (else Install)
  };
  /// Counts a call's descriptors as held until its authorization is decided (Busy beyond the
  /// bounds); returns what releases them, for `authorized`'s `decided`.
  std::function<void()> hold_undecided(std::uint32_t descriptors);
  /// Verifies an authorized Install or InstallSet now, or queues it (Busy when the queue is
  /// full).
  void queue_install(QueuedInstall install);
  /// Whether `artifacts` more may be verified now.
  bool may_verify(std::size_t artifacts) const;
  /// Reads the artifacts' heads and checks their signatures (off the loop), then starts the
  /// install job; the next queued Install follows when it is done.
  void verify(QueuedInstall install);
  void start_verification(QueuedInstall install, TrustRoot trust);
  /// Starts queued Installs while verification slots are free.
  void drain_verify_queue();
  sdbus::ObjectPath start_install(std::shared_ptr<artifact::VerifiedManifest> art,
                                  std::shared_ptr<sdbus::UnixFd> fd, std::uint64_t payload_offset,
                                  bool activate, uid_t caller);
  /// InstallSet's job: every artifact staged (a failure takes back the ones staged before it),
  /// then, with `activate`, one set activation.
  sdbus::ObjectPath start_install_set(const std::vector<VerifiedHead>& heads,
                                      const std::vector<std::shared_ptr<sdbus::UnixFd>>& fds,
                                      bool activate, uid_t caller);
  /// What staging `m` needs and finds on the filesystem of its app's directory, less what
  /// `taken` says artifacts before it in the same call need there (by filesystem id); with
  /// `take`, its payload is added to that.
  activation::InstallSpace install_space(const artifact::Manifest& m,
                                         std::map<std::uint64_t, std::uint64_t>& taken,
                                         bool take) const;
  /// The job's point of no return (Job::try_commit), announced as State "committed".
  bool commit(Job& job) const;
  /// The helper for one run, with a uid of its own.
  sandbox::Helper next_helper();
  /// Calls the shutdown continuation once no job and no task is left.
  void maybe_idle();
  /// Claims the app (in this daemon and in the store), creates the job's object and thread.
  sdbus::ObjectPath start_job(const std::string& type, const std::string& app,
                              const std::string& version, uid_t owner, Work work);
  /// The same for a job that holds several apps (a set): `versions` is what its Version says.
  sdbus::ObjectPath start_set_job(const std::string& type, const std::vector<std::string>& apps,
                                  const std::string& versions, uid_t owner, SetWork work);
  /// The apps' locks, in the order given (taken in name order, none waited for); Busy if any
  /// has a job here or a lock holder elsewhere.
  std::vector<store::AppLock> claim(const std::vector<std::string>& apps) const;
  /// Creates the job's object and thread for apps already claimed.
  sdbus::ObjectPath launch(const std::string& type, const std::vector<std::string>& apps,
                           const std::string& version, uid_t owner,
                           std::function<Result<void>(Job&, const ProgressFn&)> work);
  void finish(std::uint32_t id, const Result<void>& result);
  void cancel(const std::shared_ptr<Job>& job, const std::string& sender,
              JobObject::CancelReply reply);
  /// What the host policy says about activating `app`: job timeout, instances, max_unavailable.
  activation::ActivationOptions policy_options(const std::string& app) const;
  /// A plan's refusal while `app` has a job (Busy), if it has one.
  std::optional<Error> busy_refusal(const std::string& app) const;
  /// Runs `compute` off the event loop (at most two at once, Busy beyond) and answers `reply`
  /// with its text, or its error.
  void plan_off_loop(std::shared_ptr<sdbus::Result<std::string>> reply,
                     std::function<Result<std::string>()> compute);
  /// Runs `compute` off the event loop and answers `reply`; `release` runs on the loop first
  /// (also if no thread could run it, then Failed is thrown).
  void compute_off_loop(std::shared_ptr<sdbus::Result<std::string>> reply,
                        std::function<Result<std::string>()> compute,
                        std::function<void()> release);
  activation::ActivationOptions activation_options(Job& job) const;
  /// For one app of a set.
  activation::ActivationOptions activation_options(Job& job, const std::string& app) const;
  activation::HookContext hook_context(Job& job) const;
  activation::HookContext hook_context(Job& job, const std::string& app) const;
  /// A finalize job's work (Finalize, and auto-finalize with `automatic`).
  Work finalize_work(bool no_backup, bool automatic);
  void collect_garbage(const store::AppLock& lock, Job& job) const;

  struct Running {
    std::shared_ptr<Job> job;
    std::unique_ptr<JobObject> object;
    std::thread thread;
  };

  sdbus::IConnection& m_bus;
  EventLoop& m_loop;
  Config m_config;
  const store::Store& m_store;
  units::UnitControl& m_units;
  units::HookRunner& m_hooks;
  std::set<std::string> m_auto_finalize_warned;  // apps told once why they are not finalized
  std::set<std::string> m_auto_finalize_tried;   // "app version good_since" attempted
  sandbox::Helper m_helper;
  std::string m_helper_sandbox;  // HelperSandbox: decided once, at start
  std::unique_ptr<Authorizer> m_auth;
  std::uint32_t m_next_id = 1;
  std::uint32_t m_next_helper_id = 0;
  /// The helper ids held by runs (next_helper), released from any thread.
  struct HelperIds {
    std::mutex mutex;
    std::set<std::uint32_t> held;
  };
  std::shared_ptr<HelperIds> m_helper_ids = std::make_shared<HelperIds>();
  std::map<std::uint32_t, Running> m_jobs;
  std::map<std::string, std::uint32_t> m_busy;  // app -> job
  int m_planning = 0;                           // Plan calls being computed (at most 2)
  struct Ended {
    std::string result, message, error;
  };
  static constexpr std::size_t kKeptResults = 256;
  std::map<std::uint32_t, Ended> m_ended;  // the last kKeptResults jobs, by id
  /// Install calls whose authorization is not decided yet (each holds its descriptor): at
  /// most m_max_undecided, which leaves room in RLIMIT_NOFILE for everything else.
  std::uint32_t m_max_undecided = 256;
  std::uint32_t m_undecided_installs = 0;
  static constexpr std::uint32_t kUndecidedPerConnection = 8;
  std::map<std::string, std::uint32_t> m_undecided_by_sender;
  std::size_t m_verifying = 0;               // artifacts being verified now
  std::deque<QueuedInstall> m_verify_queue;  // authorized, waiting for their turn
  std::size_t m_queued_artifacts = 0;        // their artifacts
  int m_planning_installs = 0;               // PlanInstall calls being computed
  std::map<std::string, int> m_planning_installs_by_sender;
  bool m_shutting_down = false;
  std::function<void()> m_idle;
};

}  // namespace upgraded::daemon
