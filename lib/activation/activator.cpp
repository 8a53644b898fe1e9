#include "upgraded/activation/activator.h"

#include <time.h>

#include <string.h>

#include <algorithm>
#include <cstdio>
#include <thread>

#include "upgraded/crash_point.h"
#include "upgraded/policy/names.h"
#include "upgraded/policy/version.h"

namespace upgraded::activation {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

std::string now_rfc3339() {
  return artifact::format_rfc3339(static_cast<std::int64_t>(::time(nullptr)));
}

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

bool gated_per_unit(const artifact::Manifest& m) {
  return m.strategy != artifact::Strategy::kAllAtOnce && !m.units.empty();
}

namespace {
// "tablet@" and ".service" of "tablet@.service" or "tablet@2.service"; nothing for a unit
// that is neither a template nor an instance.
std::optional<std::pair<std::string_view, std::string_view>> template_parts(std::string_view u) {
  const auto at = u.find('@');
  const auto dot = u.rfind('.');
  if (at == std::string_view::npos || dot == std::string_view::npos || dot < at) return {};
  return std::pair(u.substr(0, at + 1), u.substr(dot));
}
}  // namespace

bool is_template_unit(std::string_view unit) {
  auto parts = template_parts(unit);
  return parts && parts->first.size() + parts->second.size() == unit.size();
}

bool is_instance_of(std::string_view unit, std::string_view templ) {
  auto t = template_parts(templ);
  auto u = template_parts(unit);
  return t && u && is_template_unit(templ) && !is_template_unit(unit) && *t == *u;
}

Result<artifact::Manifest> expand_templates(
    artifact::Manifest m, const std::vector<std::string>& instances,
    const std::function<Result<std::vector<std::string>>(const std::string&)>& running,
    bool require, const std::vector<std::string>& known) {
  std::vector<std::string> out;
  auto add = [&out](const std::string& unit) -> Result<void> {
    if (std::find(out.begin(), out.end(), unit) != out.end()) return {};
    if (out.size() == kMaxExpandedUnits)
      return refuse("more than " + std::to_string(kMaxExpandedUnits) +
                    " units once templates are expanded into their instances");
    out.push_back(unit);
    return {};
  };
  for (const auto& unit : m.units) {
    if (!is_template_unit(unit)) {
      UPGRADED_TRY(add(unit));
      continue;
    }
    auto [prefix, suffix] = *template_parts(unit);
    std::vector<std::string> names;
    if (!instances.empty()) {
      for (const auto& i : instances) {
        std::string name = std::string(prefix) + i + std::string(suffix);
        if (i.empty() || i.find('@') != std::string::npos || !policy::validate_unit_name(name))
          return refuse("instance " + policy::quote(i) + " of " + unit +
                        " does not make a valid unit name");
        names.push_back(std::move(name));
      }
    } else if (running) {
      auto r = running(unit);
      if (!r) return r.error();
      for (auto& name : *r)
        if (is_instance_of(name, unit) && policy::validate_unit_name(name)) names.push_back(name);
      std::sort(names.begin(), names.end(), [](const std::string& a, const std::string& b) {
        return ::strverscmp(a.c_str(), b.c_str()) < 0;
      });
    }
    for (const auto& u : known)
      if (is_instance_of(u, unit) && policy::validate_unit_name(u) &&
          std::find(names.begin(), names.end(), u) == names.end())
        names.push_back(u);
    if (names.empty() && require)
      return refuse(unit +
                    " is a template and no instance of it is running; name its instances "
                    "in the host policy ([apps." +
                    m.app + "] instances, docs/configuration.md)");
    for (const auto& name : names)
      UPGRADED_TRY(add(name));
  }
  m.units = std::move(out);
  return m;
}

bool is_socket_unit(std::string_view unit) {
  return unit.ends_with(".socket");
}

std::vector<std::string> stop_order(const std::vector<std::string>& units) {
  std::vector<std::string> out;
  for (auto it = units.rbegin(); it != units.rend(); ++it)
    if (is_socket_unit(*it)) out.push_back(*it);
  for (auto it = units.rbegin(); it != units.rend(); ++it)
    if (!is_socket_unit(*it)) out.push_back(*it);
  return out;
}

std::vector<std::string> behind_socket(const units::UnitStatus& socket,
                                       const std::vector<std::string>& units, std::size_t from) {
  std::vector<std::string> out;
  for (const auto& service : socket.triggers)
    if (std::find(units.begin() + static_cast<std::ptrdiff_t>(std::min(from, units.size())),
                  units.end(), service) != units.end())
      out.push_back(service);
  return out;
}

bool stops_for_socket(const units::UnitStatus& service) {
  return service.active_state != "inactive" && service.active_state != "failed";
}

artifact::Manifest sockets_first(artifact::Manifest m) {
  std::stable_partition(m.units.begin(), m.units.end(),
                        [](const std::string& u) { return is_socket_unit(u); });
  return m;
}

bool units_fit(const std::vector<std::string>& units, const artifact::Manifest& m) {
  if (units.size() > kMaxExpandedUnits) return false;
  for (std::size_t i = 0; i < units.size(); ++i) {
    if (std::find(units.begin(), units.begin() + static_cast<std::ptrdiff_t>(i), units[i]) !=
        units.begin() + static_cast<std::ptrdiff_t>(i))
      return false;
    const bool listed = std::any_of(m.units.begin(), m.units.end(), [&](const std::string& u) {
      return u == units[i] || is_instance_of(units[i], u);
    });
    if (!listed || is_template_unit(units[i])) return false;
  }
  return true;
}

std::vector<std::size_t> waves(const artifact::Manifest& m, std::uint32_t max_unavailable) {
  const std::size_t n = m.units.size();
  if (!gated_per_unit(m)) return {n};
  std::vector<std::size_t> ends;
  const std::size_t width = std::max<std::uint32_t>(max_unavailable, 1);
  for (std::size_t i = 0; i < n;) {
    // Socket units (held: nothing to gate on their own) go with the unit after them.
    while (i + 1 < n && is_socket_unit(m.units[i]))
      ++i;
    std::size_t end = i + 1;
    if (m.strategy == artifact::Strategy::kRolling)
      if (auto t = template_parts(m.units[i]); t && !is_template_unit(m.units[i]))
        while (end < n && end - i < width && template_parts(m.units[end]) == t &&
               !is_template_unit(m.units[end]))
          ++end;
    ends.push_back(end);
    i = end;
  }
  return ends;
}

std::optional<std::size_t> units_touched(const store::PendingActivation& p,
                                         const artifact::Manifest& m) {
  if (!p.units_touched || !gated_per_unit(m) || *p.units_touched > m.units.size()) return {};
  // A record of an older build journaled the count but not the units: the count was taken in
  // the manifest's order, which may not be this one (sockets now come first).
  if (p.units.empty()) return {};
  return *p.units_touched;
}

Result<void> Activator::restart_and_gate(const artifact::Manifest& m,
                                         const ActivationOptions& options,
                                         const ProgressFn& progress,
                                         std::map<std::string, std::uint64_t>& downtime,
                                         const Gate& gate) {
  const bool in_waves = gated_per_unit(m);
  const std::size_t total = m.units.size();
  const std::string of_total = "/" + std::to_string(total) + ")";
  const std::vector<std::size_t> ends = waves(m, options.max_unavailable);
  // The units on the release so far, with their restart counters: each gate checks them all,
  // so that an earlier unit failing while a later one soaks fails the gate too. Resumed, the
  // units that passed their gates before the crash are checked (not restarted) first.
  std::vector<std::pair<std::string, std::uint32_t>> restarted;
  std::size_t i = std::min(gate.first, total);
  for (std::size_t j = 0; j < i; ++j) {
    auto st = m_units.status(m.units[j]);
    if (!st) return st.error();
    if (st->active_state != "active")
      return Error(ErrorCode::kFailed, "health gate: " + describe_unhealthy(m.units[j], *st));
    restarted.emplace_back(m.units[j], st->n_restarts);
  }
  // No units: the gate is the soak alone (and the health hook after it).
  bool empty_wave = total == 0;
  while (i < total || empty_wave) {
    empty_wave = false;
    // A wave: every unit (all-at-once), the next one (one-by-one) or the next instances of a
    // template (rolling), then its gate.
    const std::size_t begin = i;
    const std::size_t end = total == 0 ? 0 : *std::upper_bound(ends.begin(), ends.end(), i);
    const auto deadline = Clock::now() + std::chrono::seconds(m.health.deadline_s);
    if (in_waves && gate.before_unit)
      UPGRADED_TRY(gate.before_unit(static_cast<std::uint32_t>(end)));
    for (; i < end; ++i) {
      const std::string& unit = m.units[i];
      if (progress)
        progress((gate.start_only        ? "starting "
                  : is_socket_unit(unit) ? "holding "
                                         : "restarting ") +
                     unit + " (" + std::to_string(i + 1) + of_total,
                 40 + static_cast<int>(40 * i / total));
      auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now());
      if (left <= milliseconds(0))
        return Error(ErrorCode::kFailed,
                     "health gate: deadline passed before " + unit + " was restarted");
      // A deliberate restart must not be refused because earlier ones hit the start limit.
      if (auto reset = m_units.reset_failed(unit); !reset) return reset.error();
      // A socket unit is held: started if it is not running (a no-op when it is), never
      // restarted, unless its unit file changed on disk (its listen settings): systemd applies
      // that only to a reloaded, restarted socket.
      std::string how = gate.start_only ? "start" : "restart";
      std::vector<std::string> stopped_for_socket;
      if (is_socket_unit(unit) && !gate.start_only) {
        // Held when it listens: a start job, which does nothing. When it does not (a first
        // install, a release that adds it, a socket that failed), it starts now, and systemd
        // refuses that while a service behind it runs: this release's services behind it
        // (which may hold its port themselves) stop first; each starts in its own step after
        // it (sockets come first).
        auto before = m_units.status(unit);
        if (!before) return before.error();
        how = before->active_state == "active" ? "hold" : "start";
        for (const auto& service :
             how == "hold" ? std::vector<std::string>{} : behind_socket(*before, m.units, i)) {
          auto st = m_units.status(service);
          if (!st) return st.error();
          if (!stops_for_socket(*st)) continue;
          if (auto stop = m_units.stop(service, std::min(left, options.job_timeout)); !stop)
            return stop.error().with_context("health gate");
          stopped_for_socket.push_back(service);
          if (gate.trace) gate.trace->push_back("stop:" + service);
        }
      }
      auto r = how == "restart" ? m_units.restart(unit, std::min(left, options.job_timeout))
                                : m_units.start(unit, std::min(left, options.job_timeout));
      // A socket that did not start: the services stopped for it run again (best effort: a
      // rollback, a manual one included, may have nothing else that restores them).
      for (const auto& service : stopped_for_socket)
        if (!r) (void)m_units.start(service, std::min(left, options.job_timeout));
      if (!r) return r.error().with_context("health gate");
      if (gate.trace) gate.trace->push_back(how + ":" + unit);
      auto st = m_units.status(unit);
      if (!st) return st.error();
      if (st->active_state != "active")
        return Error(ErrorCode::kFailed, "health gate: " + describe_unhealthy(unit, *st));
      if (how != "hold" && st->active_enter_usec > st->active_exit_usec &&
          st->active_exit_usec != 0)
        downtime[unit] = st->active_enter_usec - st->active_exit_usec;
      restarted.emplace_back(unit, st->n_restarts);
    }
    if (!gate.soak) continue;
    std::string wave;
    for (std::size_t k = begin; in_waves && k < end; ++k)
      wave += (k == begin ? "" : ", ") + m.units[k];
    if (progress)
      progress(
          in_waves ? "health gate: " + wave + " (" + std::to_string(end) + of_total : "health gate",
          in_waves ? 40 + static_cast<int>(40 * end / total) : 85);
    auto soak_until = Clock::now() + std::chrono::seconds(m.health.min_ready_s);
    if (soak_until > deadline)
      return Error(ErrorCode::kFailed, "health gate: min_ready_s does not fit in deadline_s");
    // One wait for the soak period, then one look: systemd's state and restart counter say
    // whether anything happened meanwhile.
    std::this_thread::sleep_until(soak_until);
    for (const auto& [unit, restarts] : restarted) {
      auto st = m_units.status(unit);
      if (!st) return st.error();
      if (st->active_state != "active")
        return Error(ErrorCode::kFailed, "health gate: " + describe_unhealthy(unit, *st));
      if (st->n_restarts != restarts)
        return Error(ErrorCode::kFailed, "health gate: " + unit + " restarted " +
                                             std::to_string(st->n_restarts - restarts) +
                                             " time(s) within min_ready_s");
    }
    if (!in_waves) {
      if (gate.trace) gate.trace->push_back("gate:");
      continue;
    }
    // Each unit of the wave: its gate passed, then the rest of it (its health hook).
    for (std::size_t k = begin; k < end; ++k) {
      if (gate.trace) gate.trace->push_back("gate:" + m.units[k]);
      if (gate.after_unit && !is_socket_unit(m.units[k]))
        UPGRADED_TRY(gate.after_unit(m.units[k], k + 1));
    }
  }
  return {};
}

