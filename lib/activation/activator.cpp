#include "upgraded/activation/activator.h"

#include <time.h>

#include <cstdio>
#include <thread>

#include "upgraded/crash_point.h"
#include "upgraded/policy/version.h"

namespace upgraded::activation {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

std::uint64_t monotonic_usec() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000u +
         static_cast<std::uint64_t>(ts.tv_nsec) / 1000u;
}

Error refuse(const std::string& why) {
  return Error(ErrorCode::kPolicyRefused, why);
}

std::string seconds(std::uint64_t usec) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f s", static_cast<double>(usec) / 1e6);
  return buf;
}

// "hello.service is failed (exit-code, status 3) 0.4 s after it started"
// or "hello.service exited with status 3 after 0.4 s (failed)"
std::string describe_unhealthy(const std::string& unit, const units::UnitStatus& st) {
  std::string after;
  if (st.active_enter_usec != 0) {
    std::uint64_t end =
        st.inactive_enter_usec > st.active_enter_usec ? st.inactive_enter_usec : monotonic_usec();
    after = seconds(end - st.active_enter_usec);
  }
  constexpr int kExited = 1, kKilled = 2, kDumped = 3;  // CLD_* from <signal.h>
  if (st.result == "exit-code" && st.exec_main_code == kExited)
    return unit + " exited with status " + std::to_string(st.exec_main_status) +
           (after.empty() ? "" : " after " + after) + " (" + st.active_state + ")";
  if (st.result == "signal" && (st.exec_main_code == kKilled || st.exec_main_code == kDumped))
    return unit + " was killed by signal " + std::to_string(st.exec_main_status) +
           (after.empty() ? "" : " after " + after) + " (" + st.active_state + ")";
  std::string s = unit + " is " + st.active_state;
  if (!st.result.empty() && st.result != "success") {
    s += " (" + st.result;
    if (st.exec_main_code != 0) s += ", status " + std::to_string(st.exec_main_status);
    s += ")";
  }
  if (!after.empty()) s += " " + after + " after it started";
  return s;
}

}  // namespace

Result<void> Activator::restart_and_gate(const artifact::Manifest& m,
                                         const ActivationOptions& options,
                                         const ProgressFn& progress,
                                         std::map<std::string, std::uint64_t>& downtime,
                                         bool soak) {
  const auto deadline = Clock::now() + std::chrono::seconds(m.health.deadline_s);
  std::map<std::string, std::uint32_t> restarts;
  int n = 0;
  for (const auto& unit : m.units) {
    if (progress) progress("restarting " + unit, 40 + 40 * n++ / static_cast<int>(m.units.size()));
    auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now());
    if (left <= milliseconds(0))
      return Error(ErrorCode::kFailed,
                   "health gate: deadline passed before " + unit + " was restarted");
    // A deliberate restart must not be refused because earlier ones hit the start limit.
    if (auto reset = m_units.reset_failed(unit); !reset) return reset.error();
    auto r = m_units.restart(unit, std::min(left, options.job_timeout));
    if (!r) return r.error().with_context("health gate");
    auto st = m_units.status(unit);
    if (!st) return st.error();
    if (st->active_state != "active")
      return Error(ErrorCode::kFailed, "health gate: " + describe_unhealthy(unit, *st));
    if (st->active_enter_usec > st->active_exit_usec && st->active_exit_usec != 0)
      downtime[unit] = st->active_enter_usec - st->active_exit_usec;
    restarts[unit] = st->n_restarts;
  }
  if (!soak) return {};
  if (progress) progress("health gate", 85);
  auto soak_until = Clock::now() + std::chrono::seconds(m.health.min_ready_s);
  if (soak_until > deadline)
    return Error(ErrorCode::kFailed, "health gate: min_ready_s does not fit in deadline_s");
  // One wait for the soak period, then one look: systemd's state and restart counter say
  // whether anything happened meanwhile.
  std::this_thread::sleep_until(soak_until);
  for (const auto& unit : m.units) {
    auto st = m_units.status(unit);
    if (!st) return st.error();
    if (st->active_state != "active")
      return Error(ErrorCode::kFailed, "health gate: " + describe_unhealthy(unit, *st));
    if (st->n_restarts != restarts[unit])
      return Error(ErrorCode::kFailed, "health gate: " + unit + " restarted " +
                                           std::to_string(st->n_restarts - restarts[unit]) +
                                           " time(s) within min_ready_s");
  }
  return {};
}

