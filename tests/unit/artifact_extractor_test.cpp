// Adversarial payloads. Each is a raw tar written by the test generator, signed with the test
// key so that it passes verification and reaches the extractor. Every case asserts the refusal,
// that nothing is left in the destination's parent, and that files outside are untouched.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>

#include "support/artifact_builder.h"
#include "support/raw_tar.h"
#include "support/test_dir.h"
#include "upgraded/artifact/unpack.h"
#include "upgraded/fs/durable.h"

using namespace upgraded;
using namespace upgraded::artifact;
using namespace upgraded::test;

namespace {

struct Case {
  std::string name;
  std::function<std::string()> tar;  ///< the payload's (uncompressed) bytes
  ErrorCode code;
  std::string needle;  ///< part of the expected message
  Compression compression = Compression::kNone;
  std::function<void(ExtractPolicy&)> policy = {};
  bool compress = false;  ///< zstd-compress the tar (and label it zstd)
};

std::string long_path(std::size_t total) {
  std::string p;
  while (p.size() < total)
    p += std::string(100, 'd') + "/";
  return p + "f";
}

std::vector<RawEntry> many_files(int n) {
  std::vector<RawEntry> v;
  for (int i = 0; i < n; ++i)
    v.push_back(file("f" + std::to_string(i), ""));
  return v;
}

RawEntry special(const std::string& name, char type) {
  return RawEntry{name, type, {}, 0644, {}, {}, false};
}

RawEntry lying(const std::string& name, std::string data, std::uint64_t declared) {
  RawEntry e = file(name, std::move(data));
  e.declared_size = declared;
  return e;
}

const std::vector<Case>& cases() {
  static const std::vector<Case> kCases = {
      {"DotDotFirst", [] { return raw_tar({file("../evil", "x")}); }, ErrorCode::kPolicyRefused,
       "'..'"},
      {"DotDotInTheMiddle", [] { return raw_tar({file("a/../../evil", "x")}); },
       ErrorCode::kPolicyRefused, "'..'"},
      {"DotDotStayingInside",
       [] {
         return raw_tar({dir("a"), file("a/../b", "x")});
       },
       ErrorCode::kPolicyRefused, "'..'"},
      {"DotDotDirectory", [] { return raw_tar({dir("a/..")}); }, ErrorCode::kPolicyRefused, "'..'"},
      {"DotSlashDotDot", [] { return raw_tar({file("./../evil", "x")}); },
       ErrorCode::kPolicyRefused, "'..'"},
      {"AbsolutePath", [] { return raw_tar({file("/tmp/upgraded-evil", "x")}); },
       ErrorCode::kPolicyRefused, "absolute"},
      {"AbsoluteEtcPasswd", [] { return raw_tar({file("/etc/passwd", "root::0:0::/:/bin/sh\n")}); },
       ErrorCode::kPolicyRefused, "absolute"},
      {"FileThroughASymlinkToItsParent",
       [] {
         return raw_tar({dir("sub"), symlink_to("l", "sub"), file("l/evil", "x")});
       },
       ErrorCode::kPolicyRefused, "not a directory"},
      {"FileThroughASymlinkLeadingOut",
       [] {
         return raw_tar({symlink_to("l", "."), file("l/evil", "x")});
       },
       ErrorCode::kPolicyRefused, "not a directory"},
      {"SymlinkToEtcPasswd", [] { return raw_tar({symlink_to("passwd", "/etc/passwd")}); },
       ErrorCode::kPolicyRefused, "absolute"},
      {"SymlinkClimbingOut",
       [] {
         return raw_tar({dir("a"), symlink_to("a/l", "../../../../etc/passwd")});
       },
       ErrorCode::kPolicyRefused, "outside the release"},
      {"SymlinkChainEscapingThroughAnUpLink",
       [] {
         return raw_tar({dir("a"), dir("a/b"), symlink_to("esc", "a/b/up/../../.."),
                         symlink_to("a/b/up", "..")});
       },
       ErrorCode::kPolicyRefused, "resolves outside"},
      {"SymlinkChainThroughRootLinks",
       [] {
         return raw_tar({dir("a"), symlink_to("a/up", ".."), symlink_to("b", "a/up/a/up/..")});
       },
       ErrorCode::kPolicyRefused, "resolves outside"},
      {"SymlinkLoop",
       [] {
         return raw_tar({symlink_to("l1", "l2"), symlink_to("l2", "l1")});
       },
       ErrorCode::kPolicyRefused, "loop"},
      {"SymlinkWithEmptyTarget", [] { return raw_tar({symlink_to("l", "")}); },
       ErrorCode::kPolicyRefused, "empty target"},
      {"HardlinkOutside", [] { return raw_tar({hardlink_to("h", "../sentinel")}); },
       ErrorCode::kPolicyRefused, "'..'"},
      {"HardlinkToEtcPasswd", [] { return raw_tar({hardlink_to("h", "/etc/passwd")}); },
       ErrorCode::kPolicyRefused, "absolute"},
      {"HardlinkViaASymlink",
       [] {
         return raw_tar(
             {dir("d"), file("d/f", "x"), symlink_to("s", "d"), hardlink_to("h", "s/f")});
       },
       ErrorCode::kPolicyRefused, "not a regular file extracted earlier"},
      {"HardlinkToAMissingFile", [] { return raw_tar({hardlink_to("h", "nope")}); },
       ErrorCode::kPolicyRefused, "not a regular file"},
      {"HardlinkToADirectory",
       [] {
         return raw_tar({dir("d"), hardlink_to("h", "d")});
       },
       ErrorCode::kPolicyRefused, "not a regular file"},
      {"DirectoryReplacedByASymlink",
       [] {
         return raw_tar({dir("d"), dir("e"), symlink_to("d", "e"), file("d/evil", "x")});
       },
       ErrorCode::kPolicyRefused, "duplicate entry 'd'"},
      {"SymlinkThenDirectoryOfTheSameName",
       [] {
         return raw_tar({symlink_to("x", "a"), dir("x")});
       },
       ErrorCode::kPolicyRefused, "duplicate"},
      {"FileThenDirectoryOfTheSameName",
       [] {
         return raw_tar({file("x", "1"), dir("x")});
       },
       ErrorCode::kPolicyRefused, "duplicate"},
      {"DirectoryThenFileOfTheSameName",
       [] {
         return raw_tar({dir("x"), file("x", "1")});
       },
       ErrorCode::kPolicyRefused, "duplicate"},
      {"DuplicateFile",
       [] {
         return raw_tar({file("a", "1"), file("a", "2")});
       },
       ErrorCode::kPolicyRefused, "duplicate"},
      {"DuplicateSpelledWithDotSlash",
       [] {
         return raw_tar({file("a", "1"), file("./a", "2")});
       },
       ErrorCode::kPolicyRefused, "duplicate"},
      {"CharacterDevice", [] { return raw_tar({special("null", '3')}); }, ErrorCode::kPolicyRefused,
       "character device"},
      {"BlockDevice", [] { return raw_tar({special("sda", '4')}); }, ErrorCode::kPolicyRefused,
       "block device"},
      {"Fifo", [] { return raw_tar({special("pipe", '6')}); }, ErrorCode::kPolicyRefused, "FIFO"},
      // Unsafe bits: one message names them all, so each case asserts the refused mode.
      {"SetuidFile", [] { return raw_tar({file("suid", "x", 04755)}); }, ErrorCode::kPolicyRefused,
       "entry 'suid' has mode 4755 (setuid, setgid, sticky or world-writable)"},
      {"SetgidDirectory", [] { return raw_tar({dir("sg", 02755)}); }, ErrorCode::kPolicyRefused,
       "has mode 2755"},
      // Sticky: what the daemon's hand-over refuses, refused here too (not installed offline and
      // refused through the daemon).
      {"StickyDirectory", [] { return raw_tar({dir("st", 01755)}); }, ErrorCode::kPolicyRefused,
       "has mode 1755"},
      {"StickyFile", [] { return raw_tar({file("st", "x", 01644)}); }, ErrorCode::kPolicyRefused,
       "has mode 1644"},
      {"StickyRoot",
       [] {
         return raw_tar({dir(".", 01755), file("f", "x")});
       },
       ErrorCode::kPolicyRefused, "entry '.' has mode 1755"},
      {"WorldWritableFile", [] { return raw_tar({file("ww", "x", 0666)}); },
       ErrorCode::kPolicyRefused, "has mode 0666"},
      {"WorldWritableDirectory", [] { return raw_tar({dir("ww", 0777)}); },
       ErrorCode::kPolicyRefused, "has mode 0777"},
      {"TmpLikeDirectory", [] { return raw_tar({dir("tmp", 01777)}); }, ErrorCode::kPolicyRefused,
       "has mode 1777"},
      {"PathLongerThanPathMax", [] { return raw_tar({file(long_path(5000), "x")}); },
       ErrorCode::kPolicyRefused, "longer than 4095"},
      {"ComponentLongerThan255", [] { return raw_tar({file(std::string(300, 'n'), "x")}); },
       ErrorCode::kPolicyRefused, "longer than 255"},
      {"InvalidUtf8Name", [] { return raw_tar({file("bad\xff\xfe", "x")}); },
       ErrorCode::kPolicyRefused, "UTF-8"},
      {"ControlCharacterInName", [] { return raw_tar({file("a\nb", "x")}); },
       ErrorCode::kPolicyRefused, "control character"},
      {"EmptyName", [] { return raw_tar({file("", "x")}); }, ErrorCode::kPolicyRefused,
       "root entry is not a directory"},
      {"RootAsAFile", [] { return raw_tar({file(".", "x")}); }, ErrorCode::kPolicyRefused,
       "root entry is not a directory"},
      {"MoreEntriesThanAllowed", [] { return raw_tar(many_files(101)); }, ErrorCode::kPolicyRefused,
       "more than 100 entries", Compression::kNone,
       [](ExtractPolicy& p) { p.limits.max_entries = 100; }},
      {"FileLargerThanAllowed", [] { return raw_tar({file("big", std::string(200, 'b'))}); },
       ErrorCode::kPolicyRefused, "the limit is 100", Compression::kNone,
       [](ExtractPolicy& p) { p.limits.max_file_size = 100; }},
      {"MoreBytesThanAllowed",
       [] {
         return raw_tar({file("a", std::string(400, 'a')), file("b", std::string(400, 'b')),
                         file("c", std::string(400, 'c'))});
       },
       ErrorCode::kPolicyRefused, "more than 1000 bytes", Compression::kNone,
       [](ExtractPolicy& p) { p.limits.max_total_bytes = 1000; }},
      {"DecompressionBomb",
       [] { return raw_tar({file("zeros", std::string(256u << 20, '\0'))}); },
       ErrorCode::kPolicyRefused,
       "expansion limit",
       Compression::kZstd,
       {},
       true},
      {"HeaderClaimingMoreDataThanThereIs", [] { return raw_tar({lying("f", "short", 100000)}); },
       ErrorCode::kPolicyRefused, "not a valid tar archive"},
      {"HeaderClaimingLessDataThanThereIs",
       [] { return raw_tar({lying("f", std::string(2000, 'A'), 5)}); }, ErrorCode::kPolicyRefused,
       "not a valid tar archive"},
      {"ZipInsteadOfTar",
       [] { return std::string("PK\x03\x04\x14\x00\x00\x00", 8) + std::string(2000, 'z'); },
       ErrorCode::kPolicyRefused, "not a valid tar archive"},
      {"SevenZipInsteadOfTar",
       [] { return std::string("7z\xbc\xaf\x27\x1c\x00\x04", 8) + std::string(2000, '7'); },
       ErrorCode::kPolicyRefused, "not a valid tar archive"},
      {"GzipLabelledAsZstd",
       [] { return std::string("\x1f\x8b\x08\x00", 4) + std::string(2000, 'g'); },
       ErrorCode::kPolicyRefused, "not a valid tar archive", Compression::kZstd},
      {"ZstdLabelledAsPlainTar", [] { return zstd_compress(raw_tar({file("a", "x")})); },
       ErrorCode::kPolicyRefused, "not a valid tar archive", Compression::kNone},
      {"NamesTakingMoreMemoryThanAllowed", [] { return raw_tar(many_files(50)); },
       ErrorCode::kPolicyRefused, "entry names take more than 100 bytes", Compression::kNone,
       [](ExtractPolicy& p) { p.limits.max_path_bytes = 100; }},
      {"NestedDeeperThanAllowed",
       [] {
         std::string p;
         for (int i = 0; i < 257; ++i)
           p += "d/";
         return raw_tar({file(p + "f", "x")});
       },
       ErrorCode::kPolicyRefused, "nested deeper than 256 levels"},
      {"DirectoriesCountAgainstTheSpaceReserve",
       [] {
         std::vector<RawEntry> v;
         for (int i = 0; i < 50; ++i)
           v.push_back(dir("d" + std::to_string(i)));
         return raw_tar(v);
       },
       ErrorCode::kNoSpace, "not enough free space", Compression::kNone,
       [](ExtractPolicy& p) { p.limits.free_space_reserve = 1ULL << 60; }},
      {"SymlinksCountAgainstTheInodeReserve", [] { return raw_tar({symlink_to("l", "target")}); },
       ErrorCode::kNoSpace, "not enough free inodes", Compression::kNone,
       [](ExtractPolicy& p) { p.limits.free_inode_reserve = 1ULL << 60; }},
      {"NotEnoughFreeSpace", [] { return raw_tar({file("a", "x")}); }, ErrorCode::kNoSpace,
       "not enough free space", Compression::kNone,
       [](ExtractPolicy& p) { p.limits.free_space_reserve = 1ULL << 60; }},
  };
  return kCases;
}

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.name;
}