Activator::Gate Activator::journaled_gate(const store::AppLock& lock,
                                          const store::PendingActivation& pending) const {
  Gate gate;
  gate.before_unit = [this, &lock, p = pending](std::uint32_t touched) mutable -> Result<void> {
    p.units_touched = touched;
    UPGRADED_TRY(m_store.begin_activation(lock, p));
    crash_point("activation.before_unit");
    return {};
  };
  return gate;
}

Result<artifact::Manifest> Activator::expanded(const artifact::Manifest& m,
                                               const ActivationOptions& options, bool require,
                                               const std::vector<std::string>& known,
                                               bool with_failed) const {
  if (std::none_of(m.units.begin(), m.units.end(),
                   [](const std::string& u) { return is_template_unit(u); }))
    return sockets_first(m);
  auto x = expand_templates(
      m, options.instances,
      [this, with_failed](const std::string& templ) {
        return m_units.running_instances(templ, with_failed);
      },
      require, known);
  if (!x) return x;
  return sockets_first(std::move(*x));
}

Result<artifact::Manifest> Activator::journaled_or_expanded(
    const artifact::Manifest& m, const store::PendingActivation* p,
    const ActivationOptions& options) const {
  if (p && p->to == m.version && !p->units.empty() && units_fit(p->units, m)) {
    artifact::Manifest x = m;
    x.units = p->units;
    return x;
  }
  std::vector<std::string> known;
  if (p) {
    known = p->units;
    known.insert(known.end(), p->from_units.begin(), p->from_units.end());
  }
  return expanded(m, options, false, known, true);
}

