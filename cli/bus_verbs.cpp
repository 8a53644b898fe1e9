// upgradectl-bus.so: the verbs that talk to the daemon, through the proxies generated from
// dbus/*.xml (cli/verbs.h).

#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sdbus-c++/sdbus-c++.h>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>

#include "exit_codes.h"
#include "org.upgraded1.Job.proxy.h"
#include "org.upgraded1.Manager.proxy.h"
#include "output.h"
#include "upgraded/fs/durable.h"
#include "upgraded/store/views_cache.h"
#include "verbs.h"

namespace upgradectl {
namespace {

using namespace upgraded;
using nlohmann::json;
constexpr const char* kName = "org.upgraded1";
constexpr const char* kPath = "/org/upgraded1";
using Options = std::map<std::string, sdbus::Variant>;

int exit_code_for_error_name(const std::string& name) {
  if (name == "org.upgraded1.Error.InvalidArgument") return kExitUsage;
  if (name == "org.upgraded1.Error.PolicyRefused") return kExitPolicyRefused;
  if (name == "org.upgraded1.Error.VerificationFailed") return kExitVerificationFailed;
  if (name == "org.upgraded1.Error.Busy") return kExitBusy;
  if (name == "org.upgraded1.Error.AccessDenied") return kExitAccessDenied;
  if (name == "org.upgraded1.Error.NotFound") return kExitNotFound;
  if (name == "org.upgraded1.Error.Exists") return kExitExists;
  if (name == "org.upgraded1.Error.ShuttingDown") return kExitUnreachable;
  if (name == "org.freedesktop.DBus.Error.ServiceUnknown" ||
      name == "org.freedesktop.DBus.Error.NameHasNoOwner" ||
      name == "org.freedesktop.DBus.Error.NoServer" ||
      name == "org.freedesktop.DBus.Error.FileNotFound" ||
      name == "org.freedesktop.DBus.Error.Disconnected" ||
      name == "org.freedesktop.DBus.Error.Spawn.ChildExited")
    return kExitUnreachable;
  return kExitFailed;
}

// What to do next, for the errors where there is something to say.
std::string hint_for(const std::string& name, bool user) {
  if (name == "org.freedesktop.DBus.Error.NoReply" || name == "org.freedesktop.DBus.Error.TimedOut")
    return "no reply in time; a job may still have started: upgradectl jobs";
  if (name == "org.upgraded1.Error.ShuttingDown")
    return "upgraded is stopping; retry when it is back";
  if (exit_code_for_error_name(name) == kExitUnreachable)
    return user ? "is `upgraded --user` running on your session bus?"
                : "is upgraded.service installed? (systemctl status upgraded)";
  if (name == "org.upgraded1.Error.AccessDenied")
    return "run it as root (sudo), or ask for the polkit action it names";
  if (name == "org.upgraded1.Error.Busy") return "wait for that job (upgradectl jobs), then retry";
  return "";
}

int report_dbus(const sdbus::Error& e, bool user) {
  std::string message = e.getMessage().empty() ? e.getName() : e.getMessage();
  std::fprintf(stderr, "upgradectl: %s\n", message.c_str());
  if (auto hint = hint_for(e.getName(), user); !hint.empty())
    std::fprintf(stderr, "upgradectl: %s\n", hint.c_str());
  return exit_code_for_error_name(e.getName());
}

constexpr const char* kBusDriver = "org.freedesktop.DBus";

// The job a call started, and the unique bus name of the daemon that started it (the reply's
// sender): the only connection whose signals about the job count.
struct Started {
  sdbus::ObjectPath job;
  std::string daemon;
};

// A connection to the daemon, with JobRemoved subscribed before any call, so that the end of a
// job it starts cannot be missed.
//
// Signals are data from strangers: anyone on the bus can send one that looks like the daemon's,
// addressed to this connection, and sd-bus cannot check a well-known sender name locally. So
// every handler compares the sender with the daemon's unique name (or the bus driver's).
class Client final : public sdbus::ProxyInterfaces<org::upgraded1::Manager_proxy> {
 public:
  // The connection runs no event loop yet: signals that arrive during a call are queued and
  // dispatched once run_job starts the loop, by which time the daemon's name is known.
  explicit Client(sdbus::IConnection& bus) : ProxyInterfaces(bus, kName, kPath) { registerProxy(); }
  ~Client() { unregisterProxy(); }

  /// Calls a Manager method that starts a job; remembers who replied.
  template <typename... Args>
  Started start(const char* method, const Args&... args) {
    auto call = getProxy().createMethodCall(INTERFACE_NAME, method);
    (call << ... << args);
    auto reply = getProxy().callMethod(call);
    Started s;
    reply >> s.job;
    s.daemon = reply.getSender();
    std::lock_guard lock(m_mutex);
    m_daemon = s.daemon;
    return s;
  }

