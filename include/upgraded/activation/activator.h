#pragma once

// Activation: makes a staged release the running one (strategy all-at-once) and proves it
// healthy, or puts the previous release back. Uses the store for the switch and a UnitControl
// for systemd; knows nothing of D-Bus.

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "upgraded/activation/plan.h"
#include "upgraded/store/store.h"
#include "upgraded/units/hook_runner.h"
#include "upgraded/units/unit_control.h"

namespace upgraded::activation {

/// What hooks need from the host: who runs them, as whom, what they may write.
struct HookContext {
  /// Null: hooks cannot run here (upgradectl --offline); releases that declare activation
  /// hooks are refused.
  units::HookRunner* runner = nullptr;
  std::uint32_t job_id = 0;                     ///< names the hook units, UPGRADED_JOB
  std::vector<std::string> data_dirs;           ///< the app's data: the only paths hooks may write
  std::string user, group;                      ///< whom hooks run as (empty: the manager's user)
  std::vector<std::string> hidden_paths;        ///< hidden from hooks (the daemon's configuration)
  std::vector<std::string> inaccessible_paths;  ///< bus and systemd sockets, out of their sight
  int cancel_fd = -1;                           ///< readable once the job is canceled
  /// Each hook's STATUS= texts, for the job's Step.
  std::function<void(const std::string& phase, const std::string& status)> on_status;
};

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
  /// activate(): when `version` cannot be activated from the current release (upgrade_from),
  /// walk the chain of installed releases that leads there (find_upgrade_path), each step a
  /// full gated activation, stopping at the first failure.
  bool through_path = false;
  /// Template units ("tablet@.service"): their instances, from host policy ([apps.<app>]
  /// instances: "1", "2"...). Empty: the instances running now (UnitControl::running_instances).
  std::vector<std::string> instances;
  /// Strategy rolling: how many instances of one template are restarted and gated together.
  std::uint32_t max_unavailable = 1;
  /// The set (multi-app activation, set.h) this is part of: its history entries name it.
  std::string transaction;
  HookContext hooks;
};

struct ActivationReport {
  std::string from;  ///< the release that was current before (empty: none)
  std::string to;    ///< the release asked for
  bool rolled_back = false;
  /// Per unit: from leaving "active" to being active again (systemd's monotonic timestamps).
  std::map<std::string, std::uint64_t> downtime_usec;
  /// Per hook run: from the start call to its process running (systemd's timestamp).
  std::map<std::string, std::uint64_t> hook_start_usec;
  /// CLOCK_MONOTONIC µs `current` was switched in this process (0: not here, e.g. before a
  /// crash): one by one, a unit not reached that became active after it was started by
  /// systemd on the new release, and a rollback restores it too.
  std::uint64_t switched_usec = 0;
  /// The steps it took, in order, as PlanStep::key() names them (plan.h): "hook:pre_upgrade",
  /// "switch:2.0.0", "restart:a.service", "gate:a.service", "mark-good:2.0.0"... The automatic
  /// rollback's steps are not in it.
  std::vector<std::string> steps;
};

struct FinalizeOptions {
  /// Finalize a release that declares no backup hook (refused otherwise).
  bool no_backup = false;
  /// As ActivationOptions::commit: called after the backup, before the finalize hook.
  std::function<bool()> commit;
  HookContext hooks;
};

struct FinalizeReport {
  std::string version;       ///< the current release, whose data format was finalized
  std::uint64_t format = 0;  ///< the data format finalized
  std::string backup;        ///< the backup's name (empty: no backup)
};

/// Progress steps, for job objects: "checking", "switching", "restarting <unit> (k/n)",
/// "health gate" (in waves: "health gate: <unit>[, <unit>...] (k/n)", "health hook: <unit>"),
/// the hooks, "rolling back".
using ProgressFn = std::function<void(const std::string& step, int percent)>;

/// What a check may let through, and whether it is a rollback.
struct ActivationChecks {
  bool allow_bad = false;
  bool is_rollback = false;
  bool allow_below_floor = false;
  /// Hooks can run (the daemon): otherwise releases declaring activation hooks are refused.
  bool hooks_runnable = true;
};

/// The hooks that take part in an activation (pre_upgrade, migrate, health, post_upgrade).
bool has_activation_hooks(const artifact::Manifest& m);

