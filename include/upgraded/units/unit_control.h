#pragma once

// Control of the systemd units an app runs as. The engine and the job logic see only this
// interface; the daemon implements it over org.freedesktop.systemd1 (daemon/systemd/), and
// tests may implement it to inject faults. It is not a substitute for the real thing: the
// integration tests run the real implementation against a real systemd.

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "upgraded/result.h"

namespace upgraded::units {

/// What systemd reports about a unit (org.freedesktop.systemd1.Unit and .Service properties).
struct UnitStatus {
  std::string load_state;    ///< "loaded", "not-found", ...
  std::string active_state;  ///< "active", "inactive", "failed", "activating", ...
  std::string sub_state;     ///< "running", "exited", "dead", ...
  std::string result;        ///< Service.Result: "success", "exit-code", "signal", ...
  std::uint32_t n_restarts = 0;
  std::uint32_t main_pid = 0;
  std::int32_t exec_main_code = 0;    ///< CLD_EXITED, CLD_KILLED, ...
  std::int32_t exec_main_status = 0;  ///< exit status or signal number
  /// CLOCK_MONOTONIC microseconds the main process started and ended (0: never).
  std::uint64_t exec_main_start_usec = 0;
  std::uint64_t exec_main_exit_usec = 0;
  std::string status_text;  ///< the last STATUS= it sent through sd_notify
  /// CLOCK_MONOTONIC microseconds of the last state changes (0: never).
  std::uint64_t active_enter_usec = 0;
  std::uint64_t active_exit_usec = 0;
  std::uint64_t inactive_enter_usec = 0;
  std::uint64_t inactive_exit_usec = 0;
  /// Its unit file or drop-ins changed on disk since systemd loaded them (NeedDaemonReload).
  bool need_daemon_reload = false;
  /// The units it triggers (Triggers): a socket unit's services.
  std::vector<std::string> triggers;
  /// A service's FileDescriptorStoreMax and NFileDescriptorStore: the descriptors systemd keeps
  /// for it across a restart (a stop empties the store).
  std::uint32_t fd_store_max = 0;
  std::uint32_t fd_store = 0;
};

class UnitControl {
 public:
  virtual ~UnitControl() = default;

  /// Start, stop or restart `unit` ("replace" mode) and wait until systemd's job for it has
  /// finished (its JobRemoved signal), at most `timeout`. A job result other than "done" is an
  /// error naming the result and the unit's state ("hello.service: start failed (exit-code,
  /// status 3)").
  virtual Result<void> start(const std::string& unit, std::chrono::milliseconds timeout) = 0;
  virtual Result<void> stop(const std::string& unit, std::chrono::milliseconds timeout) = 0;
  virtual Result<void> restart(const std::string& unit, std::chrono::milliseconds timeout) = 0;

  /// The unit's current status (loading it if systemd has not yet). systemd unloads an
  /// inactive unit nobody references, which resets its timestamps: read them while the unit is
  /// active (e.g. right after a start or restart) to measure a downtime window.
  virtual Result<UnitStatus> status(const std::string& unit) = 0;

  /// systemctl reset-failed: clears the failed state and the start-rate counter, so that a
  /// deliberate restart (an upgrade, a rollback) is not refused with "start-limit-hit".
  virtual Result<void> reset_failed(const std::string& unit) = 0;

  /// The running instances of the template `template_unit` ("tablet@.service"): the loaded
  /// units "tablet@<instance>.service" that are active, activating or reloading (`with_failed`:
  /// or failed), in no particular order.
  virtual Result<std::vector<std::string>> running_instances(const std::string& template_unit,
                                                             bool with_failed) = 0;

  /// systemctl daemon-reload: re-read unit files.
  virtual Result<void> reload() = 0;
};

}  // namespace upgraded::units