class AdversarialPayload : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    make_dirs(t / "work");
    write_file(t / "sentinel", "untouched");
    make_dirs(t / "outside");
    write_file(t / "outside/keep", "keep");
  }

  TempDir t;
  TestKey key = make_key(t, "release");
};

}  // namespace

TEST_P(AdversarialPayload, IsRefusedAndLeavesNothingBehind) {
  const Case& c = GetParam();
  std::string tar = c.tar();
  BuildOptions o;
  o.compression = c.compression;
  if (c.compress) tar = zstd_compress(tar, 19);
  build_artifact(t / "a.upd", {key}, tar, o);
  tar.clear();
  std::string passwd = read_file("/etc/passwd");
  auto before = snapshot(t.path());
  before.erase("work");  // its mtime changes: the partial tree is created and removed in it
  ExtractPolicy policy;
  if (c.policy) c.policy(policy);

  UniqueFd fd(::open((t / "a.upd").c_str(), O_RDONLY | O_CLOEXEC));
  auto work = fs::open_directory(t / "work");
  auto r = unpack_artifact(fd.get(), keyring_of({key}), TrustPolicy{}, policy, work->get(), "out");

  ASSERT_FALSE(r.ok()) << c.name << " was accepted";
  EXPECT_EQ(r.error().code(), c.code) << r.error().message();
  EXPECT_NE(r.error().message().find(c.needle), std::string::npos) << r.error().message();
  EXPECT_EQ(snapshot(t / "work").size(), 1u) << "work/ must hold nothing, not even a partial tree";
  auto after = snapshot(t.path());
  after.erase("work");
  EXPECT_EQ(after, before) << "nothing outside the destination may change";
  EXPECT_EQ(read_file(t / "sentinel"), "untouched");
  EXPECT_EQ(read_file("/etc/passwd"), passwd);
  EXPECT_FALSE(exists("/tmp/upgraded-evil"));
}

