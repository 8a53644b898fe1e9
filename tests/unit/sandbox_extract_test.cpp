// The helper, spawned as the daemon spawns it: it reads an artifact's head, checks signatures,
// extracts a verified artifact (as an unprivileged uid when run as root, the tree handed back
// to root afterwards), refuses a manifest other than the verified one, dies on a cancel, and
// its sandbox refuses what it never needs.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <seccomp.h>
#include <spawn.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "sandbox/extract_child.h"
#include "sandbox/landlock.h"
#include "support/artifact_builder.h"
#include "support/raw_tar.h"
#include "support/test_dir.h"
#include "upgraded/artifact/container.h"
#include "upgraded/artifact/verifier.h"
#include "upgraded/fs/chown_tree.h"
#include "upgraded/fs/durable.h"

using namespace upgraded;
using namespace upgraded::test;
using namespace std::chrono_literals;

namespace {

constexpr uid_t kHelperId = 2147483646;

sandbox::Helper helper() {
  sandbox::Helper h{UPGRADED_EXTRACT_HELPER, {}};
  if (::geteuid() == 0) h.as = std::make_pair(kHelperId, kHelperId);
  return h;
}

class SandboxExtract : public ::testing::Test {
 protected:
  void SetUp() override {
    key = make_key(t, "k");
    make_dirs(t / "dest");
  }

  UniqueFd artifact(const std::string& payload,
                    artifact::Compression compression = artifact::Compression::kNone) {
    BuildOptions o;
    o.compression = compression;
    build_artifact(t / "a.upd", {key}, payload, o);
    return UniqueFd(::open((t / "a.upd").c_str(), O_RDWR | O_CLOEXEC));
  }

  Result<artifact::ExtractStats> run(
      const std::string& payload, int cancel_fd = -1,
      const std::function<void(int fd)>& tamper = {},
      artifact::Compression compression = artifact::Compression::kNone) {
    UniqueFd fd = artifact(payload, compression);
    auto head = artifact::ContainerReader::open(fd.get());
    EXPECT_TRUE(head.ok());
    auto art = artifact::open_verified(fd.get(), keyring_of({key}), artifact::TrustPolicy{});
    EXPECT_TRUE(art.ok());
    if (tamper) tamper(fd.get());
    auto dest = fs::open_directory(t / "dest");
    sandbox::ExtractRequest rq;
    rq.artifact_fd = fd.get();
    rq.manifest_bytes = art->manifest_bytes;
    rq.payload_offset = artifact::canonical_payload_offset((*head)->manifest_bytes().size(),
                                                           (*head)->signature_bytes().size());
    rq.policy.limits.free_space_reserve = 0;
    rq.policy.read_only = true;
    rq.dest_dirfd = dest->get();
    rq.cancel_fd = cancel_fd;
    return sandbox::extract_in_child(helper(), rq);
  }

  TempDir t;
  TestKey key;
};

}  // namespace

TEST_F(SandboxExtract, ExtractsAVerifiedArtifactAndHandsTheTreeBackToItsOwner) {
  auto r = run(raw_tar({dir("bin"), file("bin/hello", "#!/bin/sh\n", 0755), file("VERSION", "1"),
                        symlink_to("current", "bin")}));
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->files, 2u);
  EXPECT_EQ(r->directories, 1u);
  EXPECT_EQ(read_file(t / "dest/VERSION"), "1");
  EXPECT_EQ(::access((t / "dest/bin/hello").c_str(), X_OK), 0);
  for (const char* p : {"dest", "dest/bin", "dest/bin/hello", "dest/VERSION", "dest/current"}) {
    struct stat st {};
    ASSERT_EQ(::lstat((t / p).c_str(), &st), 0) << p;
    EXPECT_EQ(st.st_uid, ::geteuid()) << p;
    EXPECT_EQ(st.st_gid, ::getegid()) << p;
    EXPECT_EQ(st.st_mode & 0222, S_ISLNK(st.st_mode) ? st.st_mode & 0222 : 0u) << p;
  }
}

