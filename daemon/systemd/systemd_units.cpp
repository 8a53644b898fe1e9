#include "systemd/systemd_units.h"

#include <fcntl.h>
#include <poll.h>
#include <sdbus-c++/sdbus-c++.h>
#include <sys/eventfd.h>
#include <syslog.h>
#include <systemd/sd-journal.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>

#include "upgraded/artifact/manifest.h"
#include "upgraded/fs/unique_fd.h"

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
  // On a connection it does not own: sdbus-c++ would run an owned connection's loop on a thread
  // of its own, where the error of a lost bus escapes and aborts the daemon.
  ManagerProxy(sdbus::IConnection& connection, SystemdUnits& owner)
      : ProxyInterfaces(connection, kService, kManagerPath), m_owner(owner) {
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
  std::unique_ptr<SystemdUnits> self(new SystemdUnits(bus));
  try {
    auto open = [bus] {
      return bus == Bus::kSystem ? sdbus::createSystemBusConnection()
                                 : sdbus::createSessionBusConnection();
    };
    self->m_signals = open();
    self->m_manager = std::make_unique<ManagerProxy>(*self->m_signals, *self);
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
  self->m_signal_thread = std::thread([me = self.get()] { me->process_signals(); });
  return self;
}

void SystemdUnits::process_signals() {
  // sdbus-c++'s own loop, so that it knows this is the connection's loop thread: calls from job
  // threads then wait for their replies through it instead of blocking the connection (and
  // the signals queued behind them). Only the error of a lost bus is caught here, which would
  // otherwise escape the thread and abort the daemon.
  try {
    m_signals->enterEventLoop();
  } catch (const sdbus::Error&) {
    // The bus is gone (at shutdown, or dbus-daemon died): nothing more will arrive here.
  }
}

SystemdUnits::SystemdUnits(Bus bus) : m_bus(bus) {}

SystemdUnits::~SystemdUnits() {
  // No handler may run while the members it uses go away.
  if (m_signal_thread.joinable()) {
    try {
      m_signals->leaveEventLoop();
    } catch (const sdbus::Error&) {
      // The loop has ended already (the bus went away).
    }
    m_signal_thread.join();
  }
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
  if (auto w = m_wake.find(unit); w != m_wake.end()) {
    std::uint64_t one = 1;
    (void)!::write(w->second, &one, sizeof one);
  }
  while (m_done_order.size() > kMaxRemembered) {
    m_done.erase(m_done_order.front());
    m_done_order.pop_front();
  }
  m_cv.notify_all();
}

void SystemdUnits::begin_wait(const std::string& unit) {
  std::lock_guard lock(m_mutex);
  ++m_waiting[unit];
}

void SystemdUnits::end_wait(const std::string& unit) {
  std::lock_guard lock(m_mutex);
  if (--m_waiting[unit] > 0) return;
  m_waiting.erase(unit);
  for (auto it = m_done.begin(); it != m_done.end();)
    it = it->second.first == unit ? m_done.erase(it) : std::next(it);
  std::erase_if(m_done_order, [&](const std::string& j) { return !m_done.count(j); });
}

std::optional<std::string> SystemdUnits::take_result(const std::string& job) {
  auto it = m_done.find(job);
  if (it == m_done.end()) return std::nullopt;
  std::string r = it->second.second;
  m_done.erase(it);
  std::erase(m_done_order, job);
  return r;
}

// Whatever happens, stop collecting signals for a unit once nobody waits for it.
struct SystemdUnits::Waiting {
  SystemdUnits& self;
  const std::string& unit;
  Waiting(SystemdUnits& s, const std::string& u) : self(s), unit(u) { self.begin_wait(unit); }
  ~Waiting() { self.end_wait(unit); }
};

Result<void> SystemdUnits::run_job(const char* verb, const std::string& unit,
                                   std::chrono::milliseconds timeout) {
  UPGRADED_TRY(policy::validate_unit_name(unit));
  Waiting waiting(*this, unit);

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
        result = *take_result(job);
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
    if (auto r = take_result(job)) return r;
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
    st.need_daemon_reload = prop<bool>(u, "NeedDaemonReload", false);
    st.triggers = prop<std::vector<std::string>>(u, "Triggers", {});
    // An Accept=yes socket triggers an instance per connection: only the first few matter
    // (a socket's services listed in a release, at most kMaxExpandedUnits of them).
    if (st.triggers.size() > 256) st.triggers.resize(256);
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
      st.exec_main_start_usec = prop<uint64_t>(s, "ExecMainStartTimestampMonotonic", 0);
      st.exec_main_exit_usec = prop<uint64_t>(s, "ExecMainExitTimestampMonotonic", 0);
      st.status_text = prop<std::string>(s, "StatusText", "");
      st.fd_store_max = prop<uint32_t>(s, "FileDescriptorStoreMax", 0);
      st.fd_store = prop<uint32_t>(s, "NFileDescriptorStore", 0);
    }
    return st;
  } catch (const sdbus::Error& e) {
    return from_dbus(e, "reading the status of " + unit);
  }
}