INSTANTIATE_TEST_SUITE_P(Payloads, AdversarialPayload, ::testing::ValuesIn(cases()),
                         [](const auto& p) { return p.param.name; });

namespace {

class BadManifestName : public ::testing::TestWithParam<std::pair<const char*, std::string>> {};

}  // namespace

TEST_P(BadManifestName, IsRefusedBeforeAnythingIsExtracted) {
  TempDir t;
  make_dirs(t / "work");
  TestKey key = make_key(t, "release");
  auto [field, value] = GetParam();
  BuildOptions o;
  o.tweak_manifest = [&, field = std::string(field), value = value](Manifest& m) {
    (field == "app" ? m.app : m.version) = value;
  };
  build_artifact(t / "a.upd", {key}, raw_tar({file("f", "x")}), o);
  UniqueFd fd(::open((t / "a.upd").c_str(), O_RDONLY | O_CLOEXEC));
  auto work = fs::open_directory(t / "work");
  auto r = unpack_artifact(fd.get(), keyring_of({key}), TrustPolicy{}, ExtractPolicy{}, work->get(),
                           "out");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), ErrorCode::kVerificationFailed) << r.error().message();
  EXPECT_NE(r.error().message().find(field), std::string::npos) << r.error().message();
  EXPECT_EQ(snapshot(t / "work").size(), 1u);
}