Result<void> check_activation(const store::AppState& st, const artifact::Manifest& m,
                              const ActivationChecks& checks) {
  const bool allow_bad = checks.allow_bad, is_rollback = checks.is_rollback;
  const std::string& app = st.app;
  const std::string& version = m.version;
  auto rec = st.releases.find(version);
  if (rec == st.releases.end())
    return Error(ErrorCode::kNotFound, "no release " + version + " of " + app);
  if (rec->second.status == store::ReleaseStatus::kBad && !allow_bad)
    return refuse(app + " " + version + " is marked bad (it failed before)");
  if (st.current == version) return {};
  if (st.floor && policy::compare_versions(version, *st.floor) < 0 && !checks.allow_below_floor)
    return refuse(app + " " + version + " is below the version floor " + *st.floor +
                  " (downgrade protection; allow_below_floor overrides it)");
  if (!m.hooks.empty())
    return refuse(app + " " + version +
                  " declares hooks, which this version of upgraded does not run yet");
  if (!is_rollback && st.current && !m.upgrade_from.empty()) {
    bool allowed = false;
    for (const auto& p : m.upgrade_from)
      allowed = allowed || policy::version_matches(*st.current, p);
    if (!allowed)
      return refuse(app + " " + version + " cannot be upgraded to from " + *st.current +
                    " (upgrade_from)");
  }
  if (st.finalized_data_format && *st.finalized_data_format > m.data_format.writes)
    return refuse(app + " " + version + " writes data format " +
                  std::to_string(m.data_format.writes) + ", but format " +
                  std::to_string(*st.finalized_data_format) + " is finalized");
  return {};
}

Result<ActivationReport> Activator::run(const store::AppLock& lock, const std::string& version,
                                        bool is_rollback, const ActivationOptions& options,
                                        const ProgressFn& progress) {
  const std::string& app = lock.app();
  if (progress) progress("checking", 5);
  auto st = m_store.state(app);
  if (!st) return st.error();
  auto rec = st->releases.find(version);
  if (rec == st->releases.end())
    return Error(ErrorCode::kNotFound, "no release " + version + " of " + app);
  auto m = m_store.manifest(app, version);
  if (!m) return m.error();
  ActivationReport report;
  report.from = st->current.value_or("");
  report.to = version;
  UPGRADED_TRY(check_activation(
      *st, *m, ActivationChecks{options.allow_bad, is_rollback, options.allow_below_floor}));
  if (st->current == version) return report;
  std::optional<artifact::Manifest> old_manifest;
  if (st->current) {
    auto om = m_store.manifest(app, *st->current);
    if (!om) return om.error();
    old_manifest = std::move(*om);
  }

  store::HistoryEntry h{"", is_rollback ? "rollback" : "activate", report.from, version, "", "",
                        {}};
  pause_point("activation.before_commit");
  if (options.commit && !options.commit())
    return Error(ErrorCode::kCanceled, "canceled before " + app + " was touched");
  // From here on a crash is finished by resume() when the daemon starts again.
  const std::string previous = st->previous.value_or("");
  UPGRADED_TRY(m_store.begin_activation(
      lock, store::PendingActivation{h.op, report.from, version, previous, ""}));
  if (progress) progress("switching", 20);
  if (auto r = m_store.switch_to(lock, version); !r) {
    (void)m_store.end_activation(lock);
    return r.error();
  }
  crash_point("activation.after_switch");
  auto gate = restart_and_gate(*m, options, progress, report.downtime_usec, /*soak=*/true);
  if (gate) {
    (void)m_store.set_status(lock, version, store::ReleaseStatus::kGood);
    (void)m_store.end_activation(lock);  // before the history: a crash between the two must not
                                         // restart healthy units again
    h.result = "done";
    h.downtime_usec = report.downtime_usec;
    (void)m_store.append_history(lock, h);
    if (progress) progress("done", 100);
    return report;
  }
  Error failure = gate.error();
  h.message = failure.message();
  if (is_rollback || !old_manifest) {
    (void)m_store.set_status(lock, version, store::ReleaseStatus::kBad);
    h.result = "failed";
    (void)m_store.end_activation(lock);
    (void)m_store.append_history(lock, h);
    return failure;
  }
  return roll_back_after(lock, std::move(report), previous, std::move(h), failure, options,
                         progress);
}

