// Plans (activation/plan.h): the steps of each kind of activation, refusals, downtime
// predictions from history, and the JSON document. That a plan equals what an execution then
// does is checked against a real systemd (tests/integration/activation_test.cpp).

#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>

#include "upgraded/activation/activator.h"
#include "upgraded/activation/plan.h"

using namespace upgraded;
using activation::Plan;
using activation::plan_activation;
using activation::PlanContext;
using store::AppState;
using store::ReleaseStatus;

namespace {

artifact::Manifest manifest(const std::string& version, std::vector<std::string> units,
                            artifact::Strategy strategy = artifact::Strategy::kAllAtOnce,
                            std::vector<std::string> hooks = {}) {
  artifact::Manifest m;
  m.app = "db";
  m.version = version;
  m.units = std::move(units);
  m.strategy = strategy;
  m.health = {2, 30};
  for (const auto& h : hooks)
    m.hooks[h] = artifact::Hook{"hooks/" + h, 45};
  return m;
}

struct Fixture {
  AppState st;
  std::map<std::string, artifact::Manifest> manifests;
  PlanContext ctx;

  Fixture(const std::vector<artifact::Manifest>& ms, const std::string& current) {
    st.app = "db";
    for (const auto& m : ms) {
      st.releases[m.version] = store::ReleaseRecord{ReleaseStatus::kGood, false, "", 0, {}};
      manifests[m.version] = m;
    }
    if (!current.empty()) st.current = current;
    ctx.manifest = [this](const std::string& v) -> Result<artifact::Manifest> {
      auto it = manifests.find(v);
      if (it == manifests.end()) return Error(ErrorCode::kNotFound, "no manifest " + v);
      return it->second;
    };
    ctx.job_timeout_s = 90;
  }

  Plan plan(const std::string& version, bool rollback = false) {
    auto p = plan_activation(st, version, rollback, ctx);
    EXPECT_TRUE(p.ok()) << p.error().message();
    return p.ok() ? *p : Plan{};
  }
};

}  // namespace

TEST(Plan, AllAtOnceRestartsEveryUnitThenGatesThemTogether) {
  Fixture f(
      {manifest("1.0", {"a.service", "b.service"}), manifest("2.0", {"a.service", "b.service"})},
      "1.0");
  auto p = f.plan("2.0");
  EXPECT_EQ(p.keys(), (std::vector<std::string>{"switch:2.0", "restart:a.service",
                                                "restart:b.service", "gate:", "mark-good:2.0"}));
  EXPECT_EQ(p.strategy, "all-at-once");
  EXPECT_EQ(p.from, "1.0");
  EXPECT_EQ(p.to, "2.0");
  EXPECT_EQ(p.steps[1].units_down, (std::vector<std::string>{"a.service"}));
  EXPECT_EQ(p.steps[1].timeout_s, 90u);
  EXPECT_EQ(p.steps[3].timeout_s, 30u);
  EXPECT_EQ(p.steps[3].min_ready_s, 2u);
  EXPECT_FALSE(p.refusal);
  EXPECT_NE(p.on_failure.find("1.0 comes back"), std::string::npos) << p.on_failure;
  for (const auto& s : p.steps)
    EXPECT_TRUE(s.reversible) << s.key();
}

TEST(Plan, OneByOneGatesEachUnitAndRunsTheHealthHookAfterEach) {
  const auto obo = artifact::Strategy::kOneByOne;
  Fixture f(
      {manifest("1.0", {"a.service", "b.service"}, obo),
       manifest("2.0", {"a.service", "b.service"}, obo, {"pre_upgrade", "health", "post_upgrade"})},
      "1.0");
  auto p = f.plan("2.0");
  EXPECT_EQ(p.keys(), (std::vector<std::string>{
                          "hook:pre_upgrade", "switch:2.0", "restart:a.service", "gate:a.service",
                          "hook:health:a.service", "restart:b.service", "gate:b.service",
                          "hook:health:b.service", "hook:post_upgrade", "mark-good:2.0"}));
  EXPECT_EQ(p.steps[0].timeout_s, 45u);
  EXPECT_NE(p.on_failure.find("units after it are never touched"), std::string::npos);
}