INSTANTIATE_TEST_SUITE_P(Names, BadManifestName,
                         ::testing::Values(std::pair("app", std::string("../x")),
                                           std::pair("app", std::string("a/b")),
                                           std::pair("app", std::string("")),
                                           std::pair("app", std::string(300, 'a')),
                                           std::pair("version", std::string("../x")),
                                           std::pair("version", std::string("a/b")),
                                           std::pair("version", std::string("")),
                                           std::pair("version", std::string(300, '1'))));

namespace {

class GoodPayload : public ::testing::Test {
 protected:
  Result<UnpackResult> unpack(const std::string& tar, ExtractPolicy policy = {}) {
    build_artifact(t / "a.upd", {key}, tar);
    UniqueFd fd(::open((t / "a.upd").c_str(), O_RDONLY | O_CLOEXEC));
    auto parent = fs::open_directory(t.path());
    return unpack_artifact(fd.get(), keyring_of({key}), TrustPolicy{}, policy, parent->get(),
                           "out");
  }
  mode_t mode_of(const std::string& rel) {
    struct stat st {};
    ::lstat((t / rel).c_str(), &st);
    return st.st_mode & 07777;
  }
  TempDir t;
  TestKey key = make_key(t, "release");
};

}  // namespace

TEST_F(GoodPayload, KeepsLinksThatStayInsideAndCreatesMissingParents) {
  auto r =
      unpack(raw_tar({file("./a/b/c/deep", "deep"), dir("./d/", 0750), symlink_to("d/up", "../a/b"),
                      symlink_to("top", "a/b/c/deep"), hardlink_to("a/h", "a/b/c/deep"),
                      symlink_to("dangling", "does/not/exist"), file(long_path(1500), "long")}));
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(read_file(t / "out/top"), "deep");
  EXPECT_EQ(read_file(t / "out/d/up/c/deep"), "deep");
  EXPECT_EQ(read_file(t / "out/a/h"), "deep");
  EXPECT_EQ(read_file(t / ("out/" + long_path(1500))), "long");
  EXPECT_EQ(mode_of("out/a/b"), 0755u) << "implicit parents get 0755";
  EXPECT_EQ(mode_of("out/d"), 0750u);
  EXPECT_EQ(r->stats.symlinks, 3u);
  EXPECT_EQ(r->stats.hardlinks, 1u);
}

