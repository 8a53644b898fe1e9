#include "manager.h"

#include <fcntl.h>
#include <malloc.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
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
#include "upgraded/fs/durable.h"
#include "upgraded/policy/names.h"
#include "upgraded/policy/version.h"
#include "upgraded/store/views_cache.h"

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

// A set's (app, version) members, checked (ActivateSet, PlanSet): their apps and versions.
std::pair<std::vector<std::string>, std::vector<std::string>> set_members(
    const std::vector<sdbus::Struct<std::string, std::string>>& members) {
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
  return {std::move(apps), std::move(versions)};
}

// A plan's refusal while `app` has job `id` running.
Error busy_error(const std::string& app, std::uint32_t id) {
  return Error(ErrorCode::kBusy, app + " has a job running (job " + std::to_string(id) +
                                     "); plan again once it has ended");
}

// At most this many artifacts in one InstallSet or PlanInstall: the system bus passes at most
// 16 descriptors in a message (dbus-daemon's max_message_unix_fds).
constexpr std::size_t kMaxInstallSet = 16;

// PlanInstall calls computed at once (each runs its artifacts' helpers one after another), and
// per bus connection; apart from Plan's and PlanSet's, so that they never make those Busy.
constexpr int kPlanInstalls = 2;
constexpr int kPlanInstallsPerConnection = 1;

// How long PlanInstall verifies its artifacts, at most (each helper run has kHelperTimeout).
constexpr std::chrono::seconds kPlanInstallDeadline{30};

// An artifact's descriptor as Install takes it: a regular file, open for reading.
void check_artifact_fd(const sdbus::UnixFd& fd) {
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode))
    throw invalid("the artifact must be passed as a descriptor of a regular file");
  // O_PATH descriptors pass fstat but cannot be read; O_WRONLY ones cannot be read either.
  const int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags < 0 || (flags & O_PATH) || (flags & O_ACCMODE) == O_WRONLY)
    throw invalid("the artifact's descriptor is not open for reading");
}

// Reads the artifact's head and checks its signatures, each in a fresh sandboxed helper; this
// process parses the manifest only once it is known to be signed. Blocks: off the loop.
Result<VerifiedHead> verify_head(const sandbox::Helper& head_helper,
                                 const sandbox::Helper& verify_helper, int fd,
                                 const TrustRoot& trust, unsigned threshold) {
  try {
    auto head = sandbox::read_head_in_child(head_helper, fd, kHelperTimeout);
    if (!head) return head.error();
    VerifiedHead out;
    out.payload_offset = artifact::canonical_payload_offset(head->manifest_bytes.size(),
                                                            head->signature_bytes.size());
    sandbox::VerifyRequest vr{std::move(head->manifest_bytes), std::move(head->signature_bytes),
                              threshold, trust.keys, trust.revoked};
    auto report = sandbox::verify_in_child(verify_helper, vr, kHelperTimeout);
    if (!report) return report.error();
    auto manifest = artifact::parse_manifest(vr.manifest_bytes);
    if (!manifest) return manifest.error();
    out.art = std::make_shared<artifact::VerifiedManifest>(artifact::VerifiedManifest{
        std::move(*manifest), std::move(vr.manifest_bytes), std::move(*report)});
    return out;
  } catch (const std::exception& e) {
    return Error(ErrorCode::kFailed, std::string("internal error: ") + e.what());
  }
}

// The heads of `fds` verified two at a time (each run mostly waits for its helper processes:
// this halves a set's wall time on two cores), helpers 2k and 2k+1 for artifact k. In order, up
// to the first that fails; none is started past `deadline` (that one is the failure then).
std::vector<Result<VerifiedHead>> verify_heads(
    const std::vector<std::shared_ptr<sdbus::UnixFd>>& fds,
    const std::vector<sandbox::Helper>& helpers, const TrustRoot& trust, unsigned threshold,
    std::chrono::steady_clock::time_point deadline, std::chrono::seconds limit) {
  std::vector<Result<VerifiedHead>> out;
  auto one = [&](std::size_t k) {
    return verify_head(helpers[2 * k], helpers[2 * k + 1], fds[k]->get(), trust, threshold);
  };
  for (std::size_t k = 0; k < fds.size(); k += 2) {
    if (std::chrono::steady_clock::now() > deadline) {
      out.push_back(Error(ErrorCode::kFailed, "verifying the artifacts took longer than " +
                                                  std::to_string(limit.count()) + " s"));
      return out;
    }
    std::optional<Result<VerifiedHead>> second;
    std::thread other;
    if (k + 1 < fds.size()) {
      try {
        other = std::thread([&] { second = one(k + 1); });
      } catch (const std::system_error&) {
        // No thread for it: one after the other.
      }
    }
    Result<VerifiedHead> first = Error(ErrorCode::kFailed, "not verified");
    try {
      first = one(k);
    } catch (...) {
      if (other.joinable()) other.join();
      throw;
    }
    if (other.joinable()) other.join();
    out.push_back(std::move(first));
    if (!out.back()) return out;
    if (k + 1 < fds.size()) {
      out.push_back(second ? std::move(*second) : one(k + 1));
      if (!out.back()) return out;
    }
  }
  return out;
}

