#pragma once

// The procedure of an activation, as data (docs/plan.md): every step the activator would take,
// in order, with the hooks' timeouts, the units each step takes down, the gates, the refusal it
// would hit, and the downtime to expect from the app's history. What `upgradectl plan` prints
// and the daemon's Plan returns; it changes nothing. The activator traces the steps it runs
// under the same keys (ActivationReport::steps), so that a plan can be held against what an
// execution then did.

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "upgraded/artifact/manifest.h"
#include "upgraded/result.h"
#include "upgraded/store/state.h"
#include "upgraded/store/store.h"
#include "upgraded/units/unit_control.h"

namespace upgraded::activation {

struct PlanStep {
  /// "stage" (installs), "recover" (an interrupted activation finished first), "hook",
  /// "stop", "switch", "restart", "start", "hold" (a socket unit kept listening), "gate",
  /// "mark-good".
  std::string kind;
  /// The unit (stop, restart, start; gate in waves), the hook's phase, the release switched
  /// to or marked good; empty for the gate of all the units at once.
  std::string target;
  /// The release this step belongs to (a walk through an upgrade path has several).
  std::string release;
  /// Health hook in waves (one-by-one, rolling): the unit whose gate it ends.
  std::string unit;
  /// Hooks: their timeout. stop/restart/start: systemd's job timeout. gate: deadline_s.
  std::uint32_t timeout_s = 0;
  /// gate: how long the units must stay active.
  std::uint32_t min_ready_s = 0;
  /// The units that are not running while this step runs.
  std::vector<std::string> units_down;
  /// Activation steps are all undone by the automatic rollback; finalize (never part of an
  /// activation's plan) is the irreversible one.
  bool reversible = true;
  /// What to know about the step in words (a held socket; a socket restarted because its unit
  /// file changed on disk).
  std::string note;

  /// "kind:target" (plus ":unit"): the key ActivationReport::steps uses.
  std::string key() const;
};

/// A unit's expected downtime, from its measured windows in the app's history.
struct DowntimePrediction {
  std::string unit;
  std::size_t samples = 0;  ///< 0: no history (no prediction)
  std::uint64_t median_usec = 0;
  std::uint64_t p95_usec = 0;
  /// The held socket units in front of it (a service): connections queue while it restarts,
  /// none is refused.
  std::vector<std::string> held_by;
};

/// Installing an artifact before activating it (Activator::plan_install): the disk space its
/// staging needs. The unpacked size is known only once the payload is read; the signed manifest
/// gives the compressed payload's size, and the current release's tree is a second estimate.
struct InstallSpace {
  std::uint64_t payload_bytes = 0;   ///< the compressed payload (the signed manifest's)
  std::uint64_t estimate_bytes = 0;  ///< the larger of the payload and the current release's tree
  std::uint64_t free_bytes = 0;  ///< on the store's filesystem, what earlier members need deducted
  std::uint64_t reserve_bytes = 0;  ///< what extraction leaves free (extract.free_space_reserve)
  /// "enough" (the estimate fits), "tight" (the payload fits, the estimate does not) or
  /// "insufficient" (not even the payload fits: refused, NoSpace).
  std::string verdict() const;
};

struct Plan {
  std::string app;
  std::string op;  ///< "activate" or "rollback"
  std::string from;
  std::string to;
  std::string strategy;           ///< the target's: all-at-once, one-by-one, rolling
  std::vector<std::string> path;  ///< through: the releases walked, from first (current) to last
  /// The refusal activating would hit (nothing would change); steps are then empty.
  std::optional<Error> refusal;
  bool already_current = false;  ///< nothing to do: the release is current
  /// An interrupted activation of this release is finished first; how it ends decides what
  /// follows, so the plan is then that one "recover" step (plan again once it is done).
  std::string recover_first;
  std::vector<PlanStep> steps;
  /// Per unit the plan restarts, stops or starts, in the target's order.
  std::vector<DowntimePrediction> downtime;
  /// Per activation (a walk has several), the sum of its units' medians (restarted one after
  /// another), or with a migrate the longest (stopped together); summed over the walk. Set
  /// only when every unit has history.
  std::optional<std::uint64_t> predicted_total_usec;
  /// What the automatic rollback would do if a step failed.
  std::string on_failure;
  /// After it the app is pre-finalized at this data format (finalize, the irreversible step,
  /// is a separate operation).
  std::optional<std::uint64_t> pre_finalized_format;
  /// The plan of installing an artifact (op "install"): its staging is the first step.
  std::optional<InstallSpace> install;