// Automatic rollback: the old release, its units, checked again (active; no soak).
Result<ActivationReport> Activator::roll_back_after(const store::AppLock& lock,
                                                    ActivationReport report,
                                                    const std::string& previous,
                                                    store::HistoryEntry h, const Error& failure,
                                                    const ActivationOptions& options,
                                                    const ProgressFn& progress) {
  if (progress) progress("rolling back", 90);
  (void)m_store.set_status(lock, report.to, store::ReleaseStatus::kBad);
  std::map<std::string, std::uint64_t> back_downtime;
  auto old_manifest = m_store.manifest(lock.app(), report.from);
  Result<void> back = old_manifest ? m_store.switch_back(lock, report.from, previous)
                                   : Result<void>(old_manifest.error());
  if (back)
    back = restart_and_gate(
        *old_manifest, options,
        [&progress](const std::string& step, int percent) {
          if (progress) progress("rolling back: " + step, 90 + percent / 10);
        },
        back_downtime, /*soak=*/false);
  report.rolled_back = true;
  h.result = back ? "rolled-back" : "failed";
  if (!back) h.message += "; rollback to " + report.from + " failed too: " + back.error().message();
  h.downtime_usec = report.downtime_usec;
  (void)m_store.end_activation(lock);
  (void)m_store.append_history(lock, h);
  if (!back) return Error(ErrorCode::kFailed, h.message);
  return Error(ErrorCode::kFailed, failure.message() + "; rolled back to " + report.from);
}

Result<ActivationReport> Activator::resume(const store::AppLock& lock,
                                           const ActivationOptions& options,
                                           const ProgressFn& progress) {
  const std::string& app = lock.app();
  auto pending = m_store.pending_activation(app);
  if (!pending) return pending.error();
  ActivationReport report;
  if (!*pending) return report;
  const store::PendingActivation p = **pending;
  auto st = m_store.state(app);
  if (!st) return st.error();
  report.from = p.from;
  report.to = st->current.value_or("");
  store::HistoryEntry h{"", "recover", p.from, report.to, "", "", {}};
  h.message = "finishing an interrupted " + p.op + " of " + p.to;
  if (!st->current) {
    (void)m_store.end_activation(lock);
    return report;
  }
  auto m = m_store.manifest(app, *st->current);
  if (!m) return m.error();
  auto gate = restart_and_gate(*m, options, progress, report.downtime_usec, /*soak=*/true);
  if (gate) {
    if (*st->current == p.to) (void)m_store.set_status(lock, p.to, store::ReleaseStatus::kGood);
    (void)m_store.end_activation(lock);
    h.result = "done";
    h.downtime_usec = report.downtime_usec;
    (void)m_store.append_history(lock, h);
    return report;
  }
  h.message += ": " + gate.error().message();
  if (p.op == "activate" && *st->current == p.to && !p.from.empty() && st->releases.count(p.from)) {
    report.to = p.to;
    std::string previous = st->releases.count(p.previous) ? p.previous : "";
    return roll_back_after(lock, std::move(report), previous, std::move(h), gate.error(), options,
                           progress);
  }
  // As run() does: the release that failed is marked bad (a rollback target too).
  if (*st->current == p.to) (void)m_store.set_status(lock, p.to, store::ReleaseStatus::kBad);
  (void)m_store.end_activation(lock);
  h.result = "failed";
  (void)m_store.append_history(lock, h);
  return gate.error();
}

// An activation that a crash interrupted is finished first, so that the units match `current`
// before anything else changes. A failed health gate there is recorded by resume() and does not
// stop what was asked for now.
Result<void> Activator::finish_pending(const store::AppLock& lock, const ActivationOptions& options,
                                       const ProgressFn& progress) {
  auto pending = m_store.pending_activation(lock.app());
  if (!pending) return pending.error();
  if (!*pending) return {};
  // Finishing it restarts units: past the point of no return for the caller too.
  if (options.commit && !options.commit())
    return Error(ErrorCode::kCanceled, "canceled before " + lock.app() + " was touched");
  auto resumed = resume(lock, options, progress);
  if (!resumed && resumed.error().code() != ErrorCode::kFailed) return resumed.error();
  return {};
}

Result<ActivationReport> Activator::activate(const store::AppLock& lock, const std::string& version,
                                             const ActivationOptions& options,
                                             const ProgressFn& progress) {
  UPGRADED_TRY(finish_pending(lock, options, progress));
  return run(lock, version, false, options, progress);
}

Result<ActivationReport> Activator::rollback(const store::AppLock& lock,
                                             const ActivationOptions& options,
                                             const ProgressFn& progress) {
  UPGRADED_TRY(finish_pending(lock, options, progress));
  auto st = m_store.state(lock.app());
  if (!st) return st.error();
  if (!st->previous) return Error(ErrorCode::kNotFound, lock.app() + " has no rollback target");
  if (!options.expected_target.empty() && *st->previous != options.expected_target)
    return Error(ErrorCode::kFailed,
                 "the rollback target of " + lock.app() + " is now " + *st->previous + ", not " +
                     options.expected_target +
                     " (an interrupted activation was finished first); nothing was rolled back");
  return run(lock, *st->previous, true, options, progress);
}

}  // namespace upgraded::activation
