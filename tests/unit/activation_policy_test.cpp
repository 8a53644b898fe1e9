// The activation policy without systemd: the data-format rules (every combination of reads_min,
// writes and finalized format, for an activation and a rollback), upgrade paths through
// installed releases, the finalize checks, and how hook output is made printable.

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <optional>

#include "upgraded/activation/activator.h"

using namespace upgraded;
using activation::ActivationChecks;
using activation::check_activation;
using activation::check_finalize;
using activation::find_upgrade_path;
using store::AppState;
using store::ReleaseStatus;

namespace {

artifact::Manifest manifest(const std::string& version, std::uint64_t reads_min,
                            std::uint64_t writes, std::vector<std::string> upgrade_from = {}) {
  artifact::Manifest m;
  m.app = "db";
  m.version = version;
  m.data_format = {writes, reads_min};
  m.upgrade_from = std::move(upgrade_from);
  return m;
}

AppState state_with(const std::vector<artifact::Manifest>& ms, const std::string& current) {
  AppState st;
  st.app = "db";
  for (const auto& m : ms)
    st.releases[m.version] =
        store::ReleaseRecord{ReleaseStatus::kGood, false, "", 0, m.data_format};
  st.current = current;
  return st;
}

}  // namespace

TEST(DataFormat, EveryCombinationOfReadsWritesAndFinalized) {
  for (bool rollback : {false, true})
    for (std::uint64_t reads_min = 0; reads_min <= 3; ++reads_min)
      for (std::uint64_t writes = reads_min; writes <= 3; ++writes)
        for (int finalized = -1; finalized <= 3; ++finalized) {
          auto cur = manifest("5.0.0", 0, 3);
          auto m = manifest("2.0.0", reads_min, writes);
          AppState st = state_with({cur, m}, "5.0.0");
          if (finalized >= 0) st.finalized_data_format = static_cast<std::uint64_t>(finalized);
          const bool allowed = finalized < 0 || (reads_min <= std::uint64_t(finalized) &&
                                                 std::uint64_t(finalized) <= writes);
          auto r = check_activation(st, m, ActivationChecks{false, rollback, false, true});
          EXPECT_EQ(r.ok(), allowed) << "reads_min " << reads_min << " writes " << writes
                                     << " finalized " << finalized << " rollback " << rollback;
          if (!r.ok()) {
            EXPECT_EQ(r.error().code(), ErrorCode::kPolicyRefused);
          }
        }
}

TEST(DataFormat, RefusalsSayWhyInWords) {
  auto v1 = manifest("1.0.0", 1, 1), v2 = manifest("2.0.0", 1, 2), v3 = manifest("3.0.0", 2, 3);
  AppState st = state_with({v1, v2, v3}, "2.0.0");
  st.finalized_data_format = 2;
  st.finalized_at = "2026-11-20T10:00:00Z";
  st.last_backup = "snap-0042";
  auto r = check_activation(st, v1, ActivationChecks{false, true, false, true});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().message(),
            "1.0.0 reads data formats 1\u20131; format 2 was finalized on 2026-11-20T10:00:00Z; "
            "restore backup 'snap-0042' to go back");
  st.last_backup.reset();
  r = check_activation(st, v1, ActivationChecks{false, true, false, true});
  EXPECT_NE(r.error().message().find("there is no backup to go back to"), std::string::npos);
  st.finalized_data_format = 1;
  r = check_activation(st, v3, ActivationChecks{});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().message(),
            "3.0.0 reads data formats 2\u20133, but the data is in format 1 (finalized); activate "
            "and finalize a release that writes format 2 first");
}

TEST(DataFormat, PatchReleasesOfOneFormatMoveFreely) {
  auto a = manifest("2.0.0", 1, 2), b = manifest("2.0.1", 1, 2);
  AppState st = state_with({a, b}, "2.0.1");
  st.finalized_data_format = 2;
  EXPECT_TRUE(check_activation(st, a, ActivationChecks{false, true, false, true}).ok());
  st.current = "2.0.0";
  EXPECT_TRUE(check_activation(st, b, ActivationChecks{}).ok());
}

