// SystemdUnits against a real systemd user manager (tests/testbed/with-systemd-user): units
// written by the test, started, stopped and restarted through org.freedesktop.systemd1.

#include <gtest/gtest.h>
#include <time.h>

#include <sys/eventfd.h>
#include <unistd.h>
#include <chrono>
#include <cstdlib>

#include <atomic>
#include <filesystem>
#include <thread>

#include "support/test_dir.h"
#include "systemd/systemd_units.h"

using namespace upgraded;
using namespace upgraded::daemon;
using namespace std::chrono_literals;

namespace {

class RealSystemd : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* dir = std::getenv("UPGRADED_TESTBED_UNITS");
    ASSERT_NE(dir, nullptr) << "run inside tests/testbed/with-systemd-user";
    m_units = dir;
    auto u = SystemdUnits::connect(Bus::kUser);
    ASSERT_TRUE(u.ok()) << u.error().message();
    units = std::move(*u);
  }

  void write_unit(const std::string& name, const std::string& body) {
    test::write_file(m_units + "/" + name, body);
    ASSERT_TRUE(units->reload().ok());
  }

  std::string m_units;
  std::unique_ptr<SystemdUnits> units;
};

std::uint64_t monotonic_usec() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000u +
         static_cast<std::uint64_t>(ts.tv_nsec) / 1000u;
}

}  // namespace

TEST_F(RealSystemd, StartsAndStopsAUnitAndReportsItsState) {
  write_unit("sleeper.service", "[Service]\nExecStart=/bin/sleep 1000\n");
  auto before = units->status("sleeper.service");
  ASSERT_TRUE(before.ok()) << before.error().message();
  EXPECT_EQ(before->active_state, "inactive");
  ASSERT_TRUE(units->start("sleeper.service", 10s).ok());
  auto running = units->status("sleeper.service");
  ASSERT_TRUE(running.ok());
  EXPECT_EQ(running->active_state, "active");
  EXPECT_EQ(running->sub_state, "running");
  EXPECT_GT(running->main_pid, 0u);
  EXPECT_GT(running->active_enter_usec, 0u);
  EXPECT_LE(running->active_enter_usec, monotonic_usec());
  ASSERT_TRUE(units->stop("sleeper.service", 10s).ok());
  auto stopped = units->status("sleeper.service");
  ASSERT_TRUE(stopped.ok());
  EXPECT_EQ(stopped->active_state, "inactive");
  // (systemd unloads an inactive, unreferenced unit at once, which resets its timestamps.)
}

TEST_F(RealSystemd, RestartsAUnitAndShowsTheDowntimeInItsTimestamps) {
  write_unit("restarted.service", "[Service]\nExecStart=/bin/sleep 1000\n");
  ASSERT_TRUE(units->start("restarted.service", 10s).ok());
  auto first = units->status("restarted.service");
  ASSERT_TRUE(units->restart("restarted.service", 10s).ok());
  auto second = units->status("restarted.service");
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_NE(first->main_pid, second->main_pid);
  // The window: from leaving active (stop began) to active again.
  EXPECT_GT(second->active_enter_usec, second->active_exit_usec);
  EXPECT_GT(second->active_exit_usec, first->active_enter_usec);
  ASSERT_TRUE(units->stop("restarted.service", 10s).ok());
}

TEST_F(RealSystemd, ReportsAFailedStartWithTheExitStatus) {
  write_unit("fails.service", "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'exit 3'\n");
  auto r = units->start("fails.service", 10s);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("fails.service: start failed"), std::string::npos)
      << r.error().message();
  EXPECT_NE(r.error().message().find("status 3"), std::string::npos) << r.error().message();
  auto st = units->status("fails.service");
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->active_state, "failed");
  EXPECT_EQ(st->result, "exit-code");
  EXPECT_EQ(st->exec_main_status, 3);
}