std::vector<std::string> Activator::touched_units(const store::AppLock& lock,
                                                  const artifact::Manifest& failed) const {
  auto pending = m_store.pending_activation(lock.app());
  if (!pending || !*pending) return failed.units;
  auto n = units_touched(**pending, failed);
  if (!n) return failed.units;
  return {failed.units.begin(), failed.units.begin() + static_cast<std::ptrdiff_t>(*n)};
}

bool has_activation_hooks(const artifact::Manifest& m) {
  for (const char* h : {"pre_upgrade", "migrate", "health", "post_upgrade"})
    if (m.hooks.count(h)) return true;
  return false;
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
  if (!checks.hooks_runnable && has_activation_hooks(m))
    return refuse(app + " " + version +
                  " declares hooks, which only the daemon runs (as systemd units); activate it "
                  "through the daemon");
  // upgrade_from is about upgrades: going back to an older release (a rollback, or activating
  // one) is bounded by the data-format rules below instead.
  if (!is_rollback && st.current && !m.upgrade_from.empty() &&
      policy::compare_versions(version, *st.current) > 0) {
    bool allowed = false;
    for (const auto& p : m.upgrade_from)
      allowed = allowed || policy::version_matches(*st.current, p);
    if (!allowed) {
      std::string from;
      for (const auto& p : m.upgrade_from)
        from += (from.empty() ? "" : ", ") + p;
      return refuse(version + " cannot be activated from " + *st.current +
                    " (upgrade_from: " + from + ")");
    }
  }
  if (st.finalized_data_format) {
    const std::uint64_t f = *st.finalized_data_format;
    const auto& df = m.data_format;
    const std::string reads = version + " reads data formats " + std::to_string(df.reads_min) +
                              "\u2013" + std::to_string(df.writes);
    const std::string when = st.finalized_at ? " on " + *st.finalized_at : "";
    if (f > df.writes)
      return refuse(reads + "; format " + std::to_string(f) + " was finalized" + when +
                    (st.last_backup ? "; restore backup '" + *st.last_backup + "' to go back"
                                    : "; there is no backup to go back to"));
    if (df.reads_min > f)
      return refuse(reads + ", but the data is in format " + std::to_string(f) +
                    " (finalized); activate and finalize a release that writes format " +
                    std::to_string(df.reads_min) + " first");
  }
  return {};
}

bool is_upgrade_path_refusal(const Error& refusal) {
  return refusal.code() == ErrorCode::kPolicyRefused &&
         refusal.message().find("(upgrade_from: ") != std::string::npos;
}

Error with_upgrade_path(const Error& refusal, const std::vector<std::string>& path) {
  std::string msg = refusal.message();
  if (path.size() > 2) {
    msg += "; staged path: ";
    for (std::size_t i = 0; i < path.size(); ++i)
      msg += (i ? " \u2192 " : "") + path[i];
    msg += " (activate with through_path / upgradectl activate --through)";
  } else {
    msg += "; no installed release leads there: install one it upgrades from first";
  }
  return Error(refusal.code(), msg);
}

std::vector<std::string> find_upgrade_path(
    const store::AppState& st, const std::map<std::string, artifact::Manifest>& manifests,
    const std::string& target) {
  if (!st.current || !manifests.count(target)) return {};
  // Breadth first over releases newer than the current one and not newer than the target.
  std::vector<std::string> candidates;
  for (const auto& v : st.versions_in_order()) {
    const auto& rec = st.releases.at(v);
    if (rec.status == store::ReleaseStatus::kBad || !manifests.count(v)) continue;
    if (policy::compare_versions(v, *st.current) <= 0 || policy::compare_versions(v, target) > 0)
      continue;
    candidates.push_back(v);
  }
  std::map<std::string, std::string> came_from;
  std::vector<std::string> frontier{*st.current};
  while (!frontier.empty() && !came_from.count(target)) {
    std::vector<std::string> next;
    for (const auto& from : frontier) {
      store::AppState at = st;
      at.current = from;
      // Newest first: of equally short chains, the one through the newest releases.
      for (auto it = candidates.rbegin(); it != candidates.rend(); ++it) {
        if (came_from.count(*it) || policy::compare_versions(*it, from) <= 0) continue;
        if (!check_activation(at, manifests.at(*it), ActivationChecks{}).ok()) continue;
        came_from[*it] = from;
        next.push_back(*it);
      }
    }
    frontier = std::move(next);
  }
  if (!came_from.count(target)) return {};
  std::vector<std::string> path{target};
  while (path.back() != *st.current)
    path.push_back(came_from.at(path.back()));
  return {path.rbegin(), path.rend()};
}