// The n-th (from 0) of `count` artifacts, for errors about one of several.
std::string nth_artifact(std::size_t n, std::size_t count) {
  return "artifact " + std::to_string(n + 1) + " of " + std::to_string(count);
}

// Every descriptor as check_artifact_fd takes it; an error names the artifact ("artifact k of
// n") when there are several, or always with `name_one` (InstallSet's errors all name it).
void check_artifact_fds(const std::vector<std::shared_ptr<sdbus::UnixFd>>& fds, bool name_one) {
  for (std::size_t k = 0; k < fds.size(); ++k) {
    try {
      check_artifact_fd(*fds[k]);
    } catch (const sdbus::Error& e) {
      throw invalid(fds.size() == 1 && !name_one
                        ? e.getMessage()
                        : nth_artifact(k, fds.size()) + ": " + e.getMessage());
    }
  }
}

// Refused in a set: the k-th of `count` artifacts, `m`, of an app an earlier one (`earlier`)
// has. The message, or nothing when its app is new to the set.
std::optional<std::string> app_twice(const std::vector<VerifiedHead>& earlier,
                                     const artifact::Manifest& m, std::size_t k,
                                     std::size_t count) {
  for (const auto& e : earlier)
    if (e.art->manifest.app == m.app)
      return nth_artifact(k, count) + " is " + m.app + " " + m.version + ": " + m.app +
             " is in the set twice";
  return std::nullopt;
}

