#include "upgraded/activation/set.h"

#include <time.h>

#include <random>

#include "upgraded/crash_point.h"

namespace upgraded::activation {
namespace {

ProgressFn member_progress(const ProgressFn& progress, const std::string& app, std::size_t k,
                           std::size_t n) {
  return [&progress, app, k, n](const std::string& step, int percent) {
    if (progress)
      progress(app + " (" + std::to_string(k + 1) + "/" + std::to_string(n) + "): " + step,
               static_cast<int>((100 * k + static_cast<std::size_t>(percent)) / n));
  };
}

// Whether the member's last history entry belongs to the set: only then did the set leave it
// where it is (an operator may have activated it again since a record was left behind).
bool moved_by(const store::Store& store, const std::string& app, const std::string& id) {
  auto h = store.history(app, 1);
  return h && !h->empty() && h->back().transaction == id;
}

// Rolls back, last first, the members before `end` that the set moved (`current` is still
// the release the set brought). Returns what it did, for the error: ", web back on 1.4.0, ...",
// naming the members it could not take back.
std::string undo(const store::Store& store, units::UnitControl& units, const store::PendingSet& set,
                 const std::vector<SetMember>& members, std::size_t end,
                 const ProgressFn& progress) {
  std::string done;
  for (std::size_t j = end; j-- > 0;) {
    const auto& m = set.members[j];
    auto st = store.state(m.app);
    if (!st) {
      done += ", " + m.app + " NOT rolled back (" + st.error().message() + ")";
      continue;
    }
    if (st->current != m.to || m.from == m.to || !moved_by(store, m.app, set.id)) continue;
    if (m.from.empty()) {
      done += ", " + m.app + " left on " + m.to + " (it had no earlier release)";
      continue;
    }
    crash_point("set.undoing");
    ActivationOptions o = members[j].options;
    o.expected_target = m.from;
    o.commit = nullptr;  // past the point of no return
    o.transaction = set.id;
    Activator act(store, units);
    auto r = act.rollback(*members[j].lock, o,
                          member_progress(progress, "undoing " + m.app, set.members.size() - 1 - j,
                                          set.members.size()));
    done += r ? ", " + m.app + " back on " + m.from
              : ", " + m.app + " NOT rolled back (" + r.error().message() + ")";
  }
  return done;
}

}  // namespace

std::string new_set_id() {
  std::random_device rd;
  return "set-" + std::to_string(static_cast<long long>(::time(nullptr))) + "-" +
         std::to_string(rd() % 1000000000u);
}

Result<SetReport> activate_set(const store::Store& store, units::UnitControl& units,
                               const std::vector<SetMember>& members, const ProgressFn& progress) {
  if (members.empty() || members.size() > kMaxSetMembers)
    return Error(ErrorCode::kInvalidArgument,
                 "a set has 1 to " + std::to_string(kMaxSetMembers) + " apps");
  store::PendingSet set;
  set.id = new_set_id();
  // Every member checked before anything changes.
  for (std::size_t k = 0; k < members.size(); ++k) {
    const std::string& app = members[k].lock->app();
    for (std::size_t j = 0; j < k; ++j)
      if (members[j].lock->app() == app)
        return Error(ErrorCode::kInvalidArgument, app + " is in the set twice");
    if (progress) progress("checking " + app, 0);
    Activator act(store, units);
    auto plan = act.plan(app, members[k].version, false, members[k].options);
    if (!plan) return plan.error().with_context(app);
    if (plan->refusal)
      return Error(plan->refusal->code(), app + " " + members[k].version + ": " +
                                              plan->refusal->message() +
                                              "; nothing in the set was changed");
    // Its checks wait for the end of that recovery, which may change where it starts from.
    if (!plan->recover_first.empty())
      return Error(ErrorCode::kBusy, app + ": an interrupted activation of " + plan->recover_first +
                                         " is pending (the daemon finishes it at start); "
                                         "nothing in the set was changed");
    set.members.push_back({app, plan->from, members[k].version});
  }
  SetReport report;
  report.id = set.id;
  UPGRADED_TRY(store.begin_set(set));
  for (std::size_t k = 0; k < members.size(); ++k) {
    const auto& m = set.members[k];
    crash_point("set.before_app");
    ActivationOptions o = members[k].options;
    o.transaction = set.id;
    Activator act(store, units);
    auto r = act.activate(*members[k].lock, m.to, o,
                          member_progress(progress, m.app, k, members.size()));
    // A failure, or a record that cannot say this member completed: the set is undone now
    // (never left for a later start to undo), member k included if it did not go back itself.
    Result<void> recorded = r ? Result<void>() : Result<void>(r.error());
    if (r) {
      report.reports.push_back(std::move(*r));
      set.completed = static_cast<std::uint32_t>(k + 1);
      recorded = store.begin_set(set);
      if (recorded) crash_point("set.after_app");
    }
    if (!recorded) {
      const Error& e = recorded.error();
      if (e.code() == ErrorCode::kCanceled && set.completed == 0 &&
          !moved_by(store, m.app, set.id)) {
        (void)store.end_set(set.id);
        return e;  // before the first change: nothing to undo
      }
      set.undoing = true;
      (void)store.begin_set(set);
      std::string undone = undo(store, units, set, members, k + 1, progress);
      auto ended = store.end_set(set.id);
      return Error(
          e.code(),
          m.app + " " + m.to + ": " + e.message() + "; set " + set.id + " undone" +
              (undone.empty() ? " (nothing else had moved)" : undone) +
              (ended ? "" : "; its record could not be removed: " + ended.error().message()));
    }
  }
  UPGRADED_TRY(store.end_set(set.id));
  if (progress) progress("done", 100);
  return report;
}

Result<void> recover_set(const store::Store& store, units::UnitControl& units,
                         const store::PendingSet& set, const std::vector<SetMember>& members,
                         const ProgressFn& progress) {
  if (members.size() != set.members.size())
    return Error(ErrorCode::kInvalidArgument, "the members do not match set " + set.id);
  // Each member's own interrupted activation first, so that its units match `current`.
  std::string failed;
  for (std::size_t k = 0; k < members.size(); ++k) {
    ActivationOptions o = members[k].options;
    o.commit = nullptr;
    o.transaction = set.id;
    Activator act(store, units);
    auto r = act.resume(*members[k].lock, o,
                        member_progress(progress, set.members[k].app, k, members.size()));
    if (!r) failed += "; " + set.members[k].app + ": " + r.error().message();
  }
  std::string undone;
  if (set.completed < set.members.size()) {
    store::PendingSet undoing = set;
    undoing.undoing = true;
    UPGRADED_TRY(store.begin_set(undoing));
    undone = undo(store, units, undoing, members, members.size(), progress);
  }
  UPGRADED_TRY(store.end_set(set.id));
  if (!failed.empty() || undone.find(" NOT rolled back ") != std::string::npos)
    return Error(ErrorCode::kFailed,
                 "set " + set.id + " interrupted" +
                     (set.completed < set.members.size() ? "; undone" + undone : "") + failed);
  return {};
}

}  // namespace upgraded::activation