  struct Outcome {
    std::string result, message;
    std::string error;  ///< the error name, when it came from GetJobResult
  };
  // Waits for JobRemoved of `job`, or for the daemon to leave the bus (a crash, a kill): then
  // the job cannot end as far as this client can tell, and waiting longer would hang a
  // package hook for ever. A JobRemoved can also be lost (the bus drops signals to a client
  // whose queue is full, which anyone can make happen by flooding it): every two seconds
  // without one, the daemon is asked how the job ended (GetJobResult).
  //
  // The bus is processed on this thread (no event loop thread), so that a connection that
  // drops surfaces here as an sdbus::Error the caller handles.
  Outcome wait(sdbus::IConnection& bus, const std::string& job) {
    using Clock = std::chrono::steady_clock;
    auto next_check = Clock::now() + std::chrono::seconds(2);
    for (;;) {
      while (bus.processPendingRequest()) {
      }
      {
        std::lock_guard lock(m_mutex);
        if (m_removed.count(job)) return m_removed[job];
        if (m_daemon_gone) return daemon_gone();
      }
      if (Clock::now() >= next_check) {
        if (auto ended = ask_result(job)) return *ended;
        next_check = Clock::now() + std::chrono::seconds(2);
      }
      auto pd = bus.getEventLoopPollData();
      pollfd pfd{pd.fd, pd.events, 0};
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(next_check - Clock::now());
      int timeout = static_cast<int>(std::max<std::int64_t>(left.count(), 0));
      if (auto rel = pd.getRelativeTimeout())
        timeout = std::min(timeout, static_cast<int>((rel->count() + 999) / 1000));
      if (::poll(&pfd, 1, timeout) < 0 && errno != EINTR)
        throw sdbus::Error("org.freedesktop.DBus.Error.Disconnected", "waiting for the bus failed");
    }
  }
  // NameOwnerChanged for org.upgraded1, from the bus driver: the daemon that runs our job left
  // (not when D-Bus activation starts one: then the old owner is empty).
  void owner_changed(const std::string& old_owner) {
    std::lock_guard lock(m_mutex);
    if (!m_daemon.empty() && old_owner == m_daemon) m_daemon_gone = true;
  }
  bool from_daemon(const sdbus::Message& msg) {
    std::lock_guard lock(m_mutex);
    return !m_daemon.empty() && msg.getSender() == m_daemon;
  }

 private:
  static Outcome daemon_gone() {
    return {"failed",
            "upgraded stopped while the job ran; when it starts again it finishes what a crash "
            "interrupted (see upgradectl status and upgradectl history)",
            ""};
  }
  // The job's outcome from the daemon that started it, if it has ended.
  std::optional<Outcome> ask_result(const std::string& job) {
    std::uint32_t id = 0;
    try {
      id = static_cast<std::uint32_t>(std::stoul(job.substr(job.rfind('/') + 1)));
    } catch (const std::exception&) {
      return std::nullopt;
    }
    try {
      auto call = getProxy().createMethodCall(INTERFACE_NAME, "GetJobResult");
      call << id;
      auto reply = getProxy().callMethod(call);
      std::string result, message, error;
      reply >> result >> message >> error;
      std::lock_guard lock(m_mutex);
      if (reply.getSender() != m_daemon) return daemon_gone();  // another daemon now
      if (result == "running") return std::nullopt;
      return Outcome{result, message, error};
    } catch (const sdbus::Error& e) {
      if (e.getName() == "org.upgraded1.Error.NotFound") return daemon_gone();
      return std::nullopt;  // e.g. an older daemon without the method: keep waiting
    }
  }

 public:
 private:
  void onJobNew(const uint32_t&, const sdbus::ObjectPath&) override {}
  void onJobRemoved(const uint32_t&, const sdbus::ObjectPath& job, const std::string& result,
                    const std::string& message) override {
    const sdbus::Message* msg = getProxy().getCurrentlyProcessedMessage();
    if (!msg || !from_daemon(*msg)) return;
    std::lock_guard lock(m_mutex);
    m_removed[job] = {result, message, ""};
  }
  std::mutex m_mutex;
  std::string m_daemon;  // the unique name that replied to start()
  std::map<std::string, Outcome> m_removed;
  bool m_daemon_gone = false;
};

// Follows a job's properties: progress for people, and the error name for the exit code. The
// match is added before the call that creates the job, so that nothing it emits is missed; what
// does not come from the daemon that started the job is ignored.
class JobWatch {
 public:
  JobWatch(sdbus::IConnection& bus, Client& client, upgradectl::Progress& progress)
      : m_client(client), m_progress(progress) {
    m_slot = bus.addMatch(
        "type='signal',sender='org.upgraded1',interface='org.freedesktop.DBus.Properties',"
        "member='PropertiesChanged',path_namespace='/org/upgraded1/job'",
        [this](sdbus::Message& msg) { on_changed(msg); });
  }
  void follow(const std::string& path) {
    std::lock_guard lock(m_mutex);
    m_path = path;
  }
  std::string error() {
    std::lock_guard lock(m_mutex);
    return m_error;
  }