Result<void> check_finalize(const store::AppState& st, const artifact::Manifest& m,
                            bool no_backup) {
  const std::string& app = st.app;
  if (!st.current) return refuse(app + " has no current release");
  auto rec = st.releases.find(*st.current);
  if (rec == st.releases.end() || rec->second.status != store::ReleaseStatus::kGood)
    return refuse(app + " " + *st.current +
                  " is not confirmed healthy yet; finalize only a release marked good");
  if (!st.pre_finalized())
    return refuse("nothing to finalize: " + app + " " + *st.current + " writes data format " +
                  std::to_string(m.data_format.writes) + ", which is finalized");
  if (!m.hooks.count("backup") && !no_backup)
    return refuse(app + " " + *st.current +
                  " declares no backup hook; finalizing without a backup leaves no way back "
                  "(option no_backup, upgradectl finalize --no-backup, does it anyway)");
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
  if (auto ok = check_activation(
          *st, *m,
          ActivationChecks{options.allow_bad, is_rollback, options.allow_below_floor,
                           options.hooks.runner != nullptr});
      !ok) {
    // An upgrade path refusal names the way that works, if the installed releases have one.
    if (!is_rollback && is_upgrade_path_refusal(ok.error()))
      return with_upgrade_path(ok.error(), upgrade_path(app, version));
    return ok.error();
  }
  if (st->current == version) return report;
  // Templates become their instances before anything changes: one without any is refused.
  if (auto x = expanded(*m, options, true, {}, is_rollback); x)
    *m = std::move(*x);
  else
    return x.error();
  std::optional<artifact::Manifest> old_manifest;
  if (st->current) {
    auto om = m_store.manifest(app, *st->current);
    if (om) om = expanded(*om, options, false, {}, true);
    if (!om) return om.error();
    old_manifest = std::move(*om);
  }
  if (has_activation_hooks(*m))
    return run_hooked(lock, *st, *m, old_manifest, std::move(report), is_rollback, options,
                      progress);

  store::HistoryEntry h{"", is_rollback ? "rollback" : "activate", report.from, version, "", "",
                        {}};
  h.transaction = options.transaction;
  pause_point("activation.before_commit");
  if (options.commit && !options.commit())
    return Error(ErrorCode::kCanceled, "canceled before " + app + " was touched");
  // From here on a crash is finished by resume() when the daemon starts again.
  const std::string previous = st->previous.value_or("");
  // Its start time once: the record is rewritten before each wave.
  store::PendingActivation pending{h.op,          report.from, version, previous,
                                   now_rfc3339(), "restart",   {},      m->units};
  if (old_manifest) pending.from_units = old_manifest->units;
  pending.max_unavailable = options.max_unavailable;
  UPGRADED_TRY(m_store.begin_activation(lock, pending));
  if (progress) progress("switching", 20);
  if (auto r = m_store.switch_to(lock, version); !r) {
    (void)m_store.end_activation(lock);
    return r.error();
  }
  crash_point("activation.after_switch");
  report.switched_usec = monotonic_usec();
  report.steps.push_back("switch:" + version);
  Gate units = journaled_gate(lock, pending);
  units.trace = &report.steps;
  auto gate = restart_and_gate(*m, options, progress, report.downtime_usec, units);
  if (gate) {
    (void)m_store.set_status(lock, version, store::ReleaseStatus::kGood);
    report.steps.push_back("mark-good:" + version);
    (void)m_store.end_activation(lock);  // before the history: a crash between the two must not
                                         // restart healthy units again
    h.result = "done";
    h.downtime_usec = report.downtime_usec;
    (void)m_store.append_history(lock, h);
    if (progress) progress("done", 100);
    return report;
  }
  return fail_after_switch(lock, std::move(report), previous, std::move(h), gate.error(),
                           is_rollback, options, progress);
}

// A failure past the point of no return: the release is marked bad and, unless this was a
// rollback or there is nothing to go back to, the release it replaced comes back.
Result<ActivationReport> Activator::fail_after_switch(
    const store::AppLock& lock, ActivationReport report, const std::string& previous,
    store::HistoryEntry h, const Error& failure, bool is_rollback, const ActivationOptions& options,
    const ProgressFn& progress) {
  h.message = failure.message();
  if (is_rollback || report.from.empty()) {
    (void)m_store.set_status(lock, report.to, store::ReleaseStatus::kBad);
    h.result = "failed";
    (void)m_store.end_activation(lock);
    (void)m_store.append_history(lock, h);
    return failure;
  }
  return roll_back_after(lock, std::move(report), previous, std::move(h), failure, options,
                         progress);
}

// Automatic rollback: the old release, its units, checked again (active; no soak). Units of the
// failed release that the old one does not have are stopped. No hooks run.
Result<ActivationReport> Activator::roll_back_after(const store::AppLock& lock,
                                                    ActivationReport report,
                                                    const std::string& previous,
                                                    store::HistoryEntry h, const Error& failure,
                                                    const ActivationOptions& options,
                                                    const ProgressFn& progress, bool mark_bad) {
  if (progress) progress("rolling back", 90);
  // Journaled first: a crash from here on finishes the rollback (switch back, old units, no
  // hook), whatever step the record said before.
  std::optional<store::PendingActivation> record;
  if (auto pending = m_store.pending_activation(lock.app()); pending && *pending) {
    record = **pending;
    record->step = "rolling_back";
    (void)m_store.begin_activation(lock, *record);
  }
  if (mark_bad) (void)m_store.set_status(lock, report.to, store::ReleaseStatus::kBad);
  crash_point("activation.rolling_back");
  std::map<std::string, std::uint64_t> back_downtime;
  // The failed release's units as its activation journaled them; the old release's instances
  // include those (restored even if they stopped running).
  auto failed = m_store.manifest(lock.app(), report.to);
  if (failed) failed = journaled_or_expanded(*failed, record ? &*record : nullptr, options);
  auto old_manifest = m_store.manifest(lock.app(), report.from);
  if (old_manifest) {
    std::vector<std::string> known = failed ? failed->units : std::vector<std::string>();
    if (record) {
      known.insert(known.end(), record->units.begin(), record->units.end());
      known.insert(known.end(), record->from_units.begin(), record->from_units.end());
    }
    old_manifest = expanded(*old_manifest, options, false, known, true);
  }
  Result<void> back = old_manifest ? Result<void>() : Result<void>(old_manifest.error());
  // In waves, the units not reached yet still run the old release: they are left alone.
  std::vector<std::string> untouched;
  if (back) {
    if (failed) {
      const auto touched = touched_units(lock, *failed);
      auto was_touched = [&touched](const std::string& unit) {
        return std::find(touched.begin(), touched.end(), unit) != touched.end();
      };
      for (const auto& unit : stop_order(touched))
        if (back && std::find(old_manifest->units.begin(), old_manifest->units.end(), unit) ==
                        old_manifest->units.end())
          back = m_units.stop(unit, options.job_timeout);
      if (touched.size() < failed->units.size()) {
        // Left alone only when it provably still runs the old release: active since before
        // the switch, as this process saw it. After a crash (or a reboot) the daemon cannot
        // tell what systemd started meanwhile, so every unit is restored.
        auto still_old = [&](const std::string& unit) {
          if (report.switched_usec == 0) return false;
          auto st = m_units.status(unit);
          return st && st->active_state == "active" && st->active_enter_usec != 0 &&
                 st->active_enter_usec < report.switched_usec;
        };
        std::vector<std::string> restore;
        for (const auto& unit : old_manifest->units)
          (was_touched(unit) || !still_old(unit) ? restore : untouched).push_back(unit);
        old_manifest->units = std::move(restore);
      }
    }
  }
  if (back) back = m_store.switch_back(lock, report.from, previous);
  if (back)
    back = restart_and_gate(
        *old_manifest, options,
        [&progress](const std::string& step, int percent) {
          if (progress) progress("rolling back: " + step, 90 + percent / 10);
        },
        back_downtime, Gate{.soak = false});
  report.rolled_back = true;
  std::string kept;
  for (const auto& unit : untouched)
    kept += (kept.empty() ? "" : ", ") + unit;
  if (!kept.empty()) kept = " (never restarted: " + kept + ")";
  // The release rolled back to is the healthy one again (and its soak starts over).
  if (back) (void)m_store.set_status(lock, report.from, store::ReleaseStatus::kGood);
  h.result = back ? "rolled-back" : "failed";
  if (back) h.message += kept;
  if (!back) h.message += "; rollback to " + report.from + " failed too: " + back.error().message();
  h.downtime_usec = report.downtime_usec;
  (void)m_store.end_activation(lock);
  (void)m_store.append_history(lock, h);
  if (!back) return Error(ErrorCode::kFailed, h.message);
  return Error(ErrorCode::kFailed, failure.message() + "; rolled back to " + report.from + kept);
}