TEST(Plan, AMigrateStopsTheOldUnitsInReverseAndStartsTheNewOnes) {
  Fixture f({manifest("1.0", {"a.service", "b.service"}),
             manifest("2.0", {"a.service", "b.service"}, artifact::Strategy::kAllAtOnce,
                      {"pre_upgrade", "migrate", "health", "post_upgrade"})},
            "1.0");
  auto p = f.plan("2.0");
  EXPECT_EQ(p.keys(), (std::vector<std::string>{
                          "hook:pre_upgrade", "stop:b.service", "stop:a.service", "switch:2.0",
                          "hook:migrate", "start:a.service", "start:b.service",
                          "gate:", "hook:health", "hook:post_upgrade", "mark-good:2.0"}));
  // Down from the stops until each one's start.
  EXPECT_EQ(p.steps[4].units_down, (std::vector<std::string>{"b.service", "a.service"}));
  EXPECT_EQ(p.steps[5].units_down, (std::vector<std::string>{"a.service", "b.service"}));
  EXPECT_EQ(p.steps[6].units_down, (std::vector<std::string>{"b.service"}));
  // Going back never migrates.
  f.st.current = "2.0";
  f.st.previous = "1.0";
  auto back = f.plan("", /*rollback=*/true);
  EXPECT_EQ(back.to, "1.0");
  EXPECT_EQ(back.keys(), (std::vector<std::string>{"switch:1.0", "restart:a.service",
                                                   "restart:b.service", "gate:", "mark-good:1.0"}));
  EXPECT_NE(back.on_failure.find("not bounced back"), std::string::npos);
}

TEST(Plan, RefusalsAreThePlanAndChangeNothing) {
  Fixture f({manifest("1.0", {"a.service"}), manifest("2.0", {"a.service"})}, "1.0");
  f.st.releases["2.0"].status = ReleaseStatus::kBad;
  auto bad = f.plan("2.0");
  ASSERT_TRUE(bad.refusal);
  EXPECT_EQ(bad.refusal->code(), ErrorCode::kPolicyRefused);
  EXPECT_TRUE(bad.steps.empty());
  f.ctx.allow_bad = true;
  EXPECT_FALSE(f.plan("2.0").refusal);
  auto missing = f.plan("9.0");
  ASSERT_TRUE(missing.refusal);
  EXPECT_EQ(missing.refusal->code(), ErrorCode::kNotFound);
  auto current = f.plan("1.0");
  EXPECT_TRUE(current.already_current);
  EXPECT_TRUE(current.steps.empty());
  auto json = nlohmann::json::parse(activation::plan_to_json(current));
  EXPECT_EQ(json["changes"], false);
  Fixture none({manifest("1.0", {"a.service"})}, "1.0");
  auto no_target = none.plan("", /*rollback=*/true);
  ASSERT_TRUE(no_target.refusal);
  EXPECT_EQ(no_target.refusal->code(), ErrorCode::kNotFound);
}

TEST(Plan, AnUpgradePathRefusalNamesTheWayAndThroughWalksIt) {
  auto m2 = manifest("2.0", {"a.service"});
  auto m3 = manifest("3.0", {"a.service"});
  m3.upgrade_from = {"2.*"};
  Fixture f({manifest("1.0", {"a.service"}), m2, m3}, "1.0");
  auto refused = f.plan("3.0");
  ASSERT_TRUE(refused.refusal);
  EXPECT_NE(refused.refusal->message().find("staged path: 1.0 \u2192 2.0 \u2192 3.0"),
            std::string::npos)
      << refused.refusal->message();
  f.ctx.through_path = true;
  auto walk = f.plan("3.0");
  ASSERT_FALSE(walk.refusal) << walk.refusal->message();
  EXPECT_EQ(walk.path, (std::vector<std::string>{"1.0", "2.0", "3.0"}));
  EXPECT_EQ(walk.keys(), (std::vector<std::string>{"switch:2.0", "restart:a.service",
                                                   "gate:", "mark-good:2.0", "switch:3.0",
                                                   "restart:a.service", "gate:", "mark-good:3.0"}));
  EXPECT_EQ(walk.steps[4].release, "3.0");
}

