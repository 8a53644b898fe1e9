#include "upgraded/activation/plan.h"

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "upgraded/activation/activator.h"
#include "upgraded/policy/version.h"

namespace upgraded::activation {
namespace {

using nlohmann::json;

PlanStep step(std::string kind, std::string target, const std::string& release) {
  PlanStep s;
  s.kind = std::move(kind);
  s.target = std::move(target);
  s.release = release;
  return s;
}

// The steps of one activation of `m` from the state `st` (current: the release it leaves), as
// Activator::run and run_hooked take them.
// `started`: the socket units earlier activations of a walk start (listening from then on).
void append_steps(Plan& plan, const store::AppState& st, const artifact::Manifest& m,
                  const std::optional<artifact::Manifest>& old, bool is_rollback,
                  const PlanContext& ctx, std::set<std::string>& started) {
  const std::string& version = m.version;
  const std::string from = st.current.value_or("");
  const bool in_waves = gated_per_unit(m);
  const bool hooked = has_activation_hooks(m);
  auto hook = [&](const std::string& phase, const std::string& unit = {},
                  std::vector<std::string> down = {}) {
    auto h = m.hooks.find(phase);
    if (h == m.hooks.end()) return;
    PlanStep s = step("hook", phase, version);
    s.unit = unit;
    s.timeout_s = h->second.timeout_s;
    s.units_down = std::move(down);
    plan.steps.push_back(std::move(s));
  };
  if (hooked) hook("pre_upgrade");
  const bool downgrade =
      is_rollback || (!from.empty() && policy::compare_versions(version, from) < 0);
  const bool migrate = hooked && !downgrade && m.hooks.count("migrate");
  std::vector<std::string> stopped;
  if (migrate && old)
    for (const auto& unit : stop_order(old->units)) {
      PlanStep s = step("stop", unit, version);
      s.timeout_s = ctx.job_timeout_s;
      if (ctx.unit_status)
        if (auto st = ctx.unit_status(unit); st && st->fd_store_max > 0)
          s.note = "its file descriptor store (" + std::to_string(st->fd_store) +
                   " now) is emptied: systemd keeps it across a restart, not a stop";
      stopped.push_back(unit);
      s.units_down = stopped;
      plan.steps.push_back(std::move(s));
    }
  {
    PlanStep s = step("switch", version, version);
    s.units_down = stopped;
    plan.steps.push_back(std::move(s));
  }
  if (migrate) hook("migrate", {}, stopped);
  auto gate = [&](const std::string& unit) {
    PlanStep s = step("gate", unit, version);
    s.timeout_s = m.health.deadline_s;
    s.min_ready_s = m.health.min_ready_s;
    plan.steps.push_back(std::move(s));
  };
  std::size_t begin = 0;
  for (const std::size_t end : waves(m, ctx.max_unavailable)) {
    for (std::size_t k = begin; k < end; ++k) {
      const std::string& unit = m.units[k];
      PlanStep s = step(migrate ? "start" : "restart", unit, version);
      s.timeout_s = ctx.job_timeout_s;
      if (!migrate && is_socket_unit(unit)) {
        // As Activator::restart_and_gate: held when it listens, else started after this
        // release's services behind it stop.
        auto st = ctx.unit_status ? ctx.unit_status(unit)
                                  : Result<units::UnitStatus>(Error(ErrorCode::kNotFound, ""));
        if (st && st->active_state != "active" && !started.count(unit)) {
          started.insert(unit);
          s.kind = "start";
          s.units_down = {unit};
          std::vector<std::string> behind;
          for (const auto& service : behind_socket(*st, m.units, k)) {
            auto ss = ctx.unit_status(service);
            if (!ss || !stops_for_socket(*ss)) continue;
            PlanStep stop = step("stop", service, version);
            stop.timeout_s = ctx.job_timeout_s;
            stop.units_down = {service};
            behind.push_back(service);
            plan.steps.push_back(std::move(stop));
          }
          s.units_down.insert(s.units_down.end(), behind.begin(), behind.end());
          s.note = "not listening: it starts now" +
                   std::string(behind.empty() ? "" : ", after the services behind it stop") +
                   "; connections are refused until it listens";
        } else {
          s.kind = "hold";
          s.note = "never stopped: connections queue while the services behind it restart";
          if (st && st->need_daemon_reload)
            s.note +=
                "; its unit file changed on disk, which takes effect only when you restart "
                "it (refusing connections meanwhile): upgraded keeps it as it runs";
        }
        plan.steps.push_back(std::move(s));
        continue;
      }
      if (migrate) {
        // Stopped for the migrate: down until its own start, like every unit after it; the
        // old release's units that this one does not have stay down.
        s.units_down.assign(m.units.begin() + static_cast<std::ptrdiff_t>(k), m.units.end());
        for (const auto& u : stopped)
          if (std::find(m.units.begin(), m.units.end(), u) == m.units.end())
            s.units_down.push_back(u);
      } else {
        s.units_down = {unit};
      }
      plan.steps.push_back(std::move(s));
    }
    // In waves, each unit of the wave gated, then its health hook.
    for (std::size_t k = begin; in_waves && k < end; ++k) {
      gate(m.units[k]);
      if (hooked && !is_socket_unit(m.units[k])) hook("health", m.units[k]);
    }
    begin = end;
  }
  if (!in_waves) {
    gate("");
    if (hooked) hook("health");
  }
  if (hooked) hook("post_upgrade");
  plan.steps.push_back(step("mark-good", version, version));
}

// As the D-Bus error the activation would fail with (org.upgraded1.Error.<name>).
std::string refusal_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::kPolicyRefused:
      return "PolicyRefused";
    case ErrorCode::kNotFound:
      return "NotFound";
    case ErrorCode::kBusy:
      return "Busy";
    case ErrorCode::kExists:
      return "Exists";
    case ErrorCode::kNoSpace:
      return "NoSpace";
    default:
      return "Failed";
  }
}

}  // namespace

