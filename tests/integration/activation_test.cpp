// Activation against a real systemd user manager: a sample service whose binary lives in the
// release and reports its version; upgrade, a release failing its health gate and rolled back
// automatically, manual rollback, and the policy refusals.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <thread>

#include "support/artifact_builder.h"
#include "support/test_dir.h"
#include "systemd/systemd_units.h"
#include "upgraded/activation/activator.h"
#include "upgraded/artifact/packer.h"

using namespace upgraded;
using namespace upgraded::test;
using namespace std::chrono_literals;

namespace {

class Activation : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* units_dir = std::getenv("UPGRADED_TESTBED_UNITS");
    ASSERT_NE(units_dir, nullptr) << "run inside tests/testbed/with-systemd-user";
    key = make_key(t, "release");
    make_dirs(t / "keys");
    write_file(t / "keys/k.pem", read_file(key.public_path));
    store::StoreOptions o;
    o.root = t / "state";
    o.extract.limits.free_space_reserve = 0;
    auto s = store::Store::open(o);
    ASSERT_TRUE(s.ok());
    st.emplace(std::move(*s));
    auto u = daemon::SystemdUnits::connect(daemon::Bus::kUser);
    ASSERT_TRUE(u.ok()) << u.error().message();
    units = std::move(*u);
    out = t / "hello.out";
    test::write_file(std::string(units_dir) + "/hello.service",
                     "[Service]\nExecStart=" + st->app_root("hello") +
                         "/current/bin/hello\n"
                         "Environment=OUT=" +
                         out + "\n");
    ASSERT_TRUE(units->reload().ok());
  }

  void TearDown() override {
    if (units)
      for (const char* u :
           {"hello.socket", "hello-a.socket", "hello-b.socket", "hello@1.socket", "hello@2.socket",
            "hello.service", "hello-a.service", "hello-b.service", "hello-c.service",
            "hello@1.service", "hello@2.service", "hello@3.service", "hello@a.service",
            "hello@b.service", "hello@c.service"})
        (void)units->stop(u, 10s);
  }

  // A template unit: hello@<name>.service writes the release it runs to t/<name>.out.
  void template_unit() {
    const char* units_dir = std::getenv("UPGRADED_TESTBED_UNITS");
    test::write_file(std::string(units_dir) + "/hello@.service",
                     "[Service]\nExecStart=" + st->app_root("hello") +
                         "/current/bin/hello\nEnvironment=OUT=" + std::string(t.path()) +
                         "/%i.out NAME=%i\n");
    ASSERT_TRUE(units->reload().ok());
  }

  // A release of hello@.service with strategy rolling.
  static std::string rolling_manifest(int min_ready_s) {
    return R"({"units": ["hello@.service"], "strategy": "rolling", "health": {"min_ready_s": )" +
           std::to_string(min_ready_s) + R"(, "deadline_s": 30}})";
  }

  std::vector<units::UnitStatus> instance_status(const std::vector<std::string>& names) {
    std::vector<units::UnitStatus> found;
    for (const auto& name : names) {
      auto u = units->status("hello@" + name + ".service");
      EXPECT_TRUE(u.ok());
      EXPECT_EQ(u->active_state, "active") << name;
      found.push_back(*u);
    }
    return found;
  }

  // Three units of one release, each writing the version it runs to t/<name>.out.
  void three_units() {
    const char* units_dir = std::getenv("UPGRADED_TESTBED_UNITS");
    for (std::string name : {"a", "b", "c"})
      test::write_file(std::string(units_dir) + "/hello-" + name + ".service",
                       "[Service]\nExecStart=" + st->app_root("hello") +
                           "/current/bin/hello\nEnvironment=OUT=" + (t / (name + ".out")) +
                           " NAME=" + name + "\n");
    ASSERT_TRUE(units->reload().ok());
  }

  std::string serving_as(const std::string& name, const std::string& expect) {
    const std::string file = t / (name + ".out");
    for (int i = 0; i < 100 && read_file(file) != expect; ++i)
      std::this_thread::sleep_for(30ms);
    return read_file(file);
  }

  // systemd's InvocationID of a unit: a new one each time it starts.
  static std::string invocation_id(const std::string& unit) {
    std::string cmd = "systemctl --user show -P InvocationID " + unit;
    FILE* p = ::popen(cmd.c_str(), "r");
    if (!p) return "";
    char buf[128] = {};
    std::string id = std::fgets(buf, sizeof buf, p) ? buf : "";
    ::pclose(p);
    return id;
  }

  // Packs and stages a release of the sample service. `fail`: it exits 3 after 0.3 s; with
  // `fail_unit`, only in the unit whose NAME= is that.
  void release(const store::AppLock& lock, const std::string& version, bool fail = false,
               const std::string& extra = "", const std::string& fail_unit = "hello") {
    std::string src = t / ("src-" + version);
    make_dirs(src + "/bin");
    write_file(src + "/bin/hello",
               "#!/bin/sh\nhere=$(dirname \"$(readlink -f \"$0\")\")\n"
               "cat \"$here/../VERSION\" > \"$OUT\"\n"
               "if [ -e \"$here/../fail-${NAME:-hello}\" ]; then sleep 0.3; exit 3; fi\n"
               "exec sleep 1000\n",
               0755);
    write_file(src + "/VERSION", version);
    if (fail) write_file(src + "/fail-" + fail_unit, "");
    write_file(
        t / "extra.json",
        extra.empty()
            ? R"({"units": ["hello.service"], "health": {"min_ready_s": 1, "deadline_s": 30}})"
            : extra);
    artifact::PackOptions o;
    o.key_paths = {key.private_path};
    o.app = "hello";
    o.version = version;
    o.output = t / (version + ".upd");
    o.source_dir = src;
    o.extra_manifest_path = t / "extra.json";
    auto p = artifact::pack(o);
    ASSERT_TRUE(p.ok()) << p.error().message();
    UniqueFd fd(::open(o.output.c_str(), O_RDONLY | O_CLOEXEC));
    auto r = st->stage(lock, fd.get(), keyring_of({key}), artifact::TrustPolicy{});
    ASSERT_TRUE(r.ok()) << r.error().message();
  }

  // What the service reports. A Type=simple start is "done" once systemd has forked it, so wait
  // (bounded) for the script to have written its version.
  std::string serving(const std::string& expect = "") {
    for (int i = 0; i < 100 && !expect.empty() && read_file(out) != expect; ++i)
      std::this_thread::sleep_for(30ms);
    return read_file(out);
  }

  TempDir t;
  TestKey key;
  std::optional<store::Store> st;
  std::unique_ptr<daemon::SystemdUnits> units;
  std::string out;
};

}  // namespace