Result<std::vector<std::string>> SystemdUnits::running_instances(const std::string& template_unit,
                                                                 bool with_failed) {
  UPGRADED_TRY(policy::validate_unit_name(template_unit));
  const auto at = template_unit.find('@');
  const auto dot = template_unit.rfind('.');
  if (at == std::string::npos || dot != at + 1)
    return Error(ErrorCode::kInvalidArgument, template_unit + " is not a template unit");
  // A backslash escapes in systemd's glob patterns: "?" matches it (and anything), and the
  // prefix is compared exactly below.
  std::string pattern = template_unit.substr(0, at + 1);
  std::replace(pattern.begin(), pattern.end(), '\\', '?');
  pattern += "*" + template_unit.substr(dot);
  using Listed =
      sdbus::Struct<std::string, std::string, std::string, std::string, std::string, std::string,
                    sdbus::ObjectPath, std::uint32_t, std::string, sdbus::ObjectPath>;
  std::vector<Listed> listed;
  {
    std::lock_guard lock(m_calls_mutex);
    try {
      auto manager = sdbus::createProxy(*m_calls, kService, kManagerPath);
      manager->callMethod("ListUnitsByPatterns")
          .onInterface("org.freedesktop.systemd1.Manager")
          .withArguments(
              with_failed ? std::vector<std::string>{"active", "activating", "reloading", "failed"}
                          : std::vector<std::string>{"active", "activating", "reloading"},
              std::vector<std::string>{pattern})
          .storeResultsTo(listed);
    } catch (const sdbus::Error& e) {
      return from_dbus(e, "listing the instances of " + template_unit);
    }
  }
  std::vector<std::string> out;
  const std::string_view prefix(template_unit.data(), at + 1), suffix(template_unit.data() + dot);
  for (const auto& u : listed) {
    const std::string& name = u.get<0>();
    if (name.size() > prefix.size() + suffix.size() && name.starts_with(prefix) &&
        name.ends_with(suffix) && policy::validate_unit_name(name))
      out.push_back(name);
  }
  return out;
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

// --- hooks ------------------------------------------------------------------------------------

namespace {

using Prop = sdbus::Struct<std::string, sdbus::Variant>;
using ExecCommand = sdbus::Struct<std::string, std::vector<std::string>, bool>;
using AuxUnit = sdbus::Struct<std::string, std::vector<Prop>>;

// How long systemd gives a hook between SIGTERM and SIGKILL when it is stopped (a timeout, a
// cancel).
constexpr std::uint64_t kHookStopUsec = 5'000'000;
// How often a running hook's StatusText is read.
constexpr std::chrono::milliseconds kStatusPollInterval{200};
// After the hook's job ended, how long its output may take to reach EOF (systemd kills what is
// left of the hook's processes when the service ends).
constexpr std::chrono::seconds kDrainTime{2};
constexpr std::size_t kMaxLine = 4096;
// What a held hook's shell prints first, once its sandbox is set up and it waits for release:
// the daemon reads it (it is not the hook's output) before it begins what the hold is for.
constexpr const char* kHeldLine = "upgraded-hook-held";
constexpr std::chrono::seconds kHeldSetupTime{30};
// What one wake-up reads from one pipe: a hook printing without pause cannot keep the wait
// from its other duties (cancel, deadline, status).
constexpr std::size_t kReadPerRound = 64 * 1024;
// Lines of one hook forwarded to the journal; past it only the tail is kept (journald would
// rate-limit the daemon's own messages otherwise).
constexpr std::size_t kMaxJournalLines = 10000;

std::uint64_t now_usec() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000u +
         static_cast<std::uint64_t>(ts.tv_nsec) / 1000u;
}

// A hook's output: line by line to the journal, its tail and last stdout line kept.
class HookOutput {
 public:
  HookOutput(const units::HookRun& hook) : m_hook(hook) {}

  // Reads what is there; false at EOF (or an error).
  bool read_from(int fd, bool is_stdout) {
    char buf[8192];
    for (std::size_t taken = 0; taken < kReadPerRound; taken += sizeof buf) {
      ssize_t n = ::read(fd, buf, sizeof buf);
      if (n > 0) {
        feed(std::string_view(buf, static_cast<std::size_t>(n)), is_stdout);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) return true;
      flush(is_stdout);
      return false;
    }
    return true;  // more may be there: the next round reads it
  }

  units::HookOutcome& fill(units::HookOutcome& o) {
    o.tail.assign(m_tail.begin(), m_tail.end());
    o.last_stdout_line = m_last_stdout;
    return o;
  }

 private:
  void feed(std::string_view data, bool is_stdout) {
    std::string& partial = is_stdout ? m_out : m_err;
    for (char c : data) {
      if (c == '\n') {
        line(partial, is_stdout);
        partial.clear();
        continue;
      }
      partial.push_back(c);
      if (partial.size() >= kMaxLine) {  // an endless line still goes out in pieces
        line(partial, is_stdout);
        partial.clear();
      }
    }
  }
  void flush(bool is_stdout) {
    std::string& partial = is_stdout ? m_out : m_err;
    if (!partial.empty()) line(partial, is_stdout);
    partial.clear();
  }
  void line(const std::string& raw, bool is_stdout) {
    // At most kHookTailBytes with its newline: the tail below never cuts inside a line.
    const std::string text = units::printable_line(raw, units::kHookTailBytes - 1);
    if (++m_lines == kMaxJournalLines + 1)
      ::sd_journal_send("MESSAGE=%s: more output than %zu lines; the rest is not logged",
                        m_hook.unit.c_str(), kMaxJournalLines, "PRIORITY=%d", LOG_WARNING,
                        "SYSLOG_IDENTIFIER=upgraded-hook-%s", m_hook.app.c_str(), nullptr);
    if (m_lines <= kMaxJournalLines)
      ::sd_journal_send("MESSAGE=%s", text.c_str(), "PRIORITY=%d",
                        is_stdout ? LOG_INFO : LOG_WARNING, "SYSLOG_IDENTIFIER=upgraded-hook-%s",
                        m_hook.app.c_str(), "UPGRADED_APP=%s", m_hook.app.c_str(),
                        "UPGRADED_PHASE=%s", m_hook.phase.c_str(), "UPGRADED_HOOK_UNIT=%s",
                        m_hook.unit.c_str(), nullptr);
    if (is_stdout && text.find_first_not_of(" \t\r") != std::string::npos) m_last_stdout = text;
    m_tail.push_back(text);
    m_tail_bytes += text.size() + 1;
    while (m_tail.size() > units::kHookTailLines ||
           (m_tail_bytes > units::kHookTailBytes && m_tail.size() > 1)) {
      m_tail_bytes -= m_tail.front().size() + 1;
      m_tail.pop_front();
    }
  }

  const units::HookRun& m_hook;
  std::string m_out, m_err;
  std::deque<std::string> m_tail;
  std::size_t m_tail_bytes = 0;
  std::string m_last_stdout;
  std::size_t m_lines = 0;
};

}  // namespace