TEST_F(RealSystemd, WaitsForNotifyReadiness) {
  write_unit("notify.service",
             "[Service]\nType=notify\nNotifyAccess=all\n"
             "ExecStart=/bin/sh -c 'sleep 0.4; systemd-notify --ready; exec sleep 1000'\n");
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(units->start("notify.service", 10s).ok());
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 350ms) << "start returned before READY=1";
  EXPECT_EQ(units->status("notify.service")->active_state, "active");
  ASSERT_TRUE(units->stop("notify.service", 10s).ok());
}

TEST_F(RealSystemd, CountsAutomaticRestarts) {
  write_unit(
      "flaky.service",
      "[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart=/bin/sh -c 'sleep 0.2; exit 1'\n"
      "Restart=always\nRestartSec=100ms\n");
  ASSERT_TRUE(units->start("flaky.service", 10s).ok());
  std::uint32_t restarts = 0;
  for (int i = 0; i < 100 && restarts < 2; ++i) {  // bounded: 5 s
    std::this_thread::sleep_for(50ms);
    restarts = units->status("flaky.service")->n_restarts;
  }
  EXPECT_GE(restarts, 2u);
  ASSERT_TRUE(units->stop("flaky.service", 10s).ok());
}

TEST_F(RealSystemd, RefusesUnknownAndMalformedUnits) {
  auto missing = units->start("does-not-exist.service", 10s);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.error().message().find("does-not-exist.service"), std::string::npos);
  auto bad = units->start("../../etc/x.service", 10s);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code(), ErrorCode::kInvalidArgument);
}

TEST_F(RealSystemd, GivesUpWaitingAfterTheTimeout) {
  write_unit("slow.service", "[Service]\nType=oneshot\nExecStart=/bin/sleep 30\n");
  auto t0 = std::chrono::steady_clock::now();
  auto r = units->start("slow.service", 300ms);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("did not finish within 300 ms"), std::string::npos);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s);
  ASSERT_TRUE(units->stop("slow.service", 10s).ok());
}

TEST_F(RealSystemd, RunsJobsForSeveralUnitsAtOnce) {
  for (int i = 0; i < 4; ++i)
    write_unit("par" + std::to_string(i) + ".service", "[Service]\nExecStart=/bin/sleep 1000\n");
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int i = 0; i < 4; ++i)
    threads.emplace_back([&, i] {
      std::string u = "par" + std::to_string(i) + ".service";
      if (units->start(u, 10s) && units->restart(u, 10s) && units->stop(u, 10s)) ++ok;
    });
  for (auto& t : threads)
    t.join();
  EXPECT_EQ(ok.load(), 4);
}

// --- hooks as transient units -------------------------------------------------------------------

namespace {

class Hooks : public RealSystemd {
 protected:
  // A hook script in the test's directory, and a data directory it may write.
  units::HookRun hook(const std::string& name, const std::string& body,
                      std::chrono::seconds timeout = 30s) {
    test::make_dirs(dir / "data");
    test::write_file(dir / name, "#!/bin/sh\n" + body, 0755);
    units::HookRun h;
    h.unit = "upgraded-hook-demo-" + name + "-" + std::to_string(++n) + ".service";
    h.app = "demo";
    h.phase = name;
    h.exec = dir / name;
    h.working_directory = dir.path();
    h.environment = {{"UPGRADED_APP", "demo"}, {"UPGRADED_PHASE", name}};
    h.read_write_paths = {dir / "data"};
    h.timeout = timeout;
    return h;
  }
  test::TempDir dir;
  int n = 0;
};

}  // namespace