std::string PlanStep::key() const {
  return kind + ":" + target + (unit.empty() ? "" : ":" + unit);
}

std::vector<std::string> Plan::keys() const {
  std::vector<std::string> out;
  for (const auto& s : steps)
    out.push_back(s.key());
  return out;
}

DowntimePrediction predict_downtime(const std::vector<store::HistoryEntry>& history,
                                    const std::string& unit, std::size_t window) {
  DowntimePrediction p;
  p.unit = unit;
  std::vector<std::uint64_t> windows;
  for (auto it = history.rbegin(); it != history.rend() && windows.size() < window; ++it)
    if (auto w = it->downtime_usec.find(unit); w != it->downtime_usec.end())
      windows.push_back(w->second);
  p.samples = windows.size();
  if (windows.empty()) return p;
  std::sort(windows.begin(), windows.end());
  const std::size_t n = windows.size();
  p.median_usec = n % 2 ? windows[n / 2] : (windows[n / 2 - 1] + windows[n / 2]) / 2;
  // Nearest rank: the smallest value with at least 95 % of the samples at or below it.
  p.p95_usec = windows[(95 * n + 99) / 100 - 1];
  return p;
}

Result<Plan> plan_activation(const store::AppState& st, const std::string& version,
                             bool is_rollback, const PlanContext& ctx) {
  Plan plan;
  plan.app = st.app;
  plan.op = is_rollback ? "rollback" : "activate";
  plan.from = st.current.value_or("");
  plan.to = version;
  if (ctx.pending) {
    // Finished first, whatever was asked (Activator::finish_pending), and how it ends (on
    // either release, hooks rerun or not) decides everything after it: only that is certain.
    plan.recover_first = ctx.pending->to;
    plan.steps.push_back(step("recover", plan.recover_first, plan.recover_first));
    plan.on_failure = "an interrupted " + ctx.pending->op + " of " + ctx.pending->to +
                      " is finished first (docs/hooks.md, \"Crash safety\"); plan again once it is";
    if (is_rollback && st.previous) plan.to = *st.previous;
    return plan;
  }
  if (is_rollback) {
    if (!st.previous) {
      plan.refusal = Error(ErrorCode::kNotFound, st.app + " has no rollback target");
      return plan;
    }
    plan.to = *st.previous;
  }
  const std::string& target = plan.to;
  if (!st.releases.count(target)) {
    plan.refusal = Error(ErrorCode::kNotFound, "no release " + target + " of " + st.app);
    return plan;
  }
  auto m = ctx.manifest(target);
  if (!m) return m.error();
  plan.strategy = std::string(artifact::to_string(m->strategy));
  auto installed_path = [&] { return find_installed_upgrade_path(st, ctx.manifest, target); };
  // Templates expanded into their instances (`require`: refused without any, as the activator
  // refuses the release it activates).
  auto expand = [&](artifact::Manifest mv, bool require) -> Result<artifact::Manifest> {
    return ctx.expand ? ctx.expand(mv, require) : Result<artifact::Manifest>(std::move(mv));
  };
  auto refused = [&plan](const Error& e) -> Result<Plan> {
    if (e.code() != ErrorCode::kPolicyRefused) return e;
    plan.refusal = e;
    plan.steps.clear();
    return plan;
  };
  std::vector<std::string> path;
  std::optional<artifact::Manifest> old_last;  // a walk: the manifest of its last release
  if (ctx.through_path && !is_rollback) {
    auto p = installed_path();
    if (p.size() > 2) path = std::move(p);
  }
  if (path.empty()) {
    auto ok = check_activation(
        st, *m,
        ActivationChecks{ctx.allow_bad, is_rollback, ctx.allow_below_floor, ctx.hooks_runnable});
    if (!ok) {
      std::vector<std::string> way;
      if (!is_rollback && is_upgrade_path_refusal(ok.error())) way = installed_path();
      plan.refusal = is_rollback ? ok.error() : with_upgrade_path(ok.error(), way);
      return plan;
    }
    if (st.current == target) {
      plan.already_current = true;
      return plan;
    }
    auto xm = expand(*m, true);
    if (!xm) return refused(xm.error());
    std::optional<artifact::Manifest> old;
    if (st.current) {
      auto om = ctx.manifest(*st.current);
      if (om) om = expand(std::move(*om), false);
      if (!om) return om.error();
      old = std::move(*om);
    }
    std::set<std::string> started;
    append_steps(plan, st, *xm, old, is_rollback, ctx, started);
  } else {
    // A walk: each step a whole activation from the one before (Activator::activate).
    plan.path = path;
    std::optional<artifact::Manifest>& old = old_last;
    auto om = ctx.manifest(path.front());
    if (om) om = expand(std::move(*om), false);
    if (!om) return om.error();
    old = std::move(*om);
    std::set<std::string> started;
    for (std::size_t i = 1; i < path.size(); ++i) {
      auto mi = ctx.manifest(path[i]);
      if (!mi) return mi.error();
      mi = expand(std::move(*mi), true);
      if (!mi) return refused(mi.error());
      store::AppState at = st;
      at.previous = at.current;
      at.current = path[i - 1];
      append_steps(plan, at, *mi, old, false, ctx, started);
      old = std::move(*mi);
    }
  }
  // The units it takes down, in the order it first does.
  std::vector<std::string> units;
  for (const auto& s : plan.steps)
    if ((s.kind == "stop" || s.kind == "restart" || s.kind == "start") &&
        std::find(units.begin(), units.end(), s.target) == units.end())
      units.push_back(s.target);
  std::map<std::string, const DowntimePrediction*> by_unit;
  for (const auto& unit : units)
    plan.downtime.push_back(predict_downtime(ctx.history, unit));
  // The services behind a held socket refuse nothing while they restart.
  for (const auto& s : plan.steps) {
    if (s.kind != "hold" || !ctx.unit_status) continue;
    auto st = ctx.unit_status(s.target);
    if (!st) continue;
    for (auto& d : plan.downtime)
      if (std::find(st->triggers.begin(), st->triggers.end(), d.unit) != st->triggers.end() &&
          std::find(d.held_by.begin(), d.held_by.end(), s.target) == d.held_by.end())
        d.held_by.push_back(s.target);
  }
  for (const auto& d : plan.downtime)
    by_unit[d.unit] = &d;
  // Per activation (a walk has several): restarted one after another, its units' windows add
  // up; stopped together for a migrate, they overlap, and the longest is the app's window (a
  // migrate's windows run from the stop to the start, the migrate included).
  std::uint64_t total = 0;
  bool complete = !units.empty();
  for (std::size_t i = 0; i < plan.steps.size();) {
    const std::string& release = plan.steps[i].release;
    bool migrated = false;
    std::uint64_t sum = 0, longest = 0;
    for (; i < plan.steps.size() && plan.steps[i].release == release; ++i) {
      const auto& s = plan.steps[i];
      migrated = migrated || (s.kind == "hook" && s.target == "migrate");
      if (s.kind != "restart" && s.kind != "start") continue;
      const DowntimePrediction& d = *by_unit.at(s.target);
      complete = complete && d.samples > 0;
      sum += d.median_usec;
      longest = std::max(longest, d.median_usec);
    }
    total += migrated ? longest : sum;
  }
  if (complete) plan.predicted_total_usec = total;
  const bool migrate = std::any_of(plan.steps.begin(), plan.steps.end(), [](const PlanStep& s) {
    return s.kind == "hook" && s.target == "migrate";
  });
  if (plan.from.empty())
    plan.on_failure = target + " is marked bad; there is no release to go back to";
  else if (is_rollback)
    plan.on_failure = target + " is marked bad; a failed rollback is reported, not bounced back";
  else if (!path.empty())
    plan.on_failure = "the failing step rolls back to the release before it, and the walk stops";
  else if (m->strategy != artifact::Strategy::kAllAtOnce && !migrate)
    plan.on_failure = target + " is marked bad; " + plan.from +
                      " comes back on the units moved so far (the failing wave included); the "
                      "units after it are never touched";
  else
    plan.on_failure =
        target + " is marked bad; " + plan.from + " comes back: switched back, its units restarted";
  const artifact::Manifest& last = path.empty() ? *m : *old_last;
  if (st.finalized_data_format && last.data_format.writes > *st.finalized_data_format)
    plan.pre_finalized_format = last.data_format.writes;
  return plan;
}