TEST_F(Activation, UpgradesRollsBackAutomaticallyOnAFailedHealthGateAndManually) {
  activation::Activator act(*st, *units);
  auto lock = st->lock("hello");
  ASSERT_TRUE(lock.ok());

  release(*lock, "1.0.0");
  auto v1 = act.activate(*lock, "1.0.0");
  ASSERT_TRUE(v1.ok()) << v1.error().message();
  EXPECT_EQ(serving("1.0.0"), "1.0.0");
  EXPECT_EQ(units->status("hello.service")->active_state, "active");

  release(*lock, "2.0.0");
  // The plan changes nothing, and is what the activation then does.
  const auto before_plan = snapshot(t / "state");
  auto plan = act.plan("hello", "2.0.0", false);
  ASSERT_TRUE(plan.ok()) << plan.error().message();
  EXPECT_EQ(snapshot(t / "state"), before_plan);
  ASSERT_EQ(plan->downtime.size(), 1u);
  EXPECT_EQ(plan->downtime[0].samples, 0u) << "the first activation had no window";
  std::vector<std::string> steps;
  auto v2 = act.activate(*lock, "2.0.0", {},
                         [&](const std::string& step, int) { steps.push_back(step); });
  ASSERT_TRUE(v2.ok()) << v2.error().message();
  EXPECT_EQ(plan->keys(), v2->steps);
  EXPECT_EQ(v2->steps, (std::vector<std::string>{"switch:2.0.0", "restart:hello.service",
                                                 "gate:", "mark-good:2.0.0"}));
  EXPECT_EQ(serving("2.0.0"), "2.0.0");
  EXPECT_EQ(v2->from, "1.0.0");
  ASSERT_EQ(v2->downtime_usec.count("hello.service"), 1u);
  EXPECT_GT(v2->downtime_usec["hello.service"], 0u);
  EXPECT_LT(v2->downtime_usec["hello.service"], 2000000u);
  EXPECT_EQ(steps.front(), "checking");
  EXPECT_EQ(steps.back(), "done");
  auto s2 = st->state("hello");
  EXPECT_EQ(s2->current, "2.0.0");
  EXPECT_EQ(s2->previous, "1.0.0");
  EXPECT_EQ(s2->releases["2.0.0"].status, store::ReleaseStatus::kGood);

  release(*lock, "3.0.0", /*fail=*/true);
  auto v3 = act.activate(*lock, "3.0.0");
  ASSERT_FALSE(v3.ok());
  const std::string& why = v3.error().message();
  EXPECT_NE(why.find("health gate: hello.service exited with status 3 after"), std::string::npos)
      << why;
  EXPECT_NE(why.find("rolled back to 2.0.0"), std::string::npos) << why;
  auto s3 = st->state("hello");
  EXPECT_EQ(s3->current, "2.0.0");
  EXPECT_EQ(s3->releases["3.0.0"].status, store::ReleaseStatus::kBad);
  EXPECT_EQ(serving("2.0.0"), "2.0.0") << "the old release runs again";
  EXPECT_EQ(units->status("hello.service")->active_state, "active");

  auto again = act.activate(*lock, "3.0.0");
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code(), ErrorCode::kPolicyRefused);

  // Manual rollback: the previous release (3.0.0 became previous during the automatic
  // rollback, and it is bad), so roll back explicitly to 1.0.0 through activate.
  auto back = act.activate(*lock, "1.0.0");
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_EQ(serving("1.0.0"), "1.0.0");
  auto rb = act.rollback(*lock);  // previous is 2.0.0 now
  ASSERT_TRUE(rb.ok()) << rb.error().message();
  EXPECT_EQ(serving("2.0.0"), "2.0.0");
  EXPECT_EQ(st->state("hello")->current, "2.0.0");

  auto history = st->history("hello");
  ASSERT_TRUE(history.ok());
  std::vector<std::string> ops;
  for (const auto& h : *history)
    ops.push_back(h.op + ":" + h.to + ":" + h.result);
  EXPECT_EQ(ops, (std::vector<std::string>{"activate:1.0.0:done", "activate:2.0.0:done",
                                           "activate:3.0.0:rolled-back", "activate:1.0.0:done",
                                           "rollback:2.0.0:done"}));
  EXPECT_NE((*history)[2].message.find("status 3"), std::string::npos);
}