// Whether `m`'s release is installed already from this very signed manifest: a set takes it
// as staged and does not stage it again.
bool installed_from(const store::Store& store, const artifact::Manifest& m) {
  auto installed = store.manifest(m.app, m.version);
  return installed && *installed == m;
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
  // each artifact being verified (the artifact, pipes to and a pidfd of its helper: 10 at
  // most; a set larger than `verifications`, which runs alone, fits in that too), two for each
  // queued or undecided artifact (the call's message keeps its descriptor until the reply,
  // besides the daemon's own duplicate), and the artifacts of the PlanInstall calls being
  // computed (two each, as many as kPlanInstalls calls of kMaxInstallSet). A message whose
  // descriptor cannot be received breaks the bus connection, so the undecided ones get half of
  // what RLIMIT_NOFILE leaves.
  rlimit nofile{};
  if (::getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur != RLIM_INFINITY) {
    std::int64_t room = static_cast<std::int64_t>(nofile.rlim_cur) - 64 -
                        2 * std::int64_t(m_config.queued_installs) -
                        10 * std::int64_t(m_config.verifications) -
                        2 * std::int64_t(kPlanInstalls * kMaxInstallSet + 2);
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

std::function<void()> Manager::hold_undecided(std::uint32_t descriptors) {
  // Until authorization decides, the call holds its descriptors (and its message): a bounded
  // number of calls per connection, and of descriptors in all. The uid is not known yet, so a
  // connection is what can be counted; the bus bounds connections per user and in all.
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
  if (m_undecided_installs + descriptors > m_max_undecided) {
    if (mine == 0) m_undecided_by_sender.erase(sender);
    throw sdbus::Error(bus_error::kBusy, "too many installs at once (" +
                                             std::to_string(m_undecided_installs) +
                                             " artifacts waiting for authorization); retry later");
  }
  ++mine;
  m_undecided_installs += descriptors;
  return [this, sender, descriptors] {
    m_undecided_installs -= descriptors;
    // This connection may send another one now.
    auto it = m_undecided_by_sender.find(sender);
    if (it != m_undecided_by_sender.end() && --it->second == 0) m_undecided_by_sender.erase(it);
  };
}

bool Manager::may_verify(std::size_t artifacts) const {
  // A set larger than the limit runs alone.
  return m_verifying == 0 || m_verifying + artifacts <= m_config.verifications;
}

void Manager::queue_install(QueuedInstall install) {
  // A bounded number of artifacts are verified at once (each a thread's turn and two helper
  // processes, its descriptor held); a bounded number more wait for their turn, each holding
  // its descriptor; beyond that: Busy. An InstallSet counts once per artifact.
  const std::size_t n = install.fds.size();
  if (m_verify_queue.empty() && may_verify(n)) {
    verify(std::move(install));
  } else if (m_queued_artifacts + n <= m_config.queued_installs) {
    m_queued_artifacts += n;
    m_verify_queue.push_back(std::move(install));
  } else {
    throw sdbus::Error(bus_error::kBusy,
                       "too many installs at once (" + std::to_string(m_verifying) +
                           " artifacts being verified, " + std::to_string(m_queued_artifacts) +
                           " waiting); retry later");
  }
}

void Manager::Install(PathResult&& result, sdbus::UnixFd artifact, Options options) {
  auto reply = std::make_shared<PathResult>(std::move(result));
  try {
    check_options(options, {{"activate", "b"}});
    const bool activate = option<bool>(options, "activate", false);
    auto decided = hold_undecided(1);
    auto fd = std::make_shared<sdbus::UnixFd>(std::move(artifact));
    authorized(
        reply, "org.upgraded1.install",
        [this, reply, fd, activate](uid_t caller) {
          check_artifact_fd(*fd);
          queue_install(QueuedInstall{reply, {fd}, activate, caller, false});
        },
        std::move(decided));
  } catch (const sdbus::Error& e) {
    reply->returnError(e);
  }
}

void Manager::InstallSet(PathResult&& result, std::vector<sdbus::UnixFd> artifacts,
                         Options options) {
  auto reply = std::make_shared<PathResult>(std::move(result));
  try {
    check_options(options, {{"activate", "b"}});
    const bool activate = option<bool>(options, "activate", false);
    if (artifacts.empty() || artifacts.size() > kMaxInstallSet)
      throw invalid("InstallSet takes 1 to " + std::to_string(kMaxInstallSet) + " artifacts");
    auto decided = hold_undecided(static_cast<std::uint32_t>(artifacts.size()));
    std::vector<std::shared_ptr<sdbus::UnixFd>> fds;
    for (auto& a : artifacts)
      fds.push_back(std::make_shared<sdbus::UnixFd>(std::move(a)));
    authorized(
        reply, "org.upgraded1.install",
        [this, reply, fds, activate](uid_t caller) {
          check_artifact_fds(fds, true);
          queue_install(QueuedInstall{reply, fds, activate, caller, true});
        },
        std::move(decided));
  } catch (const sdbus::Error& e) {
    reply->returnError(e);
  }
}

void Manager::verify(QueuedInstall install) {
  // No helper runs where it could not be confined (HelperSandbox says why).
  if (m_helper_sandbox.rfind("unusable:", 0) == 0) {
    install.reply->returnError(
        sdbus::Error(bus_error::kFailed, "the extraction helpers' sandbox is " + m_helper_sandbox));
    drain_verify_queue();
    return;
  }
  // The trust root as it is now, when this artifact's turn comes.
  auto trust = read_trust_root(m_config);
  if (!trust) {
    install.reply->returnError(bus_error::from(trust.error()));
    return;
  }
  const std::size_t n = install.fds.size();
  m_verifying += n;
  auto reply = install.reply;
  try {
    start_verification(std::move(install), std::move(*trust));
  } catch (const std::exception& e) {
    // No thread for it (TasksMax, RLIMIT_NPROC): this call fails, the slot is free again.
    m_verifying -= n;
    reply->returnError(
        sdbus::Error(bus_error::kFailed, std::string("cannot start verifying: ") + e.what()));
    drain_verify_queue();
  }
}

void Manager::drain_verify_queue() {
  // In order: a large set waits for the verifications before it to end, and holds the ones
  // behind it back until it can start.
  while (!m_verify_queue.empty() && may_verify(m_verify_queue.front().fds.size()) &&
         !m_shutting_down) {
    QueuedInstall next = std::move(m_verify_queue.front());
    m_verify_queue.pop_front();
    m_queued_artifacts -= next.fds.size();
    verify(std::move(next));
  }
}

void Manager::start_verification(QueuedInstall install, TrustRoot trust) {
  // The helper reads the container head and checks the signatures over it, in fresh
  // sandboxed processes and off the loop (the caller's file may be slow to read).
  std::vector<sandbox::Helper> helpers;
  for (std::size_t k = 0; k < 2 * install.fds.size(); ++k)
    helpers.push_back(next_helper());
  auto in = std::make_shared<QueuedInstall>(std::move(install));
  m_loop.run_task([this, in, helpers = std::move(helpers), trust = std::move(trust)]() {
    // Stops at the first artifact that fails.
    auto heads = verify_heads(in->fds, helpers, trust, m_config.threshold,
                              std::chrono::steady_clock::time_point::max(), kHelperTimeout);
    return std::function<void()>([this, in, heads = std::move(heads)] {
      m_verifying -= in->fds.size();
      try {
        if (m_shutting_down)
          throw sdbus::Error(bus_error::kShuttingDown, "upgraded is shutting down");
        std::vector<VerifiedHead> verified;
        for (std::size_t k = 0; k < heads.size(); ++k) {
          if (!heads[k])
            throw bus_error::from(
                in->set ? heads[k].error().with_context(nth_artifact(k, in->fds.size()))
                        : heads[k].error());
          verified.push_back(*heads[k]);
        }
        in->reply->returnResults(
            in->set ? start_install_set(verified, in->fds, in->activate, in->caller)
                    : start_install(verified[0].art, in->fds[0], verified[0].payload_offset,
                                    in->activate, in->caller));
      } catch (const sdbus::Error& e) {
        in->reply->returnError(e);
      } catch (const std::exception& e) {
        in->reply->returnError(sdbus::Error(bus_error::kFailed, e.what()));
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
  bool new_app = false;
  auto known = m_store.state_or_new(app, &new_app);
  if (!known) throw bus_error::from(known.error());
  const store::AppState st = std::move(*known);
  // Refused before any byte is extracted: the release already there, the floor, a payload
  // that cannot fit (PlanInstall's refusals).
  std::map<std::uint64_t, std::uint64_t> taken;
  if (auto refused = activation::install_refusal(st, art->manifest,
                                                 install_space(art->manifest, taken, false)))
    throw bus_error::from(*refused);
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

activation::InstallSpace Manager::install_space(const artifact::Manifest& m,
                                                std::map<std::uint64_t, std::uint64_t>& taken,
                                                bool take) const {
  activation::InstallSpace space;
  space.payload_bytes = m.payload.size;
  space.estimate_bytes = m.payload.size;
  space.reserve_bytes = m_config.extract.limits.free_space_reserve;
  // The release it replaces is a second estimate of the tree's size.
  if (auto st = m_store.state(m.app); st && st->current)
    if (auto it = st->releases.find(*st->current); it != st->releases.end())
      space.estimate_bytes = std::max(space.estimate_bytes, it->second.size);
  // The filesystem of the app's directory (its own root, or the apps' directory): the
  // directory's parent, as a new app's own directory is not there yet.
  const std::string root = m_store.app_root(m.app);
  struct statvfs vfs {};
  if (::statvfs(root.substr(0, root.rfind('/')).c_str(), &vfs) != 0) {
    space.free_bytes = UINT64_MAX;  // cannot be told: extraction checks as it goes
    return space;
  }
  const std::uint64_t free_bytes = static_cast<std::uint64_t>(vfs.f_bavail) * vfs.f_frsize;
  std::uint64_t& before = taken[vfs.f_fsid];
  space.free_bytes = free_bytes > before ? free_bytes - before : 0;
  if (take) before += m.payload.size;
  return space;
}

sdbus::ObjectPath Manager::start_install_set(const std::vector<VerifiedHead>& heads,
                                             const std::vector<std::shared_ptr<sdbus::UnixFd>>& fds,
                                             bool activate, uid_t caller) {
  struct Member {
    VerifiedHead head;
    std::shared_ptr<sdbus::UnixFd> fd;
    sandbox::Helper helper;
    bool present = false;  // installed already, from this very manifest: not staged again
    bool new_app = false;  // the app has no state yet: forgotten again if taken back
  };
  auto members = std::make_shared<std::vector<Member>>();
  std::vector<std::string> apps;
  std::string label;
  for (std::size_t k = 0; k < heads.size(); ++k) {
    const artifact::Manifest& m = heads[k].art->manifest;
    if (auto twice = app_twice({heads.begin(), heads.begin() + static_cast<std::ptrdiff_t>(k)}, m,
                               k, heads.size()))
      throw invalid(*twice);
    Member member{heads[k], fds[k], next_helper()};
    if (auto st = m_store.state(m.app)) {
      if (auto same = st->installed_as(m.version)) {
        member.present = *same == m.version && installed_from(m_store, m);
        if (!member.present)
          throw sdbus::Error(bus_error::kExists, m.app + " " + m.version + " is already installed" +
                                                     (*same == m.version ? " from another artifact"
                                                                         : " (as " + *same + ")") +
                                                     "; nothing was changed");
      }
    } else if (st.error().code() == ErrorCode::kNotFound) {
      member.new_app = true;
    } else {
      throw bus_error::from(st.error());
    }
    apps.push_back(m.app);
    label += (k ? "," : "") + m.version;
    members->push_back(std::move(member));
  }
  SetWork work = [this, members, activate](Job& job, const std::vector<store::AppLock>& locks,
                                           const ProgressFn& progress) -> Result<void> {
    const std::size_t n = locks.size();
    auto name = [&](std::size_t k) {
      const auto& m = (*members)[k].head.art->manifest;
      return m.app + " " + m.version;
    };
    // Every member checked before anything changes: what installing it would hit (the release
    // already there, the floor, the free space, each member's payload counted against what the
    // ones before it will take) and, to activate, what its activation would, its new release
    // taken as staged.
    std::map<std::uint64_t, std::uint64_t> taken;  // by filesystem
    for (std::size_t k = 0; k < n; ++k) {
      const Member& mb = (*members)[k];
      const artifact::Manifest& m = mb.head.art->manifest;
      if (progress) progress("checking " + m.app, 0);
      // Taken as staged when the call came, outside the lock: still there?
      if (mb.present) {
        auto st = m_store.state(m.app);
        if (!st || !st->releases.count(m.version))
          return Error(ErrorCode::kNotFound,
                       name(k) + " was removed meanwhile; nothing in the set was changed");
      }
      const auto space = install_space(m, taken, !mb.present);
      activation::Activator act(m_store, m_units);
      auto how = activation_options(job, m.app);
      std::optional<Error> refusal;
      if (activate) {
        auto plan =
            mb.present ? act.plan(m.app, m.version, false, how) : act.plan_install(m, space, how);
        if (!plan) return plan.error().with_context(m.app);
        refusal = plan->refusal;
        // Its checks wait for the end of that recovery (as ActivateSet's).
        if (!refusal && !plan->recover_first.empty())
          refusal = Error(ErrorCode::kBusy, "an interrupted activation of " + plan->recover_first +
                                                " is pending (the daemon finishes it at start)");
      } else if (!mb.present) {
        auto st = m_store.state_or_new(m.app);
        if (!st) return st.error();
        refusal = activation::install_refusal(*st, m, space);
      }
      if (refusal)
        return Error(refusal->code(),
                     name(k) + ": " + refusal->message() + "; nothing in the set was changed");
    }
    // Staged, all of them, before anything running is touched; one that cannot be takes back
    // the ones this job staged.
    std::vector<bool> staged(n, false);
    auto take_back = [&] {
      for (std::size_t k = n; k-- > 0;) {
        if (!staged[k]) continue;
        (void)m_store.remove(locks[k], (*members)[k].head.art->manifest.version);
        if ((*members)[k].new_app) (void)m_store.forget_app(locks[k]);
      }
    };
    std::size_t last = n;  // the last member to stage: its end is a stage-only job's commit
    for (std::size_t k = 0; k < n; ++k)
      if (!(*members)[k].present) last = k;
    for (std::size_t k = 0; k < n; ++k) {
      Member& mb = (*members)[k];
      if (mb.present) continue;
      const int percent = static_cast<int>((activate ? 50 : 100) * k / n);
      progress("staging " + name(k) + " (" + std::to_string(k + 1) + "/" + std::to_string(n) + ")",
               percent);
      pause_point("install.before_extract");
      auto extract = [&](const artifact::ExtractPolicy& policy,
                         int dest) -> Result<artifact::ExtractStats> {
        auto stats = sandbox::extract_in_child(
            mb.helper, {mb.fd->get(), mb.head.art->manifest_bytes, mb.head.payload_offset, policy,
                        dest, job.cancel_fd()});
        if (!stats) return stats;
        const bool go_on = (activate || k != last) ? !job.cancel_requested() : commit(job);
        if (!go_on) return Error(ErrorCode::kCanceled, "canceled");
        return stats;
      };
      auto done = m_store.stage(locks[k], *mb.head.art, extract);
      if (!done) {
        take_back();
        if (done.error().code() == ErrorCode::kCanceled) return done.error();
        return Error(done.error().code(), name(k) + ": " + done.error().message() +
                                              "; nothing in the set was changed (the artifacts "
                                              "staged before it were taken back)");
      }
      staged[k] = true;
      log(Level::kInfo,
          LogContext{locks[k].app(), mb.head.art->manifest.version, std::to_string(job.id),
                     nullptr},
          "staged " + name(k) + ": " + std::to_string(done->stats.files) + " files, " +
              std::to_string(done->stats.bytes) + " bytes");
    }
    if (!activate) {
      // Nothing was left to stage: nothing to cancel either.
      if (last == n && !commit(job)) return Error(ErrorCode::kCanceled, "canceled");
      progress("done", 100);
      return {};
    }
    progress("staged", 50);
    ProgressFn second_half = [&progress](const std::string& step, int percent) {
      progress(step, 50 + percent / 2);
    };
    std::vector<activation::SetMember> set;
    for (std::size_t k = 0; k < n; ++k)
      set.push_back({&locks[k], (*members)[k].head.art->manifest.version,
                     activation_options(job, locks[k].app())});
    auto done = activation::activate_set(m_store, m_units, set, second_half);
    if (!done) {
      // Canceled before the first switch: the staged releases go again, so nothing changed.
      if (done.error().code() == ErrorCode::kCanceled) take_back();
      return done.error();
    }
    for (const auto& lock : locks)
      collect_garbage(lock, job);
    return {};
  };
  return start_set_job("install-set", apps, label, caller, std::move(work));
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
    auto [apps, versions] = set_members(members);
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
  // once, a plan anyone may ask for beside an extraction) can touch each other's trees or
  // processes: a uid owns only what its one run created. Ids go round the range; one still
  // held by a run (its Helper's lease: until the job or task that holds it ends, the hand-over
  // of an extracted tree included) is skipped, however fast callers make the count go round.
  if (h.as) {
    struct Lease {
      Lease(std::shared_ptr<HelperIds> i, std::uint32_t n) : ids(std::move(i)), id(n) {}
      Lease(const Lease&) = delete;
      Lease& operator=(const Lease&) = delete;
      std::shared_ptr<HelperIds> ids;
      std::uint32_t id;
      ~Lease() {
        std::lock_guard lock(ids->mutex);
        ids->held.erase(id);
      }
    };
    std::lock_guard lock(m_helper_ids->mutex);
    for (std::uint32_t tries = 0; tries < Config::kHelperIds; ++tries) {
      const std::uint32_t n = m_next_helper_id++ % Config::kHelperIds;
      if (!m_helper_ids->held.insert(n).second) continue;
      auto id = static_cast<uid_t>(h.as->first + n);
      h.as = std::make_pair(id, static_cast<gid_t>(id));
      h.lease = std::make_shared<const Lease>(m_helper_ids, n);
      return h;
    }
    throw sdbus::Error(bus_error::kBusy, "every helper uid is in use; retry later");
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
  m_queued_artifacts = 0;
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

// The listing as a sealed memfd (docs/dbus-api.md). What a caller can make the daemon hold is
// bounded whoever calls and however often: one listing, the current one. Every caller gets a
// dup of one read-only description of it (no kernel object per call); a new memfd is made only
// when an app's listed releases changed (a state read again with the same content, as within
// its first seconds, reuses the old one), and the one it replaces is emptied, so that callers
// still holding it hold nothing. The memfd is sealed against writes and growth, and mode 0444:
// no caller can change or reopen it for writing; the daemon only ever empties it.
sdbus::UnixFd Manager::ListAllReleasesByFileDescriptor() {
  auto states = readable_states();
  struct stat sb {};
  bool intact =
      m_listing.reader && ::fstat(m_listing.reader.get(), &sb) == 0 && sb.st_size == m_listing.size;
  if (!intact || states != m_listing.states) {
    trim_after_reply();
    bool changed = !intact || states.size() != m_listing.apps.size();
    decltype(m_listing.apps) apps;
    for (const auto& [app, st] : states) {
      auto old = m_listing.apps.find(app);
      if (old != m_listing.apps.end() && old->second.state == st) {
        apps.emplace(app, old->second);
        continue;
      }
      ListingEntry now{st, st->pre_finalized(),
                       store::views_cache::encode_releases(store::view_of(*st).releases)};
      if (old == m_listing.apps.end() || old->second.pre_finalized != now.pre_finalized ||
          old->second.releases != now.releases)
        changed = true;
      apps.emplace(app, std::move(now));
    }
    if (changed) {
      std::vector<store::views_cache::EncodedApp> encoded;
      encoded.reserve(states.size());
      for (const auto& [app, st] : states) {
        const auto& a = apps.at(app);
        encoded.push_back({app, a.pre_finalized, a.releases});
      }
      auto bytes = store::views_cache::encode_listing(encoded);
      // Never executable (MFD_NOEXEC_SEAL, Linux 6.3; refused as unknown before, then without).
      constexpr unsigned kNoExecSeal = 0x0008U;
      int fd = ::memfd_create("upgraded-listing", MFD_CLOEXEC | MFD_ALLOW_SEALING | kNoExecSeal);
      if (fd < 0 && errno == EINVAL)
        fd = ::memfd_create("upgraded-listing", MFD_CLOEXEC | MFD_ALLOW_SEALING);
      // Every failure here is Failed: the client then asks ListAllReleases instead.
      auto failed = [](const Error& e) { return sdbus::Error(bus_error::kFailed, e.message()); };
      if (fd < 0) throw failed(system_error(errno, "creating the listing's memfd"));
      UniqueFd memfd(fd);
      if (auto w = fs::write_all(fd, std::as_bytes(std::span(bytes))); !w) throw failed(w.error());
      if (::fchmod(fd, 0444) != 0 ||
          ::fcntl(fd, F_ADD_SEALS, F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) != 0)
        throw failed(system_error(errno, "sealing the listing's memfd"));
      // A description of its own, read-only: a dup of the daemon's would let a caller empty it.
      std::string self = "/proc/self/fd/" + std::to_string(fd);
      int rfd = ::open(self.c_str(), O_RDONLY | O_CLOEXEC);
      if (rfd < 0)
        throw failed(system_error(errno, "reopening the listing's memfd (through /proc/self/fd)"));
      UniqueFd reader(rfd);
      if (m_listing.memfd) (void)::ftruncate(m_listing.memfd.get(), 0);
      m_listing.memfd = std::move(memfd);
      m_listing.reader = std::move(reader);
      m_listing.size = static_cast<off_t>(bytes.size());
    }
    m_listing.states = std::move(states);
    m_listing.apps = std::move(apps);
  }
  return sdbus::UnixFd(m_listing.reader.get());  // a dup
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
    struct Member {
      std::string app, version;
      activation::ActivationOptions how;
      std::optional<Error> busy;
    };
    std::vector<Member> set;
    auto [apps, versions] = set_members(members);
    for (std::size_t k = 0; k < apps.size(); ++k) {
      Member member{apps[k], versions[k], policy_options(apps[k]), busy_refusal(apps[k])};
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

void Manager::PlanInstall(sdbus::Result<std::string>&& result, std::vector<sdbus::UnixFd> artifacts,
                          Options options) {
  auto reply = std::make_shared<sdbus::Result<std::string>>(std::move(result));
  try {
    check_options(options, std::initializer_list<std::pair<const char*, const char*>>{});
    if (artifacts.empty() || artifacts.size() > kMaxInstallSet)
      throw invalid("PlanInstall takes 1 to " + std::to_string(kMaxInstallSet) + " artifacts");
    std::vector<std::shared_ptr<sdbus::UnixFd>> fds;
    for (auto& a : artifacts)
      fds.push_back(std::make_shared<sdbus::UnixFd>(std::move(a)));
    check_artifact_fds(fds, false);
    if (m_helper_sandbox.rfind("unusable:", 0) == 0)
      throw sdbus::Error(bus_error::kFailed,
                         "the extraction helpers' sandbox is " + m_helper_sandbox);
    // Anyone may ask, and each call runs two helper processes per artifact: a few at a time,
    // one per connection, with slots of their own (Plan and PlanSet are never kept Busy by
    // them), taken before anything is spent on the call.
    const sdbus::Message* msg = getObject().getCurrentlyProcessedMessage();
    const std::string sender = msg ? msg->getSender() : std::string();
    if (m_planning_installs >= kPlanInstalls)
      throw sdbus::Error(bus_error::kBusy,
                         "too many plans of artifacts are being computed; try again");
    if (m_planning_installs_by_sender[sender] >= kPlanInstallsPerConnection) {
      throw sdbus::Error(bus_error::kBusy,
                         "this connection has a plan of artifacts being computed; wait for it");
    }
    ++m_planning_installs;
    ++m_planning_installs_by_sender[sender];
    auto release = [this, sender] {
      --m_planning_installs;
      if (auto it = m_planning_installs_by_sender.find(sender);
          it != m_planning_installs_by_sender.end() && --it->second <= 0)
        m_planning_installs_by_sender.erase(it);
    };
    Result<TrustRoot> trust = Error(ErrorCode::kFailed, "no trust root");
    std::vector<sandbox::Helper> helpers;
    try {
      trust = read_trust_root(m_config);
      if (!trust) throw bus_error::from(trust.error());
      for (std::size_t k = 0; k < 2 * fds.size(); ++k)
        helpers.push_back(next_helper());
    } catch (...) {
      release();
      throw;
    }
    // The apps are known only once verified, off the loop: what is busy now, from here.
    auto busy = std::make_shared<std::map<std::string, std::uint32_t>>(m_busy);
    auto compute = [this, fds, helpers, trust = std::move(*trust), busy]() -> Result<std::string> {
      auto verified = verify_heads(fds, helpers, trust, m_config.threshold,
                                   std::chrono::steady_clock::now() + kPlanInstallDeadline,
                                   kPlanInstallDeadline);
      std::vector<VerifiedHead> heads;
      for (std::size_t k = 0; k < verified.size(); ++k) {
        auto& head = verified[k];
        if (!head)
          return fds.size() == 1 ? head.error()
                                 : head.error().with_context(nth_artifact(k, fds.size()));
        if (auto twice = app_twice(heads, head->art->manifest, k, fds.size()))
          return Error(ErrorCode::kInvalidArgument, *twice);
        heads.push_back(std::move(*head));
      }
      std::map<std::uint64_t, std::uint64_t> taken;  // by filesystem
      std::vector<activation::Plan> plans;
      for (const auto& h : heads) {
        const artifact::Manifest& m = h.art->manifest;
        activation::ActivationOptions how = policy_options(m.app);
        how.hooks.runner = &m_hooks;  // the daemon runs hooks: releases with hooks are not refused
        activation::Activator act(m_store, m_units);
        // In a set, a release installed already from this very manifest is not staged again
        // (InstallSet): only activated.
        const bool present = heads.size() > 1 && installed_from(m_store, m);
        auto plan = present ? act.plan(m.app, m.version, false, how)
                            : act.plan_install(m, install_space(m, taken, true), how);
        if (!plan) return plan.error().with_context(m.app);
        if (auto it = busy->find(m.app); it != busy->end())
          plan->refusal = busy_error(m.app, it->second);
        plans.push_back(std::move(*plan));
      }
      return plans.size() == 1 ? activation::plan_to_json(plans.front())
                               : activation::set_plan_to_json(plans, true);
    };
    compute_off_loop(reply, std::move(compute), std::move(release));
  } catch (const sdbus::Error& e) {
    reply->returnError(e);
  }
}

std::optional<Error> Manager::busy_refusal(const std::string& app) const {
  // What Activate would answer now; a plan's steps are those it would take once the job is
  // over.
  auto it = m_busy.find(app);
  if (it == m_busy.end()) return std::nullopt;
  return busy_error(app, it->second);
}

void Manager::plan_off_loop(std::shared_ptr<sdbus::Result<std::string>> reply,
                            std::function<Result<std::string>()> compute) {
  // Anyone may ask: off the loop (a walk reads every manifest), and only two at a time.
  if (m_planning >= 2)
    throw sdbus::Error(bus_error::kBusy, "too many plans are being computed; try again");
  ++m_planning;
  compute_off_loop(std::move(reply), std::move(compute), [this] { --m_planning; });
}

void Manager::compute_off_loop(std::shared_ptr<sdbus::Result<std::string>> reply,
                               std::function<Result<std::string>()> compute,
                               std::function<void()> release) {
  try {
    m_loop.run_task([this, reply, compute = std::move(compute), release]() {
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
      return std::function<void()>([reply, text = std::move(text), error, release] {
        release();
        if (error)
          reply->returnError(*error);
        else
          reply->returnResults(text);
      });
    });
  } catch (const std::exception& e) {
    // No thread for it (TasksMax, RLIMIT_NPROC).
    release();
    throw sdbus::Error(bus_error::kFailed, std::string("cannot start planning: ") + e.what());
  }
}

}  // namespace upgraded::daemon