std::string InstallSpace::verdict() const {
  const std::uint64_t room = free_bytes > reserve_bytes ? free_bytes - reserve_bytes : 0;
  if (payload_bytes > room) return "insufficient";
  return estimate_bytes > room ? "tight" : "enough";
}

std::optional<Error> install_refusal(const store::AppState& st, const artifact::Manifest& m,
                                     const InstallSpace& space) {
  const std::string& version = m.version;
  // As the daemon's Install refuses it, before anything is extracted.
  if (auto same = st.installed_as(version))
    return Error(ErrorCode::kExists,
                 m.app + " " + version + " is already installed" +
                     (*same == version ? "" : " (as " + *same + ", an equal version)"));
  if (st.floor && policy::compare_versions(version, *st.floor) < 0)
    return Error(ErrorCode::kPolicyRefused, m.app + " " + version +
                                                " is older than the version floor " + *st.floor +
                                                " (downgrade protection)");
  if (space.verdict() == "insufficient")
    return Error(ErrorCode::kNoSpace, "not enough free space for " + m.app + " " + version +
                                          ": its payload alone is " +
                                          std::to_string(space.payload_bytes) + " bytes, " +
                                          std::to_string(space.free_bytes) + " are free and " +
                                          std::to_string(space.reserve_bytes) + " must stay free");
  return std::nullopt;
}

