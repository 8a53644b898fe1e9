#include <fcntl.h>
#include <gtest/gtest.h>
#include <seccomp.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <functional>

#include "support/test_dir.h"
#include "upgraded/fs/beneath.h"
#include "upgraded/fs/durable.h"
#include "upgraded/fs/remove_tree.h"

using namespace upgraded;
using namespace upgraded::test;

TEST(OpenBeneath, RefusesSymlinksAndEscapes) {
  TempDir t;
  make_dirs(t / "root/sub");
  write_file(t / "outside", "secret");
  ::symlink("../outside", (t / "root/link").c_str());
  ::symlink("sub", (t / "root/dirlink").c_str());
  auto root = fs::open_directory(t / "root");
  ASSERT_TRUE(root.ok());
  EXPECT_TRUE(fs::open_beneath(root->get(), "sub", O_PATH | O_DIRECTORY).ok());
  EXPECT_FALSE(fs::open_beneath(root->get(), "link", O_RDONLY).ok());
  EXPECT_FALSE(fs::open_beneath(root->get(), "dirlink/x", O_WRONLY | O_CREAT, 0644).ok());
  EXPECT_FALSE(fs::open_beneath(root->get(), "../outside", O_RDONLY).ok());
  EXPECT_FALSE(fs::open_beneath(root->get(), "/etc/passwd", O_RDONLY).ok());
  EXPECT_FALSE(exists(t / "root/sub/x"));
}

TEST(WriteFileAtomic, ReplacesDurablyOrRefusesToReplace) {
  TempDir t;
  auto dir = fs::open_directory(t.path());
  ASSERT_TRUE(dir.ok());
  ASSERT_TRUE(fs::write_file_atomic(dir->get(), "f", "one", 0600).ok());
  EXPECT_EQ(read_file(t / "f"), "one");
  ASSERT_TRUE(fs::write_file_atomic(dir->get(), "f", "two", 0644).ok());
  EXPECT_EQ(read_file(t / "f"), "two");
  auto r = fs::write_file_atomic(dir->get(), "f", "three", 0644, /*replace=*/false);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), ErrorCode::kExists);
  EXPECT_EQ(read_file(t / "f"), "two");
  struct stat st {};
  ASSERT_EQ(::stat((t / "f").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0644u);
  EXPECT_EQ(snapshot(t.path()).size(), 2u) << "no temporary file left behind";
}

TEST(RemoveTree, RemovesReadOnlyTreesWithoutFollowingSymlinks) {
  TempDir t;
  make_dirs(t / "victim");
  write_file(t / "victim/keep", "keep");
  make_dirs(t / "tree/a/b");
  write_file(t / "tree/a/b/f", "x", 0444);
  ::symlink((t / "victim").c_str(), (t / "tree/a/link").c_str());
  ::chmod((t / "tree/a/b").c_str(), 0555);
  ::chmod((t / "tree/a").c_str(), 0555);
  auto dir = fs::open_directory(t.path());
  ASSERT_TRUE(fs::remove_tree(dir->get(), "tree").ok());
  EXPECT_FALSE(exists(t / "tree"));
  EXPECT_EQ(read_file(t / "victim/keep"), "keep");
  EXPECT_TRUE(fs::remove_tree(dir->get(), "missing").ok());
}

// --- paths beneath a directory: openat2, and the walk used where openat2 is missing -----------

namespace {

// A tree with every kind of component the walk must judge as openat2 does.
struct BeneathTree {
  TempDir t;
  UniqueFd root;
  BeneathTree() {
    make_dirs(t / "root/a/b/c");
    make_dirs(t / "outside");
    write_file(t / "root/a/b/file", "inside");
    write_file(t / "outside/secret", "secret");
    auto link = [&](const char* target, const std::string& at) {
      ASSERT_EQ(::symlink(target, (t / at).c_str()), 0) << at;
    };
    link("b", "root/a/tob");                    // relative, inside
    link("b/file", "root/a/tofile");            // to a file
    link("../../outside/secret", "root/a/up");  // leaves the tree
    link("..", "root/dotdot");                  // ".." of the root
    link("/etc/passwd", "root/abs");            // absolute
    link("missing", "root/dangling");
    link("loop2", "root/loop1");
    link("loop1", "root/loop2");
    link("a/b/c/../../tob", "root/winding");  // up and down, stays inside
    link("/proc/self/exe", "root/magic");
    link("b/file/", "root/a/slashfile");  // a target that must be a directory
    link("b/", "root/a/slashdir");
    auto fd = fs::open_directory(t / "root");
    EXPECT_TRUE(fd.ok());
    root = std::move(*fd);
  }
};

const char* kPaths[] = {
    "a",
    "a/b",
    "a/b/file",
    "a/b/file/x",
    "a/tob",
    "a/tob/file",
    "a/tofile",
    "a/up",
    "dotdot",
    "dotdot/a",
    "abs",
    "dangling",
    "loop1",
    "winding",
    "winding/c",
    "magic",
    "a/b/../b/file",
    "a/../..",
    "..",
    "../outside",
    "/etc/passwd",
    ".",
    "a/./b//c/",
    "a/b/c/../..",
    "nonexistent",
    "a/nonexistent/x",
    "",
    "a/b/file/",
    "a/b/file/.",
    "a/b/",
    "a/b/.",
    "a/tob/",
    "a/b/..",
    "a/slashfile",
    "a/slashdir",
    "a/slashdir/file",
    "./a//b/./file",
    "a/b/file/..",
};

// What one call did: the inode it opened, or the errno it failed with.
std::string outcome(int fd) {
  if (fd < 0) return std::string("errno ") + std::strerror(errno);
  struct stat st {};
  EXPECT_EQ(::fstat(fd, &st), 0);
  ::close(fd);
  return "inode " + std::to_string(st.st_ino);
}

std::string run_as(fs::BeneathImpl impl, const std::function<int()>& call) {
  fs::set_beneath_impl(impl);
  std::string r = outcome(call());
  fs::set_beneath_impl(fs::BeneathImpl::kAuto);
  return r;
}

}  // namespace