TEST(Plan, PredictsEachUnitsDowntimeFromItsLastTwentyWindows) {
  Fixture f(
      {manifest("1.0", {"a.service", "b.service"}), manifest("2.0", {"a.service", "b.service"})},
      "1.0");
  auto p = f.plan("2.0");
  ASSERT_EQ(p.downtime.size(), 2u);
  EXPECT_EQ(p.downtime[0].samples, 0u) << "no history: no prediction";
  EXPECT_FALSE(p.predicted_total_usec);
  // 25 windows of a: 1000..25000 µs; only the last 20 (6000..25000) count.
  for (int i = 1; i <= 25; ++i) {
    store::HistoryEntry h;
    h.op = "activate";
    h.downtime_usec["a.service"] = static_cast<std::uint64_t>(i) * 1000;
    if (i > 22) h.downtime_usec["b.service"] = 7000;
    f.ctx.history.push_back(h);
  }
  p = f.plan("2.0");
  ASSERT_EQ(p.downtime.size(), 2u);
  EXPECT_EQ(p.downtime[0].samples, 20u);
  EXPECT_EQ(p.downtime[0].median_usec, 15500u);  // (15000 + 16000) / 2
  EXPECT_EQ(p.downtime[0].p95_usec, 24000u);     // nearest rank: the 19th of 20
  EXPECT_EQ(p.downtime[1].samples, 3u);
  EXPECT_EQ(p.downtime[1].median_usec, 7000u);
  ASSERT_TRUE(p.predicted_total_usec);
  EXPECT_EQ(*p.predicted_total_usec, 22500u);
  auto json = nlohmann::json::parse(activation::plan_to_json(p));
  EXPECT_EQ(json["format"], 1);
  EXPECT_EQ(json["predicted_total_usec"], 22500);
  EXPECT_EQ(json["downtime"][0]["p95_usec"], 24000);
  EXPECT_EQ(json["steps"].size(), 5u);
  EXPECT_EQ(json["steps"][1]["units_down"][0], "a.service");
}

TEST(Plan, AnInterruptedActivationIsRecoveredFirstAndADataFormatChangeIsNamed) {
  auto m2 = manifest("2.0", {"a.service"});
  m2.data_format = {2, 1};
  auto m1 = manifest("1.0", {"a.service"});
  m1.data_format = {1, 1};
  Fixture f({m1, m2}, "1.0");
  f.st.finalized_data_format = 1;
  auto p = f.plan("2.0");
  EXPECT_EQ(p.pre_finalized_format, 2u);
  // Its outcome decides what follows: the plan is the recovery alone, and it changes things
  // even for a release that is current or refused.
  f.ctx.pending = store::PendingActivation{"activate", "0.9", "1.0", "", "", "restart", {}};
  for (const std::string v : {"2.0", "1.0", "9.9"}) {
    p = f.plan(v);
    EXPECT_EQ(p.keys(), (std::vector<std::string>{"recover:1.0"})) << v;
    EXPECT_EQ(p.recover_first, "1.0");
    EXPECT_FALSE(p.refusal) << v;
    EXPECT_FALSE(p.already_current) << v;
    EXPECT_NE(p.on_failure.find("plan again once it is"), std::string::npos);
    EXPECT_EQ(nlohmann::json::parse(activation::plan_to_json(p))["changes"], true);
  }
}

TEST(Plan, OneByOneWithoutUnitsGatesAndRunsTheHealthHookOnce) {
  Fixture f({manifest("1.0", {}), manifest("2.0", {}, artifact::Strategy::kOneByOne, {"health"})},
            "1.0");
  EXPECT_EQ(f.plan("2.0").keys(),
            (std::vector<std::string>{"switch:2.0", "gate:", "hook:health", "mark-good:2.0"}));
}

TEST(Plan, PredictsTheTotalPerActivationOfAWalkAndTheLongestWindowOfAMigrate) {
  auto m3 = manifest("3.0", {"a.service", "b.service"});
  m3.upgrade_from = {"2.*"};
  Fixture f({manifest("1.0", {"a.service", "b.service"}),
             manifest("2.0", {"a.service", "b.service"}), m3},
            "1.0");
  store::HistoryEntry h;
  h.downtime_usec = {{"a.service", 1000}, {"b.service", 3000}};
  f.ctx.history = {h};
  f.ctx.through_path = true;
  auto walk = f.plan("3.0");
  ASSERT_EQ(walk.path.size(), 3u);
  ASSERT_TRUE(walk.predicted_total_usec);
  EXPECT_EQ(*walk.predicted_total_usec, 8000u) << "two activations of 1 + 3 ms";
  Fixture g(
      {manifest("1.0", {"a.service", "b.service"}),
       manifest("2.0", {"a.service", "b.service"}, artifact::Strategy::kAllAtOnce, {"migrate"})},
      "1.0");
  g.ctx.history = {h};
  auto migrate = g.plan("2.0");
  ASSERT_TRUE(migrate.predicted_total_usec);
  EXPECT_EQ(*migrate.predicted_total_usec, 3000u) << "stopped together: the longest";
}