Result<units::HookOutcome> Activator::run_hook(
    const store::AppLock& lock, const artifact::Manifest& m, const std::string& phase,
    const std::string& from, const std::string& to, const HookContext& ctx,
    ActivationReport* report, std::function<Result<void>()> before_release,
    std::chrono::seconds hold_budget, const std::string& unit, std::size_t unit_index) {
  auto hook = m.hooks.find(phase);
  if (hook == m.hooks.end()) return units::HookOutcome{units::HookOutcome::How::kExited};
  if (!ctx.runner)
    return Error(ErrorCode::kPolicyRefused, "the " + phase + " hook of " + lock.app() + " " +
                                                m.version +
                                                " cannot run here: hooks run only in the daemon");
  const std::string& app = lock.app();
  auto st = m_store.state(app);
  if (!st) return st.error();
  units::HookRun run;
  // In waves, a health hook per unit: the unit's index keeps the names apart.
  run.unit = "upgraded-hook-" + app + "-" + phase + "-" + std::to_string(ctx.job_id) +
             (unit_index ? "-" + std::to_string(unit_index) : "") + ".service";
  run.app = app;
  run.phase = phase;
  const std::string dir = m_store.release_path(app, m.version);
  run.exec = dir + "/" + hook->second.path;
  run.working_directory = dir;
  run.environment = {{"UPGRADED_APP", app},
                     {"UPGRADED_PHASE", phase},
                     {"UPGRADED_FROM", from},
                     {"UPGRADED_TO", to},
                     {"UPGRADED_RELEASE_DIR", dir},
                     {"UPGRADED_DATA_FORMAT",
                      st->finalized_data_format ? std::to_string(*st->finalized_data_format)
                      // A held migrate of a first activation runs after the switch, which
                      // records the format.
                      : !st->current && before_release ? std::to_string(m.data_format.writes)
                                                       : ""},
                     {"UPGRADED_JOB", std::to_string(ctx.job_id)},
                     {"UPGRADED_UNIT", unit}};
  std::string dirs;
  for (const auto& d : ctx.data_dirs)
    dirs += (dirs.empty() ? "" : ":") + d;
  run.environment.emplace_back("UPGRADED_DATA_DIRS", dirs);
  run.read_write_paths = ctx.data_dirs;
  run.user = ctx.user;
  run.group = ctx.group;
  run.hidden_paths = ctx.hidden_paths;
  run.inaccessible_paths = ctx.inaccessible_paths;
  run.timeout = std::chrono::seconds(hook->second.timeout_s);
  run.cancel_fd = ctx.cancel_fd;
  // Its own error is reported as it is, not as the hook's.
  bool release_failed = false;
  if (before_release)
    run.before_release = [&release_failed, first = std::move(before_release)]() -> Result<void> {
      auto r = first();
      release_failed = !r;
      return r;
    };
  run.hold_budget = hold_budget;
  crash_point(("hook." + phase + ".before").c_str());
  auto outcome = ctx.runner->run(run, [&ctx, &phase](const std::string& status) {
    if (ctx.on_status) ctx.on_status(phase, status);
  });
  if (!outcome && release_failed) return outcome.error();
  if (!outcome) return outcome.error().with_context("the " + phase + " hook");
  crash_point(("hook." + phase + ".after").c_str());
  if (report) report->steps.push_back("hook:" + phase + (unit.empty() ? "" : ":" + unit));
  if (report) report->hook_start_usec[phase] = outcome->start_usec;
  if (outcome->passed()) return outcome;
  if (outcome->how == units::HookOutcome::How::kCanceled)
    return Error(ErrorCode::kCanceled, "canceled while the " + phase + " hook ran");
  std::string msg =
      "the " + phase + " hook (" + hook->second.path + ") " + outcome->describe(run.timeout);
  if (!outcome->tail.empty()) {
    msg += "; its last output:";
    for (const auto& line : outcome->tail)
      msg += "\n    " + line;
  }
  return Error(ErrorCode::kFailed, msg);
}