TEST_F(GoodPayload, StripsUnsafeModesWhenThePolicySaysSo) {
  ExtractPolicy p;
  p.unsafe_modes = UnsafeModes::kStrip;
  auto r = unpack(raw_tar({file("suid", "x", 04755), dir("ww", 0777), file("ww/f", "y", 0666),
                           dir("st", 01755)}),
                  p);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(mode_of("out/suid"), 0755u);
  EXPECT_EQ(mode_of("out/st"), 0755u);
  EXPECT_EQ(mode_of("out/ww"), 0775u);
  EXPECT_EQ(mode_of("out/ww/f"), 0664u);
}

TEST_F(GoodPayload, GivesFilesTheirArchivedModeWhateverTheUmask) {
  auto r = [&] {
    ScopedUmask mask(077);
    return unpack(raw_tar({file("a", "x", 0644), file("b", "y", 0755), file("c", "z", 0400)}));
  }();
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(mode_of("out/a"), 0644u);
  EXPECT_EQ(mode_of("out/b"), 0755u);
  EXPECT_EQ(mode_of("out/c"), 0400u);
}

// A caller that knows the umask (the sandboxed helper, which cannot read /proc) spares every
// file whose mode the umask leaves intact its fchmod; the others still get theirs.
TEST_F(GoodPayload, TakesTheUmaskFromItsCallerWhenItKnowsIt) {
  auto extract = [&](mode_t process, std::optional<mode_t> told) {
    build_artifact(t / "a.upd", {key}, raw_tar({file("a", "x", 0644), file("b", "y", 0664)}));
    UniqueFd fd(::open((t / "a.upd").c_str(), O_RDONLY | O_CLOEXEC));
    auto art = open_verified(fd.get(), keyring_of({key}), TrustPolicy{});
    EXPECT_TRUE(art.ok());
    std::filesystem::remove_all(t / "out");
    make_dirs(t / "out");
    auto dest = fs::open_directory(t / "out");
    auto r = [&] {
      ScopedUmask mask(process);
      return extract_verified(*art, ExtractPolicy{}, dest->get(), /*sync=*/false, told);
    }();
    ASSERT_TRUE(r.ok()) << r.error().message();
  };
  extract(022, 022);
  EXPECT_EQ(mode_of("out/a"), 0644u) << "created with its mode";
  EXPECT_EQ(mode_of("out/b"), 0664u) << "the umask takes 0020 away: an fchmod gives it back";
  extract(0, 0);
  EXPECT_EQ(mode_of("out/a"), 0644u);
  EXPECT_EQ(mode_of("out/b"), 0664u);
  extract(077, std::nullopt);  // read from /proc/self/status
  EXPECT_EQ(mode_of("out/a"), 0644u);
  EXPECT_EQ(mode_of("out/b"), 0664u);
  // Told wrongly, it trusts what it was told: no fchmod, so the umask shows. (What the helper
  // would produce if it passed 0 without setting it.)
  extract(077, 0);
  EXPECT_EQ(mode_of("out/a"), 0600u);
  EXPECT_EQ(mode_of("out/b"), 0600u);
}