TEST_F(Activation, SocketUnitsAreHeldAndStartedOnlyWhenNotListeningAsThePlanSays) {
  const char* units_dir = std::getenv("UPGRADED_TESTBED_UNITS");
  test::write_file(std::string(units_dir) + "/hello.socket",
                   "[Socket]\nListenStream=" + (t / "hello.sock") + "\n");
  ASSERT_TRUE(units->reload().ok());
  activation::Activator act(*st, *units);
  auto lock = st->lock("hello");
  ASSERT_TRUE(lock.ok());
  // What each activation did is what its plan said, step for step.
  auto planned = [&](const std::string& version) {
    auto plan = act.plan("hello", version, false);
    EXPECT_TRUE(plan.ok()) << plan.error().message();
    auto done = act.activate(*lock, version);
    EXPECT_TRUE(done.ok()) << done.error().message();
    EXPECT_EQ(plan->keys(), done->steps) << version;
    return done.ok() ? done->steps : std::vector<std::string>{};
  };
  release(*lock, "0.9.0");
  planned("0.9.0");
  const std::string service = invocation_id("hello.service");
  // A release that adds the socket, listed after its service: the socket comes first, and as
  // it does not listen yet, the service behind it stops first.
  const std::string units_json = R"({"units": ["hello.service", "hello.socket"], )"
                                 R"("health": {"min_ready_s": 1, "deadline_s": 30}})";
  release(*lock, "1.0.0", false, units_json);
  EXPECT_EQ(planned("1.0.0"),
            (std::vector<std::string>{"switch:1.0.0", "stop:hello.service", "start:hello.socket",
                                      "restart:hello.service", "gate:", "mark-good:1.0.0"}));
  EXPECT_NE(invocation_id("hello.service"), service);
  auto listening = units->status("hello.socket");
  ASSERT_TRUE(listening.ok());
  EXPECT_EQ(listening->active_state, "active");
  // Then held: never restarted, in an upgrade or a rollback.
  release(*lock, "2.0.0", false, units_json);
  EXPECT_EQ(planned("2.0.0"),
            (std::vector<std::string>{"switch:2.0.0", "hold:hello.socket", "restart:hello.service",
                                      "gate:", "mark-good:2.0.0"}));
  auto plan = act.plan("hello", "", true);
  ASSERT_TRUE(plan.ok());
  auto back = act.rollback(*lock);
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_EQ(plan->keys(), back->steps);
  EXPECT_EQ(units->status("hello.socket")->active_enter_usec, listening->active_enter_usec);
  EXPECT_EQ(serving("1.0.0"), "1.0.0");
}