// The activation of a release that declares hooks (docs/hooks.md):
// pre_upgrade (old release serving) -> commit -> [migrate: stop units in reverse order ->]
// switch -> [migrate -> start units | restart units] -> health gate + health hook ->
// post_upgrade. A rollback runs the target's pre_upgrade and post_upgrade, never a migrate.
Result<ActivationReport> Activator::run_hooked(
    const store::AppLock& lock, const store::AppState& st, const artifact::Manifest& m,
    const std::optional<artifact::Manifest>& old_manifest, ActivationReport report,
    bool is_rollback, const ActivationOptions& options, const ProgressFn& progress) {
  const std::string& app = lock.app();
  const std::string& version = m.version;
  const HookContext& ctx = options.hooks;
  store::HistoryEntry h{"", is_rollback ? "rollback" : "activate", report.from, version, "", "",
                        {}};
  h.transaction = options.transaction;
  auto fail_untouched = [&](const Error& e) -> Result<ActivationReport> {
    if (e.code() == ErrorCode::kCanceled)
      return Error(ErrorCode::kCanceled, e.message() + "; nothing was changed");
    h.result = "failed";
    h.message = e.message() + "; nothing was changed, " +
                (report.from.empty() ? "nothing was running" : report.from + " kept serving");
    (void)m_store.append_history(lock, h);
    return Error(e.code(), h.message);
  };
  if (progress) progress("pre_upgrade hook", 10);
  if (auto r = run_hook(lock, m, "pre_upgrade", report.from, version, ctx, &report); !r)
    return fail_untouched(r.error());
  pause_point("activation.before_commit");
  if (options.commit && !options.commit())
    return Error(ErrorCode::kCanceled, "canceled before " + app + " was touched");
  // Going back to an older release, by rollback or by activate, never migrates: the data stays
  // in the format the older release reads (the data-format checks made sure it can).
  const bool downgrade =
      is_rollback || (!report.from.empty() && policy::compare_versions(version, report.from) < 0);
  const bool migrate = !downgrade && m.hooks.count("migrate");
  const std::string previous = st.previous.value_or("");
  // With a migrate, one record covers the stop, the switch and the migrate (a crash in any of
  // them is undone alike); "starting" follows once the migrate passed.
  store::PendingActivation pending{h.op,     report.from,   version,
                                   previous, now_rfc3339(), migrate ? "migrate" : "starting",
                                   {},       m.units};
  if (old_manifest) pending.from_units = old_manifest->units;
  pending.max_unavailable = options.max_unavailable;
  UPGRADED_TRY(m_store.begin_activation(lock, pending));
  auto roll_back = [&](const Error& failure) {
    return fail_after_switch(lock, std::move(report), previous, std::move(h), failure, is_rollback,
                             options, progress);
  };
  std::map<std::string, std::uint64_t> stopped_at;  // CLOCK_MONOTONIC µs each unit went down
  // Nothing may write the data while it is migrated: the old release's units stop first, in
  // reverse order, then `current` is switched. With a migrate hook that all happens while its
  // unit is already started and held (its sandbox set up), so that the unit's start is not
  // part of the downtime window.
  auto stop_and_switch = [&]() -> Result<void> {
    int n = 0;
    if (migrate && old_manifest)
      for (const auto& unit : stop_order(old_manifest->units)) {
        if (progress)
          progress("stopping " + unit,
                   20 + 10 * n++ / static_cast<int>(old_manifest->units.size()));
        // systemd may unload a stopped unit (and forget its timestamps) before it can be
        // asked: the time the stop was asked for bounds the window from above.
        const std::uint64_t asked = monotonic_usec();
        if (auto r = m_units.stop(unit, options.job_timeout); !r)
          return r.error().with_context("stopping the units");
        report.steps.push_back("stop:" + unit);
        auto su = m_units.status(unit);
        stopped_at[unit] = su && su->active_exit_usec >= asked ? su->active_exit_usec : asked;
      }
    crash_point("activation.after_stop");
    if (progress) progress("switching", 30);
    UPGRADED_TRY(m_store.switch_to(lock, version));
    crash_point("activation.after_switch");
    report.switched_usec = monotonic_usec();
    report.steps.push_back("switch:" + version);
    if (progress && migrate) progress("migrate hook", 35);
    return {};
  };
  if (migrate) {
    const auto units = old_manifest ? old_manifest->units.size() : 0;
    auto r = run_hook(lock, m, "migrate", report.from, version, ctx, &report, stop_and_switch,
                      std::chrono::duration_cast<std::chrono::seconds>(options.job_timeout) *
                              static_cast<long>(units) +
                          std::chrono::seconds(60));
    if (!r) return roll_back(r.error());
    pending.step = "starting";
    UPGRADED_TRY(m_store.begin_activation(lock, pending));
  } else if (auto r = stop_and_switch(); !r) {
    (void)m_store.end_activation(lock);
    return r.error();
  }
  // Stopped for a migrate, every unit counts as touched: only otherwise is the count journaled.
  Gate units = migrate ? Gate{} : journaled_gate(lock, pending);
  units.start_only = migrate;
  units.trace = &report.steps;
  auto gate = restart_and_gate(
      m, options, progress, report.downtime_usec,
      hooked_gate(lock, m, report.from, report, options, progress, std::move(units)));
  if (migrate) {
    // From the stop to active again: the start's timestamps against the stop's.
    for (const auto& unit : m.units)
      if (auto su = m_units.status(unit);
          su && stopped_at.count(unit) && su->active_enter_usec > stopped_at[unit])
        report.downtime_usec[unit] = su->active_enter_usec - stopped_at[unit];
  }
  if (!gate) return roll_back(gate.error());
  if (auto r = finish_hooked(lock, m, report.from, previous, report, options, progress); !r)
    return roll_back(r.error());
  h.result = "done";
  h.downtime_usec = report.downtime_usec;
  h.hook_start_usec = report.hook_start_usec;
  (void)m_store.append_history(lock, h);
  if (progress) progress("done", 100);
  return report;
}

Result<void> Activator::finish_hooked(const store::AppLock& lock, const artifact::Manifest& m,
                                      const std::string& from, const std::string& previous,
                                      ActivationReport& report, const ActivationOptions& options,
                                      const ProgressFn& progress) {
  const std::string& version = m.version;
  if (!gated_per_unit(m)) {
    if (progress && m.hooks.count("health")) progress("health hook", 86);
    if (auto r = run_hook(lock, m, "health", from, version, options.hooks, &report); !r)
      return r.error().code() == ErrorCode::kCanceled ? r.error()
                                                      : r.error().with_context("health gate");
  }
  if (m.hooks.count("post_upgrade")) {
    auto pending = m_store.pending_activation(lock.app());
    if (pending && *pending) {
      store::PendingActivation p = **pending;
      p.step = "post_upgrade";
      UPGRADED_TRY(m_store.begin_activation(lock, p));
    }
    if (progress) progress("post_upgrade hook", 92);
    UPGRADED_TRY(run_hook(lock, m, "post_upgrade", from, version, options.hooks, &report));
  }
  (void)previous;
  (void)m_store.set_status(lock, version, store::ReleaseStatus::kGood);
  report.steps.push_back("mark-good:" + version);
  (void)m_store.end_activation(lock);
  return {};
}

Activator::Gate Activator::hooked_gate(const store::AppLock& lock, const artifact::Manifest& m,
                                       const std::string& from, ActivationReport& report,
                                       const ActivationOptions& options, const ProgressFn& progress,
                                       Gate gate) {
  if (!gated_per_unit(m) || !m.hooks.count("health")) return gate;
  gate.after_unit = [this, &lock, &m, &from, &report, &options, &progress](
                        const std::string& unit, std::size_t index) -> Result<void> {
    if (progress)
      progress("health hook: " + unit, 40 + static_cast<int>(40 * index / m.units.size()));
    auto r =
        run_hook(lock, m, "health", from, m.version, options.hooks, &report, {}, {}, unit, index);
    if (!r)
      return r.error().code() == ErrorCode::kCanceled
                 ? r.error()
                 : r.error().with_context("health gate of " + unit);
    return {};
  };
  return gate;
}

