#pragma once

// Sets: several apps, each to a release, activated in the given order as one operation. Each
// member is a full gated activation of its own (its strategy, hooks and automatic rollback); a
// failure at member k, after k's own rollback, rolls back k-1, ..., 1 in reverse order, each
// with its rollback hooks. The set's progress is journaled in the store (PendingSet), so that a
// crash at any point is finished (every member had completed) or undone as a whole.

#include <string>
#include <vector>

#include "upgraded/activation/activator.h"
#include "upgraded/store/store.h"
#include "upgraded/units/unit_control.h"

namespace upgraded::activation {

struct SetMember {
  const store::AppLock* lock = nullptr;  ///< the app's lock, held for the whole set
  std::string version;                   ///< the release it goes to (recover_set: unused)
  ActivationOptions options;             ///< this app's: policy, hooks, the job's commit
};

struct SetReport {
  std::string id;  ///< the set's transaction id, in every member's history entries
  /// Per member, in order; `from` equal to `to`: it was current already, nothing was done.
  std::vector<ActivationReport> reports;
};

/// At most this many apps in one set.
inline constexpr std::size_t kMaxSetMembers = 64;

/// Checks every member before anything changes (the activation's own checks, templates
/// expanded: a refusal names the app and nothing is changed), journals the set, then activates
/// the members in order. A member that fails is rolled back by its own activation; then the
/// members before it that moved are rolled back, last first (Activator::rollback to the release
/// each left). The error names the member that failed, why, and what was undone:
/// "db 2.0.0: health gate: ...; rolled back to 1.0.0; set set-...: undone, web back on 1.4.0,
/// api back on 3.1.0". Apps must be distinct; the caller holds every lock.
Result<SetReport> activate_set(const store::Store& store, units::UnitControl& units,
                               const std::vector<SetMember>& members,
                               const ProgressFn& progress = {});

/// Finishes a set a crash interrupted (Store::pending_sets), `members` in the record's order
/// with their locks held (versions unused): each member's interrupted activation is finished
/// first (Activator::resume); then, unless every member had completed, the members that moved
/// are rolled back, last first. The record is removed. The error, if any, says what could not
/// be undone.
Result<void> recover_set(const store::Store& store, units::UnitControl& units,
                         const store::PendingSet& set, const std::vector<SetMember>& members,
                         const ProgressFn& progress = {});

/// A new set id: "set-<unix seconds>-<random>".
std::string new_set_id();

}  // namespace upgraded::activation