TEST_F(Activation, TwoSocketsOfOneServiceAndTheInstancesOfATemplateSocketAreHeld) {
  const char* units_dir = std::getenv("UPGRADED_TESTBED_UNITS");
  for (std::string name : {"a", "b"})
    test::write_file(
        std::string(units_dir) + "/hello-" + name + ".socket",
        "[Socket]\nListenStream=" + (t / (name + ".sock")) + "\nService=hello.service\n");
  test::write_file(std::string(units_dir) + "/hello@.socket",
                   "[Socket]\nListenStream=" + std::string(t.path()) + "/%i.sock\n");
  template_unit();
  activation::Activator act(*st, *units);
  auto lock = st->lock("hello");
  ASSERT_TRUE(lock.ok());
  activation::ActivationOptions o;
  o.instances = {"1", "2"};
  auto planned = [&](const std::string& version) {
    auto plan = act.plan("hello", version, false, o);
    EXPECT_TRUE(plan.ok()) << plan.error().message();
    auto done = act.activate(*lock, version, o);
    EXPECT_TRUE(done.ok()) << done.error().message();
    EXPECT_EQ(plan->keys(), done->steps) << version;
    return plan.ok() ? *plan : activation::Plan{};
  };
  const std::string two = R"({"units": ["hello.service", "hello-a.socket", "hello-b.socket"], )"
                          R"("health": {"min_ready_s": 0, "deadline_s": 30}})";
  release(*lock, "1.0.0", false, two);
  planned("1.0.0");
  const auto a = units->status("hello-a.socket")->active_enter_usec;
  const auto b = units->status("hello-b.socket")->active_enter_usec;
  release(*lock, "2.0.0", false, two);
  auto plan = planned("2.0.0");
  EXPECT_EQ(plan.keys(),
            (std::vector<std::string>{"switch:2.0.0", "hold:hello-a.socket", "hold:hello-b.socket",
                                      "restart:hello.service", "gate:", "mark-good:2.0.0"}));
  ASSERT_EQ(plan.downtime.size(), 1u);
  EXPECT_EQ(plan.downtime[0].held_by,
            (std::vector<std::string>{"hello-a.socket", "hello-b.socket"}));
  EXPECT_EQ(units->status("hello-a.socket")->active_enter_usec, a);
  EXPECT_EQ(units->status("hello-b.socket")->active_enter_usec, b);
  EXPECT_EQ(serving("2.0.0"), "2.0.0");

  // Instances of a template socket, each holding its instance of the template service.
  const std::string templ = R"({"units": ["hello@.service", "hello@.socket"], )"
                            R"("health": {"min_ready_s": 0, "deadline_s": 30}})";
  release(*lock, "3.0.0", false, templ);
  planned("3.0.0");
  const auto one = units->status("hello@1.socket")->active_enter_usec;
  release(*lock, "4.0.0", false, templ);
  plan = planned("4.0.0");
  EXPECT_EQ(plan.keys(),
            (std::vector<std::string>{"switch:4.0.0", "hold:hello@1.socket", "hold:hello@2.socket",
                                      "restart:hello@1.service", "restart:hello@2.service",
                                      "gate:", "mark-good:4.0.0"}));
  ASSERT_EQ(plan.downtime.size(), 2u);
  EXPECT_EQ(plan.downtime[0].held_by, (std::vector<std::string>{"hello@1.socket"}));
  EXPECT_EQ(units->status("hello@1.socket")->active_enter_usec, one);
  EXPECT_EQ(serving_as("2", "4.0.0"), "4.0.0");
}

