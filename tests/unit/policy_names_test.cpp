#include <gtest/gtest.h>

#include "upgraded/policy/names.h"

using namespace upgraded;
using namespace upgraded::policy;

TEST(AppNames, AcceptTypicalNames) {
  for (const char* n : {"hello", "ozone-om", "openmldb.tablet", "a", "App_2", "x+y"})
    EXPECT_TRUE(validate_app_name(n).ok()) << n;
}

TEST(AppNames, RefuseAnythingThatCouldBecomeAPathTrick) {
  for (std::string n : std::initializer_list<std::string>{
           "", "../x", "a/b", ".", "..", ".hidden", "-rf", "a b", "a\nb", "é", std::string(65, 'a'),
           std::string(300, 'a'), std::string("a\0b", 3)}) {
    auto r = validate_app_name(n);
    EXPECT_FALSE(r.ok()) << quote(n);
    if (!r.ok()) {
      EXPECT_EQ(r.error().code(), ErrorCode::kInvalidArgument);
    }
  }
}

TEST(Versions, AcceptSemverAndDebianStyle) {
  for (const char* v : {"1.0.0", "2.3.4-rc.1", "1.2.3+build.5", "2.0~beta1", "20261121"})
    EXPECT_TRUE(validate_version(v).ok()) << v;
}

TEST(Versions, RefusePathComponentsAndOverlongOnes) {
  for (std::string v :
       std::initializer_list<std::string>{"", "../x", "a/b", "..", ".1", std::string(129, '1'),
                                          std::string(300, '1'), "1.0 ", "1\t0", "1:2.0"})
    EXPECT_FALSE(validate_version(v).ok()) << quote(v);
}

TEST(UnitNames, NeedAKnownSuffixAndSafeCharacters) {
  EXPECT_TRUE(validate_unit_name("hello.service").ok());
  EXPECT_TRUE(validate_unit_name("tablet@1.service").ok());
  EXPECT_TRUE(validate_unit_name("x.socket").ok());
  EXPECT_FALSE(validate_unit_name("hello").ok());
  EXPECT_FALSE(validate_unit_name(".service").ok());
  EXPECT_FALSE(validate_unit_name("a b.service").ok());
  EXPECT_FALSE(validate_unit_name("../x.service").ok());
}

TEST(Utf8, RecognisesWellFormedAndMalformedSequences) {
  EXPECT_TRUE(is_valid_utf8("plain"));
  EXPECT_TRUE(is_valid_utf8("caf\xc3\xa9"));
  EXPECT_TRUE(is_valid_utf8("\xf0\x9f\x98\x80"));
  EXPECT_FALSE(is_valid_utf8("\xff"));
  EXPECT_FALSE(is_valid_utf8("\xc3"));              // truncated
  EXPECT_FALSE(is_valid_utf8("\xc0\xaf"));          // overlong '/'
  EXPECT_FALSE(is_valid_utf8("\xed\xa0\x80"));      // surrogate
  EXPECT_FALSE(is_valid_utf8("\xf4\x90\x80\x80"));  // above U+10FFFF
}

TEST(RelativePaths, RefuseTraversalAbsoluteAndOddComponents) {
  EXPECT_TRUE(validate_relative_path("bin/hello").ok());
  for (std::string p : std::initializer_list<std::string>{
           "", "/etc/passwd", "../x", "a/../b", "a/..", "./a", "a//b", "a/./b", "a/",
           "a\x01"
           "b",
           std::string("bad\xff"), std::string(256, 'n'), std::string(5000, 'a')}) {
    auto r = validate_relative_path(p);
    EXPECT_FALSE(r.ok()) << quote(p);
    if (!r.ok()) {
      EXPECT_EQ(r.error().code(), ErrorCode::kPolicyRefused);
    }
  }
}

TEST(Quote, EscapesControlAndNonAsciiBytes) {
  EXPECT_EQ(quote("a\nb\x01\xff'"), "'a\\nb\\x01\\xff\\''");
  EXPECT_EQ(quote(std::string(300, 'x')).size(), 200u + 2 + 3);
}