// The helper creates files with the modes the extractor gives them, whatever umask the daemon
// passed on (here 077, which would leave 0400 and 0500): it sets its own to 0, and tells the
// extractor, which cannot read it from /proc in the sandbox.
// (And whatever default ACL the tree inherited: the helper can tell, and then gives every file
// its fchmod.)
TEST_F(SandboxExtract, GivesFilesTheirModesWhateverTheDaemonsUmaskOrADefaultAcl) {
  const std::string payload =
      raw_tar({dir("bin", 0755), file("bin/tool", "x", 0755), file("README", "y", 0644)});
  auto mode_of = [](const std::string& path) {
    struct stat st {};
    EXPECT_EQ(::lstat(path.c_str(), &st), 0) << path;
    return st.st_mode & 07777;
  };
  for (bool acl : {false, true}) {
    SCOPED_TRACE(acl ? "a default ACL, others: nothing" : "umask 077");
    if (acl) {  // a fresh destination; the read-only tree goes when `t` does
      std::filesystem::rename(t / "dest", t / "dest-umask");
      make_dirs(t / "dest");
    }
    if (acl && !set_default_acl(t / "dest", 07, 05, 0))
      UPGRADED_SKIP_UNLESS_CI("the test directory's file system has no ACLs");
    auto r = [&] {
      ScopedUmask mask(acl ? 0 : 077);
      return run(payload);
    }();
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_EQ(mode_of(t / "dest/bin/tool"), 0555u);
    EXPECT_EQ(mode_of(t / "dest/README"), 0444u);
  }
}

TEST_F(SandboxExtract, ExtractsEveryCompressionUnderItsSystemCallAllowlist) {
  // The allowlist was taken from traces; this runs each decompressor, large files across many
  // chunks, the writer threads, links and directories through it.
  std::string big(3u << 20, '\0');
  for (std::size_t i = 0; i < big.size(); ++i)
    big[i] = static_cast<char>((i * 2654435761u) >> 13);
  std::vector<RawEntry> entries = {dir("a"), dir("a/b")};
  for (int i = 0; i < 40; ++i)
    entries.push_back(file("a/b/f" + std::to_string(i), std::string(100 + i, 'x')));
  entries.push_back(file("big", big));
  entries.push_back(symlink_to("link", "a/b/f1"));
  entries.push_back(hardlink_to("hard", "a/b/f2"));
  const std::string tar = raw_tar(entries);
  auto compress = [&](const char* tool) {
    write_file(t / "payload.tar", tar);
    std::string cmd =
        std::string(tool) + " -c " + (t / "payload.tar") + " > " + (t / "payload.out");
    EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
    return read_file(t / "payload.out");
  };
  const std::pair<artifact::Compression, std::string> cases[] = {
      {artifact::Compression::kNone, tar},
      {artifact::Compression::kZstd, zstd_compress(tar)},
      {artifact::Compression::kXz, compress("xz -T1")},
      {artifact::Compression::kGzip, compress("gzip")}};
  for (const auto& [compression, payload] : cases) {
    // A fresh destination each time (the tree is read-only; the last one is kept aside).
    ASSERT_EQ(::rename((t / "dest").c_str(),
                       (t / ("dest-" + std::to_string(static_cast<int>(compression)))).c_str()),
              0);
    make_dirs(t / "dest");
    auto r = run(payload, -1, {}, compression);
    ASSERT_TRUE(r.ok()) << static_cast<int>(compression) << ": " << r.error().message();
    EXPECT_EQ(r->files, 41u);
    EXPECT_EQ(read_file(t / "dest/big"), big);
    EXPECT_EQ(read_file(t / "dest/hard"), std::string(102, 'x'));
  }
}

