#include "systemd/systemd_units.h"

#include <sdbus-c++/sdbus-c++.h>

#include "org.freedesktop.systemd1.proxy.h"
#include "upgraded/policy/names.h"

namespace upgraded::daemon {
namespace {

constexpr const char* kService = "org.freedesktop.systemd1";
constexpr const char* kManagerPath = "/org/freedesktop/systemd1";
constexpr const char* kBusDriver = "org.freedesktop.DBus";
// JobRemoved results kept for units being waited on. Each wait claims its own at once, so this
// is only ever a few; the bound holds whatever systemd sends.
constexpr std::size_t kMaxRemembered = 64;
// How long a wait for JobRemoved goes before asking systemd whether the job still exists.
constexpr std::chrono::seconds kJobCheckInterval{1};

Error from_dbus(const sdbus::Error& e, const std::string& doing) {
  ErrorCode code = e.getName() == "org.freedesktop.systemd1.NoSuchUnit" ? ErrorCode::kNotFound
                                                                        : ErrorCode::kFailed;
  return Error(code, doing + ": " + e.getMessage() + " (" + e.getName() + ")");
}

template <typename T>
T prop(const std::map<std::string, sdbus::Variant>& props, const char* name, T fallback) {
  auto it = props.find(name);
  if (it == props.end()) return fallback;
  try {
    return it->second.get<T>();
  } catch (const sdbus::Error&) {
    return fallback;
  }
}

}  // namespace

class SystemdUnits::ManagerProxy final
    : public sdbus::ProxyInterfaces<org::freedesktop::systemd1::Manager_proxy> {
 public:
  ManagerProxy(std::unique_ptr<sdbus::IConnection> connection, SystemdUnits& owner)
      : ProxyInterfaces(std::move(connection), kService, kManagerPath), m_owner(owner) {
    registerProxy();  // the JobRemoved match is in place from here on
  }
  ~ManagerProxy() { unregisterProxy(); }
  sdbus::IConnection& connection() { return getProxy().getConnection(); }

 private:
  void onJobRemoved(const uint32_t&, const sdbus::ObjectPath& job, const std::string& unit,
                    const std::string& result) override {
    const sdbus::Message* msg = getProxy().getCurrentlyProcessedMessage();
    m_owner.on_job_removed(msg ? msg->getSender() : std::string(), job, unit, result);
  }
  SystemdUnits& m_owner;
};

Result<std::unique_ptr<SystemdUnits>> SystemdUnits::connect(Bus bus) {
  std::unique_ptr<SystemdUnits> self(new SystemdUnits());
  try {
    auto open = [bus] {
      return bus == Bus::kSystem ? sdbus::createSystemBusConnection()
                                 : sdbus::createSessionBusConnection();
    };
    self->m_manager = std::make_unique<ManagerProxy>(open(), *self);
    self->m_calls = open();
    // Who owns systemd's name, and from now on every change of it. Only the bus driver can
    // send as org.freedesktop.DBus (dbus-daemon sets the sender field), so that match is safe.
    SystemdUnits* me = self.get();
    self->m_owner_match = self->m_manager->connection().addMatch(
        std::string("type='signal',sender='") + kBusDriver +
            "',path='/org/freedesktop/DBus',interface='org.freedesktop.DBus',"
            "member='NameOwnerChanged',arg0='" +
            kService + "'",
        [me](sdbus::Message& msg) {
          if (msg.getSender() != kBusDriver) return;
          std::string name, old_owner, new_owner;
          try {
            msg >> name >> old_owner >> new_owner;
          } catch (const sdbus::Error&) {
            return;
          }
          if (name == kService) me->on_owner_changed(new_owner);
        });
    std::string owner;
    auto driver = sdbus::createProxy(*self->m_calls, kBusDriver, "/org/freedesktop/DBus");
    try {
      driver->callMethod("GetNameOwner")
          .onInterface(kBusDriver)
          .withArguments(std::string(kService))
          .storeResultsTo(owner);
    } catch (const sdbus::Error& e) {
      // Not on the bus yet: no signal counts until NameOwnerChanged says who it is.
      if (e.getName() != "org.freedesktop.DBus.Error.NameHasNoOwner") throw;
    }
    std::lock_guard lock(self->m_mutex);
    if (!self->m_owner_seen) self->m_systemd_owner = owner;
    // No Subscribe(): systemd sends a job's JobRemoved to the client that queued it anyway,
    // and a subscriber makes systemd serialize every unit's properties at every state change.
  } catch (const sdbus::Error& e) {
    return from_dbus(e, "connecting to systemd");
  }
  return self;
}

SystemdUnits::~SystemdUnits() {
  // No handler may run while the members it uses go away.
  if (m_manager) m_manager->connection().leaveEventLoop();
}

void SystemdUnits::on_owner_changed(const std::string& owner) {
  std::lock_guard lock(m_mutex);
  m_systemd_owner = owner;
  m_owner_seen = true;
}

void SystemdUnits::on_job_removed(const std::string& sender, const std::string& job,
                                  const std::string& unit, const std::string& result) {
  std::lock_guard lock(m_mutex);
  // Anyone on the bus can send a signal that looks like systemd's: only its owner counts.
  if (sender.empty() || sender != m_systemd_owner) return;
  if (!m_waiting.count(unit)) return;  // not ours: nobody will claim it
  if (m_done.emplace(job, std::make_pair(unit, result)).second) m_done_order.push_back(job);
  while (m_done_order.size() > kMaxRemembered) {
    m_done.erase(m_done_order.front());
    m_done_order.pop_front();
  }
  m_cv.notify_all();
}

Result<void> SystemdUnits::run_job(const char* verb, const std::string& unit,
                                   std::chrono::milliseconds timeout) {
  UPGRADED_TRY(policy::validate_unit_name(unit));
  {
    std::lock_guard lock(m_mutex);
    ++m_waiting[unit];
  }
  // Whatever happens below, stop collecting signals for this unit once nobody waits for it.
  struct Unwait {
    SystemdUnits& self;
    const std::string& unit;
    ~Unwait() {
      std::lock_guard lock(self.m_mutex);
      if (--self.m_waiting[unit] > 0) return;
      self.m_waiting.erase(unit);
      for (auto it = self.m_done.begin(); it != self.m_done.end();)
        it = it->second.first == unit ? self.m_done.erase(it) : std::next(it);
      std::erase_if(self.m_done_order, [&](const std::string& j) { return !self.m_done.count(j); });
    }
  } unwait{*this, unit};

  std::string job;
  std::string what = std::string(verb) + " " + unit;
  try {
    sdbus::ObjectPath path;
    if (std::string_view(verb) == "start")
      path = m_manager->StartUnit(unit, "replace");
    else if (std::string_view(verb) == "stop")
      path = m_manager->StopUnit(unit, "replace");
    else
      path = m_manager->RestartUnit(unit, "replace");
    job = path;
  } catch (const sdbus::Error& e) {
    return from_dbus(e, what);
  }
  std::string result;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    {
      std::unique_lock lock(m_mutex);
      auto slice = std::min(std::chrono::steady_clock::time_point(deadline),
                            std::chrono::steady_clock::now() + kJobCheckInterval);
      if (m_cv.wait_until(lock, slice, [&] { return m_done.count(job) > 0; })) {
        result = m_done[job].second;
        m_done.erase(job);
        std::erase(m_done_order, job);
        break;
      }
    }
    // No JobRemoved yet. The bus drops signals to a connection whose queue is full (which
    // anyone can cause by flooding it), so ask whether systemd still has the job; if it is
    // gone, the unit's state tells how it ended.
    if (auto ended = job_ended_without_signal(verb, unit, job)) {
      result = *ended;
      break;
    }
    if (std::chrono::steady_clock::now() >= deadline)
      return Error(ErrorCode::kFailed, what + ": systemd's job did not finish within " +
                                           std::to_string(timeout.count()) + " ms");
  }
  if (result == "done") return {};
  std::string detail;
  if (auto st = status(unit)) {
    detail = " (" + st->active_state + "/" + st->sub_state;
    if (!st->result.empty() && st->result != "success") detail += ", " + st->result;
    if (st->exec_main_code != 0) detail += ", status " + std::to_string(st->exec_main_status);
    detail += ")";
  }
  return Error(ErrorCode::kFailed, unit + ": " + verb + " " + result + detail);
}