TEST_F(Activation, RefusesReleasesItCannotActivateSafely) {
  activation::Activator act(*st, *units);
  auto lock = st->lock("hello");
  release(*lock, "1.0.0");
  ASSERT_TRUE(act.activate(*lock, "1.0.0").ok());
  release(*lock, "2.0.0", false, R"({"units": ["hello.service"], "upgrade_from": ["0.9.*"]})");
  auto path = act.activate(*lock, "2.0.0");
  ASSERT_FALSE(path.ok());
  EXPECT_EQ(path.error().code(), ErrorCode::kPolicyRefused);
  EXPECT_NE(path.error().message().find("upgrade_from"), std::string::npos);
  release(
      *lock, "2.1.0", false,
      R"({"units": ["hello.service"], "hooks": {"migrate": {"path": "bin/hello", "timeout_s": 5}}})");
  auto hooks = act.activate(*lock, "2.1.0");
  ASSERT_FALSE(hooks.ok());
  EXPECT_NE(hooks.error().message().find("hooks"), std::string::npos);
  ASSERT_TRUE(st->record_finalized_data_format(*lock, 5).ok());
  release(*lock, "2.2.0", false,
          R"({"units": ["hello.service"], "data_format": {"writes": 4, "reads_min": 1}})");
  auto format = act.activate(*lock, "2.2.0");
  ASSERT_FALSE(format.ok());
  EXPECT_NE(format.error().message().find("finalized"), std::string::npos);
  EXPECT_EQ(st->state("hello")->current, "1.0.0") << "a refusal switches nothing";
  EXPECT_EQ(serving("1.0.0"), "1.0.0");
}

// One by one: each unit restarted only once the one before it passed its whole gate (systemd's
// timestamps show when each left and reached "active"); a unit failing its gate rolls back the
// units moved so far, and the ones after it are never touched.
TEST_F(Activation, OneByOneGatesEachUnitBeforeTheNextAndRollsBackOnlyTheUnitsItMoved) {
  three_units();
  activation::Activator act(*st, *units);
  auto lock = st->lock("hello");
  ASSERT_TRUE(lock.ok());
  const std::string extra =
      R"({"units": ["hello-a.service", "hello-b.service", "hello-c.service"],
          "strategy": "one-by-one", "health": {"min_ready_s": 1, "deadline_s": 30}})";
  release(*lock, "1.0.0", false, extra);
  ASSERT_TRUE(act.activate(*lock, "1.0.0").ok());
  release(*lock, "2.0.0", false, extra);
  auto plan = act.plan("hello", "2.0.0", false);
  ASSERT_TRUE(plan.ok()) << plan.error().message();
  std::vector<std::string> steps;
  auto v2 = act.activate(*lock, "2.0.0", {},
                         [&](const std::string& step, int) { steps.push_back(step); });
  ASSERT_TRUE(v2.ok()) << v2.error().message();
  EXPECT_EQ(plan->keys(), v2->steps);
  EXPECT_EQ(v2->steps.size(), 8u);  // switch, 3 x (restart, gate), mark-good
  for (std::string name : {"a", "b", "c"})
    EXPECT_EQ(serving_as(name, "2.0.0"), "2.0.0") << name;
  std::vector<units::UnitStatus> s;
  for (std::string name : {"a", "b", "c"}) {
    auto u = units->status("hello-" + name + ".service");
    ASSERT_TRUE(u.ok());
    EXPECT_EQ(u->active_state, "active");
    s.push_back(*u);
  }
  for (std::size_t k = 0; k + 1 < s.size(); ++k)
    EXPECT_GE(s[k + 1].active_exit_usec, s[k].active_enter_usec + 1000000)
        << "unit " << k + 2 << " left active before unit " << k + 1 << " had been active for "
        << "min_ready_s";
  EXPECT_EQ(v2->downtime_usec.size(), 3u);
  const std::vector<std::string> expected{
      "restarting hello-a.service (1/3)", "health gate: hello-a.service (1/3)",
      "restarting hello-b.service (2/3)", "health gate: hello-b.service (2/3)",
      "restarting hello-c.service (3/3)", "health gate: hello-c.service (3/3)"};
  std::vector<std::string> unit_steps;
  for (const auto& step : steps)
    if (step.rfind("restarting ", 0) == 0 || step.rfind("health gate", 0) == 0)
      unit_steps.push_back(step);
  EXPECT_EQ(unit_steps, expected);

  // 3.0.0 fails in hello-b only: a and b go back to 2.0.0, c keeps its 2.0.0 processes.
  const std::string c_before = invocation_id("hello-c.service");
  ASSERT_FALSE(c_before.empty());
  const std::string a_before = invocation_id("hello-a.service");
  release(*lock, "3.0.0", true, extra, "b");
  auto v3 = act.activate(*lock, "3.0.0");
  ASSERT_FALSE(v3.ok());
  const std::string& why = v3.error().message();
  EXPECT_NE(why.find("health gate: hello-b.service exited with status 3"), std::string::npos)
      << why;
  EXPECT_NE(why.find("rolled back to 2.0.0 (never restarted: hello-c.service)"), std::string::npos)
      << why;
  EXPECT_EQ(invocation_id("hello-c.service"), c_before) << "hello-c was touched";
  EXPECT_NE(invocation_id("hello-a.service"), a_before) << "hello-a was not moved";
  for (std::string name : {"a", "b", "c"}) {
    EXPECT_EQ(serving_as(name, "2.0.0"), "2.0.0") << name;
    EXPECT_EQ(units->status("hello-" + name + ".service")->active_state, "active") << name;
  }
  auto after = st->state("hello");
  EXPECT_EQ(after->current, "2.0.0");
  EXPECT_EQ(after->releases["3.0.0"].status, store::ReleaseStatus::kBad);
  EXPECT_FALSE(*st->pending_activation("hello")) << "the journal record is gone";
  auto history = st->history("hello");
  ASSERT_TRUE(history.ok());
  EXPECT_EQ(history->back().result, "rolled-back");
  EXPECT_NE(history->back().message.find("never restarted: hello-c.service"), std::string::npos);

  // hello-c restarted by systemd (here: by hand) after the switch started from the new
  // release: it is not left alone then.
  release(*lock, "3.1.0", true, extra, "b");
  auto v31 = act.activate(*lock, "3.1.0", {}, [&](const std::string& step, int) {
    if (step == "restarting hello-b.service (2/3)") {
      ASSERT_EQ(std::system("systemctl --user restart hello-c.service"), 0);
    }
  });
  ASSERT_FALSE(v31.ok());
  EXPECT_EQ(v31.error().message().find("never restarted"), std::string::npos)
      << v31.error().message();
  for (std::string name : {"a", "b", "c"})
    EXPECT_EQ(serving_as(name, "2.0.0"), "2.0.0") << name;
  EXPECT_EQ(st->state("hello")->current, "2.0.0");
}

