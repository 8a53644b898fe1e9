#include <gtest/gtest.h>

#include "upgraded/store/state.h"

using namespace upgraded;
using namespace upgraded::store;

namespace {

AppState sample() {
  AppState st;
  st.app = "hello";
  st.current = "1.10.0";
  st.previous = "1.9.0";
  st.last_known_good = "1.9.0";
  st.floor = "1.0.0";
  st.finalized_data_format = 2;
  st.releases["1.9.0"] = {ReleaseStatus::kGood, true, "2026-11-21T00:00:00Z", 123, {2, 1}};
  st.releases["1.10.0"] = {ReleaseStatus::kActive, false, "2026-11-21T01:00:00Z", 456, {3, 2}};
  return st;
}

}  // namespace

TEST(StateFile, RoundTripsAndListsReleasesInVersionOrder) {
  auto text = serialize_state(sample());
  auto back = parse_state(text);
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_EQ(*back, sample());
  EXPECT_LT(text.find("\"1.9.0\": {"), text.find("\"1.10.0\": {"));
  EXPECT_EQ(sample().versions_in_order(), (std::vector<std::string>{"1.9.0", "1.10.0"}));
}

TEST(StateFile, RefusesCorruptOrInconsistentContent) {
  std::string good = serialize_state(sample());
  auto replace = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    s.replace(s.find(from), from.size(), to);
    return s;
  };
  for (const auto& bad : {std::string(""), good.substr(0, good.size() / 2),
                          replace("\"current\": \"1.10.0\"", "\"current\": \"7.0\""),
                          replace("\"status\": \"good\"", "\"status\": \"great\""),
                          replace("\"pinned\": true", "\"pinned\": 1"),
                          replace("\"app\": \"hello\"", "\"app\": \"../x\""),
                          replace("\"format\": 1", "\"format\": 9")}) {
    auto r = parse_state(bad);
    EXPECT_FALSE(r.ok()) << bad.substr(0, 60);
  }
}

TEST(AppState, FindsAnInstalledReleaseEqualByVersionOrder) {
  AppState st;
  st.app = "hello";
  st.releases["1.0"] = ReleaseRecord{};
  st.releases["2.0.0"] = ReleaseRecord{};
  EXPECT_EQ(st.installed_as("1.0"), "1.0");
  EXPECT_EQ(st.installed_as("1.00"), "1.0");
  EXPECT_EQ(st.installed_as("01.0"), "1.0");
  EXPECT_EQ(st.installed_as("2.00.000"), "2.0.0");
  EXPECT_EQ(st.installed_as("2.0"), std::nullopt) << "2.0 sorts before 2.0.0";
  EXPECT_EQ(st.installed_as("1.0~rc1"), std::nullopt);
}