/// The policy checks of activating the release `m` describes, with the app's state `st`: it is
/// installed, not marked bad (unless `allow_bad`), not below the version floor (unless
/// `allow_below_floor`), its hooks can run, its upgrade_from admits the current release (for
/// an upgrade: activating an older release, as a rollback does, is bounded by the data formats),
/// and it can read and write the finalized data format (reads_min <= finalized <= writes).
/// kPolicyRefused (kNotFound for a missing release), with the reason in words. Activating the
/// current release passes once it is not bad.
Result<void> check_activation(const store::AppState& st, const artifact::Manifest& m,
                              const ActivationChecks& checks);

/// Whether `m`'s units are gated in waves, each unit's health hook run in its wave (strategies
/// one-by-one and rolling, with units); otherwise all of them together.
bool gated_per_unit(const artifact::Manifest& m);

/// The most units one activation handles once templates are expanded.
inline constexpr std::size_t kMaxExpandedUnits = 256;

/// Whether `unit` is a socket unit ("web.socket", "web@1.socket"). A release's socket units
/// are held (docs/hooks.md, "Socket units"): never stopped or restarted while the services
/// behind them restart, so that their listening sockets queue connections; started when they
/// are not listening (the release's services behind them stopped first: that refuses
/// connections); stopped for a migrate, first. They come first in a release's units
/// (sockets_first), and in waves they go with the unit after them, without a health hook.
bool is_socket_unit(std::string_view unit);

/// The services behind `socket` that must stop before it starts, if it is not listening
/// (systemd refuses to start a socket while a service behind it runs): those it triggers that
/// `units` lists at `from` or later (each starts in its own step after the socket). Which of
/// them run is for the caller to ask (`stops_for_socket`).
std::vector<std::string> behind_socket(const units::UnitStatus& socket,
                                       const std::vector<std::string>& units, std::size_t from);

/// Whether a service in this state must be stopped before a socket in front of it starts:
/// it runs (neither inactive nor failed).
bool stops_for_socket(const units::UnitStatus& service);

/// `m` with its socket units first, each group in its order.
artifact::Manifest sockets_first(artifact::Manifest m);

/// The order in which `units` stop (a migrate): the socket units first, so that no connection
/// starts a service again behind them, then the others; each group in reverse order.
std::vector<std::string> stop_order(const std::vector<std::string>& units);

/// Whether `unit` is a template unit ("tablet@.service").
bool is_template_unit(std::string_view unit);

/// Whether `unit` is an instance of the template `templ` ("tablet@2.service" of
/// "tablet@.service").
bool is_instance_of(std::string_view unit, std::string_view templ);

/// `m` with each template in its units replaced by instances of it, in place: those of
/// `instances` (host policy: "1", "2"...) in their order, or if there are none, the units that
/// `running(template)` names (instances of it, in strverscmp order); then the instances of it
/// in `known` not listed yet (those an interrupted or failed activation covered, which a
/// rollback restores whatever the policy or systemd says now). A unit is listed once.
/// kPolicyRefused, nothing changed, when an instance name is not a valid unit, when more than
/// kMaxExpandedUnits result, or (`require`) when a template has no instance.
Result<artifact::Manifest> expand_templates(
    artifact::Manifest m, const std::vector<std::string>& instances,
    const std::function<Result<std::vector<std::string>>(const std::string&)>& running,
    bool require = true, const std::vector<std::string>& known = {});

/// Whether the journaled `units` of an activation fit the release `m` (unexpanded): each is
/// one of its units or an instance of one of its templates, none twice, at most
/// kMaxExpandedUnits.
bool units_fit(const std::vector<std::string>& units, const artifact::Manifest& m);

/// The waves in which the units of `m` (expanded) are restarted and gated, as the index one past
/// each wave's last unit: all-at-once one wave; one-by-one one unit each; rolling one unit
/// each, except consecutive instances of one template, `max_unavailable` at a time. In waves,
/// socket units go with the unit after them.
std::vector<std::size_t> waves(const artifact::Manifest& m, std::uint32_t max_unavailable);

/// How many of `m`'s units the interrupted activation `p` had touched, one by one; nothing when
/// the record has no count, or one that does not fit `m` (not one-by-one, more than its
/// units): then every unit counts as touched.
std::optional<std::size_t> units_touched(const store::PendingActivation& p,
                                         const artifact::Manifest& m);