std::optional<std::string> SystemdUnits::job_ended_without_signal(const char* verb,
                                                                  const std::string& unit,
                                                                  const std::string& job) {
  {
    std::lock_guard lock(m_calls_mutex);
    try {
      auto proxy = sdbus::createProxy(*m_calls, kService, job);
      std::string state = proxy->getProperty("State").onInterface("org.freedesktop.systemd1.Job");
      return std::nullopt;  // still queued or running
    } catch (const sdbus::Error& e) {
      if (e.getName() != "org.freedesktop.DBus.Error.UnknownObject" &&
          e.getName() != "org.freedesktop.systemd1.NoSuchJob")
        return std::nullopt;  // cannot tell: keep waiting
    }
  }
  // The job is gone. A JobRemoved that arrives meanwhile is the better word.
  {
    std::lock_guard lock(m_mutex);
    if (auto it = m_done.find(job); it != m_done.end()) {
      std::string r = it->second.second;
      m_done.erase(it);
      std::erase(m_done_order, job);
      return r;
    }
  }
  auto st = status(unit);
  if (!st) return std::string("failed");
  const bool stopping = std::string_view(verb) == "stop";
  if (stopping) return st->active_state == "inactive" ? "done" : "failed";
  return st->active_state == "active" || st->active_state == "reloading" ? "done" : "failed";
}

