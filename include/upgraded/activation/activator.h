#pragma once

// Activation: makes a staged release the running one (strategy all-at-once) and proves it
// healthy, or puts the previous release back. Uses the store for the switch and a UnitControl
// for systemd; knows nothing of D-Bus.

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <string>

#include "upgraded/store/store.h"
#include "upgraded/units/unit_control.h"

namespace upgraded::activation {

struct ActivationOptions {
  /// How long one systemd job (a unit's restart) may take.
  std::chrono::milliseconds job_timeout{90000};
  /// Activate a release that is marked bad (refused otherwise).
  bool allow_bad = false;
  /// Activate (or roll back to) a kept release below the app's version floor (refused
  /// otherwise: the floor keeps releases with known flaws from running again).
  bool allow_below_floor = false;
  /// Called once, after the checks and right before the first change (the switch of
  /// `current`): the point of no return. Returning false cancels the activation with nothing
  /// changed (kCanceled).
  std::function<bool()> commit;
  /// rollback(): the target the caller announced (empty: any). If finishing an interrupted
  /// activation first changed it, nothing is rolled back.
  std::string expected_target;
};

struct ActivationReport {
  std::string from;  ///< the release that was current before (empty: none)
  std::string to;    ///< the release asked for
  bool rolled_back = false;
  /// Per unit: from leaving "active" to being active again (systemd's monotonic timestamps).
  std::map<std::string, std::uint64_t> downtime_usec;
};

/// Progress steps, for job objects: "checking", "switching", "restarting <unit>",
/// "health gate", "rolling back".
using ProgressFn = std::function<void(const std::string& step, int percent)>;

/// What a check may let through, and whether it is a rollback.
struct ActivationChecks {
  bool allow_bad = false;
  bool is_rollback = false;
  bool allow_below_floor = false;
};

/// The policy checks of activating the release `m` describes, with the app's state `st`: it is
/// installed, not marked bad (unless `allow_bad`), not below the version floor (unless
/// `allow_below_floor`), declares no hooks, its upgrade_from admits the current release (not
/// for a rollback), and it writes a data format at least as new as the finalized one.
/// kPolicyRefused (kNotFound for a missing release). Activating the current release passes once
/// it is not bad.
Result<void> check_activation(const store::AppState& st, const artifact::Manifest& m,
                              const ActivationChecks& checks);

class Activator {
 public:
  Activator(const store::Store& store, units::UnitControl& units)
      : m_store(store), m_units(units) {}

  /// Policy checks (release present and not bad, upgrade path, data format), then: switch
  /// `current`, restart the release's units in order (one systemd job each: the old processes
  /// keep the files they opened), and the health gate: every unit active, still active and not
  /// restarted after the manifest's min_ready_s, all within deadline_s. On failure after the
  /// switch the previous release is switched back and its units restarted, the new release is
  /// marked bad, and the error says why ("health gate: hello.service is failed (exit-code,
  /// status 3) 0.4 s after it started"). On success the release is marked good. Every outcome
  /// is appended to the history. Releases that declare hooks are refused: this build does not
  /// run hooks yet.
  Result<ActivationReport> activate(const store::AppLock& lock, const std::string& version,
                                    const ActivationOptions& options = {},
                                    const ProgressFn& progress = {});

  /// Activates the rollback target (state.previous) without re-extraction. The same health
  /// gate applies; a failing rollback is reported, not bounced back again.
  Result<ActivationReport> rollback(const store::AppLock& lock,
                                    const ActivationOptions& options = {},
                                    const ProgressFn& progress = {});

  /// Finishes an activation that a crash interrupted (Store::pending_activation): restarts the
  /// units of the release `current` names, so the running processes match it, and runs the
  /// health gate. If that fails on the release being activated, the release it replaced is
  /// switched back and restarted, as activate() would have done. Nothing pending: no-op
  /// (report.to empty).
  Result<ActivationReport> resume(const store::AppLock& lock, const ActivationOptions& options = {},
                                  const ProgressFn& progress = {});

 private:
  Result<void> finish_pending(const store::AppLock& lock, const ActivationOptions& options,
                              const ProgressFn& progress);
  Result<ActivationReport> run(const store::AppLock& lock, const std::string& version,
                               bool is_rollback, const ActivationOptions& options,
                               const ProgressFn& progress);
  Result<ActivationReport> roll_back_after(const store::AppLock& lock, ActivationReport report,
                                           const std::string& previous, store::HistoryEntry h,
                                           const Error& failure, const ActivationOptions& options,
                                           const ProgressFn& progress);
  Result<void> restart_and_gate(const artifact::Manifest& m, const ActivationOptions& options,
                                const ProgressFn& progress,
                                std::map<std::string, std::uint64_t>& downtime, bool soak);

  const store::Store& m_store;
  units::UnitControl& m_units;
};

}  // namespace upgraded::activation