 private:
  void on_changed(sdbus::Message& msg) {
    if (!m_client.from_daemon(msg)) return;
    std::string iface;
    std::map<std::string, sdbus::Variant> changed;
    std::vector<std::string> invalidated;
    try {
      msg >> iface >> changed >> invalidated;
    } catch (const sdbus::Error&) {
      return;
    }
    std::lock_guard lock(m_mutex);
    if (msg.getPath() != m_path || iface != "org.upgraded1.Job") return;
    try {
      if (auto it = changed.find("Error"); it != changed.end())
        m_error = it->second.get<std::string>();
      if (auto it = changed.find("Step"); it != changed.end())
        m_step = it->second.get<std::string>();
      if (auto it = changed.find("Progress"); it != changed.end())
        m_percent = it->second.get<uint32_t>();
    } catch (const sdbus::Error&) {
      return;  // a value of the wrong type: not what the API sends
    }
    if (changed.count("Step") || changed.count("Progress")) m_progress.update(m_step, m_percent);
  }
  Client& m_client;
  upgradectl::Progress& m_progress;
  sdbus::Slot m_slot;
  std::mutex m_mutex;
  std::string m_path, m_error, m_step;
  uint32_t m_percent = 0;
};

std::unique_ptr<sdbus::IConnection> connect(bool user) {
  auto bus = user ? sdbus::createSessionBusConnection() : sdbus::createSystemBusConnection();
  // Install replies after the signature check (up to ~20 s) and polkit may ask for a password:
  // more than sd-bus's default 25 s.
  bus->setMethodCallTimeout(std::chrono::minutes(5));
  return bus;
}

// Starts a job with `call` and, unless --no-block, follows it to its end.
int run_job(const Common& c, const std::function<Started(Client&)>& call, const std::string& what) {
  try {
    auto bus = connect(c.user);
    Client client(*bus);
    Progress progress(what, c.quiet);
    JobWatch watch(*bus, client, progress);
    auto owner = bus->addMatch(
        "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
        "member='NameOwnerChanged',arg0='org.upgraded1'",
        [&client](sdbus::Message& msg) {
          if (msg.getSender() != kBusDriver) return;  // only the bus driver says who owns what
          std::string name, old_owner, new_owner;
          try {
            msg >> name >> old_owner >> new_owner;
          } catch (const sdbus::Error&) {
            return;
          }
          if (name == kName) client.owner_changed(old_owner);
        });
    sdbus::ObjectPath job = call(client).job;
    if (c.no_block) {
      std::printf("%s\n", job.c_str());
      return kExitOk;
    }
    watch.follow(job);
    auto outcome = client.wait(*bus, job);
    progress.finish(outcome.result == "done");
    if (outcome.result == "done") return kExitOk;
    std::string name = outcome.error.empty() ? watch.error() : outcome.error;
    std::fprintf(stderr, "upgradectl: %s %s: %s\n", what.c_str(), outcome.result.c_str(),
                 outcome.message.c_str());
    if (outcome.result == "canceled") return kExitFailed;
    return name.empty() ? kExitFailed : exit_code_for_error_name(name);
  } catch (const sdbus::Error& e) {
    return report_dbus(e, c.user);
  }
}

int run_status(const Common& c, const std::string& app) {
  try {
    auto bus = connect(c.user);
    Client client(*bus);
    // One call for every app (thousands of apps: one round trip, not one per app).
    std::map<std::string, std::map<std::string, sdbus::Variant>> apps;
    if (app.empty()) {
      apps = client.GetApps();
    } else {
      try {
        apps.emplace(app, client.GetApp(app));
      } catch (const sdbus::Error& e) {
        if (e.getName() != "org.upgraded1.Error.NotFound") throw;
      }
    }
    auto jobs = client.ListJobs();
    json out = json::array();
    Table t({"APP", "CURRENT", "PREVIOUS", "LAST GOOD", "FLOOR", "DATA FORMAT", "JOB"});
    for (const auto& [name, details] : apps) {
      std::string job;
      for (const auto& j : jobs)
        if (std::get<2>(j) == name)
          job = std::to_string(std::get<0>(j)) + " " + std::get<1>(j) + " " + std::get<4>(j);
      auto text = [&](const char* key) {
        auto it = details.find(key);
        return it == details.end() ? std::string() : it->second.get<std::string>();
      };
      std::optional<std::uint64_t> finalized, writes;
      if (auto it = details.find("finalized_data_format"); it != details.end())
        finalized = it->second.get<std::uint64_t>();
      if (auto it = details.find("current_writes"); it != details.end())
        writes = it->second.get<std::uint64_t>();
      const std::string current = text("current"), previous = text("previous"),
                        good = text("last_known_good"), floor = text("floor"),
                        finalization = text("finalization");
      out.push_back({{"app", name},
                     {"current", current},
                     {"previous", previous},
                     {"last_known_good", good},
                     {"floor", floor},
                     {"finalization", finalization},
                     {"finalized_data_format", finalized ? json(*finalized) : json(nullptr)},
                     {"job", job}});
      std::string data = finalized ? std::to_string(*finalized) : "";
      if (finalization == "pre-finalized" && writes)
        data += " (pre-finalized: " + std::to_string(*writes) + ")";
      t.add({name, current, previous, good, floor, data, job});
    }
    if (!app.empty() && out.empty()) {
      std::fprintf(stderr, "upgradectl: no app '%s' is installed\n", app.c_str());
      return kExitNotFound;
    }
    print_rows(c.json, out, t, "No apps are installed.");
    // A daemon whose helpers cannot be fully confined (no Landlock: some containers) says so
    // at start in its log, and here.
    std::string sandbox;
    try {
      sandbox = client.HelperSandbox();
    } catch (const sdbus::Error&) {
      // A daemon older than the property: nothing to say.
    }
    if (!sandbox.empty() && sandbox.rfind("full:", 0) != 0)
      std::fprintf(stderr, "upgradectl: note: the extraction helpers' sandbox is %s\n",
                   sandbox.c_str());
    return kExitOk;
  } catch (const sdbus::Error& e) {
    return report_dbus(e, c.user);
  }
}

// Bounds a listing handed over as a file: 1,000 apps x 5 releases take about 250 KB.
constexpr off_t kMaxListing = 64 << 20;

// ListAllReleasesByFileDescriptor's listing (docs/dbus-api.md): the daemon's sealed memfd,
// read whole and decoded before anything is printed. A descriptor that is not a regular file
// sealed against writes and growth, or bytes that are not exactly such a listing, are refused:
// the listing is printed whole or not at all. None, with a note on stderr: the daemon cannot
// hand one over (it predates the method, the bus policy does not allow it yet, it has no
// /proc) or its listing was replaced three times while read; ListAllReleases then answers.
// Any other error (the daemon died, a timeout) is the caller's.
Result<std::optional<std::vector<store::views_cache::ListedApp>>> read_listing(Client& client) {
  using Listing = std::optional<std::vector<store::views_cache::ListedApp>>;
  auto refuse = [](const std::string& why) {
    return Error(ErrorCode::kFailed, "the daemon's listing cannot be read: " + why);
  };
  auto fall_back = [](const std::string& why) {
    std::fprintf(stderr, "upgradectl: note: %s; listing through ListAllReleases\n", why.c_str());
    return Listing();
  };
  for (int attempt = 0; attempt < 3; ++attempt) {
    sdbus::UnixFd fd;
    try {
      fd = client.ListAllReleasesByFileDescriptor();
    } catch (const sdbus::Error& e) {
      static const std::set<std::string> kCannot = {
          "org.freedesktop.DBus.Error.UnknownMethod", "org.freedesktop.DBus.Error.UnknownInterface",
          "org.freedesktop.DBus.Error.AccessDenied", "org.upgraded1.Error.Failed"};
      if (!kCannot.count(e.getName())) throw;
      return fall_back("the daemon cannot hand over its listing as a file (" + e.getName() +
                       (e.getMessage().empty() ? "" : ": " + e.getMessage()) + ")");
    }
    struct stat sb {};
    if (::fstat(fd.get(), &sb) != 0) return refuse(std::strerror(errno));
    if (!S_ISREG(sb.st_mode)) return refuse("not a regular file");
    if (sb.st_size > kMaxListing) return refuse(std::to_string(sb.st_size) + " bytes");
    constexpr int kSealed = F_SEAL_WRITE | F_SEAL_GROW;
    int seals = ::fcntl(fd.get(), F_GET_SEALS);
    if (seals < 0 || (seals & kSealed) != kSealed) return refuse("not sealed against changes");
    // Read with pread (read_fd): the descriptor's offset is shared with every other caller's.
    auto text = fs::read_fd(fd.get(), sb, "the daemon's listing", kMaxListing);
    if (!text) return refuse(text.error().message());
    // Emptied: replaced by a newer one.
    if (text->empty() || text->size() < static_cast<std::size_t>(sb.st_size)) continue;
    std::span bytes(reinterpret_cast<const std::uint8_t*>(text->data()), text->size());
    auto apps = store::views_cache::decode_listing(bytes);
    if (!apps) return refuse("not a listing (docs/dbus-api.md)");
    return Listing(std::move(*apps));
  }
  return fall_back("the daemon's listing was replaced three times while it was read");
}

int run_list(const Common& c, const std::string& only) {
  try {
    auto bus = connect(c.user);
    Client client(*bus);
    json out = json::array();
    Table t({"APP", "VERSION", "STATUS", "ROLE", "STAGED", "PINNED", "SIZE"});
    auto pre_finalized = [](const std::map<std::string, sdbus::Variant>& details) {
      auto it = details.find("finalization");
      return it != details.end() && it->second.get<std::string>() == "pre-finalized";
    };
    if (!only.empty()) {
      bool pre = pre_finalized(client.GetApp(only));
      for (const auto& r : client.ListReleases(only)) {
        const std::string& role = std::get<2>(r);
        add_release_row(c.json, out, t, only, std::get<0>(r), std::get<1>(r), role, std::get<3>(r),
                        std::get<4>(r), std::get<5>(r), role == "current" && pre);
      }
    } else if (auto listing = read_listing(client); !listing) {
      return report(listing.error());
    } else if (*listing) {
      // One call and one read whatever the number of apps.
      for (const auto& a : **listing)
        for (const auto& r : a.releases)
          add_release_row(c.json, out, t, a.app, r.version, std::string(store::to_string(r.status)),
                          r.role, r.staged_at, r.pinned, r.size,
                          r.role == "current" && a.pre_finalized);
    } else {
      for (const auto& r : client.ListAllReleases())
        add_release_row(c.json, out, t, std::get<0>(r), std::get<1>(r), std::get<2>(r),
                        std::get<3>(r), std::get<4>(r), std::get<5>(r), std::get<6>(r),
                        std::get<7>(r));
    }
    print_rows(c.json, out, t, "No releases are installed.");
    return kExitOk;
  } catch (const sdbus::Error& e) {
    return report_dbus(e, c.user);
  }
}

int run_jobs(const Common& c) {
  try {
    auto bus = connect(c.user);
    Client client(*bus);
    json out = json::array();
    Table t({"ID", "TYPE", "APP", "VERSION", "STATE"});
    for (const auto& j : client.ListJobs()) {
      out.push_back({{"id", std::get<0>(j)},
                     {"type", std::get<1>(j)},
                     {"app", std::get<2>(j)},
                     {"version", std::get<3>(j)},
                     {"state", std::get<4>(j)},
                     {"path", std::string(std::get<5>(j))}});
      t.add({std::to_string(std::get<0>(j)), std::get<1>(j), std::get<2>(j), std::get<3>(j),
             std::get<4>(j)});
    }
    print_rows(c.json, out, t, "No jobs are running.");
    return kExitOk;
  } catch (const sdbus::Error& e) {
    return report_dbus(e, c.user);
  }
}

std::string milliseconds(std::uint64_t usec) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f ms", static_cast<double>(usec) / 1000);
  return buf;
}

int run_history(const Common& c, const std::string& app, unsigned limit) {
  try {
    auto bus = connect(c.user);
    Client client(*bus);
    auto entries = client.GetHistory(app, {{"limit", sdbus::Variant(uint32_t(limit))}});
    json out = json::array();
    Table t({"TIME", "OP", "FROM", "TO", "RESULT", "DOWNTIME", "MESSAGE"});
    for (const auto& h : entries) {
      // Each unit's own window (one by one they differ; all at once too, restarted in turn).
      json downtime = json::object();
      std::string windows;
      for (const auto& [unit, usec] : std::get<6>(h)) {
        downtime[unit] = usec;
        const std::string ms = milliseconds(usec);
        windows +=
            (windows.empty() ? "" : ", ") + (std::get<6>(h).size() == 1 ? ms : unit + " " + ms);
      }
      out.push_back({{"time", std::get<0>(h)},
                     {"op", std::get<1>(h)},
                     {"from", std::get<2>(h)},
                     {"to", std::get<3>(h)},
                     {"result", std::get<4>(h)},
                     {"message", std::get<5>(h)},
                     {"downtime_usec", downtime},
                     {"transaction", std::get<7>(h)}});
      // Part of a set: its id before the message, the same in each member's history.
      const std::string& tx = std::get<7>(h);
      t.add({std::get<0>(h), std::get<1>(h), std::get<2>(h), std::get<3>(h),
             colored_status(std::get<4>(h)), windows,
             tx.empty() ? std::get<5>(h) : "(" + tx + ") " + std::get<5>(h)});
    }
    print_rows(c.json, out, t, "No history for " + app + ".");
    return kExitOk;
  } catch (const sdbus::Error& e) {
    return report_dbus(e, c.user);
  }
}

int run_finalization_status(const Common& c, const std::string& app) {
  try {
    auto bus = connect(c.user);
    Client client(*bus);
    auto all = client.FinalizationStatus(app);
    json out = json::array();
    Table t({"APP", "STATE", "FINALIZED", "CURRENT", "WRITES", "PENDING SINCE", "LAST BACKUP",
             "ROLLBACK TARGETS"});
    auto str = [](const std::map<std::string, sdbus::Variant>& v, const char* k) {
      auto it = v.find(k);
      return it == v.end() ? std::string() : it->second.get<std::string>();
    };
    auto num = [](const std::map<std::string, sdbus::Variant>& v,
                  const char* k) -> std::optional<std::uint64_t> {
      auto it = v.find(k);
      if (it == v.end()) return std::nullopt;
      return it->second.get<std::uint64_t>();
    };
    for (const auto& [name, v] : all) {
      auto finalized = num(v, "finalized_data_format");
      std::vector<std::string> targets;
      if (auto it = v.find("rollback_targets"); it != v.end())
        targets = it->second.get<std::vector<std::string>>();
      std::string joined;
      for (const auto& x : targets)
        joined += (joined.empty() ? "" : " ") + x;
      out.push_back({{"app", name},
                     {"state", str(v, "state")},
                     {"finalized_data_format", finalized ? json(*finalized) : json(nullptr)},
                     {"finalized_at", str(v, "finalized_at")},
                     {"current", str(v, "current")},
                     {"current_writes", num(v, "current_writes").value_or(0)},
                     {"pending_since", str(v, "pending_since")},
                     {"last_backup", str(v, "last_backup")},
                     {"auto_finalize_after_s", num(v, "auto_finalize_after_s").value_or(0)},
                     {"rollback_targets", targets}});
      t.add({name, str(v, "state"), finalized ? std::to_string(*finalized) : "", str(v, "current"),
             std::to_string(num(v, "current_writes").value_or(0)), str(v, "pending_since"),
             str(v, "last_backup"), joined});
    }
    print_rows(c.json, out, t, "No apps are installed.");
    return kExitOk;
  } catch (const sdbus::Error& e) {
    return report_dbus(e, c.user);
  }
}

// On a terminal, finalize asks first: it is the one step that cannot be undone.
bool confirm_finalize(const Common& c, const std::string& app) {
  if (!::isatty(STDIN_FILENO) || !::isatty(STDERR_FILENO)) return true;
  auto bus = connect(c.user);
  Client client(*bus);
  auto all = client.FinalizationStatus(app);
  auto it = all.find(app);
  if (it == all.end()) return true;  // the daemon's refusal says why
  const auto& v = it->second;
  auto get = [&](const char* k) {
    auto f = v.find(k);
    return f == v.end() ? std::string() : f->second.get<std::string>();
  };
  std::uint64_t writes = 0;
  if (auto f = v.find("current_writes"); f != v.end()) writes = f->second.get<std::uint64_t>();
  std::fprintf(stderr,
               "Finalize data format %llu of %s %s? Downgrading to releases older than %s will no "
               "longer be possible (only a backup restore goes back). [y/N] ",
               static_cast<unsigned long long>(writes), app.c_str(), get("current").c_str(),
               get("current").c_str());
  char line[64] = "";
  if (!std::fgets(line, sizeof line, stdin)) return false;
  return line[0] == 'y' || line[0] == 'Y';
}

int run_cancel(const Common& c, unsigned id) {
  try {
    auto bus = connect(c.user);
    struct JobProxy final : sdbus::ProxyInterfaces<org::upgraded1::Job_proxy> {
      JobProxy(sdbus::IConnection& b, std::string path)
          : ProxyInterfaces(b, kName, std::move(path)) {
        registerProxy();
      }
      ~JobProxy() { unregisterProxy(); }
    } job(*bus, "/org/upgraded1/job/" + std::to_string(id));
    job.Cancel();
    if (!c.quiet) std::printf("Asked job %u to cancel.\n", id);
    return kExitOk;
  } catch (const sdbus::Error& e) {
    if (e.getName() == "org.freedesktop.DBus.Error.UnknownObject" ||
        e.getName() == "org.freedesktop.DBus.Error.UnknownMethod") {
      std::fprintf(stderr, "upgradectl: there is no job %u (it may have ended)\n", id);
      return kExitNotFound;
    }
    return report_dbus(e, c.user);
  }
}

int run_install(const Common& c, const std::string& file, bool stage_only) {
  int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return report(upgraded::system_error(errno, "opening '" + file + "'"));
  sdbus::UnixFd artifact(fd, sdbus::adopt_fd);
  return run_job(
      c,
      [&](Client& cl) {
        return cl.start("Install", artifact, Options{{"activate", sdbus::Variant(!stage_only)}});
      },
      "install " + file);
}

// The artifacts as descriptors for the daemon (never paths).
std::optional<std::vector<sdbus::UnixFd>> open_artifacts(const std::vector<std::string>& files,
                                                         int& exit_code) {
  std::vector<sdbus::UnixFd> fds;
  for (const auto& file : files) {
    int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
      exit_code = report(upgraded::system_error(errno, "opening '" + file + "'"));
      return std::nullopt;
    }
    fds.emplace_back(fd, sdbus::adopt_fd);
  }
  return fds;
}