TEST(Beneath, TheWalkAnswersEveryPathAsOpenat2Does) {
  BeneathTree tree;
  const int flag_sets[] = {O_RDONLY, O_PATH, O_PATH | O_DIRECTORY, O_RDONLY | O_DIRECTORY,
                           O_RDONLY | O_NOFOLLOW};
  int compared = 0;
  for (const char* path : kPaths) {
    for (int flags : flag_sets) {
      int dir = tree.root.get();
      auto kernel =
          run_as(fs::BeneathImpl::kOpenat2, [&] { return fs::open_beneath_fd(dir, path, flags); });
      auto walked =
          run_as(fs::BeneathImpl::kWalk, [&] { return fs::open_beneath_fd(dir, path, flags); });
      EXPECT_EQ(walked, kernel) << "open_beneath_fd('" << path << "', flags " << flags << ")";
      ++compared;
    }
    int dir = tree.root.get();
    auto kernel = run_as(fs::BeneathImpl::kOpenat2, [&] { return fs::resolve_beneath(dir, path); });
    auto walked = run_as(fs::BeneathImpl::kWalk, [&] { return fs::resolve_beneath(dir, path); });
    EXPECT_EQ(walked, kernel) << "resolve_beneath('" << path << "')";
    ++compared;
  }
  EXPECT_EQ(compared, static_cast<int>(std::size(kPaths)) * 6);
  // Creating, at the paths that cannot be created (each exists, or must be a directory).
  for (const char* path : {"a/b/.", "a/b/..", "a/b/", "a/b/new/", "a/b/file/", ".", "a/b/file"}) {
    for (int flags : {O_WRONLY | O_CREAT, O_WRONLY | O_CREAT | O_EXCL}) {
      int dir = tree.root.get();
      auto kernel = run_as(fs::BeneathImpl::kOpenat2,
                           [&] { return fs::open_beneath_fd(dir, path, flags, 0644); });
      auto walked = run_as(fs::BeneathImpl::kWalk,
                           [&] { return fs::open_beneath_fd(dir, path, flags, 0644); });
      EXPECT_EQ(walked, kernel) << "creating '" << path << "', flags " << flags;
    }
  }
  // Too long for the kernel: the same answer.
  const std::string very_long(PATH_MAX + 10, 'x');
  int d = tree.root.get();
  EXPECT_EQ(
      run_as(fs::BeneathImpl::kWalk, [&] { return fs::resolve_beneath(d, very_long.c_str()); }),
      run_as(fs::BeneathImpl::kOpenat2, [&] { return fs::resolve_beneath(d, very_long.c_str()); }));
  // The cases that matter most, spelled out (the comparison above would pass if both were wrong).
  fs::set_beneath_impl(fs::BeneathImpl::kWalk);
  int dir = tree.root.get();
  errno = 0;
  EXPECT_EQ(fs::open_beneath_fd(dir, "a/up", O_RDONLY), -1);
  EXPECT_EQ(errno, ELOOP);
  EXPECT_EQ(fs::resolve_beneath(dir, "a/up"), -1);
  EXPECT_EQ(errno, EXDEV);
  EXPECT_EQ(fs::resolve_beneath(dir, "abs"), -1);
  EXPECT_EQ(errno, EXDEV);
  EXPECT_EQ(fs::resolve_beneath(dir, "loop1"), -1);
  EXPECT_EQ(errno, ELOOP);
  EXPECT_EQ(fs::open_beneath_fd(dir, "../outside/secret", O_RDONLY), -1);
  EXPECT_EQ(errno, EXDEV);
  int fd = fs::resolve_beneath(dir, "winding/file");
  EXPECT_GE(fd, 0) << std::strerror(errno);
  if (fd >= 0) ::close(fd);
  fs::set_beneath_impl(fs::BeneathImpl::kAuto);
}