Result<Plan> plan_install(store::AppState st, const artifact::Manifest& m,
                          const InstallSpace& space, PlanContext ctx) {
  const std::string& version = m.version;
  const std::optional<Error> refusal = install_refusal(st, m, space);
  Result<Plan> plan = Plan{};
  if (refusal) {
    plan->app = st.app;
    plan->from = st.current.value_or("");
    plan->to = version;
    plan->strategy = std::string(artifact::to_string(m.strategy));
    plan->refusal = refusal;
  } else {
    store::ReleaseRecord staged;
    staged.data_format = m.data_format;
    st.releases[version] = staged;
    auto installed = std::move(ctx.manifest);
    ctx.manifest = [&m, installed](const std::string& v) -> Result<artifact::Manifest> {
      if (v == m.version) return m;
      return installed(v);
    };
    plan = plan_activation(st, version, false, ctx);
    if (!plan) return plan;
    if (!plan->refusal) {
      PlanStep s = step("stage", version, version);
      plan->steps.insert(plan->steps.begin(), std::move(s));
    }
  }
  plan->op = "install";
  plan->install = space;
  return plan;
}

namespace {
json plan_document(const Plan& plan);
}  // namespace

std::string plan_to_json(const Plan& plan) {
  // Messages may carry text from hooks (a backup's name): never throw on invalid UTF-8.
  return plan_document(plan).dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string set_plan_to_json(const std::vector<Plan>& plans, bool staged_first) {
  json members = json::array();
  json refusal;
  bool changes = false, complete = !plans.empty();
  std::uint64_t total = 0;
  for (const auto& p : plans) {
    members.push_back(plan_document(p));
    if (p.refusal && refusal.is_null())
      refusal = {{"error", refusal_name(p.refusal->code())},
                 {"message", p.app + " " + p.to + ": " + p.refusal->message() +
                                 "; nothing in the set would change"}};
    // As activate_set refuses it: its checks wait for that recovery.
    if (!p.recover_first.empty() && refusal.is_null())
      refusal = {{"error", "Busy"},
                 {"message", p.app + ": an interrupted activation of " + p.recover_first +
                                 " is pending (the daemon finishes it at start); nothing in "
                                 "the set would change"}};
    const bool member_changes = !p.refusal && !p.already_current;
    changes = changes || member_changes;
    if (!member_changes) continue;
    complete = complete && p.predicted_total_usec.has_value() && p.recover_first.empty();
    total += p.predicted_total_usec.value_or(0);
  }
  std::string on_failure =
      "the app that fails is rolled back by its own activation; then the apps before it that "
      "moved are rolled back, last first";
  if (staged_first)
    on_failure =
        "an artifact that cannot be staged takes back the ones staged before it, and "
        "nothing running was touched; once all are staged, " +
        on_failure;
  json doc = {{"format", 1},
              {"op", staged_first ? "install-set" : "activate-set"},
              {"members", members},
              {"changes", changes && refusal.is_null()},
              {"refusal", refusal},
              {"predicted_total_usec", complete && changes ? json(total) : json()},
              {"on_failure", on_failure}};
  return doc.dump(-1, ' ', false, json::error_handler_t::replace);
}

namespace {
json plan_document(const Plan& plan) {
  json steps = json::array();
  for (const auto& s : plan.steps)
    steps.push_back({{"kind", s.kind},
                     {"target", s.target},
                     {"release", s.release},
                     {"unit", s.unit},
                     {"timeout_s", s.timeout_s},
                     {"min_ready_s", s.min_ready_s},
                     {"units_down", s.units_down},
                     {"reversible", s.reversible},
                     {"note", s.note}});
  json downtime = json::array();
  for (const auto& d : plan.downtime)
    downtime.push_back({{"unit", d.unit},
                        {"samples", d.samples},
                        {"median_usec", d.samples ? json(d.median_usec) : json()},
                        {"p95_usec", d.samples ? json(d.p95_usec) : json()},
                        {"held_by", d.held_by}});
  json doc = {{"format", 1},
              {"app", plan.app},
              {"op", plan.op},
              {"from", plan.from},
              {"to", plan.to},
              {"strategy", plan.strategy},
              {"path", plan.path},
              {"changes", !plan.refusal && !plan.already_current},
              {"refusal", plan.refusal ? json{{"error", refusal_name(plan.refusal->code())},
                                              {"message", plan.refusal->message()}}
                                       : json()},
              {"recover_first", plan.recover_first},
              {"steps", steps},
              {"downtime", downtime},
              {"predicted_total_usec",
               plan.predicted_total_usec ? json(*plan.predicted_total_usec) : json()},
              {"on_failure", plan.on_failure},
              {"pre_finalized_format",
               plan.pre_finalized_format ? json(*plan.pre_finalized_format) : json()}};
  if (plan.install)
    doc["install"] = {{"payload_bytes", plan.install->payload_bytes},
                      {"estimate_bytes", plan.install->estimate_bytes},
                      {"free_bytes", plan.install->free_bytes},
                      {"reserve_bytes", plan.install->reserve_bytes},
                      {"space", plan.install->verdict()}};
  return doc;
}
}  // namespace

}  // namespace upgraded::activation