/// Whether check_activation refused because the release's upgrade_from does not admit the
/// current one.
bool is_upgrade_path_refusal(const Error& refusal);
/// That refusal, naming the chain of installed releases that leads there (find_upgrade_path:
/// `path`, empty when there is none) or saying there is none.
Error with_upgrade_path(const Error& refusal, const std::vector<std::string>& path);

/// The shortest chain of installed releases, not marked bad, each newer than the one before,
/// from the current release to `target` (both included), every step passing check_activation
/// from the step before (upgrade_from and data formats; nothing is finalized on the way).
/// `manifests` holds the manifests of the installed releases. Empty when there is none (or no
/// current release).
std::vector<std::string> find_upgrade_path(
    const store::AppState& st, const std::map<std::string, artifact::Manifest>& manifests,
    const std::string& target);

/// find_upgrade_path over the installed releases whose manifests `manifest` reads; a release
/// whose manifest cannot be read is no step of a path.
std::vector<std::string> find_installed_upgrade_path(
    const store::AppState& st,
    const std::function<Result<artifact::Manifest>(const std::string&)>& manifest,
    const std::string& target);

/// The checks of finalizing the app's current release (`m` its manifest): it is marked good,
/// its data format is newer than the finalized one, and it declares a backup hook unless
/// `no_backup`. kPolicyRefused with the reason.
Result<void> check_finalize(const store::AppState& st, const artifact::Manifest& m, bool no_backup);

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
  /// is appended to the history. A release with hooks runs them around this (docs/hooks.md):
  /// pre_upgrade before anything changes; with a migrate hook the units are stopped, `current`
  /// switched, migrate run and the units started (instead of restarted); the health hook ends
  /// the gate; post_upgrade follows it.
  Result<ActivationReport> activate(const store::AppLock& lock, const std::string& version,
                                    const ActivationOptions& options = {},
                                    const ProgressFn& progress = {});

  /// The plan of activate(`version`), or of rollback() when `is_rollback` (`version` unused),
  /// from the app's state, manifests, history and activation record (plan.h). Reads only: no
  /// lock, nothing changed.
  Result<Plan> plan(const std::string& app, const std::string& version, bool is_rollback,
                    const ActivationOptions& options = {}) const;
  /// The plan of installing the verified artifact whose manifest is `m` and activating it
  /// (activation::plan_install), with the app's state, history and policy.
  Result<Plan> plan_install(const artifact::Manifest& m, const InstallSpace& space,
                            const ActivationOptions& options) const;

  /// Activates the rollback target (state.previous) without re-extraction. The same health
  /// gate applies; a failing rollback is reported, not bounced back again.
  Result<ActivationReport> rollback(const store::AppLock& lock,
                                    const ActivationOptions& options = {},
                                    const ProgressFn& progress = {});

  /// Finalizes the current release's data format: the backup hook (its last stdout line names
  /// the backup), then commit, the finalize hook, and the format recorded (the commit point;
  /// releases that cannot read it can no longer be activated). Failures leave the app
  /// pre-finalized.
  Result<FinalizeReport> finalize(const store::AppLock& lock, const FinalizeOptions& options,
                                  const ProgressFn& progress = {});

  /// Finishes an activation that a crash interrupted (Store::pending_activation): restarts the
  /// units of the release `current` names, so the running processes match it, and runs the
  /// health gate. If that fails on the release being activated, the release it replaced is
  /// switched back and restarted, as activate() would have done. Nothing pending: no-op
  /// (report.to empty).
  Result<ActivationReport> resume(const store::AppLock& lock, const ActivationOptions& options = {},
                                  const ProgressFn& progress = {});

 private:
  /// What planning needs to know about `app` (a new one: not `installed`) besides its state.
  Result<PlanContext> plan_context(const std::string& app, const ActivationOptions& options,
                                   bool installed) const;
  /// The release an interrupted activation was finishing (empty: none was pending).
  Result<std::string> finish_pending(const store::AppLock& lock, const ActivationOptions& options,
                                     const ProgressFn& progress);
  /// find_upgrade_path over the store's releases.
  std::vector<std::string> upgrade_path(const std::string& app, const std::string& target) const;
  /// `m` with its templates expanded (expand_templates): the policy's instances, or those
  /// running now (`with_failed`: failed ones too, for a rollback or a release being left),
  /// plus the instances in `known` (journaled ones, restored even when they no longer run).
  Result<artifact::Manifest> expanded(const artifact::Manifest& m, const ActivationOptions& options,
                                      bool require, const std::vector<std::string>& known = {},
                                      bool with_failed = false) const;
  /// The units an activation of `to` covers: from its record when they fit its manifest
  /// (the instances it journaled), else expanded now (leniently: recovery restarts what runs).
  Result<artifact::Manifest> journaled_or_expanded(const artifact::Manifest& m,
                                                   const store::PendingActivation* p,
                                                   const ActivationOptions& options) const;
  Result<ActivationReport> run(const store::AppLock& lock, const std::string& version,
                               bool is_rollback, const ActivationOptions& options,
                               const ProgressFn& progress);
  Result<ActivationReport> run_hooked(const store::AppLock& lock, const store::AppState& st,
                                      const artifact::Manifest& m,
                                      const std::optional<artifact::Manifest>& old_manifest,
                                      ActivationReport report, bool is_rollback,
                                      const ActivationOptions& options, const ProgressFn& progress);
  /// After the units of `m` are active: the health hook (unless one by one: it ran in each
  /// unit's gate), then post_upgrade (journaled), then the release marked good.
  Result<void> finish_hooked(const store::AppLock& lock, const artifact::Manifest& m,
                             const std::string& from, const std::string& previous,
                             ActivationReport& report, const ActivationOptions& options,
                             const ProgressFn& progress);
  Result<ActivationReport> fail_after_switch(const store::AppLock& lock, ActivationReport report,
                                             const std::string& previous, store::HistoryEntry h,
                                             const Error& failure, bool is_rollback,
                                             const ActivationOptions& options,
                                             const ProgressFn& progress);
  Result<ActivationReport> roll_back_after(const store::AppLock& lock, ActivationReport report,
                                           const std::string& previous, store::HistoryEntry h,
                                           const Error& failure, const ActivationOptions& options,
                                           const ProgressFn& progress, bool mark_bad = true);
  /// How restart_and_gate brings up a release's units.
  struct Gate {
    bool soak = true;         ///< wait min_ready_s and check again (not when rolling back)
    bool start_only = false;  ///< start (the units were stopped for a migrate), not restart
    std::size_t first = 0;    ///< units before this index are on the release already (resume)
    /// One-by-one: called before the unit at index n-1 is touched, with n (journals it).
    std::function<Result<void>(std::uint32_t touched)> before_unit;
    /// One-by-one: the rest of a unit's gate once it has soaked (the health hook).
    std::function<Result<void>(const std::string& unit, std::size_t index)> after_unit;
    /// Where the steps taken are traced (ActivationReport::steps); null: nowhere.
    std::vector<std::string>* trace = nullptr;
  };
  /// The units of `m` in order, per its strategy: all-at-once restarts them all, then gates
  /// them together; one-by-one restarts one, gates it (active, min_ready_s without a restart,
  /// after_unit), and only then touches the next. deadline_s bounds each gate.
  Result<void> restart_and_gate(const artifact::Manifest& m, const ActivationOptions& options,
                                const ProgressFn& progress,
                                std::map<std::string, std::uint64_t>& downtime, const Gate& gate);
  /// One by one, the health hook ends each unit's gate (UPGRADED_UNIT names it).
  Gate hooked_gate(const store::AppLock& lock, const artifact::Manifest& m, const std::string& from,
                   ActivationReport& report, const ActivationOptions& options,
                   const ProgressFn& progress, Gate gate);
  /// A gate whose before_unit journals, into `pending`'s record, how far a one-by-one got.
  Gate journaled_gate(const store::AppLock& lock, const store::PendingActivation& pending) const;
  /// The units an interrupted or failed activation of `failed` touched (from the journal):
  /// all of them unless it went one by one.
  std::vector<std::string> touched_units(const store::AppLock& lock,
                                         const artifact::Manifest& failed) const;
  /// Runs one of `m`'s hooks (if declared: otherwise passes) with FROM/TO as given. An error
  /// says which hook failed and how, with its last lines of output; kCanceled if canceled.
  Result<units::HookOutcome> run_hook(const store::AppLock& lock, const artifact::Manifest& m,
                                      const std::string& phase, const std::string& from,
                                      const std::string& to, const HookContext& ctx,
                                      ActivationReport* report,
                                      std::function<Result<void>()> before_release = {},
                                      std::chrono::seconds hold_budget = {},
                                      const std::string& unit = {}, std::size_t unit_index = 0);

  const store::Store& m_store;
  units::UnitControl& m_units;
};

}  // namespace upgraded::activation