TEST_F(Hooks, RunsAHookAsATransientUnitWithItsEnvironmentAndOutput) {
  auto h = hook("pre_upgrade",
                "echo \"app=$UPGRADED_APP phase=$UPGRADED_PHASE cwd=$(pwd)\"\n"
                "echo warning >&2\n"
                "systemd-notify --status='half way'\nsleep 0.5\n"
                "echo written >\"$(pwd)/data/out\"\n"
                "printf 'snap-0042\\n\\n'\n");
  std::vector<std::string> statuses;
  auto o = units->run(h, [&](const std::string& s) { statuses.push_back(s); });
  ASSERT_TRUE(o.ok()) << o.error().message();
  EXPECT_TRUE(o->passed()) << o->describe(h.timeout);
  ASSERT_EQ(o->tail.size(), 4u);
  EXPECT_EQ(o->tail[0], "app=demo phase=pre_upgrade cwd=" + dir.path());
  EXPECT_EQ(o->last_stdout_line, "snap-0042");
  EXPECT_EQ(test::read_file(dir / "data/out"), "written\n");
  ASSERT_FALSE(statuses.empty());
  EXPECT_EQ(statuses.back(), "half way");
  EXPECT_GT(o->start_usec, 0u);
  EXPECT_LT(o->start_usec, 5'000'000u);
  // Collected once read: the name is free again.
  auto st = units->status(h.unit);
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->load_state, "not-found");
}

TEST_F(Hooks, ReportsExitStatusSignalAndTimeout) {
  auto h = hook("migrate", "echo line1\necho line2\nexit 3\n");
  auto o = units->run(h, {});
  ASSERT_TRUE(o.ok()) << o.error().message();
  EXPECT_EQ(o->how, units::HookOutcome::How::kExited);
  EXPECT_EQ(o->status, 3);
  EXPECT_EQ(o->tail, (std::vector<std::string>{"line1", "line2"}));
  EXPECT_EQ(o->describe(h.timeout).rfind("exited with status 3 after ", 0), 0u);

  h = hook("health", "kill -9 $$\n");
  o = units->run(h, {});
  ASSERT_TRUE(o.ok()) << o.error().message();
  EXPECT_EQ(o->how, units::HookOutcome::How::kKilled);
  EXPECT_EQ(o->status, 9);

  h = hook("post_upgrade", "echo started\nexec sleep 60\n", 1s);
  auto t0 = std::chrono::steady_clock::now();
  o = units->run(h, {});
  ASSERT_TRUE(o.ok()) << o.error().message();
  EXPECT_EQ(o->how, units::HookOutcome::How::kTimedOut);
  EXPECT_EQ(o->describe(h.timeout), "timed out after 1 s");
  EXPECT_EQ(o->tail, std::vector<std::string>{"started"});
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s);
}

TEST_F(Hooks, KeepsOnlyTheLastLinesOfALongOutput) {
  auto h = hook("migrate",
                "i=0\nwhile [ $i -lt 500 ]; do echo \"line $i\"; i=$((i+1)); done\n"
                "head -c 10000 /dev/zero | tr '\\0' x\n");
  auto o = units->run(h, {});
  ASSERT_TRUE(o.ok()) << o.error().message();
  std::size_t bytes = 0;
  for (const auto& l : o->tail)
    bytes += l.size() + 1;
  EXPECT_LE(o->tail.size(), units::kHookTailLines);
  EXPECT_LE(bytes, units::kHookTailBytes);
  EXPECT_EQ(o->tail.back().find_first_not_of('x'), std::string::npos);
}

TEST_F(Hooks, CancelStopsTheHook) {
  auto h = hook("pre_upgrade", "touch \"$(pwd)/data/started\"\nexec sleep 60\n");
  int efd = ::eventfd(0, EFD_CLOEXEC);
  ASSERT_GE(efd, 0);
  h.cancel_fd = efd;
  std::thread canceler([&] {
    for (int i = 0; i < 100 && !std::filesystem::exists(std::string(dir / "data/started")); ++i)
      std::this_thread::sleep_for(50ms);
    std::uint64_t one = 1;
    (void)!::write(efd, &one, sizeof one);
  });
  auto o = units->run(h, {});
  canceler.join();
  ::close(efd);
  ASSERT_TRUE(o.ok()) << o.error().message();
  EXPECT_EQ(o->how, units::HookOutcome::How::kCanceled);
  EXPECT_EQ(units->status(h.unit)->load_state, "not-found");
}