// A default ACL on the destination takes the umask's place (acl(5)): told that the umask is 0,
// the extractor still gives every file its fchmod, or the ACL's "others: nothing" would show.
TEST_F(GoodPayload, GivesFilesTheirModesUnderADefaultAcl) {
  build_artifact(t / "a.upd", {key},
                 raw_tar({file("a", "x", 0644), dir("d", 0755), file("d/b", "y", 0755)}));
  UniqueFd fd(::open((t / "a.upd").c_str(), O_RDONLY | O_CLOEXEC));
  auto art = open_verified(fd.get(), keyring_of({key}), TrustPolicy{});
  ASSERT_TRUE(art.ok());
  make_dirs(t / "out");
  if (!set_default_acl(t / "out", 07, 05, 0))
    UPGRADED_SKIP_UNLESS_CI("the test directory's file system has no ACLs");
  auto dest = fs::open_directory(t / "out");
  auto r = [&] {
    ScopedUmask mask(0);
    return extract_verified(*art, ExtractPolicy{}, dest->get(), /*sync=*/false, /*umask=*/0);
  }();
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(mode_of("out/a"), 0644u);
  EXPECT_EQ(mode_of("out/d"), 0755u);
  EXPECT_EQ(mode_of("out/d/b"), 0755u) << "in a directory that inherited the ACL";
}