int run_install_set(const Common& c, const std::vector<std::string>& files, bool stage_only) {
  int code = kExitOk;
  auto fds = open_artifacts(files, code);
  if (!fds) return code;
  std::string what = "install";
  for (const auto& f : files)
    what += " " + f;
  return run_job(
      c,
      [&](Client& cl) {
        return cl.start("InstallSet", *fds, Options{{"activate", sdbus::Variant(!stage_only)}});
      },
      what);
}

int run_activate(const Common& c, const std::string& app, const std::string& version, bool through,
                 bool allow_bad, bool below_floor) {
  Options o;
  if (through) o["through_path"] = sdbus::Variant(true);
  if (allow_bad) o["allow_bad"] = sdbus::Variant(true);
  if (below_floor) o["allow_below_floor"] = sdbus::Variant(true);
  return run_job(
      c, [&](Client& cl) { return cl.start("Activate", app, version, o); },
      "activate " + app + " " + version);
}

int run_activate_set(const Common& c, const std::vector<std::pair<std::string, std::string>>& set) {
  std::vector<sdbus::Struct<std::string, std::string>> members;
  std::string what = "activate";
  for (const auto& [app, version] : set) {
    members.emplace_back(app, version);
    what += " " + app + "=" + version;
  }
  return run_job(
      c, [&](Client& cl) { return cl.start("ActivateSet", members, Options{}); }, what);
}

