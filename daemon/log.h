#pragma once

// Structured logging to the journal: MESSAGE plus UPGRADED_APP, UPGRADED_VERSION, UPGRADED_JOB
// and, for key events, a MESSAGE_ID (catalogued in docs/dbus-api.md), so that
// `journalctl MESSAGE_ID=...` or `journalctl UPGRADED_APP=hello` find them. Where the journal is
// not reachable, or stderr is not already the journal, lines also go to stderr.

#include <string>

namespace upgraded::daemon {

enum class Level { kError = 3, kWarning = 4, kNotice = 5, kInfo = 6, kDebug = 7 };

/// MESSAGE_IDs of key events.
namespace message_id {
inline constexpr const char* kStarted = "a4df541d27ff4d618a82f85c0f76ea2c";
inline constexpr const char* kJobStarted = "3a4c784a76bb409db397595cf85c1aef";
inline constexpr const char* kJobDone = "1f2fcc52544e4b45aabc7375fecd86e1";
inline constexpr const char* kJobFailed = "bc811cb679cc4d178788370f8d403479";
inline constexpr const char* kRolledBack = "05d57eb598f74f1fb0008931923c7fbc";
inline constexpr const char* kAccessDenied = "198b6ee283cd4635acd53c2564923998";
}  // namespace message_id

struct LogContext {
  std::string app;
  std::string version;
  std::string job;  ///< the job's id
  const char* message_id = nullptr;
};

void log(Level level, const LogContext& context, const std::string& message);
inline void log(Level level, const std::string& message) {
  log(level, LogContext{}, message);
}

}  // namespace upgraded::daemon