// Real magic links, beneath /proc/self: never followed (RESOLVE_NO_MAGICLINKS: ELOOP), while
// the files next to them open as usual.
TEST(Beneath, TheWalkNeverFollowsAMagicLink) {
  UniqueFd self(::open("/proc/self", O_PATH | O_DIRECTORY | O_CLOEXEC));
  ASSERT_TRUE(self);
  int dir = self.get();
  for (const char* path : {"exe", "cwd", "root", "fd/0", "fd/1", "status", "fd", "task/.."}) {
    auto kernel = run_as(fs::BeneathImpl::kOpenat2, [&] { return fs::resolve_beneath(dir, path); });
    auto walked = run_as(fs::BeneathImpl::kWalk, [&] { return fs::resolve_beneath(dir, path); });
    EXPECT_EQ(walked, kernel) << path;
  }
  fs::set_beneath_impl(fs::BeneathImpl::kWalk);
  errno = 0;
  EXPECT_EQ(fs::resolve_beneath(dir, "exe"), -1);
  EXPECT_EQ(errno, ELOOP);
  fs::set_beneath_impl(fs::BeneathImpl::kAuto);
}

TEST(Beneath, TheWalkCreatesAsOpenat2DoesAndNeverThroughALink) {
  for (auto impl : {fs::BeneathImpl::kOpenat2, fs::BeneathImpl::kWalk}) {
    BeneathTree tree;
    fs::set_beneath_impl(impl);
    int dir = tree.root.get();
    const int create = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW;
    int fd = fs::open_beneath_fd(dir, "a/b/new", create, 0640);
    EXPECT_GE(fd, 0) << std::strerror(errno);
    if (fd >= 0) ::close(fd);
    struct stat st {};
    EXPECT_EQ(::stat((tree.t / "root/a/b/new").c_str(), &st), 0);
    mode_t mask = ::umask(0);
    ::umask(mask);
    EXPECT_EQ(st.st_mode & 07777, 0640u & ~mask);
    EXPECT_EQ(fs::open_beneath_fd(dir, "a/tob/x", create, 0644), -1);
    EXPECT_EQ(errno, ELOOP);
    EXPECT_EQ(fs::open_beneath_fd(dir, "dangling", create, 0644), -1);
    EXPECT_EQ(errno, EEXIST);
    EXPECT_EQ(fs::open_beneath_fd(dir, "../outside/new", create, 0644), -1);
    EXPECT_EQ(errno, EXDEV);
    for (const char* must_be_dir : {"a/b/new/", "a/b/", "a/b/file/"}) {
      EXPECT_EQ(fs::open_beneath_fd(dir, must_be_dir, create, 0644), -1) << must_be_dir;
      EXPECT_EQ(errno, EISDIR) << must_be_dir;
    }
    fs::set_beneath_impl(fs::BeneathImpl::kAuto);
    EXPECT_FALSE(exists(tree.t / "root/missing"));
    EXPECT_FALSE(exists(tree.t / "outside/new"));
    EXPECT_FALSE(exists(tree.t / "root/a/b/x"));
  }
}

// What a seccomp filter that cannot inspect openat2 does (systemd's RestrictSUIDSGID=,
// systemd-nspawn's default filter): ENOSYS. The default mode notices and walks from then on.
TEST(Beneath, FallsBackToTheWalkWhenASeccompFilterAnswersENOSYS) {
  BeneathTree tree;
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto check = [](bool ok, int code) {
      if (!ok) ::_exit(code);
    };
    scmp_filter_ctx ctx = ::seccomp_init(SCMP_ACT_ALLOW);
    check(ctx != nullptr, 10);
    check(::seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(openat2), 0) == 0, 11);
    check(::seccomp_load(ctx) == 0, 12);
    check(::syscall(SYS_openat2, AT_FDCWD, ".", nullptr, 0) == -1 && errno == ENOSYS, 13);
    fs::set_beneath_impl(fs::BeneathImpl::kAuto);  // also under UPGRADED_TEST_BENEATH=walk
    check(!fs::openat2_missing(), 14);
    int dir = tree.root.get();
    int fd = fs::open_beneath_fd(dir, "a/b/file", O_RDONLY);
    check(fd >= 0, 15);
    char buf[16] = {};
    check(::read(fd, buf, sizeof buf) == 6 && std::string(buf) == "inside", 16);
    check(fs::openat2_missing(), 17);
    check(fs::open_beneath_fd(dir, "a/up", O_RDONLY) == -1 && errno == ELOOP, 18);
    check(fs::resolve_beneath(dir, "a/up") == -1 && errno == EXDEV, 19);
    check(fs::resolve_beneath(dir, "winding/file") >= 0, 20);
    // Forcing openat2 returns its ENOSYS instead of walking.
    fs::set_beneath_impl(fs::BeneathImpl::kOpenat2);
    check(fs::open_beneath_fd(dir, "a/b/file", O_RDONLY) == -1 && errno == ENOSYS, 21);
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0)
      << "the child's check number " << WEXITSTATUS(status) << " failed (see the test's source)";
}