TEST_F(Hooks, WritesOutsideTheDataDirectoriesFail) {
  test::make_dirs(dir / "elsewhere");
  auto h = hook("migrate", "echo x >\"$(pwd)/elsewhere/file\" || exit 7\n");
  auto o = units->run(h, {});
  ASSERT_TRUE(o.ok()) << o.error().message();
  EXPECT_EQ(o->how, units::HookOutcome::How::kExited);
  EXPECT_EQ(o->status, 7);
  EXPECT_FALSE(std::filesystem::exists(std::string(dir / "elsewhere/file")));
  // Hidden paths are an empty tmpfs; a missing one is a loud failure, not a silent no-sandbox.
  test::make_dirs(dir / "conf");
  test::write_file(dir / "conf/secret", "k");
  h = hook("health", "ls \"$(pwd)/conf\" | grep -q . && exit 5; exit 0\n");
  h.hidden_paths = {dir / "conf"};
  o = units->run(h, {});
  ASSERT_TRUE(o.ok()) << o.error().message();
  EXPECT_TRUE(o->passed()) << o->describe(h.timeout);
}

TEST_F(Hooks, AMissingProgramOrNameClashIsReported) {
  auto h = hook("backup", "exit 0\n");
  h.exec = dir / "no-such-hook";
  auto o = units->run(h, {});
  ASSERT_TRUE(o.ok()) << o.error().message();
  EXPECT_FALSE(o->passed());
  EXPECT_EQ(o->how, units::HookOutcome::How::kExited);
  EXPECT_EQ(o->status, 203);  // EXIT_EXEC
}

TEST_F(Hooks, StopsHooksALostDaemonLeftRunning) {
  // A hook another connection started (as a daemon that then died would have), still running.
  auto other = SystemdUnits::connect(Bus::kUser);
  ASSERT_TRUE(other.ok());
  auto h = hook("migrate", "touch \"$(pwd)/data/running\"\nexec sleep 60\n");
  std::thread runner([&] { (void)(*other)->run(h, {}); });
  for (int i = 0; i < 100 && !std::filesystem::exists(std::string(dir / "data/running")); ++i)
    std::this_thread::sleep_for(50ms);
  auto stopped = units->stop_leftovers("demo");
  ASSERT_TRUE(stopped.ok()) << stopped.error().message();
  EXPECT_EQ(*stopped, std::vector<std::string>{h.unit});
  runner.join();
  EXPECT_TRUE(units->stop_leftovers("demo")->empty());
}

TEST_F(Hooks, AHeldHookRunsOnlyOnceReleased) {
  auto h = hook("migrate", "echo ran >\"$(pwd)/data/ran\"\necho migrated\n");
  bool checked = false;
  h.hold_budget = 10s;
  h.before_release = [&]() -> Result<void> {
    // Set up and waiting: the unit runs, the hook has not.
    auto st = units->status(h.unit);
    checked = st.ok() && st->active_state == "activating" && !test::exists(dir / "data/ran");
    return {};
  };
  auto o = units->run(h, {});
  ASSERT_TRUE(o.ok()) << o.error().message();
  EXPECT_TRUE(checked);
  EXPECT_TRUE(o->passed()) << o->describe(h.timeout);
  EXPECT_EQ(o->tail, std::vector<std::string>{"migrated"});  // the hold's line is not output
  EXPECT_TRUE(test::exists(dir / "data/ran"));

  // Not released: the hook never runs, and the error is before_release's.
  std::filesystem::remove(std::string(dir / "data/ran"));
  h = hook("migrate", "echo ran >\"$(pwd)/data/ran\"\n");
  h.before_release = []() -> Result<void> { return Error(ErrorCode::kFailed, "stop failed"); };
  o = units->run(h, {});
  ASSERT_FALSE(o.ok());
  EXPECT_EQ(o.error().message(), "stop failed");
  EXPECT_FALSE(test::exists(dir / "data/ran"));
  EXPECT_EQ(units->status(h.unit)->load_state, "not-found");
}
