#pragma once

// Running a release's hooks (pre_upgrade, migrate, health, post_upgrade, backup, finalize). The
// engine sees only this interface; the daemon runs each hook as a transient systemd service
// (daemon/systemd/, docs/hooks.md). Tests may implement it to inject faults; the integration
// tests run the real one against a real systemd.

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "upgraded/result.h"

namespace upgraded::units {

/// At most this much of a hook's output is kept for the job's error (the journal has it all).
inline constexpr std::size_t kHookTailLines = 20;
inline constexpr std::size_t kHookTailBytes = 4096;

struct HookRun {
  std::string unit;   ///< "upgraded-hook-<app>-<phase>-<job id>.service"
  std::string app;    ///< for the journal's SYSLOG_IDENTIFIER, upgraded-hook-<app>
  std::string phase;  ///< "migrate", ...
  std::string exec;   ///< absolute path of the hook program
  std::string working_directory;
  std::vector<std::pair<std::string, std::string>> environment;
  /// The only paths the hook may write (ProtectSystem=strict otherwise).
  std::vector<std::string> read_write_paths;
  std::string user;   ///< empty: the service manager's own user
  std::string group;  ///< empty: the user's group
  /// Hidden from the hook (an empty read-only tmpfs over each): the daemon's configuration and
  /// trust keys. One such mount also makes systemd refuse to run the hook without its mount
  /// namespace, instead of silently dropping the sandbox.
  std::vector<std::string> hidden_paths;
  /// Made inaccessible (when they exist): the bus sockets and systemd's private socket, through
  /// which a hook running as root would be root again for the daemon and for systemd.
  std::vector<std::string> inaccessible_paths;
  std::chrono::seconds timeout{60};
  /// Readable (an eventfd, poll()) once the hook must be stopped: the outcome is kCanceled.
  int cancel_fd = -1;
  /// If set, the hook's unit is started first, held before the hook's program runs (its
  /// sandbox and process set up), then this is called, and only once it succeeded is the hook
  /// released: so the start of the unit is not inside what `before_release` begins (the
  /// downtime window of a migrate). Its error is run()'s (the held unit is stopped, the hook
  /// never ran). The timeout counts from the release; holding may take `hold_budget` more.
  std::function<Result<void>()> before_release;
  std::chrono::seconds hold_budget{0};
};

struct HookOutcome {
  enum class How {
    kExited,    ///< exited; status is the exit status (0: passed)
    kKilled,    ///< killed by signal `status`
    kTimedOut,  ///< ran longer than its timeout and was stopped
    kCanceled,  ///< stopped because the job was canceled
    kFailed,    ///< systemd could not run it (result `resources`, ...; `detail` says)
  };
  How how = How::kFailed;
  int status = 0;
  std::string detail;             ///< systemd's Service.Result for kFailed
  std::uint64_t run_usec = 0;     ///< from the start call to the hook's end
  std::uint64_t start_usec = 0;   ///< from the start call to the hook's process running
  std::vector<std::string> tail;  ///< its last lines of output (stdout and stderr)
  std::string last_stdout_line;   ///< the last non-empty line it printed on stdout
  bool passed() const { return how == How::kExited && status == 0; }
  /// "exited with status 3 after 0.2 s", "was killed by signal 9 after 1.0 s", "timed out after
  /// 5 s", "was canceled", "could not run (resources)".
  std::string describe(std::chrono::seconds timeout) const;
};

/// A line of hook output made safe to show, log and send on the bus: invalid UTF-8 and control
/// characters (but tab) each become U+FFFD, and it is cut to `max_bytes` (on a character
/// boundary). D-Bus and JSON accept only valid UTF-8: a hook's bytes must never break the job's
/// error or the state file.
std::string printable_line(std::string_view bytes, std::size_t max_bytes = kHookTailBytes);

/// Called with each STATUS= text the hook sends through sd_notify.
using HookStatusFn = std::function<void(const std::string& status)>;

class HookRunner {
 public:
  virtual ~HookRunner() = default;
  /// Runs the hook and waits for it to end (at most its timeout, plus the time systemd takes to
  /// stop it). An error means it could not be started or waited for (the bus went away, the
  /// unit name is taken): its outcome is unknown. Anything it did is in the outcome.
  virtual Result<HookOutcome> run(const HookRun& hook, const HookStatusFn& on_status) = 0;
  /// Stops the hook units of `app` that are still loaded (left running by a daemon that died
  /// while a hook ran) and waits for them to end; every app's when `app` is empty. Returns
  /// their names.
  virtual Result<std::vector<std::string>> stop_leftovers(const std::string& app) = 0;
};

}  // namespace upgraded::units