TEST_F(GoodPayload, AppliesTheRootEntryAndReadOnlyDirectoriesLast) {
  auto r = unpack(raw_tar({dir("./", 0750), dir("ro", 0555), file("ro/f", "x", 0444)}));
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(mode_of("out"), 0750u);
  EXPECT_EQ(mode_of("out/ro"), 0555u);
  EXPECT_EQ(read_file(t / "out/ro/f"), "x");
}

TEST(DiskFull, LeavesNoPartialTreeAndReportsNoSpace) {
  UPGRADED_REQUIRE_ROOT();
  TempDir t;
  make_dirs(t / "small");
  ASSERT_EQ(::mount("tmpfs", (t / "small").c_str(), "tmpfs", 0, "size=2m"), 0)
      << std::strerror(errno);
  TestKey key = make_key(t, "release");
  std::string big;
  for (int i = 0; i < 400000; ++i)
    big += std::to_string(i * 2654435761u);
  build_artifact(t / "a.upd", {key}, zstd_compress(raw_tar({file("a", "x"), file("big", big)})),
                 BuildOptions{.compression = Compression::kZstd});
  ExtractPolicy p;
  p.limits.free_space_reserve = 0;  // let the write itself hit ENOSPC
  UniqueFd fd(::open((t / "a.upd").c_str(), O_RDONLY | O_CLOEXEC));
  auto small = fs::open_directory(t / "small");
  auto r = unpack_artifact(fd.get(), keyring_of({key}), TrustPolicy{}, p, small->get(), "out");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), ErrorCode::kNoSpace) << r.error().message();
  EXPECT_EQ(snapshot(t / "small").size(), 1u) << "the partial tree is removed";
  // With the default reserve the same install is refused before writing.
  p = ExtractPolicy{};
  p.limits.free_space_reserve = 1 << 20;
  UniqueFd fd2(::open((t / "a.upd").c_str(), O_RDONLY | O_CLOEXEC));
  auto r2 = unpack_artifact(fd2.get(), keyring_of({key}), TrustPolicy{}, p, small->get(), "out");
  ASSERT_FALSE(r2.ok());
  EXPECT_NE(r2.error().message().find("not enough free space"), std::string::npos)
      << r2.error().message();
  EXPECT_EQ(snapshot(t / "small").size(), 1u);
  // Many small files: the failure happens on a writer thread and must surface just the same.
  std::vector<RawEntry> many;
  for (int i = 0; i < 3000; ++i)
    many.push_back(
        file("d" + std::to_string(i % 7) + "/f" + std::to_string(i), std::string(1500, 'x')));
  build_artifact(t / "many.upd", {key}, zstd_compress(raw_tar(many)),
                 BuildOptions{.compression = Compression::kZstd});
  p.limits.free_space_reserve = 0;
  UniqueFd fd3(::open((t / "many.upd").c_str(), O_RDONLY | O_CLOEXEC));
  auto r3 = unpack_artifact(fd3.get(), keyring_of({key}), TrustPolicy{}, p, small->get(), "out");
  ASSERT_FALSE(r3.ok());
  EXPECT_EQ(r3.error().code(), ErrorCode::kNoSpace) << r3.error().message();
  EXPECT_EQ(snapshot(t / "small").size(), 1u);
  small->reset();
  ::umount2((t / "small").c_str(), MNT_DETACH);
}