TEST(DataFormat, PreFinalizedIsWritesAboveTheFinalizedFormat) {
  auto v1 = manifest("1.0.0", 1, 1), v2 = manifest("2.0.0", 1, 2);
  AppState st = state_with({v1, v2}, "2.0.0");
  st.finalized_data_format = 1;
  EXPECT_TRUE(st.pre_finalized());
  st.finalized_data_format = 2;
  EXPECT_FALSE(st.pre_finalized());
  st.current = "1.0.0";
  st.finalized_data_format = 1;
  EXPECT_FALSE(st.pre_finalized());
}

TEST(Hooks, OfflineActivationRefusesReleasesWithActivationHooks) {
  auto v1 = manifest("1.0.0", 1, 1), v2 = manifest("2.0.0", 1, 1);
  v2.hooks["migrate"] = artifact::Hook{"hooks/migrate", 60};
  AppState st = state_with({v1, v2}, "1.0.0");
  auto r = check_activation(st, v2, ActivationChecks{false, false, false, false});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("only the daemon runs"), std::string::npos);
  EXPECT_TRUE(check_activation(st, v2, ActivationChecks{}).ok());
  // backup and finalize take no part in an activation.
  v2.hooks.clear();
  v2.hooks["backup"] = artifact::Hook{"hooks/backup", 60};
  EXPECT_FALSE(activation::has_activation_hooks(v2));
  EXPECT_TRUE(check_activation(st, v2, ActivationChecks{false, false, false, false}).ok());
}

TEST(UpgradePath, NamesTheChainThroughInstalledReleases) {
  auto v1 = manifest("1.0.0", 1, 1), v2 = manifest("2.1.0", 1, 1, {"1.*"}),
       v2b = manifest("2.0.0", 1, 1, {"1.*"}), v3 = manifest("3.0.0", 1, 1, {"2.*"});
  std::map<std::string, artifact::Manifest> ms{
      {"1.0.0", v1}, {"2.0.0", v2b}, {"2.1.0", v2}, {"3.0.0", v3}};
  AppState st = state_with({v1, v2, v2b, v3}, "1.0.0");
  auto refused = check_activation(st, v3, ActivationChecks{});
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().message(), "3.0.0 cannot be activated from 1.0.0 (upgrade_from: 2.*)");
  // Of two equally short chains, the one through the newer release.
  EXPECT_EQ(find_upgrade_path(st, ms, "3.0.0"),
            (std::vector<std::string>{"1.0.0", "2.1.0", "3.0.0"}));
  // A bad release is no step; with none left there is no path.
  st.releases["2.1.0"].status = ReleaseStatus::kBad;
  EXPECT_EQ(find_upgrade_path(st, ms, "3.0.0"),
            (std::vector<std::string>{"1.0.0", "2.0.0", "3.0.0"}));
  st.releases["2.0.0"].status = ReleaseStatus::kBad;
  EXPECT_TRUE(find_upgrade_path(st, ms, "3.0.0").empty());
  // Directly reachable: the path is the one step.
  st.releases["2.0.0"].status = ReleaseStatus::kGood;
  EXPECT_EQ(find_upgrade_path(st, ms, "2.0.0"), (std::vector<std::string>{"1.0.0", "2.0.0"}));
}

TEST(UpgradePath, AppliesToUpgradesOnly) {
  // 23.1.1 upgrades only from 23.1.*; going back to it from 23.2.0 is a downgrade, which the
  // data formats bound instead.
  auto a = manifest("23.1.1", 230, 231, {"23.1.*"}), b = manifest("23.2.0", 231, 232, {"23.1.*"});
  AppState st = state_with({a, b}, "23.2.0");
  st.finalized_data_format = 231;
  EXPECT_TRUE(check_activation(st, a, ActivationChecks{}).ok());
  st.finalized_data_format = 232;
  EXPECT_FALSE(check_activation(st, a, ActivationChecks{}).ok());
}