int run_rollback(const Common& c, const std::string& app, bool below_floor) {
  Options o;
  if (below_floor) o["allow_below_floor"] = sdbus::Variant(true);
  return run_job(
      c, [&](Client& cl) { return cl.start("Rollback", app, o); }, "rollback " + app);
}

int run_remove(const Common& c, const std::string& app, const std::string& version) {
  return run_job(
      c, [&](Client& cl) { return cl.start("Remove", app, version, Options{}); },
      "remove " + app + " " + version);
}

int run_set_pinned(const Common& c, const std::string& app, const std::string& version, bool pin) {
  return run_job(
      c, [&](Client& cl) { return cl.start("SetPinned", app, version, pin, Options{}); },
      std::string(pin ? "pin " : "unpin ") + app + " " + version);
}

int run_floor(const Common& c, const std::string& app, const std::string& version) {
  return run_job(
      c, [&](Client& cl) { return cl.start("SetFloor", app, version, Options{}); },
      "floor " + app + " " + version);
}

int run_gc(const Common& c, const std::string& app, std::optional<unsigned> keep,
           std::optional<std::uint64_t> max_bytes) {
  Options o;
  if (keep) o["keep"] = sdbus::Variant(uint32_t(*keep));
  if (max_bytes) o["max_bytes"] = sdbus::Variant(uint64_t(*max_bytes));
  return run_job(
      c, [&](Client& cl) { return cl.start("GarbageCollect", app, o); }, "gc " + app);
}