TEST_F(SandboxExtract, ExtractsNamesThatAreNotAscii) {
  // pack writes such names as pax records, which libarchive converts through the locale: the
  // helper starts with an empty environment, in "C", where UTF-8 names cannot be converted.
  make_dirs(t / "src/données");
  write_file(t / "src/données/café.txt", "☕\n");
  write_file(t / "src/日本語", "x");
  std::string cmd = "tar --format=pax -C " + (t / "src") + " -cf " + (t / "pax.tar") + " .";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  auto r = run(read_file(t / "pax.tar"));
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(read_file(t / "dest/données/café.txt"), "☕\n");
  EXPECT_EQ(read_file(t / "dest/日本語"), "x");
}

TEST_F(SandboxExtract, KeepsHardLinksWhenTheTreeIsHandedBack) {
  // pack and unpack keep hard links; the root daemon's hand-back must too (it refused the
  // second name of a file it had just handed over).
  auto r = run(raw_tar({dir("bin"), file("bin/tool", "#!/bin/sh\n", 0755),
                        hardlink_to("bin/tool-alias", "bin/tool"), hardlink_to("third", "bin/tool"),
                        file("other", "y")}));
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->hardlinks, 2u);
  struct stat a {
  }, b{}, c{};
  ASSERT_EQ(::stat((t / "dest/bin/tool").c_str(), &a), 0);
  ASSERT_EQ(::stat((t / "dest/bin/tool-alias").c_str(), &b), 0);
  ASSERT_EQ(::stat((t / "dest/third").c_str(), &c), 0);
  EXPECT_EQ(a.st_ino, b.st_ino);
  EXPECT_EQ(a.st_ino, c.st_ino);
  EXPECT_EQ(a.st_nlink, 3u);
  EXPECT_EQ(a.st_uid, ::geteuid());
}

TEST_F(SandboxExtract, ReadsTheHeadAndChecksSignaturesWithoutTheArtifact) {
  UniqueFd fd = artifact(raw_tar({file("f", "x")}));
  auto head = sandbox::read_head_in_child(helper(), fd.get(), 10s);
  ASSERT_TRUE(head.ok()) << head.error().message();
  sandbox::VerifyRequest vr{
      head->manifest_bytes, head->signature_bytes, 1, {{"k.pem", read_file(key.public_path)}}, {}};
  auto report = sandbox::verify_in_child(helper(), vr, 10s);
  ASSERT_TRUE(report.ok()) << report.error().message();
  EXPECT_EQ(report->trusted, std::vector<std::string>{key.id});

  auto other = make_key(t, "other");
  vr.keys = {{"other.pem", read_file(other.public_path)}};
  report = sandbox::verify_in_child(helper(), vr, 10s);
  ASSERT_FALSE(report.ok());
  EXPECT_EQ(report.error().code(), ErrorCode::kVerificationFailed);

  vr.keys = {{"k.pem", read_file(key.public_path)}};
  vr.manifest_bytes[vr.manifest_bytes.size() / 2] ^= 1;
  report = sandbox::verify_in_child(helper(), vr, 10s);
  ASSERT_FALSE(report.ok());
  EXPECT_EQ(report.error().code(), ErrorCode::kVerificationFailed);

  vr.keys = {{"broken.pem", "not a key"}};
  report = sandbox::verify_in_child(helper(), vr, 10s);
  ASSERT_FALSE(report.ok()) << "a broken trust root is an error, not an empty one";

  UniqueFd junk(::open((t / "junk").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  ASSERT_EQ(::write(junk.get(), "not an artifact", 15), 15);
  auto bad = sandbox::read_head_in_child(helper(), junk.get(), 10s);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code(), ErrorCode::kVerificationFailed) << bad.error().message();
}

TEST_F(SandboxExtract, RefusesAPayloadChangedAfterTheSignatureCheckAndWritesNothing) {
  // The caller keeps its file and may change it after verification: the helper parses nothing
  // before its chunk hash matched.
  auto r = run(raw_tar({file("f", "x")}), -1, [](int fd) {
    struct stat st {};
    ASSERT_EQ(::fstat(fd, &st), 0);
    char last = 0;
    off_t at = st.st_size - 1024 - 1;  // inside the payload, before the end-of-archive blocks
    ASSERT_EQ(::pread(fd, &last, 1, at), 1);
    last ^= 0x20;
    ASSERT_EQ(::pwrite(fd, &last, 1, at), 1);
  });
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), ErrorCode::kVerificationFailed) << r.error().message();
  auto names = fs::list_names(fs::open_directory(t / "dest")->get(), ".");
  EXPECT_TRUE(names->empty());
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