Result<units::HookOutcome> SystemdUnits::run(const units::HookRun& hook,
                                             const units::HookStatusFn& on_status) {
  UPGRADED_TRY(policy::validate_unit_name(hook.unit));
  const bool held = static_cast<bool>(hook.before_release);
  UniqueFd go_r, go_w;  // held: the hook runs once a line arrives here
  if (held) {
    int go[2];
    if (::pipe2(go, O_CLOEXEC) != 0) return system_error(errno, "creating a pipe");
    go_r.reset(go[0]);
    go_w.reset(go[1]);
  }
  int out_pipe[2], err_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0) return system_error(errno, "creating a pipe");
  UniqueFd out_r(out_pipe[0]), out_w(out_pipe[1]);
  if (::pipe2(err_pipe, O_CLOEXEC) != 0) return system_error(errno, "creating a pipe");
  UniqueFd err_r(err_pipe[0]), err_w(err_pipe[1]);
  for (int fd : {out_r.get(), err_r.get()})
    (void)::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);

  const std::uint64_t timeout_usec = static_cast<std::uint64_t>(hook.timeout.count()) * 1000000u;
  std::vector<std::string> env;
  for (const auto& [k, v] : hook.environment)
    env.push_back(k + "=" + v);
  // An unprivileged user manager can neither switch users nor set up a mount namespace unless
  // the hook gets a user namespace of its own (PrivateUsers=); a root manager (system, or root's
  // user manager) can do both.
  const bool privileged_manager = m_bus == Bus::kSystem || ::geteuid() == 0;
  std::string what = hook.phase + " hook of " + hook.app + " (" + hook.unit + ")";

  Waiting waiting(*this, hook.unit);
  // The wait polls the hook's output; its JobRemoved wakes that poll at once.
  UniqueFd wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake) return system_error(errno, "creating an eventfd");
  struct Unwake {
    SystemdUnits& self;
    const std::string& unit;
    ~Unwake() {
      std::lock_guard lock(self.m_mutex);
      self.m_wake.erase(unit);
    }
  } unwake{*this, hook.unit};
  {
    std::lock_guard lock(m_mutex);
    m_wake[hook.unit] = wake.get();
  }
  std::string job;
  const std::uint64_t started = now_usec();
  try {
    std::vector<Prop> props;
    auto set = [&props](const char* k, sdbus::Variant v) {
      props.emplace_back(std::string(k), std::move(v));
    };
    set("Description", std::string("upgraded: " + hook.phase + " hook of " + hook.app));
    set("Type", std::string("oneshot"));
    if (held) {
      // Held: a shell that waits for the release line, then becomes the hook. EOF instead (the
      // daemon gave up, or died) ends it without running the hook.
      set("ExecStart",
          std::vector<ExecCommand>{ExecCommand{
              "/bin/sh",
              {"/bin/sh", "-c",
               std::string("echo ") + kHeldLine + "; IFS= read -r go && exec \"$0\"", hook.exec},
              false}});
    } else {
      set("ExecStart", std::vector<ExecCommand>{ExecCommand{hook.exec, {hook.exec}, false}});
    }
    set("Environment", env);
    set("WorkingDirectory", hook.working_directory);
    if (held)
      set("StandardInputFileDescriptor", sdbus::UnixFd(go_r.get()));
    else
      set("StandardInput", std::string("null"));
    set("StandardOutputFileDescriptor", sdbus::UnixFd(out_w.get()));
    set("StandardErrorFileDescriptor", sdbus::UnixFd(err_w.get()));
    set("SyslogIdentifier", std::string("upgraded-hook-" + hook.app));
    set("ProtectSystem", std::string("strict"));
    set("ProtectHome", std::string("read-only"));
    set("ReadWritePaths", hook.read_write_paths);
    set("PrivateTmp", true);
    set("NoNewPrivileges", true);
    if (!hook.hidden_paths.empty()) {
      std::vector<sdbus::Struct<std::string, std::string>> tmpfs;
      for (const auto& p : hook.hidden_paths)
        tmpfs.emplace_back(p, std::string("ro"));
      set("TemporaryFileSystem", tmpfs);
    }
    if (!hook.inaccessible_paths.empty()) {
      std::vector<std::string> gone;
      for (const auto& p : hook.inaccessible_paths)
        gone.push_back("-" + p);  // "-": only if it exists
      set("InaccessiblePaths", gone);
    }
    // A hook that runs as root keeps only what working on its data needs: no CAP_SYS_ADMIN
    // (no remounting its sandbox away), no raw devices, no kernel tunables or modules.
    // CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID, CAP_KILL:
    constexpr std::uint64_t kHookCapabilities =
        (1ULL << 0) | (1ULL << 1) | (1ULL << 2) | (1ULL << 3) | (1ULL << 4) | (1ULL << 5);
    set("CapabilityBoundingSet", kHookCapabilities);
    set("PrivateDevices", true);
    set("ProtectKernelTunables", true);
    set("ProtectKernelModules", true);
    set("ProtectControlGroups", true);
    if (privileged_manager) {
      if (!hook.user.empty()) set("User", hook.user);
      if (!hook.group.empty()) set("Group", hook.group);
    } else {
      set("PrivateUsers", true);
    }
    set("NotifyAccess", std::string("all"));
    // A oneshot service is in its start phase until the hook exits: the start timeout is its
    // run time limit (RuntimeMaxSec= does not apply to Type=oneshot).
    const std::uint64_t hold_usec =
        held ? static_cast<std::uint64_t>(hook.hold_budget.count()) * 1000000u : 0;
    set("TimeoutStartUSec", timeout_usec + hold_usec);
    set("RuntimeMaxUSec", timeout_usec + hold_usec);
    set("TimeoutStopUSec", kHookStopUsec);
    // Kept loaded until this daemon has read how it ended (UnrefUnit below; a daemon that dies
    // drops the reference with its connection), then collected, failed or not.
    set("CollectMode", std::string("inactive-or-failed"));
    set("AddRef", true);
    job = m_manager->StartTransientUnit(hook.unit, "fail", props, std::vector<AuxUnit>{});
  } catch (const sdbus::Error& e) {
    return from_dbus(e, "starting the " + what);
  }
  out_w.reset();  // the hook holds the only write ends now: EOF when it (and its children) end
  err_w.reset();
  go_r.reset();
  struct Unref {
    SystemdUnits& self;
    const std::string& unit;
    ~Unref() {
      try {
        self.m_manager->UnrefUnit(unit);
      } catch (const sdbus::Error&) {
      }
    }
  } unref{*this, hook.unit};

  HookOutput output(hook);
  bool out_open = true, err_open = true, canceled = false, overdue = false;
  std::string result, last_status;
  const auto now = [] { return std::chrono::steady_clock::now(); };
  // systemd enforces the timeout; the daemon's own deadline only covers a systemd that does not
  // (or a hook that pushed it out with EXTEND_TIMEOUT_USEC=). A held hook's timeout counts from
  // its release, which only the daemon knows: its deadline is the limit.
  auto deadline =
      now() + hook.timeout + std::chrono::microseconds(2 * kHookStopUsec) + std::chrono::seconds(5);
  auto stop_unit = [&] {
    try {
      m_manager->StopUnit(hook.unit, "replace");
    } catch (const sdbus::Error&) {
      // Already gone: its JobRemoved says how it ended.
    }
  };
  std::optional<Error> not_released;  // held: before_release failed; the hook never ran
  if (held) {
    // Wait until the held shell runs (its sandbox set up): otherwise setting it up would still
    // overlap what before_release begins. A unit that ends first (it could not be set up)
    // fails without anything begun.
    std::string first;
    const auto until = now() + kHeldSetupTime;
    bool up = false, ended = false;
    while (!up && !ended && now() < until) {
      pollfd fds[2] = {{out_r.get(), POLLIN, 0}, {wake.get(), POLLIN, 0}};
      if (::poll(fds, 2, 100) < 0 && errno != EINTR) break;
      char c;
      while (!up && ::read(out_r.get(), &c, 1) == 1) {
        if (c == '\n')
          up = first == kHeldLine;
        else if (first.size() < 64)
          first.push_back(c);
      }
      std::lock_guard lock(m_mutex);
      ended = m_done.count(job) > 0;
    }
    if (!up && !ended) {
      stop_unit();
      not_released = Error(ErrorCode::kFailed, what + " was not set up within " +
                                                   std::to_string(kHeldSetupTime.count()) + " s");
    }
    // Ended before it was up (it could not be set up: 226/NAMESPACE, 217/USER...): never
    // released; its outcome below says how it failed.
    if (!up) go_w.reset();
  }
  if (held && go_w) {
    auto ready = hook.before_release();
    if (ready) {
      static constexpr char kGo[] = "go\n";
      if (::write(go_w.get(), kGo, sizeof kGo - 1) != static_cast<ssize_t>(sizeof kGo - 1))
        ready = system_error(errno, "releasing the " + what);
      deadline = now() + hook.timeout;
    }
    go_w.reset();  // EOF: a hook not released ends without running
    if (!ready) not_released = ready.error();
  }
  auto next_status = now() + kStatusPollInterval, next_job_check = now() + kJobCheckInterval;
  std::optional<std::chrono::steady_clock::time_point> drain_until;
  for (;;) {
    if (result.empty()) {
      std::lock_guard lock(m_mutex);
      if (auto r = take_result(job)) result = *r;
    }
    if (!result.empty()) {
      if (!drain_until) drain_until = now() + kDrainTime;
      if ((!out_open && !err_open) || now() >= *drain_until) break;
    }
    pollfd fds[4] = {{out_open ? out_r.get() : -1, POLLIN, 0},
                     {err_open ? err_r.get() : -1, POLLIN, 0},
                     {canceled || !result.empty() ? -1 : hook.cancel_fd, POLLIN, 0},
                     {result.empty() ? wake.get() : -1, POLLIN, 0}};
    int n = ::poll(fds, 4, 100);
    if (fds[3].fd >= 0 && (fds[3].revents & POLLIN)) {
      std::uint64_t count;
      (void)!::read(wake.get(), &count, sizeof count);
    }
    if (n < 0 && errno != EINTR) return system_error(errno, "waiting for the " + what);
    if (out_open && (fds[0].revents & (POLLIN | POLLHUP | POLLERR)))
      out_open = output.read_from(out_r.get(), true);
    if (err_open && (fds[1].revents & (POLLIN | POLLHUP | POLLERR)))
      err_open = output.read_from(err_r.get(), false);
    if (fds[2].fd >= 0 && (fds[2].revents & POLLIN)) {
      canceled = true;
      stop_unit();
    }
    if (!result.empty()) continue;
    if (now() >= next_status && on_status) {
      next_status = now() + kStatusPollInterval;
      if (auto st = status(hook.unit); st && st->status_text != last_status) {
        last_status = st->status_text;
        if (!last_status.empty()) on_status(units::printable_line(last_status, 256));
      }
    }
    if (now() >= next_job_check) {
      next_job_check = now() + kJobCheckInterval;
      // A dropped JobRemoved (a flooded queue) must not hang the hook's wait: once systemd no
      // longer has the job, the unit's Result says how the hook ended.
      std::lock_guard lock(m_calls_mutex);
      try {
        auto proxy = sdbus::createProxy(*m_calls, kService, job);
        std::string state = proxy->getProperty("State").onInterface("org.freedesktop.systemd1.Job");
      } catch (const sdbus::Error& e) {
        if (e.getName() == "org.freedesktop.DBus.Error.UnknownObject" ||
            e.getName() == "org.freedesktop.systemd1.NoSuchJob")
          result = "gone";
      }
    }
    if (!overdue && now() >= deadline) {
      overdue = true;
      stop_unit();
    }
    if (overdue && now() >= deadline + std::chrono::microseconds(2 * kHookStopUsec))
      return Error(ErrorCode::kFailed, what + ": systemd did not end it within " +
                                           std::to_string(hook.timeout.count()) + " s");
  }
  if (not_released) return *not_released;
  units::HookOutcome o;
  output.fill(o);
  auto st = status(hook.unit);
  if (!st) return st.error().with_context(what + " ended, but how is unknown");
  if (st->status_text != last_status && !st->status_text.empty() && on_status)
    on_status(units::printable_line(st->status_text, 256));
  o.run_usec = (st->exec_main_exit_usec > started ? st->exec_main_exit_usec : now_usec()) - started;
  if (st->exec_main_start_usec > started) o.start_usec = st->exec_main_start_usec - started;
  constexpr int kExited = 1, kKilled = 2, kDumped = 3;  // CLD_* from <signal.h>
  if (canceled) {
    o.how = units::HookOutcome::How::kCanceled;
  } else if (st->result == "timeout" || overdue) {
    o.how = units::HookOutcome::How::kTimedOut;
  } else if (st->result == "success") {
    o.how = units::HookOutcome::How::kExited;
    o.status = 0;
  } else if (st->result == "exit-code" && st->exec_main_code == kExited) {
    o.how = units::HookOutcome::How::kExited;
    o.status = st->exec_main_status;
  } else if ((st->result == "signal" || st->result == "core-dump") &&
             (st->exec_main_code == kKilled || st->exec_main_code == kDumped)) {
    o.how = units::HookOutcome::How::kKilled;
    o.status = st->exec_main_status;
  } else {
    o.how = units::HookOutcome::How::kFailed;
    o.detail = st->result.empty() ? "job " + result : st->result;
  }
  return o;
}