// After a crash (docs/hooks.md, "Crash safety"): a hook that was running is never run again
// blindly. What was interrupted decides:
//  - queued (staged offline): the whole activation runs now;
//  - restart (no hooks), or a rollback, or `current` not yet switched: the units of `current`
//    are restarted and gated, as before hooks existed;
//  - stopping, migrate, post_upgrade: the hook's outcome is unknown, so it counts as failed:
//    switched back, the old units started; the release is not marked bad (it did not fail);
//  - starting (migrated): the units are started and gated, then health and post_upgrade.
Result<ActivationReport> Activator::resume(const store::AppLock& lock,
                                           const ActivationOptions& options,
                                           const ProgressFn& progress) {
  const std::string& app = lock.app();
  auto pending = m_store.pending_activation(app);
  if (!pending) return pending.error();
  ActivationReport report;
  if (!*pending) return report;
  const store::PendingActivation p = **pending;
  if (p.step == "queued") {
    ActivationOptions o = options;
    o.commit = nullptr;
    auto r = run(lock, p.to, p.op == "rollback", o, progress);
    if (!r) {
      // A refusal (or anything before the record was replaced) leaves the queue entry: drop it.
      auto still = m_store.pending_activation(app);
      if (still && *still && (*still)->step == "queued") {
        (void)m_store.end_activation(lock);
        store::HistoryEntry h{
            "",   p.op,     p.from,
            p.to, "failed", "the " + p.op + " queued by an offline install: " + r.error().message(),
            {}};
        (void)m_store.append_history(lock, h);
      }
    }
    return r;
  }
  auto st = m_store.state(app);
  if (!st) return st.error();
  report.from = p.from;
  report.to = st->current.value_or("");
  store::HistoryEntry h{"", "recover", p.from, report.to, "", "", {}};
  h.transaction = options.transaction;
  h.message = "finishing an interrupted " + p.op + " of " + p.to;
  if (!st->current) {
    (void)m_store.end_activation(lock);
    return report;
  }
  auto m = m_store.manifest(app, *st->current);
  if (m) m = journaled_or_expanded(*m, &p, options);
  if (!m) return m.error();
  if (p.step == "rolling_back" && !p.from.empty() && st->releases.count(p.from)) {
    // Interrupted while rolling back: finish it, hooks and the bad mark as they were.
    report.to = p.to;
    h.message += ": interrupted while rolling back to " + p.from + "; finished";
    const Error interrupted(ErrorCode::kFailed, h.message);
    std::string previous = st->releases.count(p.previous) ? p.previous : "";
    return roll_back_after(lock, std::move(report), previous, std::move(h), interrupted, options,
                           progress, /*mark_bad=*/false);
  }
  const bool hooked = p.step != "restart" && p.op == "activate" && *st->current == p.to;
  if (hooked && p.step != "starting") {
    const std::string phase = p.step == "stopping" ? "stop" : p.step;
    Error interrupted(
        ErrorCode::kFailed,
        "interrupted during the " + phase + " step of activating " + p.to +
            (p.step == "stopping" ? "" : "; the " + p.step + " hook is not run again"));
    h.message += ": " + interrupted.message();
    if (!p.from.empty() && st->releases.count(p.from)) {
      report.to = p.to;
      std::string previous = st->releases.count(p.previous) ? p.previous : "";
      return roll_back_after(lock, std::move(report), previous, std::move(h), interrupted, options,
                             progress, /*mark_bad=*/false);
    }
    (void)m_store.set_status(lock, p.to, store::ReleaseStatus::kBad);
    (void)m_store.end_activation(lock);
    h.result = "failed";
    (void)m_store.append_history(lock, h);
    return interrupted;
  }
  // In waves (no migrate: only then is the count journaled), the units before the wave being
  // restarted passed their gates: it goes on from that wave (restarted again), checks the
  // others and keeps journaling. Without a count every unit is restarted, and counts as touched.
  const auto touched = *st->current == p.to ? units_touched(p, *m) : std::nullopt;
  Gate units = touched ? journaled_gate(lock, p) : Gate{};
  units.trace = &report.steps;
  // The waves as the activation journaled them: the policy may have changed since.
  ActivationOptions resumed = options;
  if (p.max_unavailable) resumed.max_unavailable = *p.max_unavailable;
  if (touched) {
    const auto ends = waves(*m, resumed.max_unavailable);
    auto wave = std::upper_bound(ends.begin(), ends.end(), *touched - 1);
    units.first = wave == ends.begin() ? 0 : *(wave - 1);
  }
  if (hooked) units = hooked_gate(lock, *m, p.from, report, resumed, progress, std::move(units));
  auto gate = restart_and_gate(*m, resumed, progress, report.downtime_usec, units);
  if (gate && hooked) gate = finish_hooked(lock, *m, p.from, p.previous, report, resumed, progress);
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

Result<FinalizeReport> Activator::finalize(const store::AppLock& lock,
                                           const FinalizeOptions& options,
                                           const ProgressFn& progress) {
  const std::string& app = lock.app();
  if (progress) progress("checking", 5);
  auto pending = m_store.pending_activation(app);
  if (!pending) return pending.error();
  if (*pending)
    return refuse("an activation of " + app + " " + (*pending)->to +
                  " is not finished; finalize once it is");
  auto st = m_store.state(app);
  if (!st) return st.error();
  if (!st->current) return refuse(app + " has no current release");
  auto m = m_store.manifest(app, *st->current);
  if (!m) return m.error();
  UPGRADED_TRY(check_finalize(*st, *m, options.no_backup));
  FinalizeReport report{*st->current, m->data_format.writes, ""};
  const std::string before = std::to_string(st->finalized_data_format.value_or(0));
  store::HistoryEntry h{"", "finalize", before, std::to_string(report.format), "", "", {}};
  auto failed = [&](const Error& e) -> Result<FinalizeReport> {
    if (e.code() == ErrorCode::kCanceled) return e;
    h.result = "failed";
    h.message = e.message() + "; " + app + " stays pre-finalized (data format " + before + ")";
    h.backup = report.backup;
    (void)m_store.append_history(lock, h);
    return Error(e.code(), h.message);
  };
  if (m->hooks.count("backup")) {
    if (progress) progress("backup hook", 20);
    auto b = run_hook(lock, *m, "backup", "", report.version, options.hooks, nullptr);
    if (!b) return failed(b.error());
    auto& name = b->last_stdout_line;
    auto first = name.find_first_not_of(" \t\r");
    auto last = name.find_last_not_of(" \t\r");
    report.backup = first == std::string::npos ? "" : name.substr(first, last - first + 1);
    if (report.backup.empty())
      return failed(Error(ErrorCode::kFailed,
                          "the backup hook printed no backup name (its last line on stdout)"));
    // Already printable (the runner made it so); cut on a character boundary.
    report.backup = units::printable_line(report.backup, 200);
  }
  pause_point("finalize.before_commit");
  if (options.commit && !options.commit())
    return Error(ErrorCode::kCanceled, "canceled before " + app + " was finalized");
  if (progress) progress("finalize hook", 60);
  if (auto f = run_hook(lock, *m, "finalize", "", report.version, options.hooks, nullptr); !f)
    return failed(f.error());
  crash_point("finalize.before_record");
  if (progress) progress("recording", 90);
  if (auto r = m_store.record_finalized_data_format(lock, report.format, report.backup); !r)
    return failed(r.error());
  h.result = "done";
  h.backup = report.backup;
  h.message = "data format " + std::to_string(report.format) + " of " + app + " " + report.version +
              " finalized" +
              (report.backup.empty() ? " without a backup" : "; backup '" + report.backup + "'");
  (void)m_store.append_history(lock, h);
  if (progress) progress("done", 100);
  return report;
}

// An activation that a crash interrupted is finished first, so that the units match `current`
// before anything else changes. A failed health gate there is recorded by resume() and does not
// stop what was asked for now.
Result<std::string> Activator::finish_pending(const store::AppLock& lock,
                                              const ActivationOptions& options,
                                              const ProgressFn& progress) {
  auto pending = m_store.pending_activation(lock.app());
  if (!pending) return pending.error();
  if (!*pending) return std::string();
  // Finishing it restarts units: past the point of no return for the caller too.
  if (options.commit && !options.commit())
    return Error(ErrorCode::kCanceled, "canceled before " + lock.app() + " was touched");
  auto resumed = resume(lock, options, progress);
  if (!resumed && resumed.error().code() != ErrorCode::kFailed) return resumed.error();
  return (*pending)->to;
}

namespace {
// What it did first, as a plan's "recover" step names it.
Result<ActivationReport> after_recovery(Result<ActivationReport> r, const std::string& recovered) {
  if (r && !recovered.empty()) r->steps.insert(r->steps.begin(), "recover:" + recovered);
  return r;
}
}  // namespace

std::vector<std::string> find_installed_upgrade_path(
    const store::AppState& st,
    const std::function<Result<artifact::Manifest>(const std::string&)>& manifest,
    const std::string& target) {
  std::map<std::string, artifact::Manifest> manifests;
  for (const auto& [v, rec] : st.releases)
    if (auto m = manifest(v)) manifests.emplace(v, std::move(*m));
  return find_upgrade_path(st, manifests, target);
}

std::vector<std::string> Activator::upgrade_path(const std::string& app,
                                                 const std::string& target) const {
  auto st = m_store.state(app);
  if (!st) return {};
  return find_installed_upgrade_path(
      *st, [this, &app](const std::string& v) { return m_store.manifest(app, v); }, target);
}

Result<ActivationReport> Activator::activate(const store::AppLock& lock, const std::string& version,
                                             const ActivationOptions& options,
                                             const ProgressFn& progress) {
  auto recovered = finish_pending(lock, options, progress);
  if (!recovered) return recovered.error();
  if (!options.through_path)
    return after_recovery(run(lock, version, false, options, progress), *recovered);
  auto path = upgrade_path(lock.app(), version);
  if (path.size() <= 2)
    return after_recovery(run(lock, version, false, options, progress), *recovered);
  // A step whose templates have no instance would be refused midway: refused before the walk
  // starts, as its plan is.
  for (std::size_t i = 1; i < path.size(); ++i) {
    auto m = m_store.manifest(lock.app(), path[i]);
    if (m) m = expanded(*m, options, true);
    if (!m) return m.error();
  }
  // Each step a full gated activation; a failed step rolls back to the step before it (the
  // last good one) and ends the walk.
  ActivationReport whole;
  whole.from = path.front();
  whole.to = version;
  const int steps = static_cast<int>(path.size()) - 1;
  for (int i = 1; i <= steps; ++i) {
    auto step_progress = [&progress, i, steps](const std::string& step, int percent) {
      if (progress)
        progress("step " + std::to_string(i) + "/" + std::to_string(steps) + ": " + step,
                 ((i - 1) * 100 + percent) / steps);
    };
    auto r = run(lock, path[i], false, options, step_progress);
    if (!r)
      return Error(r.error().code(), "step " + std::to_string(i) + " of " + std::to_string(steps) +
                                         " (" + path[i - 1] + " \u2192 " + path[i] +
                                         "): " + r.error().message());
    for (const auto& [unit, usec] : r->downtime_usec)
      whole.downtime_usec[unit + "@" + path[i]] = usec;
    whole.steps.insert(whole.steps.end(), r->steps.begin(), r->steps.end());
  }
  return after_recovery(std::move(whole), *recovered);
}

Result<PlanContext> Activator::plan_context(const std::string& app,
                                            const ActivationOptions& options,
                                            bool installed) const {
  PlanContext ctx;
  if (installed) {
    ctx.manifest = [this, app](const std::string& v) { return m_store.manifest(app, v); };
    auto history = m_store.history(app);
    if (!history) return history.error();
    ctx.history = std::move(*history);
    auto pending = m_store.pending_activation(app);
    if (!pending) return pending.error();
    ctx.pending = *pending;
  } else {
    // A new app: no history, nothing pending, no release of its own to read.
    ctx.manifest = [app](const std::string& v) -> Result<artifact::Manifest> {
      return Error(ErrorCode::kNotFound, "no release " + v + " of " + app);
    };
  }
  ctx.allow_bad = options.allow_bad;
  ctx.allow_below_floor = options.allow_below_floor;
  ctx.through_path = options.through_path;
  ctx.hooks_runnable = options.hooks.runner != nullptr;
  ctx.job_timeout_s = static_cast<std::uint32_t>(
      std::chrono::duration_cast<std::chrono::seconds>(options.job_timeout).count());
  ctx.expand = [this, &options](const artifact::Manifest& m, bool require) {
    return expanded(m, options, require);
  };
  ctx.max_unavailable = options.max_unavailable;
  ctx.unit_status = [this](const std::string& unit) { return m_units.status(unit); };
  return ctx;
}

Result<Plan> Activator::plan(const std::string& app, const std::string& version, bool is_rollback,
                             const ActivationOptions& options) const {
  auto st = m_store.state(app);
  if (!st) return st.error();
  auto ctx = plan_context(app, options, true);
  if (!ctx) return ctx.error();
  return plan_activation(*st, version, is_rollback, *ctx);
}

Result<Plan> Activator::plan_install(const artifact::Manifest& m, const InstallSpace& space,
                                     const ActivationOptions& options) const {
  bool is_new = false;
  auto st = m_store.state_or_new(m.app, &is_new);
  if (!st) return st.error();
  auto ctx = plan_context(m.app, options, !is_new);
  if (!ctx) return ctx.error();
  return activation::plan_install(std::move(*st), m, space, std::move(*ctx));
}

Result<ActivationReport> Activator::rollback(const store::AppLock& lock,
                                             const ActivationOptions& options,
                                             const ProgressFn& progress) {
  auto recovered = finish_pending(lock, options, progress);
  if (!recovered) return recovered.error();
  auto st = m_store.state(lock.app());
  if (!st) return st.error();
  if (!st->previous) return Error(ErrorCode::kNotFound, lock.app() + " has no rollback target");
  if (!options.expected_target.empty() && *st->previous != options.expected_target)
    return Error(ErrorCode::kFailed,
                 "the rollback target of " + lock.app() + " is now " + *st->previous + ", not " +
                     options.expected_target +
                     " (an interrupted activation was finished first); nothing was rolled back");
  return after_recovery(run(lock, *st->previous, true, options, progress), *recovered);
}

}  // namespace upgraded::activation
