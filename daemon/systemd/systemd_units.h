#pragma once

// UnitControl over org.freedesktop.systemd1 (PID 1 on the system bus, or the user manager on
// the user bus for `upgraded --user`).

#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include <sdbus-c++/TypeTraits.h>

#include "upgraded/fs/unique_fd.h"
#include "upgraded/units/hook_runner.h"
#include "upgraded/units/unit_control.h"

namespace sdbus {
class IConnection;
}

namespace upgraded::daemon {

enum class Bus { kSystem, kUser };

class SystemdUnits final : public units::UnitControl, public units::HookRunner {
 public:
  /// Connects to systemd on `bus` and subscribes to its job signals. Fails when the bus or
  /// systemd is not reachable.
  static Result<std::unique_ptr<SystemdUnits>> connect(Bus bus);
  ~SystemdUnits() override;

  Result<void> start(const std::string& unit, std::chrono::milliseconds timeout) override;
  Result<void> stop(const std::string& unit, std::chrono::milliseconds timeout) override;
  Result<void> restart(const std::string& unit, std::chrono::milliseconds timeout) override;
  Result<units::UnitStatus> status(const std::string& unit) override;
  Result<void> reset_failed(const std::string& unit) override;
  /// ListUnitsByPatterns: the loaded instances that are active, activating or reloading (or
  /// failed).
  Result<std::vector<std::string>> running_instances(const std::string& template_unit,
                                                     bool with_failed) override;
  Result<void> reload() override;

  /// A hook as a transient service (Type=oneshot) started with StartTransientUnit, its
  /// stdout/stderr read through pipes (forwarded to the journal line by line), its STATUS=
  /// texts polled from Service.StatusText. docs/hooks.md lists every property set.
  Result<units::HookOutcome> run(const units::HookRun& hook,
                                 const units::HookStatusFn& on_status) override;
  Result<std::vector<std::string>> stop_leftovers(const std::string& app) override;

 private:
  class ManagerProxy;
  explicit SystemdUnits(Bus bus);
  struct Waiting;  // begin_wait/end_wait for a scope
  /// Counts a wait for `unit`'s JobRemoved signals; undone by end_wait.
  void begin_wait(const std::string& unit);
  void end_wait(const std::string& unit);
  /// The JobRemoved result of `job`, if it came (claimed: removed from what is kept).
  std::optional<std::string> take_result(const std::string& job);
  Result<void> run_job(const char* verb, const std::string& unit,
                       std::chrono::milliseconds timeout);
  void on_job_removed(const std::string& sender, const std::string& job, const std::string& unit,
                      const std::string& result);
  void on_owner_changed(const std::string& owner);
  /// For a wait that saw no JobRemoved: "done" or "failed" when systemd no longer has `job`
  /// (from the unit's state), nothing while it still does or cannot tell.
  std::optional<std::string> job_ended_without_signal(const char* verb, const std::string& unit,
                                                      const std::string& job);

  /// The signal connection's loop, on m_signal_thread: dispatches JobRemoved and
  /// NameOwnerChanged, and the replies to the job threads' calls, until the destructor leaves
  /// it or the bus goes away (then the waits fall back to asking systemd, and fail at their
  /// deadline; the daemon itself learns of the loss on its own connection). Never lets an
  /// sdbus::Error escape a thread, which would abort the daemon.
  void process_signals();

  Bus m_bus;
  std::unique_ptr<sdbus::IConnection> m_signals;  // JobRemoved, NameOwnerChanged (and calls)
  std::thread m_signal_thread;
  std::unique_ptr<ManagerProxy> m_manager;      // on m_signals
  sdbus::Slot m_owner_match;                    // NameOwnerChanged of systemd's name
  std::unique_ptr<sdbus::IConnection> m_calls;  // plain synchronous calls (properties)
  std::mutex m_calls_mutex;

  std::mutex m_mutex;
  std::condition_variable m_cv;
  // A signal's sender is whoever sent it: JobRemoved counts only from the connection that owns
  // org.freedesktop.systemd1 now (tracked through the bus driver's NameOwnerChanged), never
  // from the well-known name alone, which sd-bus cannot check locally.
  std::string m_systemd_owner;  // unique name; empty: systemd is not on the bus
  bool m_owner_seen = false;    // NameOwnerChanged arrived (newer than GetNameOwner's answer)
  std::map<std::string, int> m_waiting;                               // unit -> callers waiting
  std::map<std::string, std::pair<std::string, std::string>> m_done;  // job -> (unit, result)
  std::deque<std::string> m_done_order;  // m_done's keys, oldest first (bounds what is kept)
  std::map<std::string, int> m_wake;     // unit -> eventfd of a hook wait in poll(), woken by
                                         // its JobRemoved
};

}  // namespace upgraded::daemon