int run_finalize(const Common& c, const std::string& app, bool no_backup, bool yes) {
  try {
    if (!yes && !confirm_finalize(c, app)) {
      std::fprintf(stderr, "upgradectl: not finalized\n");
      return kExitFailed;
    }
  } catch (const sdbus::Error& e) {
    return report_dbus(e, c.user);
  }
  Options o;
  if (no_backup) o["no_backup"] = sdbus::Variant(true);
  return run_job(
      c, [&](Client& cl) { return cl.start("Finalize", app, o); }, "finalize " + app);
}

// One plan step in words ("restart a.service", "health gate of a.service, 2 s active").
std::string describe_step(const json& s) {
  const std::string kind = s.at("kind").get<std::string>();
  const std::string target = s.at("target").get<std::string>();
  const std::string unit = s.at("unit").get<std::string>();
  const auto ready = s.at("min_ready_s").get<std::uint32_t>();
  if (kind == "recover") return "finish the interrupted activation of " + target;
  if (kind == "hook") return target + " hook" + (unit.empty() ? "" : " for " + unit);
  if (kind == "stage") return "stage " + target + " (verify and extract the payload)";
  if (kind == "switch") return "switch current to " + target;
  if (kind == "mark-good") return "mark " + target + " good";
  if (kind == "gate")
    return (target.empty() ? std::string("health gate of every unit")
                           : "health gate of " + target) +
           ", " + std::to_string(ready) + " s active";
  // stop, restart, start, hold (a socket); a note, if any, says why it is done that way.
  const std::string note = s.contains("note") ? s.at("note").get<std::string>() : "";
  return kind + " " + target + (note.empty() ? "" : " (" + note + ")");
}