TEST(UnitsTouched, CountsOnlyWhatFitsAOneByOneRelease) {
  store::PendingActivation p{"activate", "1.0", "2.0", "", "", "restart", 2};
  auto obo =
      manifest("2.0", {"a.service", "b.service", "c.service"}, artifact::Strategy::kOneByOne);
  // An older build's record: a count without the units it counted in (their order may have
  // been another): every unit counts as touched.
  EXPECT_EQ(activation::units_touched(p, obo), std::nullopt);
  p.units = obo.units;
  EXPECT_EQ(activation::units_touched(p, obo), 2u);
  p.units_touched = 3;
  EXPECT_EQ(activation::units_touched(p, obo), 3u);
  p.units_touched = 10;
  EXPECT_EQ(activation::units_touched(p, obo), std::nullopt) << "more than its units: all";
  p.units_touched = 2;
  EXPECT_EQ(activation::units_touched(p, manifest("2.0", {"a.service", "b.service"})), std::nullopt)
      << "all-at-once: all";
  EXPECT_EQ(activation::units_touched(p, manifest("2.0", {}, artifact::Strategy::kOneByOne)),
            std::nullopt);
  p.units_touched.reset();
  EXPECT_EQ(activation::units_touched(p, obo), std::nullopt);
}

// Template units and waves (activator.h): what a rolling activation restarts, in which order
// and groups, before anything is asked of systemd.
TEST(Templates, AreTemplatesAndInstancesByName) {
  EXPECT_TRUE(activation::is_template_unit("tablet@.service"));
  EXPECT_FALSE(activation::is_template_unit("tablet@1.service"));
  EXPECT_FALSE(activation::is_template_unit("tablet.service"));
  EXPECT_TRUE(activation::is_instance_of("tablet@1.service", "tablet@.service"));
  EXPECT_TRUE(activation::is_instance_of("tablet@a-b.c.service", "tablet@.service"));
  EXPECT_FALSE(activation::is_instance_of("tablet@1.socket", "tablet@.service"));
  EXPECT_FALSE(activation::is_instance_of("tabletx@1.service", "tablet@.service"));
  EXPECT_FALSE(activation::is_instance_of("tablet@.service", "tablet@.service"));
  EXPECT_FALSE(activation::is_instance_of("tablet@1.service", "tablet@1.service"));
}

TEST(Templates, ExpandIntoThePolicysInstancesOrThoseRunningInVersionOrder) {
  auto m = manifest("2.0", {"ns.service", "tablet@.service", "api.service"},
                    artifact::Strategy::kRolling);
  auto x = activation::expand_templates(m, {"3", "1", "2"}, {});
  ASSERT_TRUE(x.ok()) << x.error().message();
  EXPECT_EQ(x->units,
            (std::vector<std::string>{"ns.service", "tablet@3.service", "tablet@1.service",
                                      "tablet@2.service", "api.service"}))
      << "the policy's order";
  std::vector<std::string> asked;
  auto running = [&asked](const std::string& t) -> Result<std::vector<std::string>> {
    asked.push_back(t);
    return std::vector<std::string>{"tablet@10.service", "tablet@2.service", "other@1.service",
                                    "tablet@.service",   "tablet@9.socket",  "ns.service"};
  };
  x = activation::expand_templates(m, {}, running);
  ASSERT_TRUE(x.ok()) << x.error().message();
  EXPECT_EQ(asked, (std::vector<std::string>{"tablet@.service"}));
  EXPECT_EQ(x->units, (std::vector<std::string>{"ns.service", "tablet@2.service",
                                                "tablet@10.service", "api.service"}))
      << "only its instances, 2 before 10, and ns.service once";
  // None running: refused unless leniently (a release being left, a recovery).
  auto none = [](const std::string&) -> Result<std::vector<std::string>> {
    return std::vector<std::string>{};
  };
  x = activation::expand_templates(m, {}, none);
  ASSERT_FALSE(x.ok());
  EXPECT_EQ(x.error().code(), ErrorCode::kPolicyRefused);
  EXPECT_NE(x.error().message().find("tablet@.service is a template and no instance of it is "
                                     "running; name its instances in the host policy ([apps.db] "
                                     "instances"),
            std::string::npos)
      << x.error().message();
  x = activation::expand_templates(m, {}, none, false);
  ASSERT_TRUE(x.ok());
  EXPECT_EQ(x->units, (std::vector<std::string>{"ns.service", "api.service"}));
  auto failing = [](const std::string&) -> Result<std::vector<std::string>> {
    return Error(ErrorCode::kFailed, "systemd is gone");
  };
  x = activation::expand_templates(m, {}, failing);
  ASSERT_FALSE(x.ok());
  EXPECT_EQ(x.error().message(), "systemd is gone");
  // Journaled instances join those the policy or systemd name, after them.
  x = activation::expand_templates(
      m, {"1", "2"}, {}, true,
      {"tablet@5.service", "tablet@1.service", "other@1.service", "tablet@.service"});
  ASSERT_TRUE(x.ok());
  EXPECT_EQ(x->units,
            (std::vector<std::string>{"ns.service", "tablet@1.service", "tablet@2.service",
                                      "tablet@5.service", "api.service"}));
  x = activation::expand_templates(m, {}, none, true, {"tablet@3.service"});
  ASSERT_TRUE(x.ok()) << "a journaled instance is one";
  EXPECT_EQ(x->units, (std::vector<std::string>{"ns.service", "tablet@3.service", "api.service"}));
  for (const std::string& bad : std::vector<std::string>{"", "a@b", "a/b", std::string(250, 'x')}) {
    x = activation::expand_templates(m, {bad}, {});
    ASSERT_FALSE(x.ok()) << bad;
    EXPECT_EQ(x.error().code(), ErrorCode::kPolicyRefused) << bad;
  }
  std::vector<std::string> many;
  for (int i = 0; i < 255; ++i)
    many.push_back(std::to_string(i));
  EXPECT_FALSE(activation::expand_templates(m, many, {}).ok()) << "257 units";
  many.pop_back();
  EXPECT_TRUE(activation::expand_templates(m, many, {}).ok()) << "256 units";
  // Without templates the manifest comes back as it is, and nothing is asked.
  asked.clear();
  auto plain = manifest("2.0", {"a.service"});
  x = activation::expand_templates(plain, {}, running);
  ASSERT_TRUE(x.ok());
  EXPECT_EQ(x->units, plain.units);
  EXPECT_TRUE(asked.empty());
}

