#include "manager.h"

#include <fcntl.h>
#include <malloc.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "authorizer.h"
#include "bus_errors.h"
#include "bus_options.h"
#include "log.h"
#include "sandbox/extract_child.h"
#include "sandbox/landlock.h"
#include "trust_root.h"
#include "upgraded/activation/set.h"
#include "upgraded/artifact/container.h"
#include "upgraded/artifact/verifier.h"
#include "upgraded/crash_point.h"
#include "upgraded/policy/names.h"
#include "upgraded/policy/version.h"

namespace upgraded::daemon {
namespace {

sdbus::Error invalid(const std::string& message) {
  return sdbus::Error(bus_error::kInvalidArgument, message);
}

void check_app(const std::string& app) {
  if (auto r = policy::validate_app_name(app); !r) throw invalid(r.error().message());
}
void check_version(const std::string& version) {
  if (auto r = policy::validate_version(version); !r) throw invalid(r.error().message());
}

// Reading an artifact's head and checking its signatures take milliseconds; the bound keeps
// Install's reply well within a D-Bus client's default timeout (25 s) even for a stalled file.
constexpr std::chrono::seconds kHelperTimeout{10};

template <typename T>
T value_or_throw(Result<T> r) {
  if (!r) throw bus_error::from(r.error());
  return std::move(*r);
}

}  // namespace

namespace {

// HelperSandbox: Landlock as this process sees it (its helpers inherit its filters) and, for
// helpers under a uid of their own, whether their id range is free.
std::string helper_confinement(const sandbox::Helper& helper) {
  auto landlock = sandbox::probe_landlock();
  std::string taken;
  if (helper.as && landlock.abi == 0)
    taken = sandbox::accounts_in_range(helper.as->first, Config::kHelperIds);
  return sandbox::describe_confinement(landlock, helper.as.has_value(), taken);
}

}  // namespace

Manager::Manager(sdbus::IConnection& bus, EventLoop& loop, Config config, const store::Store& store,
                 units::UnitControl& units, units::HookRunner& hooks, sandbox::Helper helper,
                 bool user_instance)
    : AdaptorInterfaces(bus, "/org/upgraded1"),
      m_bus(bus),
      m_loop(loop),
      m_config(std::move(config)),
      m_store(store),
      m_units(units),
      m_hooks(hooks),
      m_helper(std::move(helper)),
      m_helper_sandbox(helper_confinement(m_helper)),
      m_auth(std::make_unique<Authorizer>(bus, user_instance, m_config.authorizations_per_user)) {
  // Descriptors the daemon may come to hold at once: its own (bus, journal, loop: a few dozen),
  // each verification's (the artifact, pipes to and a pidfd of its helper: 10 at most), and two
  // for each queued or undecided Install (the call's message keeps its descriptor until the
  // reply, besides the daemon's own duplicate). A message whose descriptor cannot be received
  // breaks the bus connection, so the undecided ones get half of what RLIMIT_NOFILE leaves.
  rlimit nofile{};
  if (::getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur != RLIM_INFINITY) {
    std::int64_t room = static_cast<std::int64_t>(nofile.rlim_cur) - 64 -
                        2 * std::int64_t(m_config.queued_installs) -
                        10 * std::int64_t(m_config.verifications);
    m_max_undecided = static_cast<std::uint32_t>(std::clamp<std::int64_t>(room / 4, 1, 4096));
  }
  registerAdaptor();
}

Manager::~Manager() {
  unregisterAdaptor();
  for (auto& [id, running] : m_jobs) {
    running.job->request_cancel();
    if (running.thread.joinable()) running.thread.join();
  }
}

std::string Manager::Version() {
  return UPGRADED_VERSION;
}

std::string Manager::HelperSandbox() {
  return m_helper_sandbox;
}

// --- mutating methods -------------------------------------------------------------------------

void Manager::authorized(std::shared_ptr<PathResult> reply, const std::string& action,
                         std::function<void(uid_t)> then, std::function<void()> decided) {
  authorized(std::move(reply), std::vector<std::string>{action}, std::move(then),
             std::move(decided));
}

void Manager::authorized(std::shared_ptr<PathResult> reply, std::vector<std::string> actions,
                         std::function<void(uid_t)> then, std::function<void()> decided) {
  const sdbus::Message* msg = getObject().getCurrentlyProcessedMessage();
  check_actions(reply, msg ? msg->getSender() : std::string(), std::move(actions), 0,
                std::move(then), std::move(decided));
}

// Asks for actions[i], then (if allowed) for the next; `then` once all are allowed.
void Manager::check_actions(std::shared_ptr<PathResult> reply, const std::string& sender,
                            std::vector<std::string> actions, std::size_t i,
                            std::function<void(uid_t)> then, std::function<void()> decided) {
  const std::string asked = actions.at(i);
  m_auth->check(sender, asked,
                [this, reply, sender, actions = std::move(actions), i, then,
                 decided](const Authorization& a) mutable {
                  if (decided) decided();
                  try {
                    if (a.busy)
                      throw sdbus::Error(bus_error::kBusy,
                                         "too many requests: " + a.reason + "; retry later");
                    const std::string& action = actions[i];
                    if (!a.allowed) {
                      log(Level::kNotice, LogContext{"", "", "", message_id::kAccessDenied},
                          "refused " + action + " to " + sender + ": " + a.reason);
                      throw sdbus::Error(
                          bus_error::kAccessDenied,
                          "not authorized to " + action.substr(action.rfind('.') + 1) + ": " +
                              a.reason + " (run as root, or allow " + action + " in polkit)");
                    }
                    if (m_shutting_down)
                      throw sdbus::Error(bus_error::kShuttingDown, "upgraded is shutting down");
                    if (i + 1 < actions.size()) {
                      check_actions(reply, sender, std::move(actions), i + 1, std::move(then), {});
                      return;
                    }
                    then(a.uid);
                  } catch (const sdbus::Error& e) {
                    reply->returnError(e);
                  } catch (const std::exception& e) {
                    reply->returnError(sdbus::Error(bus_error::kFailed, e.what()));
                  }
                });
}

void Manager::Install(PathResult&& result, sdbus::UnixFd artifact, Options options) {
  auto reply = std::make_shared<PathResult>(std::move(result));
  try {
    check_options(options, {{"activate", "b"}});
    const bool activate = option<bool>(options, "activate", false);
    // Until authorization decides, the call holds its descriptor (and its message): a bounded
    // number of them per connection, and in all. The uid is not known yet, so a connection is
    // what can be counted; the bus bounds connections per user and in all.
    const sdbus::Message* msg = getObject().getCurrentlyProcessedMessage();
    const std::string sender = msg ? msg->getSender() : std::string();
    auto& mine = m_undecided_by_sender[sender];
    if (mine >= kUndecidedPerConnection) {
      throw sdbus::Error(bus_error::kBusy,
                         "too many installs at once on this connection (" + std::to_string(mine) +
                             " waiting for authorization); retry later, or use one connection "
                             "per " +
                             std::to_string(kUndecidedPerConnection) + " calls");
    }
    if (m_undecided_installs >= m_max_undecided) {
      if (mine == 0) m_undecided_by_sender.erase(sender);
      throw sdbus::Error(bus_error::kBusy, "too many installs at once (" +
                                               std::to_string(m_undecided_installs) +
                                               " waiting for authorization); retry later");
    }
    ++mine;
    ++m_undecided_installs;
    auto fd = std::make_shared<sdbus::UnixFd>(std::move(artifact));
    authorized(
        reply, "org.upgraded1.install",
        [this, reply, fd, activate](uid_t caller) {
          struct stat st {};
          if (::fstat(fd->get(), &st) != 0 || !S_ISREG(st.st_mode))
            throw invalid("the artifact must be passed as a descriptor of a regular file");
          // O_PATH descriptors pass fstat but cannot be read; O_WRONLY ones cannot be read either.
          const int flags = ::fcntl(fd->get(), F_GETFL);
          if (flags < 0 || (flags & O_PATH) || (flags & O_ACCMODE) == O_WRONLY)
            throw invalid("the artifact's descriptor is not open for reading");
          // A bounded number of verifications run at once (each is a thread and two helper
          // processes); a bounded number more wait for their turn; beyond that: Busy.
          if (m_verifying < m_config.verifications) {
            verify(reply, fd, activate, caller);
          } else if (m_verify_queue.size() < m_config.queued_installs) {
            m_verify_queue.push_back(QueuedInstall{reply, fd, activate, caller});
          } else {
            throw sdbus::Error(bus_error::kBusy,
                               "too many installs at once (" + std::to_string(m_verifying) +
                                   " being verified, " + std::to_string(m_verify_queue.size()) +
                                   " waiting); retry later");
          }
        },
        [this, sender] {
          --m_undecided_installs;
          // This connection may send another one now.
          auto it = m_undecided_by_sender.find(sender);
          if (it != m_undecided_by_sender.end() && --it->second == 0)
            m_undecided_by_sender.erase(it);
        });
  } catch (const sdbus::Error& e) {
    reply->returnError(e);
  }
}

void Manager::verify(std::shared_ptr<PathResult> reply, std::shared_ptr<sdbus::UnixFd> fd,
                     bool activate, uid_t caller) {
  // No helper runs where it could not be confined (HelperSandbox says why).
  if (m_helper_sandbox.rfind("unusable:", 0) == 0) {
    reply->returnError(
        sdbus::Error(bus_error::kFailed, "the extraction helpers' sandbox is " + m_helper_sandbox));
    drain_verify_queue();
    return;
  }
  // The trust root as it is now, when this artifact's turn comes.
  auto trust = read_trust_root(m_config);
  if (!trust) {
    reply->returnError(bus_error::from(trust.error()));
    return;
  }
  ++m_verifying;
  // The helper reads the container head and checks the signatures over it, in fresh
  // sandboxed processes and off the loop (the caller's file may be slow to read). This
  // process parses only the manifest, once it is known to be signed.
  try {
    start_verification(reply, fd, activate, caller, std::move(*trust));
  } catch (const std::exception& e) {
    // No thread for it (TasksMax, RLIMIT_NPROC): this call fails, the slot is free again.
    --m_verifying;
    reply->returnError(
        sdbus::Error(bus_error::kFailed, std::string("cannot start verifying: ") + e.what()));
    drain_verify_queue();
  }
}

void Manager::drain_verify_queue() {
  while (m_verifying < m_config.verifications && !m_verify_queue.empty() && !m_shutting_down) {
    QueuedInstall next = std::move(m_verify_queue.front());
    m_verify_queue.pop_front();
    verify(next.reply, next.fd, next.activate, next.caller);
  }
}

void Manager::start_verification(std::shared_ptr<PathResult> reply,
                                 std::shared_ptr<sdbus::UnixFd> fd, bool activate, uid_t caller,
                                 TrustRoot trust) {
  m_loop.run_task([this, reply, fd, activate, caller, head_helper = next_helper(),
                   verify_helper = next_helper(), trust = std::move(trust)]() mutable {
    sandbox::VerifyRequest vr;
    Result<artifact::SignatureReport> report = artifact::SignatureReport{};
    std::uint64_t payload_offset = 0;
    try {
      auto head = sandbox::read_head_in_child(head_helper, fd->get(), kHelperTimeout);
      if (!head) report = head.error();
      if (head) {
        payload_offset = artifact::canonical_payload_offset(head->manifest_bytes.size(),
                                                            head->signature_bytes.size());
        vr = {head->manifest_bytes, head->signature_bytes, m_config.threshold,
              std::move(trust.keys), std::move(trust.revoked)};
        report = sandbox::verify_in_child(verify_helper, vr, kHelperTimeout);
      }
    } catch (const std::exception& e) {
      report = Error(ErrorCode::kFailed, std::string("internal error: ") + e.what());
    }
    return std::function<void()>([this, reply, fd, activate, caller, report, payload_offset,
                                  manifest_bytes = std::move(vr.manifest_bytes)] {
      --m_verifying;
      try {
        if (m_shutting_down)
          throw sdbus::Error(bus_error::kShuttingDown, "upgraded is shutting down");
        auto signatures = value_or_throw(report);
        auto manifest = value_or_throw(artifact::parse_manifest(manifest_bytes));
        auto art = std::make_shared<artifact::VerifiedManifest>(
            artifact::VerifiedManifest{std::move(manifest), manifest_bytes, signatures});
        reply->returnResults(start_install(art, fd, payload_offset, activate, caller));
      } catch (const sdbus::Error& e) {
        reply->returnError(e);
      } catch (const std::exception& e) {
        reply->returnError(sdbus::Error(bus_error::kFailed, e.what()));
      }
      drain_verify_queue();  // the next in line, if any
      maybe_idle();
    });
  });
}

sdbus::ObjectPath Manager::start_install(std::shared_ptr<artifact::VerifiedManifest> art,
                                         std::shared_ptr<sdbus::UnixFd> fd,
                                         std::uint64_t payload_offset, bool activate,
                                         uid_t caller) {
  const std::string app = art->manifest.app, version = art->manifest.version;
  bool new_app = true;
  if (auto known = m_store.state(app)) {
    new_app = false;
    if (auto same = known->installed_as(version))
      throw sdbus::Error(bus_error::kExists,
                         app + " " + version + " is already installed" +
                             (*same == version ? "" : " (as " + *same + ", an equal version)"));
    if (known->floor && policy::compare_versions(version, *known->floor) < 0)
      throw sdbus::Error(bus_error::kPolicyRefused, app + " " + version +
                                                        " is older than the version floor " +
                                                        *known->floor + " (downgrade protection)");
  }
  Work work = [this, fd, art, payload_offset, activate, new_app, helper = next_helper()](
                  Job& job, const store::AppLock& lock,
                  const ProgressFn& progress) -> Result<void> {
    progress("extracting", 5);
    pause_point("install.before_extract");
    auto extract = [&](const artifact::ExtractPolicy& policy,
                       int dest) -> Result<artifact::ExtractStats> {
      auto stats = sandbox::extract_in_child(
          helper, {fd->get(), art->manifest_bytes, payload_offset, policy, dest, job.cancel_fd()});
      if (!stats) return stats;
      // Staging only: committing the state is the point of no return. Staging and activating:
      // the switch is, so only look at the flag here.
      bool go_on = activate ? !job.cancel_requested() : commit(job);
      if (!go_on) return Error(ErrorCode::kCanceled, "canceled");
      return stats;
    };
    auto staged = m_store.stage(lock, *art, extract);
    if (!staged) return staged.error();
    log(Level::kInfo, LogContext{job.app, job.version, std::to_string(job.id), nullptr},
        "staged " + job.app + " " + job.version + ": " + std::to_string(staged->stats.files) +
            " files, " + std::to_string(staged->stats.bytes) + " bytes");
    if (!activate) {
      progress("done", 100);
      return {};
    }
    // Staging was the first half of this job: the activation's steps fill the second.
    progress("staged", 50);
    ProgressFn second_half = [&progress](const std::string& step, int percent) {
      progress(step, 50 + percent / 2);
    };
    activation::Activator activator(m_store, m_units);
    auto done = activator.activate(lock, job.version, activation_options(job), second_half);
    if (!done) {
      // Canceled before the switch: take the staged release away again, so nothing changed.
      if (done.error().code() == ErrorCode::kCanceled) {
        (void)m_store.remove(lock, job.version);
        if (new_app) (void)m_store.forget_app(lock);
      }
      return done.error();
    }
    collect_garbage(lock, job);
    return {};
  };
  return start_job("install", app, version, caller, std::move(work));
}

void Manager::Activate(PathResult&& result, std::string app, std::string version, Options options) {
  auto reply = std::make_shared<PathResult>(std::move(result));
  try {
    check_app(app);
    check_version(version);
    check_options(options, {{"allow_bad", "b"}, {"allow_below_floor", "b"}, {"through_path", "b"}});
    const bool allow_bad = option<bool>(options, "allow_bad", false);
    const bool through = option<bool>(options, "through_path", false);
    const bool below_floor = option<bool>(options, "allow_below_floor", false);
    // Going below the floor is a decision about the floor too: both actions are needed.
    std::vector<std::string> actions{"org.upgraded1.activate"};
    if (below_floor) actions.push_back("org.upgraded1.floor");
    authorized(reply, actions,
               [this, reply, app, version, allow_bad, below_floor, through](uid_t caller) {
                 auto st = value_or_throw(m_store.state(app));
                 if (!st.releases.count(version))
                   throw sdbus::Error(bus_error::kNotFound,
                                      "no release " + version + " of " + app + " is installed");
                 Work work = [this, allow_bad, below_floor, through](
                                 Job& job, const store::AppLock& lock,
                                 const ProgressFn& progress) -> Result<void> {
                   activation::Activator activator(m_store, m_units);
                   auto how = activation_options(job);
                   how.through_path = through;
                   how.allow_bad = allow_bad;
                   how.allow_below_floor = below_floor;
                   auto done = activator.activate(lock, job.version, how, progress);
                   if (!done) return done.error();
                   collect_garbage(lock, job);
                   return {};
                 };
                 reply->returnResults(start_job("activate", app, version, caller, std::move(work)));
               });
  } catch (const sdbus::Error& e) {
    reply->returnError(e);
  }
}

void Manager::ActivateSet(PathResult&& result,
                          std::vector<sdbus::Struct<std::string, std::string>> members,
                          Options options) {
  auto reply = std::make_shared<PathResult>(std::move(result));
  try {
    check_options(options, std::initializer_list<std::pair<const char*, const char*>>{});
    if (members.empty() || members.size() > activation::kMaxSetMembers)
      throw invalid("a set has 1 to " + std::to_string(activation::kMaxSetMembers) + " apps");
    std::vector<std::string> apps, versions;
    for (const auto& m : members) {
      check_app(m.get<0>());
      check_version(m.get<1>());
      if (std::find(apps.begin(), apps.end(), m.get<0>()) != apps.end())
        throw invalid(m.get<0>() + " is in the set twice");
      apps.push_back(m.get<0>());
      versions.push_back(m.get<1>());
    }
    authorized(reply, "org.upgraded1.activate", [this, reply, apps, versions](uid_t caller) {
      std::string label;
      for (std::size_t k = 0; k < apps.size(); ++k) {
        auto st = value_or_throw(m_store.state(apps[k]));
        if (!st.releases.count(versions[k]))
          throw sdbus::Error(bus_error::kNotFound,
                             "no release " + versions[k] + " of " + apps[k] + " is installed");
        label += (k ? "," : "") + versions[k];
      }
      SetWork work = [this, versions](Job& job, const std::vector<store::AppLock>& locks,
                                      const ProgressFn& progress) -> Result<void> {
        std::vector<activation::SetMember> set;
        for (std::size_t k = 0; k < locks.size(); ++k)
          set.push_back({&locks[k], versions[k], activation_options(job, locks[k].app())});
        auto done = activation::activate_set(m_store, m_units, set, progress);
        if (!done) return done.error();
        for (const auto& lock : locks)
          collect_garbage(lock, job);
        return {};
      };
      reply->returnResults(start_set_job("activate-set", apps, label, caller, std::move(work)));
    });
  } catch (const sdbus::Error& e) {
    reply->returnError(e);
  }
}

void Manager::Rollback(PathResult&& result, std::string app, Options options) {
  auto reply = std::make_shared<PathResult>(std::move(result));
  try {
    check_app(app);
    check_options(options, {{"allow_below_floor", "b"}});
    const bool below_floor = option<bool>(options, "allow_below_floor", false);
    std::vector<std::string> actions{"org.upgraded1.rollback"};
    if (below_floor) actions.push_back("org.upgraded1.floor");
    authorized(reply, actions, [this, reply, app, below_floor](uid_t caller) {
      // A running job may be changing the rollback target: Busy, not an answer from a state
      // in flux.
      if (auto it = m_busy.find(app); it != m_busy.end())
        throw sdbus::Error(bus_error::kBusy,
                           app + " is busy with job " + std::to_string(it->second));
      auto st = value_or_throw(m_store.state(app));
      if (!st.previous)
        throw sdbus::Error(bus_error::kNotFound, app + " has no release to roll back to");
      Work work = [this, below_floor](Job& job, const store::AppLock& lock,
                                      const ProgressFn& progress) -> Result<void> {
        activation::Activator activator(m_store, m_units);
        auto how = activation_options(job);
        how.expected_target = job.version;
        how.allow_below_floor = below_floor;
        auto done = activator.rollback(lock, how, progress);
        if (!done) return done.error();
        return {};
      };
      reply->returnResults(start_job("rollback", app, *st.previous, caller, std::move(work)));
    });
  } catch (const sdbus::Error& e) {
    reply->returnError(e);
  }
}

void Manager::Remove(PathResult&& result, std::string app, std::string version, Options options) {
  auto reply = std::make_shared<PathResult>(std::move(result));
  try {
    check_app(app);
    check_version(version);
    check_options(options, {});
    authorized(reply, "org.upgraded1.remove", [this, reply, app, version](uid_t caller) {
      auto st = value_or_throw(m_store.state(app));
      auto rec = st.releases.find(version);
      if (rec == st.releases.end())
        throw sdbus::Error(bus_error::kNotFound,
                           "no release " + version + " of " + app + " is installed");
      if (st.current == version)
        throw sdbus::Error(bus_error::kPolicyRefused,
                           app + " " + version + " is the current release; activate another first");
      if (rec->second.pinned)
        throw sdbus::Error(bus_error::kPolicyRefused,
                           app + " " + version + " is pinned; unpin it first");
      Work work = [this](Job& job, const store::AppLock& lock,
                         const ProgressFn& progress) -> Result<void> {
        if (!commit(job)) return Error(ErrorCode::kCanceled, "canceled");
        progress("removing", 50);
        UPGRADED_TRY(m_store.remove(lock, job.version));
        (void)m_store.append_history(
            lock, store::HistoryEntry{"", "remove", job.version, "", "done", "", {}});
        progress("done", 100);
        return {};
      };
      reply->returnResults(start_job("remove", app, version, caller, std::move(work)));
    });
  } catch (const sdbus::Error& e) {
    reply->returnError(e);
  }
}

void Manager::SetPinned(PathResult&& result, std::string app, std::string version, bool pinned,
                        Options options) {
  auto reply = std::make_shared<PathResult>(std::move(result));
  try {
    check_app(app);
    check_version(version);
    check_options(options, {});
    authorized(reply, "org.upgraded1.setpinned", [this, reply, app, version, pinned](uid_t caller) {
      auto st = value_or_throw(m_store.state(app));
      if (!st.releases.count(version))
        throw sdbus::Error(bus_error::kNotFound,
                           "no release " + version + " of " + app + " is installed");
      Work work = [this, pinned](Job& job, const store::AppLock& lock,
                                 const ProgressFn& progress) -> Result<void> {
        if (!commit(job)) return Error(ErrorCode::kCanceled, "canceled");
        progress(pinned ? "pinning" : "unpinning", 50);
        UPGRADED_TRY(m_store.set_pinned(lock, job.version, pinned));
        progress("done", 100);
        return {};
      };
      reply->returnResults(
          start_job(pinned ? "pin" : "unpin", app, version, caller, std::move(work)));
    });
  } catch (const sdbus::Error& e) {
    reply->returnError(e);
  }
}

void Manager::GarbageCollect(PathResult&& result, std::string app, Options options) {
  auto reply = std::make_shared<PathResult>(std::move(result));
  try {
    check_app(app);
    check_options(options, {{"keep", "u"}, {"max_bytes", "t"}});
    store::GcPolicy policy{m_config.keep, m_config.max_bytes};
    if (options.count("keep")) policy.keep = option<std::uint32_t>(options, "keep", 0);
    if (options.count("max_bytes"))
      policy.max_bytes = option<std::uint64_t>(options, "max_bytes", 0);
    if (policy.keep < 1) throw invalid("keep must be at least 1");
    authorized(reply, "org.upgraded1.garbagecollect", [this, reply, app, policy](uid_t caller) {
      (void)value_or_throw(m_store.state(app));  // NotFound for an unknown app
      Work work = [this, policy](Job& job, const store::AppLock& lock,
                                 const ProgressFn& progress) -> Result<void> {
        if (!commit(job)) return Error(ErrorCode::kCanceled, "canceled");
        progress("removing", 50);
        auto gc = m_store.gc(lock, policy);
        if (!gc) return gc.error();
        std::string removed;
        for (const auto& v : gc->removed)
          removed += (removed.empty() ? "" : ", ") + v;
        (void)m_store.append_history(
            lock,
            store::HistoryEntry{"",
                                "gc",
                                "",
                                "",
                                "done",
                                removed.empty() ? "nothing to remove"
                                                : "removed " + removed + " (" +
                                                      std::to_string(gc->freed_bytes) + " bytes)",
                                {}});
        progress("done", 100);
        return {};
      };
      reply->returnResults(start_job("gc", app, "", caller, std::move(work)));
    });
  } catch (const sdbus::Error& e) {
    reply->returnError(e);
  }
}

void Manager::SetFloor(PathResult&& result, std::string app, std::string version, Options options) {
  auto reply = std::make_shared<PathResult>(std::move(result));
  try {
    check_app(app);
    check_version(version);
    check_options(options, {});
    authorized(reply, "org.upgraded1.floor", [this, reply, app, version](uid_t caller) {
      (void)value_or_throw(m_store.state(app));  // NotFound for an unknown app
      Work work = [this](Job& job, const store::AppLock& lock,
                         const ProgressFn& progress) -> Result<void> {
        auto before = m_store.state(job.app);
        if (!before) return before.error();
        if (!commit(job)) return Error(ErrorCode::kCanceled, "canceled");
        progress("raising the floor", 50);
        UPGRADED_TRY(m_store.raise_floor(lock, job.version));
        const std::string old = before->floor.value_or("");
        if (!before->floor || policy::compare_versions(*before->floor, job.version) != 0)
          (void)m_store.append_history(
              lock,
              store::HistoryEntry{"",
                                  "floor",
                                  old,
                                  job.version,
                                  "done",
                                  "version floor raised" + (old.empty() ? "" : " from " + old) +
                                      " to " + job.version + " (downgrade protection)",
                                  {}});
        progress("done", 100);
        return {};
      };
      reply->returnResults(start_job("floor", app, version, caller, std::move(work)));
    });
  } catch (const sdbus::Error& e) {
    reply->returnError(e);
  }
}

void Manager::Finalize(PathResult&& result, std::string app, Options options) {
  auto reply = std::make_shared<PathResult>(std::move(result));
  try {
    check_app(app);
    check_options(options, {{"no_backup", "b"}});
    const bool no_backup = option<bool>(options, "no_backup", false);
    // Skipping the backup removes the way back: a decision of its own.
    std::vector<std::string> actions{"org.upgraded1.finalize"};
    if (no_backup) actions.push_back("org.upgraded1.finalize-without-backup");
    authorized(reply, actions, [this, reply, app, no_backup](uid_t caller) {
      auto st = value_or_throw(m_store.state(app));
      if (!st.current)
        throw sdbus::Error(bus_error::kPolicyRefused, app + " has no current release");
      auto m = value_or_throw(m_store.manifest(app, *st.current));
      if (auto r = activation::check_finalize(st, m, no_backup); !r)
        throw bus_error::from(r.error());
      if (auto pending = m_store.pending_activation(app); pending && *pending)
        throw sdbus::Error(bus_error::kPolicyRefused, "an activation of " + app + " " +
                                                          (*pending)->to +
                                                          " is not finished; finalize once it is");
      reply->returnResults(
          start_job("finalize", app, *st.current, caller, finalize_work(no_backup, false)));
    });
  } catch (const sdbus::Error& e) {
    reply->returnError(e);
  }
}

Manager::Work Manager::finalize_work(bool no_backup, bool automatic) {
  return [this, no_backup, automatic](Job& job, const store::AppLock& lock,
                                      const ProgressFn& progress) -> Result<void> {
    activation::Activator activator(m_store, m_units);
    activation::FinalizeOptions o;
    o.no_backup = no_backup;
    o.commit = [this, &job] { return commit(job); };
    o.hooks = hook_context(job);
    auto done = activator.finalize(lock, o, progress);
    if (!done && automatic)
      return done.error().with_context("auto-finalize (not retried until " + job.app +
                                       " is activated again; upgradectl finalize does it by hand)");
    if (!done) return done.error();
    log(Level::kInfo, LogContext{job.app, job.version, std::to_string(job.id), nullptr},
        job.app + " " + job.version + ": data format " + std::to_string(done->format) +
            " finalized" +
            (done->backup.empty() ? " without a backup" : "; backup '" + done->backup + "'"));
    return {};
  };
}

void Manager::auto_finalize() {
  if (m_shutting_down) return;
  for (const auto& [app, policy] : m_config.app_policies) {
    if (policy.auto_finalize_after_s == 0 || m_busy.count(app)) continue;
    auto st = m_store.state(app);
    if (!st || !st->pre_finalized() || !st->current || !st->good_since) continue;
    // One attempt per healthy stretch of a release: a failed one is not retried until the app
    // is activated again (or the daemon restarts); an operator finalizes by hand meanwhile.
    const std::string attempt = app + " " + *st->current + " " + *st->good_since;
    if (m_auto_finalize_tried.count(attempt)) continue;
    auto since = artifact::parse_rfc3339(*st->good_since);
    if (!since ||
        std::time(nullptr) - *since < static_cast<std::int64_t>(policy.auto_finalize_after_s))
      continue;
    auto m = m_store.manifest(app, *st->current);
    if (!m) continue;
    LogContext c{app, *st->current, "", nullptr};
    if (auto r = activation::check_finalize(*st, *m, /*no_backup=*/false); !r) {
      if (m_auto_finalize_warned.insert(app + " " + *st->current).second)
        log(Level::kWarning, c,
            app + " " + *st->current + " is not finalized automatically: " + r.error().message());
      continue;
    }
    m_auto_finalize_tried.insert(attempt);
    log(Level::kInfo, c,
        app + " " + *st->current + " has been healthy for " +
            std::to_string(policy.auto_finalize_after_s) +
            " s: finalizing (auto_finalize_after_s)");
    try {
      start_job("finalize", app, *st->current, 0, finalize_work(false, true));
    } catch (const sdbus::Error& e) {
      log(Level::kWarning, c, app + ": cannot start its auto-finalize: " + e.getMessage());
    }
  }
}

// --- jobs -------------------------------------------------------------------------------------

activation::ActivationOptions Manager::policy_options(const std::string& app) const {
  activation::ActivationOptions o;
  o.job_timeout = std::chrono::seconds(m_config.job_timeout_s);
  if (auto it = m_config.app_policies.find(app); it != m_config.app_policies.end()) {
    o.instances = it->second.instances;
    o.max_unavailable = it->second.max_unavailable;
  }
  return o;
}

activation::ActivationOptions Manager::activation_options(Job& job) const {
  return activation_options(job, job.app);
}

activation::ActivationOptions Manager::activation_options(Job& job, const std::string& app) const {
  activation::ActivationOptions o = policy_options(app);
  o.commit = [this, &job] { return commit(job); };
  o.hooks = hook_context(job, app);
  return o;
}

activation::HookContext Manager::hook_context(Job& job) const {
  return hook_context(job, job.app);
}

activation::HookContext Manager::hook_context(Job& job, const std::string& app) const {
  activation::HookContext c;
  c.runner = &m_hooks;
  c.job_id = job.id;
  c.cancel_fd = job.cancel_fd();
  if (auto it = m_config.app_policies.find(app); it != m_config.app_policies.end()) {
    for (const auto& d : it->second.data_dirs)
      c.data_dirs.push_back(m_config.path(d));
    c.user = it->second.user;
    c.group = it->second.group;
  }
  // The trust keys and the host policy are none of a hook's business. The daemon creates the
  // directory at start: this mount is always there, and with it systemd's refusal to run a
  // hook it cannot sandbox.
  c.hidden_paths.push_back(m_config.config_dir());
  // A hook that reaches the bus or systemd's private socket as root is root for them: both are
  // out of its sight.
  c.inaccessible_paths = {"/run/dbus/system_bus_socket", "/run/systemd/private"};
  if (const char* addr = std::getenv("DBUS_SESSION_BUS_ADDRESS"))
    for (std::string_view a(addr); !a.empty();) {
      auto end = a.find(';');
      std::string_view one = a.substr(0, end);
      if (one.starts_with("unix:path=")) {
        std::string_view path = one.substr(10);
        path = path.substr(0, path.find(','));
        c.inaccessible_paths.emplace_back(path);
      }
      a = end == std::string_view::npos ? std::string_view() : a.substr(end + 1);
    }
  if (const char* runtime = std::getenv("XDG_RUNTIME_DIR"); runtime && *runtime == '/') {
    c.inaccessible_paths.push_back(std::string(runtime) + "/bus");
    c.inaccessible_paths.push_back(std::string(runtime) + "/systemd/private");
  }
  c.on_status = [this, id = job.id](const std::string& phase, const std::string& status) {
    m_loop.post([this, id, step = phase + " hook: " + units::printable_line(status, 200)] {
      if (auto j = m_jobs.find(id); j != m_jobs.end())
        j->second.object->update(step, j->second.job->progress);
    });
  };
  return c;
}

bool Manager::commit(Job& job) const {
  if (!job.try_commit()) return false;
  m_loop.post([this, id = job.id] {
    if (auto it = m_jobs.find(id); it != m_jobs.end()) it->second.object->set_state("committed");
  });
  return true;
}

sandbox::Helper Manager::next_helper() {
  sandbox::Helper h = m_helper;
  // Each helper run gets a uid of its own, so that no two of them (two apps installing at
  // once) can touch each other's trees: a uid owns only what its one run created.
  if (h.as) {
    auto id = static_cast<uid_t>(h.as->first + m_next_helper_id++ % Config::kHelperIds);
    h.as = std::make_pair(id, static_cast<gid_t>(id));
  }
  return h;
}

void Manager::maybe_idle() {
  if (m_shutting_down && m_jobs.empty() && m_loop.pending_tasks() == 0 && m_idle) {
    auto idle = std::move(m_idle);
    m_idle = nullptr;
    idle();
  }
}

// After a switch, not before an extraction: deleting many files right before creating many is
// slow on some filesystems, and the space is needed only for the next install.
void Manager::collect_garbage(const store::AppLock& lock, Job& job) const {
  auto gc = m_store.gc(lock, store::GcPolicy{m_config.keep, m_config.max_bytes});
  LogContext c{job.app, job.version, std::to_string(job.id), nullptr};
  if (!gc)
    log(Level::kWarning, c, "garbage collection failed, ignoring: " + gc.error().message());
  else if (!gc->removed.empty())
    log(Level::kInfo, c,
        "removed " + std::to_string(gc->removed.size()) + " old release(s), " +
            std::to_string(gc->freed_bytes) + " bytes");
}

std::vector<store::AppLock> Manager::claim(const std::vector<std::string>& apps) const {
  for (const auto& app : apps)
    if (auto it = m_busy.find(app); it != m_busy.end())
      throw sdbus::Error(bus_error::kBusy, app + " is busy with job " + std::to_string(it->second));
  // The store's locks also keep out other processes (upgradectl --offline); taken in name
  // order, without waiting, so that no two claims wait for each other.
  std::vector<std::string> order = apps;
  std::sort(order.begin(), order.end());
  std::map<std::string, store::AppLock> held;
  for (const auto& app : order) {
    auto lock = m_store.lock(app);
    if (!lock) throw bus_error::from(lock.error());
    held.emplace(app, std::move(*lock));
  }
  std::vector<store::AppLock> locks;
  for (const auto& app : apps)
    locks.push_back(std::move(held.at(app)));
  return locks;
}

sdbus::ObjectPath Manager::start_job(const std::string& type, const std::string& app,
                                     const std::string& version, uid_t owner, Work work) {
  auto locks = std::make_shared<std::vector<store::AppLock>>(claim({app}));
  return launch(type, {app}, version, owner,
                [locks, work = std::move(work)](Job& job, const ProgressFn& progress) {
                  return work(job, locks->front(), progress);
                });
}

sdbus::ObjectPath Manager::start_set_job(const std::string& type,
                                         const std::vector<std::string>& apps,
                                         const std::string& versions, uid_t owner, SetWork work) {
  auto locks = std::make_shared<std::vector<store::AppLock>>(claim(apps));
  return launch(type, apps, versions, owner,
                [locks, work = std::move(work)](Job& job, const ProgressFn& progress) {
                  return work(job, *locks, progress);
                });
}

sdbus::ObjectPath Manager::launch(const std::string& type, const std::vector<std::string>& apps,
                                  const std::string& version, uid_t owner,
                                  std::function<Result<void>(Job&, const ProgressFn&)> work) {
  std::string app;
  for (const auto& a : apps)
    app += (app.empty() ? "" : ",") + a;
  auto job = std::make_shared<Job>(m_next_id++, type, app, version, owner);
  job->apps = apps;
  // A recovery has nothing to cancel: the units must be brought in line with `current`.
  if (type == "recover") (void)job->try_commit();
  Running running;
  running.job = job;
  running.object = std::make_unique<JobObject>(
      m_bus, job,
      [this](const std::shared_ptr<Job>& j, const std::string& sender,
             JobObject::CancelReply reply) { cancel(j, sender, std::move(reply)); });
  const std::uint32_t id = job->id;
  sdbus::ObjectPath path = job->path();
  for (const auto& a : apps)
    m_busy[a] = id;
  m_jobs[id] = std::move(running);
  log(Level::kInfo, LogContext{app, version, std::to_string(id), message_id::kJobStarted},
      type + " " + app + (version.empty() ? "" : " " + version) + ": job " + std::to_string(id) +
          " started");
  // The reply goes out first (the caller returns), then JobNew, then the work: never signal
  // before the method has returned.
  m_loop.post([this, id, path, job, work = std::move(work)]() mutable {
    auto it = m_jobs.find(id);
    if (it == m_jobs.end()) return;
    emitJobNew(id, path);
    try {
      it->second.thread = std::thread([this, job, work = std::move(work)] {
        ProgressFn progress = [this, id = job->id](const std::string& step, int percent) {
          m_loop.post([this, id, step, percent] {
            if (auto j = m_jobs.find(id); j != m_jobs.end())
              j->second.object->update(step,
                                       static_cast<std::uint32_t>(std::clamp(percent, 0, 100)));
          });
        };
        Result<void> r = Error(ErrorCode::kFailed, "the job did not run");
        try {
          r = work(*job, progress);
        } catch (const std::exception& e) {
          r = Error(ErrorCode::kFailed, std::string("internal error: ") + e.what());
        }
        m_loop.post([this, id = job->id, r] { finish(id, r); });
      });
    } catch (const std::system_error& e) {
      finish(id, Error(ErrorCode::kFailed, std::string("cannot start a thread: ") + e.what()));
    }
  });
  return path;
}

void Manager::finish(std::uint32_t id, const Result<void>& r) {
  auto it = m_jobs.find(id);
  if (it == m_jobs.end()) return;
  Running running = std::move(it->second);
  m_jobs.erase(it);
  if (running.thread.joinable()) running.thread.join();  // it posted this as its last act
  const Job& job = *running.job;
  for (const auto& a : job.apps)
    m_busy.erase(a);
  std::string result = r                                          ? "done"
                       : r.error().code() == ErrorCode::kCanceled ? "canceled"
                                                                  : "failed";
  std::string message = r ? "" : r.error().message();
  LogContext c{job.app, job.version, std::to_string(id),
               r ? message_id::kJobDone : message_id::kJobFailed};
  if (!r && message.find("; rolled back to ") != std::string::npos)
    c.message_id = message_id::kRolledBack;
  log(r ? Level::kInfo : Level::kError, c,
      job.type + " " + job.app + (job.version.empty() ? "" : " " + job.version) + ": " + result +
          (message.empty() ? "" : ": " + message));
  if (!r) running.object->set_error(bus_error::name_for(r.error().code()));
  m_ended[id] = Ended{result, message, r ? "" : bus_error::name_for(r.error().code())};
  while (m_ended.size() > kKeptResults)
    m_ended.erase(m_ended.begin());  // ids only grow: the oldest first
  running.object.reset();            // the object is gone when JobRemoved arrives
  emitJobRemoved(id, sdbus::ObjectPath(job.path()), result, message);
  if (m_jobs.empty()) ::malloc_trim(0);  // idle again: give the job's memory back
  maybe_idle();
}

void Manager::cancel(const std::shared_ptr<Job>& job, const std::string& sender,
                     JobObject::CancelReply reply) {
  m_auth->caller_uid(sender, [this, job, reply](uid_t uid) {
    try {
      if (uid != 0 && uid != job->owner)
        throw sdbus::Error(
            bus_error::kAccessDenied,
            "only root or the uid that started job " + std::to_string(job->id) + " may cancel it");
      auto it = m_jobs.find(job->id);
      if (it == m_jobs.end())
        throw sdbus::Error(bus_error::kNotCancelable,
                           "job " + std::to_string(job->id) + " has ended");
      if (job->request_cancel() == Job::CancelOutcome::kTooLate)
        throw sdbus::Error(bus_error::kNotCancelable,
                           "job " + std::to_string(job->id) +
                               " is past its point of no return (the switch); wait for it to end");
      it->second.object->set_state("canceling");
      reply->returnResults();
    } catch (const sdbus::Error& e) {
      reply->returnError(e);
    }
  });
}

void Manager::recover_interrupted() {
  // A daemon that died while a hook ran left it running: it is stopped, never awaited or rerun
  // (what its step means is decided by the recovery below, docs/hooks.md).
  if (auto left = m_hooks.stop_leftovers(""); !left)
    log(Level::kError, "stopping hooks left running: " + left.error().message());
  else
    for (const auto& unit : *left)
      log(Level::kWarning, unit + " was left running by a previous daemon: stopped");
  auto apps = m_store.apps();
  if (!apps) {
    log(Level::kError, "listing apps for recovery failed: " + apps.error().message());
    return;
  }
  // Sets first: each member's interrupted activation is finished by its set's recovery, in
  // the set's order, before the set is finished or undone (docs/dbus-api.md, ActivateSet).
  std::set<std::string> in_sets;
  std::vector<Error> corrupt;
  auto sets = m_store.pending_sets(&corrupt);
  if (!sets) log(Level::kError, "reading the interrupted sets failed: " + sets.error().message());
  for (const auto& e : corrupt)
    log(Level::kError, e.message() + ": left alone; its apps are recovered one by one");
  for (const auto& set : sets ? *sets : std::vector<store::PendingSet>()) {
    std::vector<std::string> members;
    for (const auto& m : set.members)
      members.push_back(m.app);
    log(Level::kWarning, set.id + " (" + std::to_string(members.size()) +
                             " apps) was interrupted; " +
                             (set.completed == set.members.size() ? "finishing it" : "undoing it"));
    try {
      start_set_job("recover", members, "", 0,
                    [this, set](Job& job, const std::vector<store::AppLock>& locks,
                                const ProgressFn& progress) -> Result<void> {
                      std::vector<activation::SetMember> ms;
                      for (const auto& lock : locks)
                        ms.push_back({&lock, "", activation_options(job, lock.app())});
                      return activation::recover_set(m_store, m_units, set, ms, progress);
                    });
      in_sets.insert(members.begin(), members.end());
    } catch (const sdbus::Error& e) {
      // Its apps are then recovered one by one below; the record stays for the next start.
      log(Level::kError, set.id + ": cannot start its recovery: " + e.getMessage());
    }
  }
  for (const auto& app : *apps) {
    if (in_sets.count(app)) continue;
    auto pending = m_store.pending_activation(app);
    if (!pending) {
      log(Level::kError, LogContext{app, "", "", nullptr},
          app + ": reading its pending activation failed: " + pending.error().message());
      continue;
    }
    if (!*pending) continue;
    log(Level::kWarning, LogContext{app, (*pending)->to, "", nullptr},
        app + ": the " + (*pending)->op + " of " + (*pending)->to +
            " was interrupted; restarting the units of the current release");
    try {
      start_job("recover", app, (*pending)->to, 0,
                [this](Job& job, const store::AppLock& lock, const ProgressFn& progress) {
                  activation::Activator activator(m_store, m_units);
                  // The job is committed from its start: no cancel reaches it.
                  auto r = activator.resume(lock, activation_options(job), progress);
                  return r ? Result<void>() : Result<void>(r.error());
                });
    } catch (const sdbus::Error& e) {
      log(Level::kError, LogContext{app, "", "", nullptr},
          app + ": cannot start its recovery: " + e.getMessage());
    }
  }
}

void Manager::shut_down(std::function<void()> idle) {
  m_shutting_down = true;
  m_idle = std::move(idle);
  for (auto& queued : m_verify_queue)
    queued.reply->returnError(sdbus::Error(bus_error::kShuttingDown, "upgraded is shutting down"));
  m_verify_queue.clear();
  for (auto& [id, running] : m_jobs)
    if (running.job->request_cancel() == Job::CancelOutcome::kAsked)
      running.object->set_state("canceling");
  maybe_idle();
}

// --- read-only methods ------------------------------------------------------------------------

// The states of every app the bulk reads list: an app whose state.json cannot be read is left
// out (recovery at start logged it, and its own calls name the error).
std::vector<std::pair<std::string, std::shared_ptr<const store::AppState>>>
Manager::readable_states() const {
  std::vector<std::pair<std::string, std::shared_ptr<const store::AppState>>> out;
  for (auto& listed : value_or_throw(m_store.states()))
    if (listed.state) out.emplace_back(std::move(listed.app), std::move(listed.state));
  return out;
}

std::vector<sdbus::Struct<std::string, std::string, std::string, std::string>> Manager::ListApps() {
  std::vector<sdbus::Struct<std::string, std::string, std::string, std::string>> out;
  for (const auto& [app, st] : readable_states())
    out.emplace_back(app, st->current.value_or(""), st->previous.value_or(""),
                     st->last_known_good.value_or(""));
  return out;
}

std::map<std::string, std::map<std::string, sdbus::Variant>> Manager::FinalizationStatus(
    const std::string& app) {
  std::vector<std::pair<std::string, std::shared_ptr<const store::AppState>>> apps;
  if (app.empty()) {
    apps = readable_states();
  } else {
    check_app(app);
    apps.emplace_back(app,
                      std::make_shared<const store::AppState>(value_or_throw(m_store.state(app))));
  }
  std::map<std::string, std::map<std::string, sdbus::Variant>> out;
  for (const auto& [a, st] : apps) {
    std::map<std::string, sdbus::Variant> v;
    const bool pre = st->pre_finalized();
    v["state"] = sdbus::Variant(std::string(pre                         ? "pre-finalized"
                                            : st->finalized_data_format ? "finalized"
                                                                        : "none"));
    if (st->finalized_data_format)
      v["finalized_data_format"] = sdbus::Variant(std::uint64_t(*st->finalized_data_format));
    v["finalized_at"] = sdbus::Variant(st->finalized_at.value_or(""));
    v["current"] = sdbus::Variant(st->current.value_or(""));
    std::uint64_t writes = 0;
    if (st->current && st->releases.count(*st->current))
      writes = st->releases.at(*st->current).data_format.writes;
    v["current_writes"] = sdbus::Variant(writes);
    v["pending_since"] = sdbus::Variant(pre ? st->pending_since.value_or("") : std::string());
    v["last_backup"] = sdbus::Variant(st->last_backup.value_or(""));
    std::uint64_t soak = 0;
    if (auto p = m_config.app_policies.find(a); p != m_config.app_policies.end())
      soak = p->second.auto_finalize_after_s;
    v["auto_finalize_after_s"] = sdbus::Variant(soak);
    std::vector<std::string> targets;
    for (const auto& ver : st->versions_in_order()) {
      const auto& r = st->releases.at(ver);
      if (ver == st->current || r.status == store::ReleaseStatus::kBad) continue;
      const std::uint64_t f = st->finalized_data_format.value_or(0);
      if (!st->finalized_data_format || (r.data_format.reads_min <= f && f <= r.data_format.writes))
        targets.push_back(ver);
    }
    v["rollback_targets"] = sdbus::Variant(targets);
    out[a] = std::move(v);
  }
  return out;
}

namespace {

std::map<std::string, sdbus::Variant> app_details(const store::Store& store, const std::string& app,
                                                  const store::AppState& st) {
  std::map<std::string, sdbus::Variant> out;
  out["current"] = sdbus::Variant(st.current.value_or(""));
  out["previous"] = sdbus::Variant(st.previous.value_or(""));
  out["last_known_good"] = sdbus::Variant(st.last_known_good.value_or(""));
  out["floor"] = sdbus::Variant(st.floor.value_or(""));
  if (st.finalized_data_format)
    out["finalized_data_format"] = sdbus::Variant(std::uint64_t(*st.finalized_data_format));
  out["finalization"] = sdbus::Variant(std::string(st.pre_finalized()         ? "pre-finalized"
                                                   : st.finalized_data_format ? "finalized"
                                                                              : "none"));
  if (st.current && st.releases.count(*st.current))
    out["current_writes"] =
        sdbus::Variant(std::uint64_t(st.releases.at(*st.current).data_format.writes));
  auto pending = store.pending_activation(app);
  out["pending_activation"] = sdbus::Variant(pending && *pending ? (*pending)->to : std::string());
  return out;
}

}  // namespace

std::map<std::string, sdbus::Variant> Manager::GetApp(const std::string& app) {
  check_app(app);
  return app_details(m_store, app, value_or_throw(m_store.state(app)));
}

// A bulk reply of thousands of apps is built and freed in a burst: once it is sent, the heap it
// used goes back to the system, so that the idle daemon stays small.
// One trim for any number of calls in a burst, and none while jobs run (a trim takes every
// malloc arena's lock in turn; a caller looping on the bulk reads must not slow installs).
void Manager::trim_after_reply() {
  if (m_trim_posted) return;
  m_trim_posted = true;
  m_loop.post([this] {
    m_trim_posted = false;
    if (m_jobs.empty()) ::malloc_trim(0);
  });
}

std::map<std::string, std::map<std::string, sdbus::Variant>> Manager::GetApps() {
  trim_after_reply();
  std::map<std::string, std::map<std::string, sdbus::Variant>> out;
  for (const auto& [app, st] : readable_states())
    out.emplace(app, app_details(m_store, app, *st));
  return out;
}

std::vector<sdbus::Struct<std::string, std::string, std::string, std::string, std::string, bool,
                          uint64_t, bool>>
Manager::ListAllReleases() {
  trim_after_reply();
  std::vector<sdbus::Struct<std::string, std::string, std::string, std::string, std::string, bool,
                            uint64_t, bool>>
      out;
  for (const auto& [app, st] : readable_states()) {
    for (const auto& v : st->versions_in_order()) {
      const auto& r = st->releases.at(v);
      std::string role = st->current == v ? "current" : st->previous == v ? "previous" : "";
      out.emplace_back(app, v, std::string(store::to_string(r.status)), role, r.staged_at, r.pinned,
                       r.size, role == "current" && st->pre_finalized());
    }
  }
  return out;
}

std::tuple<std::string, std::string, std::string> Manager::GetJobResult(const uint32_t& id) {
  if (m_jobs.count(id)) return {"running", "", ""};
  auto it = m_ended.find(id);
  if (it == m_ended.end())
    throw sdbus::Error(bus_error::kNotFound, "no job " + std::to_string(id) +
                                                 " (running or among the last " +
                                                 std::to_string(kKeptResults) + " to end)");
  return {it->second.result, it->second.message, it->second.error};
}

std::vector<sdbus::Struct<std::string, std::string, std::string, std::string, bool, uint64_t>>
Manager::ListReleases(const std::string& app) {
  check_app(app);
  auto st = value_or_throw(m_store.state(app));
  std::vector<sdbus::Struct<std::string, std::string, std::string, std::string, bool, uint64_t>>
      out;
  for (const auto& v : st.versions_in_order()) {
    const auto& r = st.releases.at(v);
    std::string role = st.current == v ? "current" : st.previous == v ? "previous" : "";
    out.emplace_back(v, std::string(store::to_string(r.status)), role, r.staged_at, r.pinned,
                     r.size);
  }
  return out;
}

std::vector<
    sdbus::Struct<uint32_t, std::string, std::string, std::string, std::string, sdbus::ObjectPath>>
Manager::ListJobs() {
  std::vector<sdbus::Struct<uint32_t, std::string, std::string, std::string, std::string,
                            sdbus::ObjectPath>>
      out;
  for (const auto& [id, running] : m_jobs) {
    const Job& j = *running.job;
    out.emplace_back(id, j.type, j.app, j.version, j.state, sdbus::ObjectPath(j.path()));
  }
  return out;
}

std::vector<sdbus::Struct<std::string, std::string, std::string, std::string, std::string,
                          std::string, std::map<std::string, uint64_t>, std::string>>
Manager::GetHistory(const std::string& app, const Options& options) {
  check_app(app);
  check_options(options, {{"limit", "u"}});
  std::uint32_t limit = option<std::uint32_t>(options, "limit", 100);
  if (limit == 0 || limit > 10000) throw invalid("limit must be from 1 to 10000");
  (void)value_or_throw(m_store.state(app));  // NotFound for an unknown app
  std::vector<sdbus::Struct<std::string, std::string, std::string, std::string, std::string,
                            std::string, std::map<std::string, uint64_t>, std::string>>
      out;
  for (auto& h : value_or_throw(m_store.history(app, limit)))
    out.emplace_back(
        h.time, h.op, h.from, h.to, h.result, h.message,
        std::map<std::string, uint64_t>(h.downtime_usec.begin(), h.downtime_usec.end()),
        h.transaction);
  return out;
}

void Manager::Plan(sdbus::Result<std::string>&& result, std::string app, std::string version,
                   Options options) {
  auto reply = std::make_shared<sdbus::Result<std::string>>(std::move(result));
  try {
    check_app(app);
    check_options(
        options,
        {{"allow_bad", "b"}, {"allow_below_floor", "b"}, {"through_path", "b"}, {"rollback", "b"}});
    const bool rollback = option<bool>(options, "rollback", false);
    // Rollback takes only allow_below_floor.
    if (rollback) check_options(options, {{"rollback", "b"}, {"allow_below_floor", "b"}});
    if (rollback ? !version.empty() : version.empty())
      throw invalid(rollback ? "a rollback's plan takes no version" : "no version given");
    if (!rollback) check_version(version);
    activation::ActivationOptions how = policy_options(app);
    how.hooks.runner = &m_hooks;  // the daemon runs hooks: releases with hooks are not refused
    how.allow_bad = option<bool>(options, "allow_bad", false);
    how.allow_below_floor = option<bool>(options, "allow_below_floor", false);
    how.through_path = option<bool>(options, "through_path", false);
    auto job = busy_refusal(app);
    plan_off_loop(reply, [this, app, version, rollback, how, job]() -> Result<std::string> {
      activation::Activator activator(m_store, m_units);
      auto plan = activator.plan(app, version, rollback, how);
      if (!plan) return plan.error();
      if (job) plan->refusal = *job;
      return activation::plan_to_json(*plan);
    });
  } catch (const sdbus::Error& e) {
    reply->returnError(e);
  }
}

void Manager::PlanSet(sdbus::Result<std::string>&& result,
                      std::vector<sdbus::Struct<std::string, std::string>> members,
                      Options options) {
  auto reply = std::make_shared<sdbus::Result<std::string>>(std::move(result));
  try {
    check_options(options, std::initializer_list<std::pair<const char*, const char*>>{});
    if (members.empty() || members.size() > activation::kMaxSetMembers)
      throw invalid("a set has 1 to " + std::to_string(activation::kMaxSetMembers) + " apps");
    struct Member {
      std::string app, version;
      activation::ActivationOptions how;
      std::optional<Error> busy;
    };
    std::vector<Member> set;
    for (const auto& m : members) {
      check_app(m.get<0>());
      check_version(m.get<1>());
      for (const auto& earlier : set)
        if (earlier.app == m.get<0>()) throw invalid(m.get<0>() + " is in the set twice");
      Member member{m.get<0>(), m.get<1>(), policy_options(m.get<0>()), busy_refusal(m.get<0>())};
      member.how.hooks.runner = &m_hooks;
      set.push_back(std::move(member));
    }
    plan_off_loop(reply, [this, set]() -> Result<std::string> {
      std::vector<activation::Plan> plans;
      for (const auto& m : set) {
        activation::Activator activator(m_store, m_units);
        auto plan = activator.plan(m.app, m.version, false, m.how);
        if (!plan) return plan.error().with_context(m.app);
        if (m.busy) plan->refusal = *m.busy;
        plans.push_back(std::move(*plan));
      }
      return activation::set_plan_to_json(plans);
    });
  } catch (const sdbus::Error& e) {
    reply->returnError(e);
  }
}

std::optional<Error> Manager::busy_refusal(const std::string& app) const {
  // What Activate would answer now; a plan's steps are those it would take once the job is
  // over.
  auto it = m_busy.find(app);
  if (it == m_busy.end()) return std::nullopt;
  return Error(ErrorCode::kBusy, app + " has a job running (job " + std::to_string(it->second) +
                                     "); plan again once it has ended");
}

void Manager::plan_off_loop(std::shared_ptr<sdbus::Result<std::string>> reply,
                            std::function<Result<std::string>()> compute) {
  // Anyone may ask: off the loop (a walk reads every manifest), and only two at a time.
  if (m_planning >= 2)
    throw sdbus::Error(bus_error::kBusy, "too many plans are being computed; try again");
  ++m_planning;
  m_loop.run_task([this, reply, compute = std::move(compute)]() {
    std::string text;
    std::optional<sdbus::Error> error;
    try {
      auto r = compute();
      if (r)
        text = std::move(*r);
      else
        error = bus_error::from(r.error());
    } catch (const std::exception& e) {  // only sdbus::Error may leave a handler
      error = sdbus::Error(bus_error::kFailed, std::string("planning failed: ") + e.what());
    }
    return std::function<void()>([this, reply, text = std::move(text), error] {
      --m_planning;
      if (error)
        reply->returnError(*error);
      else
        reply->returnResults(text);
    });
  });
}

}  // namespace upgraded::daemon