Result<void> SystemdUnits::start(const std::string& unit, std::chrono::milliseconds timeout) {
  return run_job("start", unit, timeout);
}
Result<void> SystemdUnits::stop(const std::string& unit, std::chrono::milliseconds timeout) {
  return run_job("stop", unit, timeout);
}
Result<void> SystemdUnits::restart(const std::string& unit, std::chrono::milliseconds timeout) {
  return run_job("restart", unit, timeout);
}

Result<units::UnitStatus> SystemdUnits::status(const std::string& unit) {
  UPGRADED_TRY(policy::validate_unit_name(unit));
  std::lock_guard lock(m_calls_mutex);
  try {
    sdbus::ObjectPath path;
    auto manager = sdbus::createProxy(*m_calls, kService, kManagerPath);
    manager->callMethod("LoadUnit")
        .onInterface("org.freedesktop.systemd1.Manager")
        .withArguments(unit)
        .storeResultsTo(path);
    auto proxy = sdbus::createProxy(*m_calls, kService, path);
    std::map<std::string, sdbus::Variant> u, s;
    proxy->callMethod("GetAll")
        .onInterface("org.freedesktop.DBus.Properties")
        .withArguments(std::string("org.freedesktop.systemd1.Unit"))
        .storeResultsTo(u);
    units::UnitStatus st;
    st.load_state = prop<std::string>(u, "LoadState", "");
    st.active_state = prop<std::string>(u, "ActiveState", "");
    st.sub_state = prop<std::string>(u, "SubState", "");
    st.active_enter_usec = prop<uint64_t>(u, "ActiveEnterTimestampMonotonic", 0);
    st.active_exit_usec = prop<uint64_t>(u, "ActiveExitTimestampMonotonic", 0);
    st.inactive_enter_usec = prop<uint64_t>(u, "InactiveEnterTimestampMonotonic", 0);
    st.inactive_exit_usec = prop<uint64_t>(u, "InactiveExitTimestampMonotonic", 0);
    if (unit.ends_with(".service") && st.load_state == "loaded") {
      proxy->callMethod("GetAll")
          .onInterface("org.freedesktop.DBus.Properties")
          .withArguments(std::string("org.freedesktop.systemd1.Service"))
          .storeResultsTo(s);
      st.result = prop<std::string>(s, "Result", "");
      st.n_restarts = prop<uint32_t>(s, "NRestarts", 0);
      st.main_pid = prop<uint32_t>(s, "MainPID", 0);
      st.exec_main_code = prop<int32_t>(s, "ExecMainCode", 0);
      st.exec_main_status = prop<int32_t>(s, "ExecMainStatus", 0);
    }
    return st;
  } catch (const sdbus::Error& e) {
    return from_dbus(e, "reading the status of " + unit);
  }
}

Result<void> SystemdUnits::reset_failed(const std::string& unit) {
  UPGRADED_TRY(policy::validate_unit_name(unit));
  try {
    m_manager->ResetFailedUnit(unit);
  } catch (const sdbus::Error& e) {
    if (e.getName() == "org.freedesktop.systemd1.NoSuchUnit") return {};  // nothing to reset
    return from_dbus(e, "resetting " + unit);
  }
  return {};
}

Result<void> SystemdUnits::reload() {
  try {
    m_manager->Reload();
  } catch (const sdbus::Error& e) {
    return from_dbus(e, "reloading systemd");
  }
  return {};
}

}  // namespace upgraded::daemon