TEST(Templates, JournaledUnitsFitOnlyTheReleaseTheyCameFrom) {
  auto m = manifest("2.0", {"ns.service", "tablet@.service"}, artifact::Strategy::kRolling);
  EXPECT_TRUE(activation::units_fit({"ns.service", "tablet@1.service", "tablet@7.service"}, m));
  EXPECT_TRUE(activation::units_fit({"tablet@1.service"}, m));
  EXPECT_FALSE(activation::units_fit({"ns.service", "sshd.service"}, m));
  EXPECT_FALSE(activation::units_fit({"tablet@.service"}, m)) << "a template is never restarted";
  EXPECT_FALSE(activation::units_fit({"tablet@1.service", "tablet@1.service"}, m));
  EXPECT_FALSE(activation::units_fit({"tablet@1.socket"}, m));
}

TEST(Templates, RollingGroupsConsecutiveInstancesInWavesOfMaxUnavailable) {
  auto units = std::vector<std::string>{"ns.service",       "tablet@1.service", "tablet@2.service",
                                        "tablet@3.service", "api.service",      "web@a.service",
                                        "web@b.service"};
  EXPECT_EQ(activation::waves(manifest("2.0", units, artifact::Strategy::kRolling), 2),
            (std::vector<std::size_t>{1, 3, 4, 5, 7}));
  EXPECT_EQ(activation::waves(manifest("2.0", units, artifact::Strategy::kRolling), 1),
            (std::vector<std::size_t>{1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(activation::waves(manifest("2.0", units, artifact::Strategy::kRolling), 3),
            (std::vector<std::size_t>{1, 4, 5, 7}));
  EXPECT_EQ(activation::waves(manifest("2.0", units, artifact::Strategy::kOneByOne), 3),
            (std::vector<std::size_t>{1, 2, 3, 4, 5, 6, 7}))
      << "one-by-one ignores max_unavailable";
  EXPECT_EQ(activation::waves(manifest("2.0", units), 3), (std::vector<std::size_t>{7}));
  EXPECT_EQ(activation::waves(manifest("2.0", {}, artifact::Strategy::kRolling), 3),
            (std::vector<std::size_t>{0}));
}

TEST(Plan, RollingRestartsAndGatesEachWaveOfInstancesAndTheHealthHookPerInstance) {
  const auto rolling = artifact::Strategy::kRolling;
  const std::vector<std::string> units{"ns.service", "tablet@.service"};
  Fixture f({manifest("1.0", units, rolling), manifest("2.0", units, rolling, {"health"})}, "1.0");
  f.ctx.max_unavailable = 2;
  f.ctx.expand = [](const artifact::Manifest& m, bool require) {
    return activation::expand_templates(m, {"1", "2", "3"}, {}, require);
  };
  auto p = f.plan("2.0");
  EXPECT_EQ(p.keys(),
            (std::vector<std::string>{
                "switch:2.0", "restart:ns.service", "gate:ns.service", "hook:health:ns.service",
                "restart:tablet@1.service", "restart:tablet@2.service", "gate:tablet@1.service",
                "hook:health:tablet@1.service", "gate:tablet@2.service",
                "hook:health:tablet@2.service", "restart:tablet@3.service", "gate:tablet@3.service",
                "hook:health:tablet@3.service", "mark-good:2.0"}));
  EXPECT_EQ(p.strategy, "rolling");
  EXPECT_NE(p.on_failure.find("the failing wave included"), std::string::npos) << p.on_failure;
  // No instance: the plan is the refusal, as the activation would be.
  f.ctx.expand = [](const artifact::Manifest& m, bool require) {
    return activation::expand_templates(
        m, {},
        [](const std::string&) -> Result<std::vector<std::string>> {
          return std::vector<std::string>{};
        },
        require);
  };
  p = f.plan("2.0");
  ASSERT_TRUE(p.refusal);
  EXPECT_EQ(p.refusal->code(), ErrorCode::kPolicyRefused);
  EXPECT_TRUE(p.steps.empty());
}

TEST(InstallPlan, StagesFirstThenActivatesTheNewReleaseAsIfStaged) {
  Fixture f({manifest("1.0", {"a.service"})}, "1.0");
  auto m = manifest("2.0", {"a.service", "b.service"});
  m.upgrade_from = {"1.*"};
  m.payload.size = 1000;
  activation::InstallSpace space{1000, 5000, 1 << 20, 4096};
  auto p = activation::plan_install(f.st, m, space, f.ctx);
  ASSERT_TRUE(p.ok()) << p.error().message();
  EXPECT_EQ(p->op, "install");
  EXPECT_EQ(p->keys(), (std::vector<std::string>{"stage:2.0", "switch:2.0", "restart:a.service",
                                                 "restart:b.service", "gate:", "mark-good:2.0"}));
  EXPECT_FALSE(p->refusal);
  ASSERT_TRUE(p->install);
  EXPECT_EQ(p->install->verdict(), "enough");
  auto doc = nlohmann::json::parse(activation::plan_to_json(*p));
  EXPECT_EQ(doc["install"]["payload_bytes"], 1000);
  EXPECT_EQ(doc["install"]["estimate_bytes"], 5000);
  EXPECT_EQ(doc["install"]["space"], "enough");
  EXPECT_EQ(doc["steps"][0]["kind"], "stage");
  // The state it was given is not changed (the release is only taken as staged).
  EXPECT_EQ(f.st.releases.count("2.0"), 0u);

  // A new app: no current release, nothing to go back to.
  AppState fresh;
  fresh.app = "db";
  auto first = activation::plan_install(fresh, m, space, f.ctx);
  ASSERT_TRUE(first.ok()) << first.error().message();
  EXPECT_EQ(first->from, "");
  EXPECT_EQ(first->keys().front(), "stage:2.0");
  EXPECT_NE(first->on_failure.find("no release to go back to"), std::string::npos);

  // The activation's own refusals stay: not admitted from the current release.
  m.upgrade_from = {"0.*"};
  auto refused = activation::plan_install(f.st, m, space, f.ctx);
  ASSERT_TRUE(refused.ok());
  ASSERT_TRUE(refused->refusal);
  EXPECT_EQ(refused->refusal->code(), ErrorCode::kPolicyRefused);
  EXPECT_TRUE(refused->steps.empty());
}

TEST(InstallPlan, RefusesWhatInstallRefusesBeforeExtracting) {
  Fixture f({manifest("1.0", {"a.service"})}, "1.0");
  activation::InstallSpace space{1000, 1000, 1 << 20, 4096};
  auto refusal = [&](const artifact::Manifest& m, const activation::InstallSpace& s) {
    auto p = activation::plan_install(f.st, m, s, f.ctx);
    EXPECT_TRUE(p.ok());
    EXPECT_TRUE(p->steps.empty());
    EXPECT_TRUE(p->install);
    return p->refusal ? p->refusal->code() : ErrorCode::kFailed;
  };
  EXPECT_EQ(refusal(manifest("1.0", {"a.service"}), space), ErrorCode::kExists);
  EXPECT_EQ(refusal(manifest("1.00", {"a.service"}), space), ErrorCode::kExists);
  f.st.floor = "1.0";
  EXPECT_EQ(refusal(manifest("0.9", {"a.service"}), space), ErrorCode::kPolicyRefused);
  // Not even the payload fits above the reserve: NoSpace; the payload fits but the estimate
  // (the current tree) does not: tight, not refused.
  auto m = manifest("2.0", {"a.service"});
  EXPECT_EQ(refusal(m, {1000, 1000, 4096 + 999, 4096}), ErrorCode::kNoSpace);
  EXPECT_EQ(refusal(m, {1000, 1000, 100, 4096}), ErrorCode::kNoSpace);
  activation::InstallSpace tight{1000, 9000, 4096 + 1000, 4096};
  EXPECT_EQ(tight.verdict(), "tight");
  auto p = activation::plan_install(f.st, m, tight, f.ctx);
  ASSERT_TRUE(p.ok());
  EXPECT_FALSE(p->refusal);
  auto doc = nlohmann::json::parse(activation::plan_to_json(*p));
  EXPECT_EQ(doc["install"]["space"], "tight");
  // The refusal's name in the document, as the CLI maps it to an exit code.
  auto exists = activation::plan_install(f.st, manifest("1.0", {"a.service"}), space, f.ctx);
  EXPECT_EQ(nlohmann::json::parse(activation::plan_to_json(*exists))["refusal"]["error"], "Exists");
}

TEST(InstallPlan, ASetOfInstallsSaysEveryArtifactIsStagedFirst) {
  Fixture f({manifest("1.0", {"a.service"})}, "1.0");
  auto m = manifest("2.0", {"a.service"});
  auto p = activation::plan_install(f.st, m, {1, 1, 1 << 20, 0}, f.ctx);
  ASSERT_TRUE(p.ok());
  auto doc = nlohmann::json::parse(activation::set_plan_to_json({*p, *p}, true));
  EXPECT_EQ(doc["op"], "install-set");
  EXPECT_NE(doc["on_failure"].get<std::string>().find("takes back the ones staged before it"),
            std::string::npos);
  EXPECT_EQ(nlohmann::json::parse(activation::set_plan_to_json({*p}))["op"], "activate-set");
}

TEST(Sockets, AreHeldWhileTheServicesBehindThemRestartAndStopFirstForAMigrate) {
  Fixture f({manifest("1.0", {"web.socket", "web.service"}),
             manifest("2.0", {"web.socket", "web.service"})},
            "1.0");
  bool changed = false;
  f.ctx.unit_status = [&changed](const std::string& unit) -> Result<units::UnitStatus> {
    units::UnitStatus st;
    st.active_state = "active";
    if (unit == "web.socket") {
      st.triggers = {"web.service"};
      st.need_daemon_reload = changed;
    }
    return st;
  };
  auto p = f.plan("2.0");
  EXPECT_EQ(p.keys(), (std::vector<std::string>{"switch:2.0", "hold:web.socket",
                                                "restart:web.service", "gate:", "mark-good:2.0"}));
  EXPECT_TRUE(p.steps[1].units_down.empty());
  EXPECT_NE(p.steps[1].note.find("never stopped"), std::string::npos);
  ASSERT_EQ(p.downtime.size(), 1u);  // the held socket has no window
  EXPECT_EQ(p.downtime[0].unit, "web.service");
  EXPECT_EQ(p.downtime[0].held_by, (std::vector<std::string>{"web.socket"}));
  auto doc = nlohmann::json::parse(activation::plan_to_json(p));
  EXPECT_EQ(doc["downtime"][0]["held_by"], nlohmann::json::array({"web.socket"}));
  EXPECT_EQ(doc["steps"][1]["kind"], "hold");

  // Its unit file changed on disk: still held, as it runs (restarting it is the operator's
  // call), and the plan says so.
  changed = true;
  p = f.plan("2.0");
  EXPECT_EQ(p.steps[1].key(), "hold:web.socket");
  EXPECT_NE(p.steps[1].note.find("changed on disk"), std::string::npos);

  // Not listening (a release that adds it; one that failed): the release's service behind it
  // stops first (it may hold the port), then the socket starts, then the service.
  f.ctx.unit_status = [](const std::string& unit) -> Result<units::UnitStatus> {
    units::UnitStatus st;
    st.active_state = unit == "web.socket" ? "inactive" : "active";
    if (unit == "web.socket") st.triggers = {"web.service", "other.service"};
    return st;
  };
  p = f.plan("2.0");
  EXPECT_EQ(p.keys(),
            (std::vector<std::string>{"switch:2.0", "stop:web.service", "start:web.socket",
                                      "restart:web.service", "gate:", "mark-good:2.0"}));
  EXPECT_EQ(p.steps[2].units_down, (std::vector<std::string>{"web.socket", "web.service"}));
  EXPECT_NE(p.steps[2].note.find("refused"), std::string::npos);
  EXPECT_TRUE(p.downtime[0].held_by.empty());

  // A migrate stops the socket first (no connection may start the service again behind it),
  // then starts both in the release's order.
  f.ctx.unit_status = nullptr;
  f.manifests["2.0"] =
      manifest("2.0", {"web.socket", "web.service"}, artifact::Strategy::kAllAtOnce, {"migrate"});
  p = f.plan("2.0");
  EXPECT_EQ(p.keys(), (std::vector<std::string>{"stop:web.socket", "stop:web.service", "switch:2.0",
                                                "hook:migrate", "start:web.socket",
                                                "start:web.service", "gate:", "mark-good:2.0"}));
}

TEST(Sockets, StopOrderPutsSocketsFirstEachGroupInReverse) {
  EXPECT_EQ(
      activation::stop_order({"a.socket", "a.service", "b.socket", "b.service", "c.timer"}),
      (std::vector<std::string>{"b.socket", "a.socket", "c.timer", "b.service", "a.service"}));
  EXPECT_TRUE(activation::is_socket_unit("web@1.socket"));
  EXPECT_FALSE(activation::is_socket_unit("socket.service"));
}

TEST(Sockets, TemplateSocketsAreHeldPerInstanceAndAServiceBehindTwoSocketsNamesBoth) {
  auto m1 = manifest("1.0", {"web@.socket", "web@.service"});
  auto m2 = manifest("2.0", {"web@.socket", "web@.service"});
  Fixture f({m1, m2}, "1.0");
  f.ctx.expand = [](const artifact::Manifest& m, bool require) {
    return activation::expand_templates(m, {"1", "2"}, nullptr, require);
  };
  auto p = f.plan("2.0");
  EXPECT_EQ(p.keys(),
            (std::vector<std::string>{"switch:2.0", "hold:web@1.socket", "hold:web@2.socket",
                                      "restart:web@1.service", "restart:web@2.service",
                                      "gate:", "mark-good:2.0"}));

  // One service behind two sockets (http and https): both named as holding it.
  Fixture g({manifest("1.0", {"http.socket", "https.socket", "web.service"}),
             manifest("2.0", {"http.socket", "https.socket", "web.service"})},
            "1.0");
  g.ctx.unit_status = [](const std::string& unit) -> Result<units::UnitStatus> {
    units::UnitStatus st;
    st.active_state = "active";
    if (activation::is_socket_unit(unit)) st.triggers = {"web.service"};
    return st;
  };
  auto q = g.plan("2.0");
  ASSERT_EQ(q.downtime.size(), 1u);
  EXPECT_EQ(q.downtime[0].held_by, (std::vector<std::string>{"http.socket", "https.socket"}));
}

TEST(Sockets, GoWithTheUnitAfterThemInWavesAndRunNoHealthHook) {
  auto m1 = manifest("1.0", {"web.socket", "web.service", "api.service"},
                     artifact::Strategy::kOneByOne, {"health"});
  auto m2 = manifest("2.0", {"web.socket", "web.service", "api.service"},
                     artifact::Strategy::kOneByOne, {"health"});
  EXPECT_EQ(activation::waves(m2, 1), (std::vector<std::size_t>{2, 3}));
  Fixture f({m1, m2}, "1.0");
  EXPECT_EQ(f.plan("2.0").keys(),
            (std::vector<std::string>{
                "switch:2.0", "hold:web.socket", "restart:web.service", "gate:web.socket",
                "gate:web.service", "hook:health:web.service", "restart:api.service",
                "gate:api.service", "hook:health:api.service", "mark-good:2.0"}));
  // Listed after its service, a socket still comes first.
  auto late = manifest("2.0", {"web.service", "web.socket"});
  EXPECT_EQ(activation::sockets_first(late).units,
            (std::vector<std::string>{"web.socket", "web.service"}));
}