// Rolling over the instances of a template unit: hello@<name>.service writes the release it runs
// to t/<name>.out (fail_unit names the instance that fails).
TEST_F(Activation, RollingMovesTheInstancesOfATemplateInWavesAndRollsBackOnlyThoseItMoved) {
  template_unit();
  activation::Activator act(*st, *units);
  auto lock = st->lock("hello");
  ASSERT_TRUE(lock.ok());
  const std::string extra = rolling_manifest(1);
  activation::ActivationOptions o;
  o.instances = {"1", "2", "3"};
  release(*lock, "1.0.0", false, extra);
  ASSERT_TRUE(act.activate(*lock, "1.0.0", o).ok());
  for (std::string name : {"1", "2", "3"})
    EXPECT_EQ(serving_as(name, "1.0.0"), "1.0.0") << name;

  // One at a time: each instance left active only once the one before had soaked.
  release(*lock, "2.0.0", false, extra);
  auto plan = act.plan("hello", "2.0.0", false, o);
  ASSERT_TRUE(plan.ok()) << plan.error().message();
  std::vector<std::string> steps;
  auto v2 =
      act.activate(*lock, "2.0.0", o, [&](const std::string& step, int) { steps.push_back(step); });
  ASSERT_TRUE(v2.ok()) << v2.error().message();
  EXPECT_EQ(plan->keys(), v2->steps);
  EXPECT_EQ(v2->steps, (std::vector<std::string>{"switch:2.0.0", "restart:hello@1.service",
                                                 "gate:hello@1.service", "restart:hello@2.service",
                                                 "gate:hello@2.service", "restart:hello@3.service",
                                                 "gate:hello@3.service", "mark-good:2.0.0"}));
  EXPECT_NE(std::find(steps.begin(), steps.end(), "restarting hello@2.service (2/3)"), steps.end());
  auto s = instance_status({"1", "2", "3"});
  for (std::size_t k = 0; k + 1 < s.size(); ++k)
    EXPECT_GE(s[k + 1].active_exit_usec, s[k].active_enter_usec + 1000000) << "instance " << k + 2;
  for (std::string name : {"1", "2", "3"})
    EXPECT_EQ(serving_as(name, "2.0.0"), "2.0.0") << name;
  EXPECT_EQ(v2->downtime_usec.size(), 3u);

  // Two at a time: instances 1 and 2 restarted together, 3 after both soaked.
  o.max_unavailable = 2;
  release(*lock, "2.1.0", false, extra);
  plan = act.plan("hello", "2.1.0", false, o);
  auto v21 = act.activate(*lock, "2.1.0", o);
  ASSERT_TRUE(v21.ok()) << v21.error().message();
  EXPECT_EQ(plan->keys(), v21->steps);
  EXPECT_EQ(v21->steps, (std::vector<std::string>{"switch:2.1.0", "restart:hello@1.service",
                                                  "restart:hello@2.service", "gate:hello@1.service",
                                                  "gate:hello@2.service", "restart:hello@3.service",
                                                  "gate:hello@3.service", "mark-good:2.1.0"}));
  s = instance_status({"1", "2", "3"});
  EXPECT_LT(s[1].active_exit_usec, s[0].active_enter_usec + 1000000) << "1 and 2: one wave";
  EXPECT_GE(s[2].active_exit_usec, s[1].active_enter_usec + 1000000) << "3 after the wave";

  // 3.0.0 fails in instance 2, one at a time: 1 and 2 back on 2.1.0, 3 never restarted.
  o.max_unavailable = 1;
  const std::string third = invocation_id("hello@3.service");
  const std::string first = invocation_id("hello@1.service");
  release(*lock, "3.0.0", true, extra, "2");
  auto v3 = act.activate(*lock, "3.0.0", o);
  ASSERT_FALSE(v3.ok());
  EXPECT_NE(v3.error().message().find("health gate: hello@2.service exited with status 3"),
            std::string::npos)
      << v3.error().message();
  EXPECT_NE(v3.error().message().find("rolled back to 2.1.0 (never restarted: hello@3.service)"),
            std::string::npos)
      << v3.error().message();
  EXPECT_EQ(invocation_id("hello@3.service"), third) << "instance 3 was touched";
  EXPECT_NE(invocation_id("hello@1.service"), first) << "instance 1 was not moved";
  for (std::string name : {"1", "2", "3"}) {
    EXPECT_EQ(serving_as(name, "2.1.0"), "2.1.0") << name;
    EXPECT_EQ(units->status("hello@" + name + ".service")->active_state, "active") << name;
  }
  EXPECT_EQ(st->state("hello")->current, "2.1.0");
  EXPECT_EQ(st->state("hello")->releases["3.0.0"].status, store::ReleaseStatus::kBad);

  // Two at a time, failing in instance 3: the whole of the second wave and the first go back.
  o.max_unavailable = 2;
  release(*lock, "3.1.0", true, extra, "3");
  auto v31 = act.activate(*lock, "3.1.0", o);
  ASSERT_FALSE(v31.ok());
  EXPECT_NE(v31.error().message().find("hello@3.service"), std::string::npos);
  EXPECT_EQ(v31.error().message().find("never restarted"), std::string::npos);
  for (std::string name : {"1", "2", "3"})
    EXPECT_EQ(serving_as(name, "2.1.0"), "2.1.0") << name;
}