  /// Its steps' keys, in order: what ActivationReport::steps holds once it has run.
  std::vector<std::string> keys() const;
};

/// What planning needs to know beyond the app's state.
struct PlanContext {
  /// The manifest of an installed release.
  std::function<Result<artifact::Manifest>(const std::string& version)> manifest;
  std::vector<store::HistoryEntry> history;  ///< oldest first
  std::optional<store::PendingActivation> pending;
  bool allow_bad = false;
  bool allow_below_floor = false;
  bool through_path = false;
  bool hooks_runnable = true;
  std::uint32_t job_timeout_s = 90;
  /// Expands a manifest's templates into their instances (Activator::expanded; `require`:
  /// refused, kPolicyRefused, when a template has none). Null: units taken as listed.
  std::function<Result<artifact::Manifest>(const artifact::Manifest&, bool require)> expand;
  /// Strategy rolling: instances of one template restarted and gated together (waves()).
  std::uint32_t max_unavailable = 1;
  /// What systemd says about a unit (a socket: whether its unit file changed on disk, the
  /// services it triggers). Null: sockets are taken as held, with no services known.
  std::function<Result<units::UnitStatus>(const std::string& unit)> unit_status;
};

/// The plan of activating `version` of the app (`version` empty with `is_rollback`: the
/// rollback target). Errors only for what cannot be read (a manifest, kNotFound for an app
/// without state); a refusal is part of the plan.
Result<Plan> plan_activation(const store::AppState& st, const std::string& version,
                             bool is_rollback, const PlanContext& ctx);

/// Why installing `m` (a verified artifact's manifest) would be refused before anything is
/// extracted: that release is already installed (kExists), it is below the version floor
/// (kPolicyRefused), or not even its payload fits in the free space (kNoSpace).
std::optional<Error> install_refusal(const store::AppState& st, const artifact::Manifest& m,
                                     const InstallSpace& space);

/// The plan of installing and activating `m` (a verified artifact's manifest; `st`: the app's
/// state, or a new app's empty one): a "stage" step, then the activation's steps as
/// plan_activation gives them with `m` as a staged release. Refused when that release is already
/// installed (kExists), below the version floor (kPolicyRefused), or when not even the payload
/// fits in the free space (kNoSpace).
Result<Plan> plan_install(store::AppState st, const artifact::Manifest& m,
                          const InstallSpace& space, PlanContext ctx);

/// Up to the last `window` windows of `unit` in `history` (newest last): median and p95
/// (nearest rank).
DowntimePrediction predict_downtime(const std::vector<store::HistoryEntry>& history,
                                    const std::string& unit, std::size_t window = 20);

/// The plan as JSON (docs/plan.md, format 1).
std::string plan_to_json(const Plan& plan);

/// The plan of a set (ActivateSet: `plans` are its members', in order) as JSON (docs/plan.md,
/// "Sets"): each member's plan document, the set's refusal (the first member's, naming the
/// app: nothing in the set would change), the total predicted downtime, what a failure does.
/// With `staged_first` (op "install-set"): every member is an install, all staged before the
/// first activation.
std::string set_plan_to_json(const std::vector<Plan>& plans, bool staged_first = false);

}  // namespace upgraded::activation
