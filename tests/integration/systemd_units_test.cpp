// SystemdUnits against a real systemd user manager (tests/testbed/with-systemd-user): units
// written by the test, started, stopped and restarted through org.freedesktop.systemd1.

#include <gtest/gtest.h>
#include <time.h>

#include <chrono>
#include <cstdlib>
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
