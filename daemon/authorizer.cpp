#include "authorizer.h"

#include <sdbus-c++/sdbus-c++.h>

#include <unistd.h>

#include "log.h"

namespace upgraded::daemon {
namespace {
constexpr const char* kDBus = "org.freedesktop.DBus";
constexpr const char* kPolkit = "org.freedesktop.PolicyKit1";
constexpr const char* kPolkitAuthority = "org.freedesktop.PolicyKit1.Authority";
constexpr std::uint32_t kAllowUserInteraction = 1;
}  // namespace

Authorizer::Authorizer(sdbus::IConnection& bus, bool user_instance, std::uint32_t per_user)
    : m_bus_driver(sdbus::createProxy(bus, kDBus, "/org/freedesktop/DBus")),
      m_polkit(sdbus::createProxy(bus, kPolkit, "/org/freedesktop/PolicyKit1/Authority")),
      m_user_instance(user_instance),
      m_per_user(per_user) {
  m_bus_driver->finishRegistration();
  m_polkit->finishRegistration();
}

Authorizer::~Authorizer() = default;

void Authorizer::caller_uid(const std::string& sender, std::function<void(uid_t)> done) {
  try {
    m_bus_driver->callMethodAsync("GetConnectionUnixUser")
        .onInterface(kDBus)
        .withArguments(sender)
        .uponReplyInvoke([sender, done](const sdbus::Error* error, std::uint32_t uid) {
          if (error) {
            log(Level::kWarning, "cannot tell the uid of " + sender + ": " + error->getMessage());
            done(static_cast<uid_t>(-1));
            return;
          }
          done(static_cast<uid_t>(uid));
        });
  } catch (const sdbus::Error& e) {
    log(Level::kWarning, "cannot tell the uid of " + sender + ": " + e.getMessage());
    done(static_cast<uid_t>(-1));
  }
}

void Authorizer::check(const std::string& sender, const std::string& action,
                       std::function<void(const Authorization&)> done) {
  caller_uid(sender, [this, sender, action, done = std::move(done)](uid_t uid) mutable {
    Authorization a;
    a.uid = uid;
    decide(sender, action, a, std::move(done));
  });
}

void Authorizer::decide(const std::string& sender, const std::string& action, Authorization a,
                        std::function<void(const Authorization&)> done) {
  if (a.uid == 0 || (m_user_instance && a.uid == ::getuid())) {
    a.allowed = true;
    done(a);
    return;
  }
  if (a.uid == static_cast<uid_t>(-1)) {
    a.reason = "the caller's uid is unknown";
    done(a);
    return;
  }
  if (m_pending[a.uid] >= m_per_user) {
    a.busy = true;
    a.reason = "uid " + std::to_string(a.uid) + " already has " + std::to_string(m_per_user) +
               " requests waiting for polkit";
    done(a);
    return;
  }
  using Subject = sdbus::Struct<std::string, std::map<std::string, sdbus::Variant>>;
  Subject subject{"system-bus-name", {{"name", sdbus::Variant(sender)}}};
  std::map<std::string, std::string> details;
  ++m_pending[a.uid];
  // Counted down whichever way the request ends (reply, error, or this call throwing).
  auto release = [this, uid = a.uid] {
    if (auto it = m_pending.find(uid); it != m_pending.end() && --it->second == 0)
      m_pending.erase(it);
  };
  auto shared_done = std::make_shared<std::function<void(const Authorization&)>>(
      [release, done = std::move(done)](const Authorization& verdict) {
        release();
        done(verdict);
      });
  try {
    m_polkit->callMethodAsync("CheckAuthorization")
        .onInterface(kPolkitAuthority)
        .withTimeout(std::chrono::minutes(5))
        .withArguments(subject, action, details, kAllowUserInteraction, std::string())
        .uponReplyInvoke([base = a, action, shared_done](
                             const sdbus::Error* error,
                             sdbus::Struct<bool, bool, std::map<std::string, std::string>> result) {
          Authorization verdict = base;
          if (error && (error->getName() == "org.freedesktop.DBus.Error.ServiceUnknown" ||
                        error->getName() == "org.freedesktop.DBus.Error.NameHasNoOwner")) {
            verdict.reason =
                "uid " + std::to_string(verdict.uid) + " is not root and polkit is not available";
          } else if (error) {
            verdict.reason = "polkit: " + error->getMessage();
          } else if (std::get<0>(result)) {
            verdict.allowed = true;
          } else {
            verdict.reason = std::string("polkit denied ") + action +
                             (std::get<1>(result) ? " (authentication was required)" : "");
          }
          (*shared_done)(verdict);
        });
  } catch (const sdbus::Error& e) {
    a.reason = "polkit: " + e.getMessage();
    (*shared_done)(a);
  }
}

}  // namespace upgraded::daemon
