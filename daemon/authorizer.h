#pragma once

// Who may change things: uid 0, or whoever polkit authorizes for the action. The uid is the bus
// daemon's record of the caller's connection (GetConnectionUnixUser on its unique name, taken
// from SO_PEERCRED when it connected): never a /proc lookup of a PID that may have been reused.
// polkit is asked with the caller's bus name as subject, asynchronously, so the loop never
// waits for an authentication dialog.

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

namespace sdbus {
class IConnection;
class IProxy;
}  // namespace sdbus

namespace upgraded::daemon {

struct Authorization {
  bool allowed = false;
  bool busy = false;  ///< refused unasked: the caller's uid has too many requests at polkit
  uid_t uid = static_cast<uid_t>(-1);
  std::string reason;  ///< why not, for the AccessDenied message
};

class Authorizer {
 public:
  /// `user_instance`: on a user bus the user the daemon runs as is authorized too (it is that
  /// user's own instance).
  /// At most `per_user` requests of one uid wait for polkit at a time; more are refused at
  /// once (busy), so that no caller can make the daemon hold unbounded calls (and the
  /// descriptors they carry) while an authentication dialog stays open.
  Authorizer(sdbus::IConnection& bus, bool user_instance, std::uint32_t per_user = 8);
  ~Authorizer();

  /// The caller's uid, from the bus daemon (-1 if it cannot tell), passed to `done` on the
  /// loop's thread. Asynchronous: a synchronous call on the loop's connection would make sd-bus
  /// read every message waiting on the socket while it waits for its reply, and hold the
  /// descriptors they carry (a thousand Install calls at once exhausted RLIMIT_NOFILE).
  void caller_uid(const std::string& sender, std::function<void(uid_t)> done);

  /// Decides whether `sender` may perform polkit action `action`; calls `done` exactly once,
  /// on the loop's thread.
  void check(const std::string& sender, const std::string& action,
             std::function<void(const Authorization&)> done);

 private:
  std::unique_ptr<sdbus::IProxy> m_bus_driver;
  std::unique_ptr<sdbus::IProxy> m_polkit;
  bool m_user_instance;
  void decide(const std::string& sender, const std::string& action, Authorization a,
              std::function<void(const Authorization&)> done);
  std::uint32_t m_per_user;
  std::map<uid_t, std::uint32_t> m_pending;  // uid -> requests at polkit (loop thread only)
};

}  // namespace upgraded::daemon