namespace {
// Whether `rest` (a hook unit's name after "upgraded-hook-[<app>-]") is "<phase>-<n>.service",
// or with `any_app` "<app>-<phase>-<n>.service": so that app "hello" never claims the units of
// app "hello-migrate".
bool hook_unit_rest(const std::string& rest, const std::string& phase, bool any_app) {
  const std::string suffix = ".service";
  if (!rest.ends_with(suffix)) return false;
  std::string body = rest.substr(0, rest.size() - suffix.size());
  auto dash = body.rfind('-');
  if (dash == std::string::npos || dash + 1 == body.size()) return false;
  for (char c : body.substr(dash + 1))
    if (c < '0' || c > '9') return false;
  std::string head = body.substr(0, dash);
  return any_app ? head.ends_with("-" + phase) : head == phase;
}
}  // namespace

Result<std::vector<std::string>> SystemdUnits::stop_leftovers(const std::string& app) {
  if (!app.empty()) UPGRADED_TRY(policy::validate_app_name(app));
  std::vector<std::string> names;
  const std::string prefix = "upgraded-hook-" + (app.empty() ? "" : app + "-");
  try {
    auto units = m_manager->ListUnitsByPatterns({}, {prefix + "*.service"});
    for (const auto& u : units) {
      const std::string& name = u.get<0>();
      // "upgraded-hook-<app>-<phase>-<n>.service": <app> may itself contain '-', so the rest
      // must be a phase and a number.
      std::string rest = name.substr(prefix.size());
      bool ours = false;
      for (const char* phase : artifact::kHookNames)
        ours = ours || hook_unit_rest(rest, phase, app.empty());
      if (!ours) continue;
      const std::string& active = u.get<3>();
      if (active == "inactive") continue;
      names.push_back(name);
    }
  } catch (const sdbus::Error& e) {
    return from_dbus(e, "listing the hook units of " + app);
  }
  for (const auto& name : names) {
    if (auto r = stop(name, std::chrono::milliseconds(2 * kHookStopUsec / 1000 + 5000)); !r) {
      // A failed unit that could not be stopped is ended anyway; one still running is not.
      auto st = status(name);
      if (st && (st->active_state == "active" || st->active_state == "activating" ||
                 st->active_state == "deactivating"))
        return r.error();
    }
    (void)reset_failed(name);
  }
  return names;
}

}  // namespace upgraded::daemon
