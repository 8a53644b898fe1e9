// The extraction helper, spawned as the daemon spawns it: it extracts a verified artifact, it
// refuses a manifest other than the verified one, a cancel kills it, and its sandbox refuses
// what an extractor never needs.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <spawn.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "sandbox/extract_child.h"
#include "support/artifact_builder.h"
#include "support/raw_tar.h"
#include "support/test_dir.h"
#include "upgraded/artifact/verifier.h"
#include "upgraded/fs/durable.h"

using namespace upgraded;
using namespace upgraded::test;

namespace {

class SandboxExtract : public ::testing::Test {
 protected:
  void SetUp() override {
    key = make_key(t, "k");
    make_dirs(t / "dest");
  }

  Result<artifact::ExtractStats> run(const std::string& payload, int cancel_fd = -1,
                                     const std::string& manifest_override = "") {
    build_artifact(t / "a.upd", {key}, payload);
    UniqueFd fd(::open((t / "a.upd").c_str(), O_RDONLY | O_CLOEXEC));
    auto art = artifact::open_verified(fd.get(), keyring_of({key}), artifact::TrustPolicy{});
    EXPECT_TRUE(art.ok());
    auto dest = fs::open_directory(t / "dest");
    sandbox::ExtractRequest rq;
    rq.helper = UPGRADED_EXTRACT_HELPER;
    rq.artifact_fd = fd.get();
    rq.manifest_bytes = manifest_override.empty() ? art->manifest_bytes : manifest_override;
    rq.policy.limits.free_space_reserve = 0;
    rq.dest_dirfd = dest->get();
    rq.cancel_fd = cancel_fd;
    return sandbox::extract_in_child(rq);
  }

  TempDir t;
  TestKey key;
};

}  // namespace

TEST_F(SandboxExtract, ExtractsAVerifiedArtifactInTheHelper) {
  auto r = run(raw_tar({dir("bin"), file("bin/hello", "#!/bin/sh\n", 0755), file("VERSION", "1")}));
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->files, 2u);
  EXPECT_EQ(r->directories, 1u);
  EXPECT_EQ(read_file(t / "dest/VERSION"), "1");
  EXPECT_EQ(::access((t / "dest/bin/hello").c_str(), X_OK), 0);
}

TEST_F(SandboxExtract, RefusesAManifestOtherThanTheVerifiedOneAndWritesNothing) {
  auto before = snapshot(t / "dest");
  auto r = run(raw_tar({file("f", "x")}), -1, R"({"not": "the manifest"})");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), ErrorCode::kVerificationFailed) << r.error().message();
  EXPECT_EQ(snapshot(t / "dest"), before);
}

TEST_F(SandboxExtract, PassesPolicyRefusalsThrough) {
  auto r = run(raw_tar({file("../escape", "x")}));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), ErrorCode::kPolicyRefused) << r.error().message();
  EXPECT_NE(::access((t / "escape").c_str(), F_OK), 0);
}

TEST_F(SandboxExtract, ACancelKillsTheHelper) {
  UniqueFd ev(::eventfd(1, EFD_CLOEXEC));  // already signaled
  auto r = run(raw_tar({file("f", std::string(1 << 20, 'x'))}), ev.get());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), ErrorCode::kCanceled);
  // Reaped: no zombie child is left.
  EXPECT_EQ(::waitpid(-1, nullptr, WNOHANG), -1);
  EXPECT_EQ(errno, ECHILD);
}

TEST_F(SandboxExtract, TheSandboxRefusesWhatAnExtractorNeverNeeds) {
  int out[2];
  ASSERT_EQ(::pipe2(out, O_CLOEXEC), 0);
  UniqueFd dest = std::move(*fs::open_directory(t / "dest"));
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  posix_spawn_file_actions_adddup2(&fa, dest.get(), 4);
  char* argv[] = {const_cast<char*>("upgraded-extract"), const_cast<char*>("--probe-sandbox"),
                  nullptr};
  char* envp[] = {nullptr};
  pid_t pid;
  ASSERT_EQ(::posix_spawn(&pid, UPGRADED_EXTRACT_HELPER, &fa, nullptr, argv, envp), 0);
  posix_spawn_file_actions_destroy(&fa);
  ::close(out[1]);
  std::string text;
  char buf[4096];
  for (ssize_t n; (n = ::read(out[0], buf, sizeof buf)) > 0;)
    text.append(buf, static_cast<std::size_t>(n));
  ::close(out[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << text;
  auto probe = nlohmann::json::parse(text);
  const std::string eperm = std::strerror(EPERM);
  EXPECT_TRUE(probe["seccomp"].get<bool>());
  EXPECT_TRUE(probe["capabilities_dropped"].get<bool>());
  EXPECT_EQ(probe["socket"], eperm) << "no D-Bus, no network";
  EXPECT_EQ(probe["execve"], eperm);
  EXPECT_EQ(probe["kill_init"], eperm) << "no signals to other processes";
  EXPECT_EQ(probe["setuid"], eperm);
  EXPECT_EQ(probe["create_inside"], "allowed");
  if (probe["landlock_abi"].get<int>() > 0) {
    EXPECT_EQ(probe["create_outside"], std::string(std::strerror(EACCES)))
        << "Landlock confines writes to the destination";
  } else {
    std::fprintf(stderr, "note: this kernel has no Landlock; writes are not confined\n");
  }
  EXPECT_EQ(::access("/tmp/upgraded-probe-outside", F_OK), -1);
}