TEST_F(Activation, RollingWithoutAPolicyTakesTheRunningInstancesAndRefusesWhenNoneRuns) {
  template_unit();
  activation::Activator act(*st, *units);
  auto lock = st->lock("hello");
  ASSERT_TRUE(lock.ok());
  const std::string extra = rolling_manifest(0);
  release(*lock, "1.0.0", false, extra);
  auto none = act.activate(*lock, "1.0.0");
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.error().code(), ErrorCode::kPolicyRefused);
  EXPECT_NE(none.error().message().find("no instance of it is running"), std::string::npos)
      << none.error().message();
  EXPECT_FALSE(st->state("hello")->current) << "nothing changed";
  activation::ActivationOptions o;
  o.instances = {"a", "b", "c"};
  ASSERT_TRUE(act.activate(*lock, "1.0.0", o).ok());
  ASSERT_TRUE(units->stop("hello@b.service", 10s).ok());
  release(*lock, "2.0.0", false, extra);
  auto v2 = act.activate(*lock, "2.0.0");
  ASSERT_TRUE(v2.ok()) << v2.error().message();
  EXPECT_EQ(v2->steps, (std::vector<std::string>{"switch:2.0.0", "restart:hello@a.service",
                                                 "gate:hello@a.service", "restart:hello@c.service",
                                                 "gate:hello@c.service", "mark-good:2.0.0"}));
  EXPECT_EQ(units->status("hello@b.service")->active_state, "inactive") << "a stopped instance";
  EXPECT_EQ(serving_as("a", "2.0.0"), "2.0.0");
  EXPECT_EQ(serving_as("c", "2.0.0"), "2.0.0");
  // An instance that failed is restored by a rollback too (an upgrade leaves it alone).
  ASSERT_EQ(std::system("systemctl --user kill -s KILL hello@c.service"), 0);
  for (int i = 0; i < 100 && units->status("hello@c.service")->active_state != "failed"; ++i)
    std::this_thread::sleep_for(30ms);
  ASSERT_EQ(units->status("hello@c.service")->active_state, "failed");
  auto back = act.rollback(*lock);
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_EQ(back->steps,
            (std::vector<std::string>{"switch:1.0.0", "restart:hello@a.service",
                                      "gate:hello@a.service", "restart:hello@c.service",
                                      "gate:hello@c.service", "mark-good:1.0.0"}));
  EXPECT_EQ(serving_as("c", "1.0.0"), "1.0.0");
  // None running: refused, nothing changed.
  for (const char* i : {"a", "c"})
    ASSERT_TRUE(units->stop(std::string("hello@") + i + ".service", 10s).ok());
  release(*lock, "3.0.0", false, extra);
  auto v3 = act.activate(*lock, "3.0.0");
  ASSERT_FALSE(v3.ok());
  EXPECT_EQ(v3.error().code(), ErrorCode::kPolicyRefused);
  EXPECT_EQ(st->state("hello")->current, "1.0.0");
  auto plan = act.plan("hello", "3.0.0", false);
  ASSERT_TRUE(plan.ok());
  ASSERT_TRUE(plan->refusal);
  EXPECT_EQ(plan->refusal->message(), v3.error().message());
}

