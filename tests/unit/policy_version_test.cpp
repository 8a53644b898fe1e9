#include <gtest/gtest.h>

#include "upgraded/policy/version.h"

using upgraded::policy::compare_versions;
using upgraded::policy::version_matches;

TEST(VersionOrder, ComparesNumericRunsAsNumbers) {
  EXPECT_LT(compare_versions("1.9", "1.10"), 0);
  EXPECT_GT(compare_versions("2.0.0", "1.99.99"), 0);
  EXPECT_EQ(compare_versions("1.0", "1.00"), 0);
  EXPECT_EQ(compare_versions("1.2.3", "1.2.3"), 0);
}

TEST(VersionOrder, SortsTildeBeforeEverythingLikeDpkg) {
  EXPECT_LT(compare_versions("1.0~rc1", "1.0"), 0);
  EXPECT_LT(compare_versions("1.0~~", "1.0~"), 0);
  EXPECT_LT(compare_versions("1.0", "1.0a"), 0);
  EXPECT_LT(compare_versions("1.0a", "1.0+b"), 0);
  EXPECT_LT(compare_versions("1.0", "1.0.1"), 0);
}

TEST(VersionOrder, IsATotalOrderOnASample) {
  std::vector<std::string> v = {"0.9",  "1.0~beta", "1.0", "1.0.1", "1.1",
                                "1.10", "2.0~rc1",  "2.0", "10"};
  for (std::size_t i = 0; i < v.size(); ++i)
    for (std::size_t j = 0; j < v.size(); ++j) {
      int c = compare_versions(v[i], v[j]);
      EXPECT_EQ(c < 0, i < j) << v[i] << " vs " << v[j];
      EXPECT_EQ(c == 0, i == j) << v[i] << " vs " << v[j];
    }
}

TEST(VersionPatterns, MatchExactPrefixAndAny) {
  EXPECT_TRUE(version_matches("1.2.3", "*"));
  EXPECT_TRUE(version_matches("1.2.3", "1.2.*"));
  EXPECT_FALSE(version_matches("1.3.0", "1.2.*"));
  EXPECT_TRUE(version_matches("1.2.3", "1.2.3"));
  EXPECT_FALSE(version_matches("1.2.30", "1.2.3"));
}