TEST(UpgradePath, EveryStepKeepsTheDataFormatRules) {
  // 2.0.0 writes format 2 (pre-finalized: finalized stays 1); 3.0.0 needs format 2 finalized.
  auto v1 = manifest("1.0.0", 1, 1), v2 = manifest("2.0.0", 1, 2, {"1.*"}),
       v3 = manifest("3.0.0", 2, 3, {"2.*"});
  std::map<std::string, artifact::Manifest> ms{{"1.0.0", v1}, {"2.0.0", v2}, {"3.0.0", v3}};
  AppState st = state_with({v1, v2, v3}, "1.0.0");
  st.finalized_data_format = 1;
  EXPECT_TRUE(find_upgrade_path(st, ms, "3.0.0").empty());
  st.finalized_data_format.reset();
  EXPECT_EQ(find_upgrade_path(st, ms, "3.0.0").size(), 3u);
}

TEST(Finalize, ChecksGoodPendingAndBackup) {
  auto v1 = manifest("1.0.0", 1, 1), v2 = manifest("2.0.0", 1, 2);
  AppState st = state_with({v1, v2}, "2.0.0");
  st.finalized_data_format = 1;
  EXPECT_NE(check_finalize(st, v2, false).error().message().find("declares no backup hook"),
            std::string::npos);
  EXPECT_TRUE(check_finalize(st, v2, true).ok());
  v2.hooks["backup"] = artifact::Hook{"hooks/backup", 60};
  EXPECT_TRUE(check_finalize(st, v2, false).ok());
  st.releases["2.0.0"].status = ReleaseStatus::kActive;
  EXPECT_NE(check_finalize(st, v2, false).error().message().find("not confirmed healthy"),
            std::string::npos);
  st.releases["2.0.0"].status = ReleaseStatus::kGood;
  st.finalized_data_format = 2;
  EXPECT_NE(check_finalize(st, v2, false).error().message().find("nothing to finalize"),
            std::string::npos);
}

TEST(HookOutput, IsMadeValidUtf8WithinItsLimit) {
  using units::printable_line;
  EXPECT_EQ(printable_line("snap-0042"), "snap-0042");
  EXPECT_EQ(printable_line("caf\xc3\xa9 \xe2\x82\xac"), "caf\xc3\xa9 \xe2\x82\xac");
  EXPECT_EQ(printable_line("a\tb"), "a\tb");
  const std::string r = "\xEF\xBF\xBD";
  EXPECT_EQ(printable_line(std::string("a\0b", 3)), "a" + r + "b");
  EXPECT_EQ(printable_line("\x1b[31mred"), r + "[31mred");
  EXPECT_EQ(printable_line("\xff\xfe"), r + r);
  EXPECT_EQ(printable_line("\xc0\xaf"), r + r);                              // overlong '/'
  EXPECT_EQ(printable_line("\xed\xa0\x80"), r + r + r);                      // a surrogate
  EXPECT_EQ(printable_line("\xe2\x82"), r + r);                              // cut short
  EXPECT_EQ(printable_line("\xe2\x82\xac\xe2\x82\xac", 4), "\xe2\x82\xac");  // whole characters
  for (const char* s : {"\xff", "\xc3(", "\xf4\x90\x80\x80", "x\x7f"})
    EXPECT_NO_THROW((void)nlohmann::json(printable_line(s)).dump()) << s;
}

TEST(HookOutput, DescribesEachOutcome) {
  units::HookOutcome o;
  o.run_usec = 200000;
  o.how = units::HookOutcome::How::kExited;
  o.status = 3;
  EXPECT_EQ(o.describe(std::chrono::seconds(5)), "exited with status 3 after 0.2 s");
  o.how = units::HookOutcome::How::kKilled;
  o.status = 9;
  EXPECT_EQ(o.describe(std::chrono::seconds(5)), "was killed by signal 9 after 0.2 s");
  o.how = units::HookOutcome::How::kTimedOut;
  EXPECT_EQ(o.describe(std::chrono::seconds(5)), "timed out after 5 s");
  o.how = units::HookOutcome::How::kFailed;
  o.detail = "resources";
  EXPECT_EQ(o.describe(std::chrono::seconds(5)), "could not run (resources)");
}