// A wide and deep tree, as a real release has, by one thread and by four: everything is handed
// over, or nothing of it; a refusal names the same entry whatever the number of threads.
TEST(ChownTree, HandsOverAWideDeepTreeOrNothingOfItByAnyNumberOfThreads) {
  UPGRADED_REQUIRE_ROOT();  // to own files as another uid
  TempDir t;
  std::vector<std::string> entries{"tree"};
  for (int a = 0; a < 40; ++a) {
    std::string da = "tree/a" + std::to_string(a);
    entries.push_back(da);
    for (int b = 0; b < 5; ++b) {
      std::string db = da + "/b" + std::to_string(b);
      make_dirs(t / db);
      entries.push_back(db);
      for (int f = 0; f < 10; ++f) {
        std::string file = db + "/f" + std::to_string(f);
        write_file(t / file, "x");
        entries.push_back(file);
      }
      ASSERT_EQ(::symlink("f0", (t / (db + "/link")).c_str()), 0);
      entries.push_back(db + "/link");
    }
  }
  // A hard link between two far-apart directories, met by different threads.
  ASSERT_EQ(::link((t / "tree/a0/b0/f0").c_str(), (t / "tree/a39/b4/alias").c_str()), 0);
  entries.push_back("tree/a39/b4/alias");
  auto owned_by = [&](uid_t uid) {
    for (const auto& e : entries) {
      struct stat st {};
      if (::lstat((t / e).c_str(), &st) != 0 || st.st_uid != uid) return e;
    }
    return std::string();
  };
  auto helper_owns_all = [&] {
    for (const auto& e : entries)
      ASSERT_EQ(::lchown((t / e).c_str(), kHelperId, kHelperId), 0) << e;
  };
  auto fd = fs::open_directory(t / "tree");
  ASSERT_TRUE(fd.ok());
  for (unsigned threads : {1u, 4u}) {
    SCOPED_TRACE(threads);
    // Two setuid files among 200 directories: the first in the tree's order is named.
    helper_owns_all();
    ASSERT_EQ(::chmod((t / "tree/a27/b3/f7").c_str(), 04755), 0);
    ASSERT_EQ(::chmod((t / "tree/a3/b1/f2").c_str(), 04755), 0);
    for (int run = 0; run < 5; ++run) {
      auto r = fs::chown_tree(fd->get(), kHelperId, 0, 0, false, threads);
      ASSERT_FALSE(r.ok());
      EXPECT_NE(r.error().message().find("./a27/b3/f7"), std::string::npos) << r.error().message();
    }
    EXPECT_EQ(owned_by(kHelperId), "") << "a refused tree is not handed over, not even in part";
    ASSERT_EQ(::chmod((t / "tree/a27/b3/f7").c_str(), 0644), 0);
    ASSERT_EQ(::chmod((t / "tree/a3/b1/f2").c_str(), 0644), 0);
    // A name of a tree's file outside the tree.
    ASSERT_EQ(::link((t / "tree/a12/b2/f5").c_str(), (t / "outside-name").c_str()), 0);
    auto leaving = fs::chown_tree(fd->get(), kHelperId, 0, 0, false, threads);
    ASSERT_FALSE(leaving.ok());
    EXPECT_NE(leaving.error().message().find("'./a12/b2/f5' has 2 links, 1 of them in the tree"),
              std::string::npos)
        << leaving.error().message();
    EXPECT_EQ(owned_by(kHelperId), "");
    ASSERT_EQ(::unlink((t / "outside-name").c_str()), 0);
    // A directory replaced by a symlink to one outside: the walk does not follow it.
    make_dirs(t / "outside/x");
    ASSERT_EQ(::lchown((t / "outside/x").c_str(), kHelperId, kHelperId), 0);
    ASSERT_EQ(::rename((t / "tree/a5/b1").c_str(), (t / "moved").c_str()), 0);
    ASSERT_EQ(::symlink((t / "outside").c_str(), (t / "tree/a5/b1").c_str()), 0);
    ASSERT_EQ(::lchown((t / "tree/a5/b1").c_str(), kHelperId, kHelperId), 0);
    ASSERT_TRUE(fs::chown_tree(fd->get(), kHelperId, 0, 0, false, threads).ok());
    struct stat out {};
    ASSERT_EQ(::stat((t / "outside/x").c_str(), &out), 0);
    EXPECT_EQ(out.st_uid, kHelperId) << "the symlink's target is never touched";
    ASSERT_EQ(::unlink((t / "tree/a5/b1").c_str()), 0);
    ASSERT_EQ(::rename((t / "moved").c_str(), (t / "tree/a5/b1").c_str()), 0);
    // A good tree: everything changes owner.
    helper_owns_all();
    ASSERT_TRUE(fs::chown_tree(fd->get(), kHelperId, 0, 0, false, threads).ok());
    EXPECT_EQ(owned_by(0), "");
  }
}

