#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include "support/test_dir.h"
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