// A plan's refusal as the activation itself would exit (0: none), said on stderr unless the
// output is JSON.
int refusal_exit(const json& refusal, bool json_out) {
  if (refusal.is_null()) return kExitOk;
  const std::string message = refusal.at("message").get<std::string>();
  if (!json_out) std::fprintf(stderr, "upgradectl: %s\n", message.c_str());
  const std::string error = refusal.at("error").get<std::string>();
  return error == "NotFound"        ? kExitNotFound
         : error == "PolicyRefused" ? kExitPolicyRefused
         : error == "Busy"          ? kExitBusy
         : error == "Exists"        ? kExitExists
                                    : kExitFailed;
}

// A plan document (docs/plan.md) as text, for `app`.
void print_plan(const json& plan, const std::string& app) {
  const json& refusal = plan.at("refusal");
  if (!refusal.is_null()) {
    std::printf("Plan: %s %s: refused, nothing would change\n",
                plan.at("op").get<std::string>().c_str(), app.c_str());
  } else if (!plan.at("recover_first").get<std::string>().empty()) {
    std::printf(
        "Plan: %s %s: an interrupted activation of %s is finished first; what follows "
        "depends on how it ends: plan again once it has\n",
        plan.at("op").get<std::string>().c_str(), app.c_str(),
        plan.at("recover_first").get<std::string>().c_str());
  } else if (!plan.at("changes").get<bool>()) {
    std::printf("%s %s is already current: nothing to do.\n", app.c_str(),
                plan.at("to").get<std::string>().c_str());
  } else {
    const std::string from = plan.at("from").get<std::string>();
    std::printf("Plan: %s %s %s \u2192 %s (strategy %s)\n",
                plan.at("op").get<std::string>().c_str(), app.c_str(),
                from.empty() ? "(nothing)" : from.c_str(), plan.at("to").get<std::string>().c_str(),
                plan.at("strategy").get<std::string>().c_str());
    if (plan.contains("install")) {
      const json& in = plan.at("install");
      std::printf(
          "Staging needs %s of payload (compressed; its tree: about %s); %s free, %s "
          "kept free: %s\n",
          human_size(in.at("payload_bytes").get<std::uint64_t>()).c_str(),
          human_size(in.at("estimate_bytes").get<std::uint64_t>()).c_str(),
          human_size(in.at("free_bytes").get<std::uint64_t>()).c_str(),
          human_size(in.at("reserve_bytes").get<std::uint64_t>()).c_str(),
          in.at("space").get<std::string>().c_str());
    }
    const bool walk = !plan.at("path").empty();
    Table t = walk ? Table({"#", "RELEASE", "STEP", "UNITS DOWN", "TIMEOUT"})
                   : Table({"#", "STEP", "UNITS DOWN", "TIMEOUT"});
    int n = 0;
    for (const auto& s : plan.at("steps")) {
      std::string down;
      for (const auto& u : s.at("units_down"))
        down += (down.empty() ? "" : ", ") + u.get<std::string>();
      const auto timeout = s.at("timeout_s").get<std::uint32_t>();
      const std::string number = std::to_string(++n);
      const std::string step = describe_step(s);
      const std::string limit = timeout ? std::to_string(timeout) + " s" : "-";
      const std::string release = s.at("release").get<std::string>();
      if (walk)
        t.add({number, release, step, down.empty() ? "-" : down, limit});
      else
        t.add({number, step, down.empty() ? "-" : down, limit});
    }
    t.print();
    std::printf("Predicted downtime (median / p95 of each unit's last windows in the history):\n");
    for (const auto& d : plan.at("downtime")) {
      const auto samples = d.at("samples").get<std::uint64_t>();
      const std::string unit = d.at("unit").get<std::string>();
      std::string held;
      if (d.contains("held_by"))
        for (const auto& socket : d.at("held_by"))
          held += (held.empty() ? "; socket held (" : ", ") + socket.get<std::string>();
      if (!held.empty()) held += "): 0 refused expected";
      if (samples == 0)
        std::printf("  %s: no history%s\n", unit.c_str(), held.c_str());
      else
        std::printf("  %s: %s / %s (%llu windows)%s\n", unit.c_str(),
                    milliseconds(d.at("median_usec").get<std::uint64_t>()).c_str(),
                    milliseconds(d.at("p95_usec").get<std::uint64_t>()).c_str(),
                    static_cast<unsigned long long>(samples), held.c_str());
    }
    const json& total = plan.at("predicted_total_usec");
    if (!total.is_null())
      std::printf("  total: %s\n", milliseconds(total.get<std::uint64_t>()).c_str());
    else if (!plan.at("downtime").empty())
      std::printf("  total: unknown (a unit has no history)\n");
    std::printf("If a step fails: %s.\n", plan.at("on_failure").get<std::string>().c_str());
    const json& format = plan.at("pre_finalized_format");
    if (!format.is_null())
      std::printf(
          "Afterwards %s is pre-finalized (data format %llu): rollback stays possible until "
          "finalize, the irreversible step, which this plan does not include.\n",
          app.c_str(), static_cast<unsigned long long>(format.get<std::uint64_t>()));
  }
}

