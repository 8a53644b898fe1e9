// upgraded: the per-host upgrade daemon. See upgraded(8) and docs/dbus-api.md.

#include <malloc.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>
#include <condition_variable>
#include <mutex>
#include <thread>

#include <sdbus-c++/sdbus-c++.h>
#include <CLI/CLI.hpp>

#include "config.h"
#include "event_loop.h"
#include "log.h"
#include "manager.h"
#include "sandbox/extract_child.h"
#include "systemd/systemd_units.h"
#include "upgraded/crash_point.h"
#include "upgraded/fs/durable.h"

using namespace upgraded;
using namespace upgraded::daemon;

namespace {

constexpr const char* kBusName = "org.upgraded1";

int run(bool user, const std::string& root, std::string helper) {
  auto config = load_config(root);
  if (!config) {
    log(Level::kError, "configuration: " + config.error().message());
    return 1;
  }
  sandbox::Helper extractor{helper.empty() ? sandbox::default_helper_path() : helper, {}};
  // Never root: when the daemon is, each helper run gets a uid of its own (Manager).
  if (::geteuid() == 0) extractor.as = std::make_pair(config->helper_ids, config->helper_ids);
  // The configuration directory too: hooks get an empty read-only mount over it (docs/hooks.md).
  if (auto r = fs::make_directories(config->config_dir()); !r) {
    log(Level::kError, r.error().message());
    return 1;
  }
  if (auto r = fs::make_directories(config->state_dir()); !r) {
    log(Level::kError, r.error().message());
    return 1;
  }

  std::unique_ptr<sdbus::IConnection> bus =
      user ? sdbus::createSessionBusConnection() : sdbus::createSystemBusConnection();
  // Before any other thread exists, so that they all inherit the blocked signals.
  auto loop = EventLoop::create(*bus);
  if (!loop) {
    log(Level::kError, loop.error().message());
    return 1;
  }
  auto units = SystemdUnits::connect(user ? Bus::kUser : Bus::kSystem);
  if (!units) {
    log(Level::kError, "cannot reach systemd: " + units.error().message());
    return 1;
  }

  store::StoreOptions so = config->store_options();
  auto store = store::Store::open(so);
  if (!store) {
    log(Level::kError, "opening the store " + so.root + ": " + store.error().message());
    return 1;
  }
  // Once, at start: from then on every operation recovers the app it locks.
  if (auto r = store->recover_all(); !r) {
    log(Level::kError, "recovering the store " + so.root + ": " + r.error().message());
    return 1;
  }
  for (const auto& [app, error] : store->recovery_errors())
    log(Level::kError, LogContext{app, "", "", nullptr},
        app + ": recovery failed, the app is unusable until repaired: " + error.message());

  auto manager =
      std::make_unique<Manager>(*bus, **loop, *config, *store, **units, **units, extractor, user);
  bus->requestName(kBusName);
  // Once: the helpers inherit this process's system call filters, so what the daemon sees of
  // Landlock is what every helper will see.
  if (auto sandbox = manager->helper_sandbox(); sandbox.rfind("full:", 0) != 0)
    log(sandbox.rfind("unusable:", 0) == 0 ? Level::kError : Level::kWarning,
        "extraction helper sandbox " + sandbox);
  std::string files;
  for (const auto& f : config->files)
    files += (files.empty() ? "" : ", ") + f;
  log(Level::kInfo, LogContext{"", "", "", message_id::kStarted},
      std::string("upgraded ") + UPGRADED_VERSION + " ready on the " + (user ? "user" : "system") +
          " bus; state in " + so.root + "; config: " + (files.empty() ? "defaults" : files));
  ::sd_notify(0, "READY=1\nSTATUS=Ready");
  manager->recover_interrupted();
  // Auto-finalize ([apps.<app>] auto_finalize_after_s) looks once a second; only when some app
  // has it.
  std::mutex ticker_mutex;
  std::condition_variable ticker_cv;
  bool ticker_stop = false;
  std::thread ticker;
  bool any_auto = false;
  for (const auto& [app, p] : config->app_policies)
    any_auto = any_auto || p.auto_finalize_after_s > 0;
  if (any_auto)
    ticker = std::thread([&, m = manager.get(), l = loop->get()] {
      std::unique_lock lock(ticker_mutex);
      while (!ticker_cv.wait_for(lock, std::chrono::seconds(1), [&] { return ticker_stop; }))
        l->post([m] { m->auto_finalize(); });
    });

  auto loop_ptr = loop->get();
  auto r = (*loop)->run([&] {
    ::sd_notify(0, "STOPPING=1\nSTATUS=Finishing running jobs");
    log(Level::kInfo, "stopping: canceling jobs that can be canceled, waiting for the others");
    manager->shut_down([loop_ptr] { loop_ptr->stop(); });
  });
  if (!r) log(Level::kError, r.error().message());
  {
    std::lock_guard lock(ticker_mutex);
    ticker_stop = true;
  }
  ticker_cv.notify_all();
  if (ticker.joinable()) ticker.join();
  try {
    bus->releaseName(kBusName);
  } catch (const sdbus::Error&) {
  }
  // Tasks use the manager, and the manager's job threads post to the loop: tasks first, then
  // the manager, then (at the end of this scope) the loop.
  (*loop)->join_tasks();
  manager.reset();
  log(Level::kInfo, "stopped");
  return r ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App cli{"upgraded: verifies, stages and activates signed releases, with rollback"};
  bool user = false;
  std::string root = "/";
  std::string helper;
  cli.add_flag("--user", user, "serve on the user bus and drive the user's systemd manager");
  cli.add_option("--root", root,
                 "run an instance whose config and state live under DIR as they would under /")
      ->type_name("DIR");
  cli.add_option("--extract-helper", helper,
                 "path of upgraded-extract (default: next to "
                 "upgraded, else the libexec directory)")
      ->type_name("PATH");
  cli.set_version_flag("--version", std::string(UPGRADED_VERSION) +
                                        (kTestHooks ? " (test build: crash and pause points "
                                                      "compiled in)"
                                                    : ""));
  CLI11_PARSE(cli, argc, argv);
  if (kTestHooks)
    log(Level::kWarning,
        "this is a test build: crash and pause points are compiled in (UPGRADED_CRASH_AT, "
        "UPGRADED_PAUSE_AT); do not run it in production");
  ::signal(SIGPIPE, SIG_IGN);
  // Descriptors arrive with Install calls. The daemon uses poll(), never select(), so it may
  // use all the descriptors its hard limit allows (systemd's soft default of 1024 is for
  // select()); what callers can make it hold is bounded anyway ([limits], docs/configuration.md).
  if (rlimit nofile{};
      ::getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
    nofile.rlim_cur = nofile.rlim_max;
    (void)::setrlimit(RLIMIT_NOFILE, &nofile);
  }
  // Jobs are short-lived threads that wait on I/O: one malloc arena for all of them, so that
  // an idle daemon does not keep an arena per past job.
  ::mallopt(M_ARENA_MAX, 1);
  try {
    return run(user, root, helper);
  } catch (const sdbus::Error& e) {
    log(Level::kError, "D-Bus: " + e.getName() + ": " + e.getMessage());
    return 1;
  }
}