// Deeper than PATH_MAX: each directory is opened from its parent, so no path is too long for
// the walk. The extractor never makes such paths, so by default they are refused, and nothing
// is handed over; limits that allow them (up to the 30 levels of 200 bytes built here) do.
TEST(ChownTree, HandsOverATreeDeeperThanPathMaxOnlyWhenItsLimitsAllowIt) {
  UPGRADED_REQUIRE_ROOT();  // to own files as another uid
  TempDir t;
  make_dirs(t / "tree");
  auto root = fs::open_directory(t / "tree");
  ASSERT_TRUE(root.ok());
  const std::string name(200, 'd');  // 30 levels: about 6,000 bytes of path
  std::vector<UniqueFd> chain;
  int at = root->get();
  for (int i = 0; i < 30; ++i) {
    ASSERT_EQ(::mkdirat(at, name.c_str(), 0755), 0);
    ASSERT_EQ(::fchownat(at, name.c_str(), kHelperId, kHelperId, AT_SYMLINK_NOFOLLOW), 0);
    int fd = ::openat(at, name.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    chain.emplace_back(fd);
    at = fd;
  }
  int file = ::openat(at, "deepest", O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  ASSERT_GE(file, 0);
  ASSERT_EQ(::fchown(file, kHelperId, kHelperId), 0);
  ::close(file);
  ASSERT_EQ(::fchown(root->get(), kHelperId, kHelperId), 0);
  struct stat st {};
  for (unsigned threads : {1u, 4u}) {
    // The defaults; one byte short; one level short.
    for (auto [refused, why] :
         {std::pair{fs::TreeLimits{}, "is longer than 4095 bytes"},
          std::pair{fs::TreeLimits{30 * 201 + 6, 31}, "is longer than 6036 bytes"},
          std::pair{fs::TreeLimits{30 * 201 + 7, 30}, "is nested deeper than 30 levels"}}) {
      auto r = fs::chown_tree(root->get(), kHelperId, 0, 0, false, threads, refused);
      ASSERT_FALSE(r.ok()) << why;
      EXPECT_EQ(r.error().code(), ErrorCode::kPolicyRefused);
      EXPECT_NE(r.error().message().find(why), std::string::npos) << r.error().message();
      ASSERT_EQ(::fstatat(at, "deepest", &st, AT_SYMLINK_NOFOLLOW), 0);
      EXPECT_EQ(st.st_uid, kHelperId) << "nothing handed over";
      ASSERT_EQ(::fstat(root->get(), &st), 0);
      EXPECT_EQ(st.st_uid, kHelperId);
    }
  }
  // "d...d/" 30 times and "deepest": 30 * 201 + 7 bytes, 31 levels.
  ASSERT_TRUE(
      fs::chown_tree(root->get(), kHelperId, 0, 0, false, 4, fs::TreeLimits{30 * 201 + 7, 31})
          .ok());
  ASSERT_EQ(::fstatat(at, "deepest", &st, AT_SYMLINK_NOFOLLOW), 0);
  EXPECT_EQ(st.st_uid, 0u);
  ASSERT_EQ(::fstat(at, &st), 0);
  EXPECT_EQ(st.st_uid, 0u);
  // Removing it needs relative paths too.
  ASSERT_EQ(::unlinkat(chain[29].get(), "deepest", 0), 0);
  for (int i = 29; i >= 0; --i) {
    int parent = i == 0 ? root->get() : chain[static_cast<std::size_t>(i - 1)].get();
    ASSERT_EQ(::unlinkat(parent, name.c_str(), AT_REMOVEDIR), 0);
  }
}

TEST(ChownTree, RefusesAnEntryTheBuilderDidNotCreate) {
  UPGRADED_REQUIRE_ROOT();  // to own files as another uid
  TempDir t;
  make_dirs(t / "tree/sub");
  write_file(t / "tree/sub/mine", "x");
  write_file(t / "foreign", "y");
  // A refused walk may have handed some entries over already (the tree is then discarded):
  // each check starts from a tree the helper owns.
  auto helper_owns_all = [&] {
    for (const char* p : {"tree", "tree/sub", "tree/sub/mine"})
      ASSERT_EQ(::chown((t / p).c_str(), kHelperId, kHelperId), 0);
  };
  helper_owns_all();
  ASSERT_EQ(::link((t / "foreign").c_str(), (t / "tree/sub/link").c_str()), 0);
  auto fd = fs::open_directory(t / "tree");
  auto r = fs::chown_tree(fd->get(), kHelperId, 0, 0, false);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), ErrorCode::kPolicyRefused);
  EXPECT_NE(r.error().message().find("link"), std::string::npos) << r.error().message();
  ASSERT_EQ(::unlink((t / "tree/sub/link").c_str()), 0);
  // Modes a well-behaved extraction never leaves: refused, whatever the builder did.
  for (mode_t bad : {04755, 02755, 01755}) {
    helper_owns_all();
    ASSERT_EQ(::chmod((t / "tree/sub/mine").c_str(), bad), 0);
    EXPECT_FALSE(fs::chown_tree(fd->get(), kHelperId, 0, 0, false).ok()) << std::oct << bad;
  }
  helper_owns_all();
  ASSERT_EQ(::chmod((t / "tree/sub/mine").c_str(), 0644), 0);
  EXPECT_FALSE(fs::chown_tree(fd->get(), kHelperId, 0, 0, true).ok()) << "writable, read-only";
  helper_owns_all();
  ASSERT_EQ(::mkfifo((t / "tree/fifo").c_str(), 0444), 0);
  ASSERT_EQ(::lchown((t / "tree/fifo").c_str(), kHelperId, kHelperId), 0);
  EXPECT_FALSE(fs::chown_tree(fd->get(), kHelperId, 0, 0, false).ok()) << "a fifo";
  ASSERT_EQ(::unlink((t / "tree/fifo").c_str()), 0);
  // A hard link within the tree is handed over with its file; one leaving the tree is not.
  helper_owns_all();
  ASSERT_EQ(::link((t / "tree/sub/mine").c_str(), (t / "tree/alias").c_str()), 0);
  auto linked = fs::chown_tree(fd->get(), kHelperId, 0, 0, false);
  ASSERT_TRUE(linked.ok()) << linked.error().message();
  helper_owns_all();
  ASSERT_EQ(::link((t / "tree/sub/mine").c_str(), (t / "outside").c_str()), 0);
  auto leaving = fs::chown_tree(fd->get(), kHelperId, 0, 0, false);
  ASSERT_FALSE(leaving.ok());
  EXPECT_NE(leaving.error().message().find("3 links, 2 of them in the tree"), std::string::npos)
      << leaving.error().message();
  struct stat outside {};
  ASSERT_EQ(::stat((t / "outside").c_str(), &outside), 0);
  EXPECT_EQ(outside.st_uid, kHelperId) << "a refused tree is not handed over, not even in part";
  ASSERT_EQ(::unlink((t / "outside").c_str()), 0);
  ASSERT_EQ(::unlink((t / "tree/alias").c_str()), 0);
  // A symlink hard-linked out of the tree: refused too (a root-owned symlink at a path the
  // builder chose).
  helper_owns_all();
  ASSERT_EQ(::symlink("/etc/shadow", (t / "tree/sub/sym").c_str()), 0);
  ASSERT_EQ(::lchown((t / "tree/sub/sym").c_str(), kHelperId, kHelperId), 0);
  ASSERT_EQ(::linkat(AT_FDCWD, (t / "tree/sub/sym").c_str(), AT_FDCWD, (t / "symout").c_str(), 0),
            0);
  auto sym = fs::chown_tree(fd->get(), kHelperId, 0, 0, false);
  ASSERT_FALSE(sym.ok());
  struct stat so {};
  ASSERT_EQ(::lstat((t / "symout").c_str(), &so), 0);
  EXPECT_EQ(so.st_uid, kHelperId);
  ASSERT_EQ(::unlink((t / "symout").c_str()), 0);
  ASSERT_EQ(::unlink((t / "tree/sub/sym").c_str()), 0);
  helper_owns_all();
  ASSERT_TRUE(fs::chown_tree(fd->get(), kHelperId, 0, 0, false).ok());
  struct stat st {};
  ASSERT_EQ(::stat((t / "tree/sub/mine").c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, 0u);
}

TEST(Sandbox, RefusesWhatTheHelperNeverNeeds) {
  TempDir t;
  make_dirs(t / "dest");
  int out[2];
  ASSERT_EQ(::pipe2(out, O_CLOEXEC), 0);
  UniqueFd dest = std::move(*fs::open_directory(t / "dest"));
  const bool root = ::geteuid() == 0;
  if (root) {
    ASSERT_EQ(::fchown(dest.get(), kHelperId, kHelperId), 0);
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  posix_spawn_file_actions_adddup2(&fa, dest.get(), 4);
  std::string uid = "--uid=" + std::to_string(kHelperId),
              gid = "--gid=" + std::to_string(kHelperId);
  std::vector<char*> argv = {const_cast<char*>("upgraded-extract"),
                             const_cast<char*>("--probe-sandbox")};
  if (root) {
    argv.push_back(uid.data());
    argv.push_back(gid.data());
  }
  argv.push_back(nullptr);
  char* envp[] = {nullptr};
  pid_t pid;
  ASSERT_EQ(::posix_spawn(&pid, UPGRADED_EXTRACT_HELPER, &fa, nullptr, argv.data(), envp), 0);
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
  const std::string eperm = std::strerror(EPERM), eacces = std::strerror(EACCES);
  if (root) {
    EXPECT_EQ(probe["uid"].get<uid_t>(), kHelperId) << "never root";
    EXPECT_EQ(probe["read_shadow"], eacces);
  }
  EXPECT_TRUE(probe["seccomp"].get<bool>());
  EXPECT_TRUE(probe["capabilities_dropped"].get<bool>());
  EXPECT_EQ(probe["socket"], eperm) << "no D-Bus, no network";
  EXPECT_EQ(probe["io_uring"], eperm) << "no sockets through io_uring either";
  EXPECT_EQ(probe["fork"], eperm) << "threads only: nothing outlives the helper";
  EXPECT_EQ(probe["execve"], eperm);
  EXPECT_EQ(probe["kill_init"], eperm) << "no signals to other processes";
  EXPECT_EQ(probe["setuid"], eperm);
  EXPECT_EQ(probe["chown_inside"], eperm);
  EXPECT_EQ(probe["create_inside"], "allowed");
  // An allowlist: nothing acts on the daemon, even under the daemon's own uid.
  for (const char* what :
       {"prlimit_other", "prlimit_self_set", "setpriority_other", "affinity_other", "ioprio_other"})
    EXPECT_NE(probe[what], "allowed") << what;
  EXPECT_EQ(probe["not_listed"], std::strerror(ENOSYS)) << "what is not listed does not exist";
#ifndef UPGRADED_SANITIZE  // ASan's shadow memory leaves no room for RLIMIT_AS (sandbox.cpp)
  EXPECT_EQ(probe["rlimit_as"].get<std::uint64_t>(), 1ull << 30);
#endif
  EXPECT_EQ(probe["oom_score_adj"].get<int>(), 1000) << "killed before the daemon";
  EXPECT_EQ(probe["rlimit_fsize"].get<std::uint64_t>(), 4096u);
  EXPECT_EQ(probe["rlimit_nofile"].get<std::uint64_t>(), 128u);
  if (probe["landlock_abi"].get<int>() > 0) {
    EXPECT_EQ(probe["create_outside"], eacces) << "Landlock confines writes to the destination";
    EXPECT_EQ(probe["read_outside"], eacces) << "and reads";
  } else {
    std::fprintf(stderr,
                 "note: this kernel has no Landlock; writes are confined by the uid only\n");
  }
  EXPECT_EQ(::access("/tmp/upgraded-probe-outside", F_OK), -1);
}

// systemd-nspawn's default system call filter answers the Landlock calls with EPERM, as any
// filter that does not know them may. A root daemon's helper then falls back to the uid of its
// own; a helper that shares the daemon's uid (a --user instance) refuses to run.
TEST_F(SandboxExtract, WithoutLandlockARootHelperFallsBackToItsOwnUidAndAUserHelperRefuses) {
  const bool root = ::geteuid() == 0;
  int out[2];
  ASSERT_EQ(::pipe2(out, O_CLOEXEC), 0);
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(out[0]);
    auto say = [&](const std::string& what, int code) {
      (void)!::write(out[1], what.data(), what.size());
      ::_exit(code);
    };
    scmp_filter_ctx ctx = ::seccomp_init(SCMP_ACT_ALLOW);
    if (!ctx ||
        ::seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(landlock_create_ruleset), 0) != 0 ||
        ::seccomp_load(ctx) != 0)
      say("loading the filter failed", 10);
    auto landlock = sandbox::probe_landlock();
    if (landlock.abi != 0 || landlock.reason.find("EPERM") == std::string::npos)
      say("probe_landlock: abi " + std::to_string(landlock.abi) + ", " + landlock.reason, 11);
    auto described = sandbox::describe_confinement(landlock, root);
    if (described.rfind(root ? "degraded:" : "unusable:", 0) != 0) say(described, 12);
    // The helper inherits the filter, as a helper of a daemon in such a container does.
    auto r = run(raw_tar({dir("bin"), file("bin/hello", "#!/bin/sh\n", 0755)}));
    if (root) {
      if (!r) say("a root daemon's helper refused: " + r.error().message(), 13);
      if (read_file(t / "dest/bin/hello") != "#!/bin/sh\n") say("not extracted", 14);
      struct stat st {};
      if (::stat((t / "dest/bin/hello").c_str(), &st) != 0 || st.st_uid != 0)
        say("the tree was not handed back to root", 15);
    } else {
      if (r) say("a helper without a uid of its own ran without Landlock", 16);
      if (r.error().message().find("Landlock is not available") == std::string::npos)
        say("unclear refusal: " + r.error().message(), 17);
      if (snapshot(t / "dest").size() != 1) say("the refused helper wrote something", 18);
    }
    say(described, 0);
  }
  ::close(out[1]);
  std::string text;
  char buf[4096];
  for (ssize_t n; (n = ::read(out[0], buf, sizeof buf)) > 0;)
    text.append(buf, static_cast<std::size_t>(n));
  ::close(out[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << text;
  EXPECT_EQ(WEXITSTATUS(status), 0) << text;
  if (!root)
    std::fprintf(stderr,
                 "note: not root, so only the refusal of a helper without a uid of its own "
                 "was checked (CI runs this as root)\n");
}
