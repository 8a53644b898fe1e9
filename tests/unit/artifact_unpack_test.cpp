#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include "support/artifact_builder.h"
#include "support/raw_tar.h"
#include "support/test_dir.h"
#include "upgraded/artifact/unpack.h"
#include "upgraded/fs/durable.h"

using namespace upgraded;
using namespace upgraded::artifact;
using namespace upgraded::test;

namespace {

class Unpack : public ::testing::Test {
 protected:
  void SetUp() override { build_artifact(t / "a.upd", {key}, raw_tar({file("f", "content")})); }
  Result<UnpackResult> run(const std::string& dest, const Keyring& ring, unsigned threshold = 1) {
    UniqueFd fd(::open((t / "a.upd").c_str(), O_RDONLY | O_CLOEXEC));
    auto parent = fs::open_directory(t.path());
    return unpack_artifact(fd.get(), ring, TrustPolicy{threshold}, ExtractPolicy{}, parent->get(),
                           dest);
  }
  TempDir t;
  TestKey key = make_key(t, "release");
};

}  // namespace

TEST_F(Unpack, RefusesAnExistingDestinationAndLeavesItAlone) {
  make_dirs(t / "out");
  write_file(t / "out/mine", "mine");
  auto r = run("out", keyring_of({key}));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), ErrorCode::kExists);
  EXPECT_EQ(read_file(t / "out/mine"), "mine");
  EXPECT_FALSE(exists(t / "out/f"));
  ::symlink("/tmp", (t / "link").c_str());
  EXPECT_FALSE(run("link", keyring_of({key})).ok());
}

TEST_F(Unpack, RefusesDestinationNamesThatAreNotOneComponent) {
  for (const char* bad : {"", ".", "..", "a/b"}) {
    auto r = run(bad, keyring_of({key}));
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.error().code(), ErrorCode::kInvalidArgument);
  }
}

TEST_F(Unpack, RefusesAWrongKeyOrAnUnmetThresholdAndExtractsNothing) {
  TestKey other = make_key(t, "other");
  auto before = snapshot(t.path());
  auto wrong = run("out", keyring_of({other}));
  ASSERT_FALSE(wrong.ok());
  EXPECT_EQ(wrong.error().code(), ErrorCode::kVerificationFailed);
  auto threshold = run("out", keyring_of({key, other}), 2);
  ASSERT_FALSE(threshold.ok());
  EXPECT_EQ(threshold.error().code(), ErrorCode::kVerificationFailed);
  EXPECT_EQ(snapshot(t.path()), before);
}

TEST_F(Unpack, ProducesTheTreeAndReportsWhatItVerified) {
  auto r = run("out", keyring_of({key}));
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(read_file(t / "out/f"), "content");
  EXPECT_EQ(r->manifest.app, "hello");
  EXPECT_EQ(r->signatures.trusted, std::vector<std::string>{key.id});
  EXPECT_EQ(r->stats.files, 1u);
  for (const auto& [path, desc] : snapshot(t.path()))
    EXPECT_EQ(path.find(".partial"), std::string::npos) << path;
}