int run_plan(const Common& c, const std::string& app, const std::string& version, bool rollback,
             bool through, bool allow_bad, bool below_floor) {
  std::string text;
  try {
    auto bus = connect(c.user);
    Client client(*bus);
    Options o;
    if (rollback) o["rollback"] = sdbus::Variant(true);
    if (through) o["through_path"] = sdbus::Variant(true);
    if (allow_bad) o["allow_bad"] = sdbus::Variant(true);
    if (below_floor) o["allow_below_floor"] = sdbus::Variant(true);
    text = client.Plan(app, version, o);
  } catch (const sdbus::Error& e) {
    return report_dbus(e, c.user);
  }
  try {
    const json plan = json::parse(text);
    const json& refusal = plan.at("refusal");
    if (c.json)
      std::printf("%s\n", plan.dump().c_str());
    else
      print_plan(plan, app);
    return refusal_exit(refusal, c.json);
  } catch (const json::exception& e) {
    std::fprintf(stderr, "upgradectl: the daemon's plan cannot be read: %s\n", e.what());
    return kExitFailed;
  }
}

// A set's plan document (PlanSet, PlanInstall of several artifacts) as text, or as JSON.
int print_set_plan(const std::string& text, bool json_out) {
  try {
    const json plan = json::parse(text);
    if (json_out) {
      std::printf("%s\n", plan.dump().c_str());
    } else {
      const json& members = plan.at("members");
      for (std::size_t k = 0; k < members.size(); ++k) {
        std::printf("%s%zu/%zu: ", k ? "\n" : "", k + 1, members.size());
        print_plan(members[k], members[k].at("app").get<std::string>());
      }
      const json& total = plan.at("predicted_total_usec");
      std::printf("\nSet of %zu apps, in this order%s. Predicted downtime: %s.\n", members.size(),
                  plan.at("op") == "install-set"
                      ? "; every artifact is staged before anything running is touched"
                      : "",
                  total.is_null() ? "unknown (an app has no history, or nothing changes)"
                                  : milliseconds(total.get<std::uint64_t>()).c_str());
      std::printf("If an app fails: %s.\n", plan.at("on_failure").get<std::string>().c_str());
    }
    return refusal_exit(plan.at("refusal"), json_out);
  } catch (const json::exception& e) {
    std::fprintf(stderr, "upgradectl: the daemon's plan cannot be read: %s\n", e.what());
    return kExitFailed;
  }
}

int run_plan_set(const Common& c, const std::vector<std::pair<std::string, std::string>>& set) {
  std::string text;
  try {
    auto bus = connect(c.user);
    Client client(*bus);
    std::vector<sdbus::Struct<std::string, std::string>> members;
    for (const auto& [app, version] : set)
      members.emplace_back(app, version);
    text = client.PlanSet(members, Options{});
  } catch (const sdbus::Error& e) {
    return report_dbus(e, c.user);
  }
  return print_set_plan(text, c.json);
}

int run_plan_install(const Common& c, const std::vector<std::string>& files) {
  int code = kExitOk;
  auto fds = open_artifacts(files, code);
  if (!fds) return code;
  std::string text;
  try {
    auto bus = connect(c.user);
    Client client(*bus);
    text = client.PlanInstall(*fds, Options{});
  } catch (const sdbus::Error& e) {
    return report_dbus(e, c.user);
  }
  if (files.size() > 1) return print_set_plan(text, c.json);
  try {
    const json plan = json::parse(text);
    if (c.json)
      std::printf("%s\n", plan.dump().c_str());
    else
      print_plan(plan, plan.at("app").get<std::string>());
    return refusal_exit(plan.at("refusal"), c.json);
  } catch (const json::exception& e) {
    std::fprintf(stderr, "upgradectl: the daemon's plan cannot be read: %s\n", e.what());
    return kExitFailed;
  }
}

constexpr BusVerbs kVerbs{
    kModuleInterface,
    sizeof(BusVerbs),
    guarded<run_status>,
    guarded<run_list>,
    guarded<run_jobs>,
    guarded<run_history>,
    guarded<run_finalization_status>,
    guarded<run_cancel>,
    guarded<run_install>,
    guarded<run_activate>,
    guarded<run_rollback>,
    guarded<run_remove>,
    guarded<run_set_pinned>,
    guarded<run_floor>,
    guarded<run_gc>,
    guarded<run_finalize>,
    guarded<run_plan>,
    guarded<run_activate_set>,
    guarded<run_plan_set>,
    guarded<run_install_set>,
    guarded<run_plan_install>,
};

}  // namespace
}  // namespace upgradectl

extern "C" __attribute__((visibility("default"))) const upgradectl::BusVerbs*
upgradectl_bus_verbs() {
  return &upgradectl::kVerbs;
}
