// Crash safety of the release store. A helper process runs one operation and is killed with
// SIGKILL at a named crash point (every point, every time it is reached) or at a random moment;
// then the app is recovered, by the next lock() (what every operation does) or by recover_all()
// (what the daemon does at start), and the invariants are checked.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <functional>
#include <random>
#include <thread>

#include "support/store_fixture.h"

using namespace upgraded;
using namespace upgraded::store;
using namespace upgraded::test;

extern char** environ;

namespace {

StoreFixture& fixture() {
  static StoreFixture f;
  return f;
}

const char* const kPoints[] = {"write_file_atomic.before_rename",
                               "state.before_write",
                               "state.after_write",
                               "stage.after_journal",
                               "stage.after_extract",
                               "stage.after_manifest",
                               "stage.after_rename",
                               "stage.after_state",
                               "switch.after_state",
                               "switch.after_symlink_new",
                               "switch.after_symlink_rename",
                               "remove.after_state",
                               "remove.after_delete",
                               "gc.before_remove"};

// Starts the helper with `crash_at` in its environment; returns its pid.
pid_t spawn_helper(const std::vector<std::string>& args, const std::string& crash_at,
                   const std::string& stderr_path = "/dev/null") {
  std::vector<std::string> env_strings;
  for (char** e = environ; *e; ++e)
    if (std::strncmp(*e, "UPGRADED_CRASH_AT=", 18) != 0) env_strings.emplace_back(*e);
  if (!crash_at.empty()) env_strings.push_back("UPGRADED_CRASH_AT=" + crash_at);
  std::vector<char*> envp, argv;
  for (auto& s : env_strings)
    envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> all = {STORE_CRASH_HELPER};
  all.insert(all.end(), args.begin(), args.end());
  for (auto& s : all)
    argv.push_back(s.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 2, stderr_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  int rc = ::posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  EXPECT_EQ(rc, 0);
  return pid;
}

int wait_status(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return status;
}

struct Scenario {
  std::string name;
  std::function<void(const Store&)> setup;  // builds the state before the operation
  std::vector<std::string> args;            // helper arguments after ROOT
};

std::vector<Scenario> scenarios() {
  auto& f = fixture();
  auto base = [&f](const Store& s) {
    f.stage(s, "1.0.0");
    f.stage(s, "1.1.0");
    auto l = s.lock("hello");
    ASSERT_TRUE(s.switch_to(*l, "1.0.0").ok());
    ASSERT_TRUE(s.set_status(*l, "1.0.0", ReleaseStatus::kGood).ok());
    ASSERT_TRUE(s.raise_floor(*l, "1.0.0").ok());
  };
  auto more = [&f, base](const Store& s) {
    base(s);
    f.stage(s, "1.2.0");
    f.stage(s, "2.0.0");
    auto l = s.lock("hello");
    ASSERT_TRUE(s.switch_to(*l, "2.0.0").ok());
  };
  return {
      {"stage", base, {"stage", f.artifact("1.2.0"), f.keys_dir()}},
      {"stage-first", [](const Store&) {}, {"stage", f.artifact("1.0.0"), f.keys_dir()}},
      {"switch", base, {"switch", "hello", "1.1.0"}},
      {"remove", base, {"remove", "hello", "1.1.0"}},
      {"gc", more, {"gc", "hello", "1"}},
      {"pin", base, {"pin", "hello", "1.1.0"}},
      {"mark-good", base, {"good", "hello", "1.1.0"}},
      {"raise-floor", more, {"floor", "hello", "1.2.0"}},
  };
}

}  // namespace

TEST(StoreCrash, RecoversToAConsistentStateAfterAKillAtEveryCrashPoint) {
  int crashes = 0, points_reached = 0;
  for (const auto& sc : scenarios()) {
    for (const char* point : kPoints) {
      bool reached = false;
      for (int n = 1;; ++n) {
        TempDir t;
        std::string root = t / "state";
        {
          auto s = Store::open(fixture().options(root));
          ASSERT_TRUE(s.ok());
          sc.setup(*s);
        }
        auto floor_before = Store::open(fixture().options(root))->state("hello");
        std::optional<std::string> floor = floor_before ? floor_before->floor : std::nullopt;
        std::vector<std::string> args = {root};
        args.insert(args.end(), sc.args.begin(), sc.args.end());
        int status = wait_status(spawn_helper(args, std::string(point) + "#" + std::to_string(n)));
        if (WIFEXITED(status)) {
          ASSERT_EQ(WEXITSTATUS(status), 0) << sc.name << " failed without a crash";
          break;  // the point is reached fewer than n times in this operation
        }
        ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << sc.name << " " << point;
        ++crashes;
        reached = true;
        auto s = Store::open(fixture().options(root));
        ASSERT_TRUE(s.ok()) << sc.name << " " << point << "#" << n << ": " << s.error().message();
        // Before any recovery: an app that a read-only listing would show as needing none is
        // already what its state says (every release listed is there, `current` agrees).
        auto needs = s->needs_recovery("hello");
        if (needs.ok() && !*needs) {
          // Only garbage may be left: files the state does not list, temporary files.
          for (const auto& b : check_store_invariants(s->app_root("hello"), fixture().trees()))
            EXPECT_TRUE(b.rfind("orphan ", 0) == 0 || b.rfind("leftover ", 0) == 0 ||
                        b.find(".tmp.") != std::string::npos)
                << sc.name << " killed at " << point << "#" << n
                << ": needs_recovery() said no, but " << b;
        }
        if (n % 2) {
          ASSERT_TRUE(s->lock("hello").ok()) << sc.name << " " << point;
        } else {
          ASSERT_TRUE(s->recover_all().ok());
          ASSERT_TRUE(s->recovery_errors().empty()) << sc.name << " " << point;
        }
        EXPECT_FALSE(*s->needs_recovery("hello")) << sc.name << " " << point << "#" << n;
        auto bad = check_store_invariants(s->app_root("hello"), fixture().trees(), floor);
        ASSERT_TRUE(bad.empty()) << sc.name << " killed at " << point << "#" << n << ": "
                                 << ::testing::PrintToString(bad);
        // And the store still works: the operation can be repeated to completion.
        int again = wait_status(spawn_helper(args, ""));
        ASSERT_TRUE(WIFEXITED(again)) << sc.name;
        auto after = Store::open(fixture().options(root));
        ASSERT_TRUE(after.ok() && after->recover_all().ok());
        EXPECT_TRUE(
            check_store_invariants(after->app_root("hello"), fixture().trees(), floor).empty());
      }
      points_reached += reached;
    }
  }
  std::printf("crash points reached: %d (scenario x point), crashes checked: %d\n", points_reached,
              crashes);
  EXPECT_GE(points_reached, 30);
}

TEST(StoreCrash, RecoversAfterKillsAtRandomMoments) {
  TempDir t;
  std::string tmpl = t / "template";
  {
    auto s = Store::open(fixture().options(tmpl));
    ASSERT_TRUE(s.ok());
    fixture().stage(*s, "1.0.0");
    auto l = s->lock("hello");
    ASSERT_TRUE(s->switch_to(*l, "1.0.0").ok());
  }
  std::mt19937 rng(20261121);
  std::uniform_int_distribution<int> delay_us(0, 60000);
  const int kKills = 200;
  int killed_mid_operation = 0;
  for (int i = 0; i < kKills; ++i) {
    std::string root = t / ("run" + std::to_string(i));
    ASSERT_EQ(std::system(("cp -a " + tmpl + " " + root).c_str()), 0);
    std::vector<std::string> args = {root, "cycle", "hello", fixture().keys_dir()};
    for (const auto& [v, h] : fixture().trees())
      args.push_back(fixture().artifact(v));
    pid_t pid = spawn_helper(args, "", t / "helper.log");
    std::this_thread::sleep_for(std::chrono::microseconds(delay_us(rng)));
    ::kill(pid, SIGKILL);
    int status = wait_status(pid);
    ASSERT_TRUE(WIFSIGNALED(status))
        << "the cycle stopped by itself (run " << i << "): " << read_file(t / "helper.log");
    killed_mid_operation += WIFSIGNALED(status);
    auto s = Store::open(fixture().options(root));
    ASSERT_TRUE(s.ok()) << "run " << i << ": " << s.error().message();
    ASSERT_TRUE(s->recover_all().ok());
    auto bad = check_store_invariants(s->app_root("hello"), fixture().trees());
    ASSERT_TRUE(bad.empty()) << "run " << i << ": " << ::testing::PrintToString(bad);
    ASSERT_EQ(std::system(("rm -rf " + root).c_str()), 0);
  }
  std::printf("random kills checked: %d\n", killed_mid_operation);
  EXPECT_EQ(killed_mid_operation, kKills);
}