// A crash mid-rolling: the record's units are what recovery covers, whatever the policy says
// by then; the wave being restarted is restarted again, the ones before it only checked.
TEST_F(Activation, ARollingResumedAfterACrashCoversTheUnitsItJournaled) {
  template_unit();
  activation::Activator act(*st, *units);
  auto lock = st->lock("hello");
  ASSERT_TRUE(lock.ok());
  const std::string extra = rolling_manifest(0);
  activation::ActivationOptions o;
  o.instances = {"1", "2", "3"};
  release(*lock, "1.0.0", false, extra);
  ASSERT_TRUE(act.activate(*lock, "1.0.0", o).ok());
  release(*lock, "2.0.0", false, extra);
  // As the activator leaves it when killed before instance 2's restart.
  store::PendingActivation p{
      "activate", "1.0.0",   "2.0.0", "",
      "",         "restart", 2,       {"hello@1.service", "hello@2.service", "hello@3.service"}};
  ASSERT_TRUE(st->begin_activation(*lock, p).ok());
  ASSERT_TRUE(st->switch_to(*lock, "2.0.0").ok());
  ASSERT_TRUE(units->restart("hello@1.service", 10s).ok());
  const std::string first = invocation_id("hello@1.service");
  o.instances = {"1", "2"};  // the policy changed meanwhile
  auto r = act.resume(*lock, o);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->steps,
            (std::vector<std::string>{"restart:hello@2.service", "gate:hello@2.service",
                                      "restart:hello@3.service", "gate:hello@3.service"}));
  EXPECT_EQ(invocation_id("hello@1.service"), first) << "it had passed its gate";
  for (std::string name : {"1", "2", "3"})
    EXPECT_EQ(serving_as(name, "2.0.0"), "2.0.0") << name;
  EXPECT_FALSE(*st->pending_activation("hello"));
  EXPECT_EQ(st->state("hello")->releases["2.0.0"].status, store::ReleaseStatus::kGood);

  // Killed in a wave of three (max_unavailable 3), after its first restart, and restarted with
  // max_unavailable 1: the whole wave is restarted again, not only its last instance.
  release(*lock, "3.0.0", false, extra);
  p = {"activate", "2.0.0",   "3.0.0", "",
       "",         "restart", 3,       {"hello@1.service", "hello@2.service", "hello@3.service"}};
  p.max_unavailable = 3;
  ASSERT_TRUE(st->begin_activation(*lock, p).ok());
  ASSERT_TRUE(st->switch_to(*lock, "3.0.0").ok());
  ASSERT_TRUE(units->restart("hello@1.service", 10s).ok());
  o.instances = {"1", "2", "3"};
  r = act.resume(*lock, o);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->steps,
            (std::vector<std::string>{"restart:hello@1.service", "restart:hello@2.service",
                                      "restart:hello@3.service", "gate:hello@1.service",
                                      "gate:hello@2.service", "gate:hello@3.service"}));
  for (std::string name : {"1", "2", "3"})
    EXPECT_EQ(serving_as(name, "3.0.0"), "3.0.0") << name;
}
