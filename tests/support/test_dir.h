#pragma once

// Test fixtures: a private temporary directory, key pairs, tree snapshots.

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstdint>
#include <map>
#include <string>

namespace upgraded::test {

/// A temporary directory removed (recursively, whatever its modes) at destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return m_path; }
  std::string operator/(const std::string& rel) const { return m_path + "/" + rel; }

 private:
  std::string m_path;
};

void write_file(const std::string& path, const std::string& content, unsigned mode = 0644);
std::string read_file(const std::string& path);
bool exists(const std::string& path);
void make_dirs(const std::string& path);

/// Sets the process umask for a scope, and puts the previous one back at its end.
class ScopedUmask {
 public:
  explicit ScopedUmask(mode_t mask) : m_old(::umask(mask)) {}
  ~ScopedUmask() { ::umask(m_old); }
  ScopedUmask(const ScopedUmask&) = delete;
  ScopedUmask& operator=(const ScopedUmask&) = delete;

 private:
  mode_t m_old;
};

/// Gives directory `dir` a minimal default ACL (acl(5): owner, group and others, each with the
/// permission bits given), which what is created in it inherits in place of the umask. False
/// where the file system has no ACLs.
bool set_default_acl(const std::string& dir, unsigned owner, unsigned group, unsigned other);

/// Every entry below `root` with type, mode, size, link target, content hash and mtime: two
/// snapshots are equal exactly when nothing in the tree changed.
std::map<std::string, std::string> snapshot(const std::string& root, bool with_mtime = true);

/// A hash over paths, types, modes, link targets and contents (not mtimes).
std::string tree_hash(const std::string& root);

/// Skips the test, saying `why` (what this machine lacks), but fails it under CI=true, where
/// the suite must exercise everything.
#define UPGRADED_SKIP_UNLESS_CI(why)                                 \
  do {                                                               \
    if (::upgraded::test::in_ci()) FAIL() << "CI=true, but " << why; \
    GTEST_SKIP() << why << " - skipped";                             \
  } while (false)

/// Skips the test when not running as root, but fails it under CI=true.
#define UPGRADED_REQUIRE_ROOT()                                                                    \
  do {                                                                                             \
    if (::geteuid() != 0) UPGRADED_SKIP_UNLESS_CI("this test needs root (run as root, or in CI)"); \
  } while (false)
bool in_ci();

}  // namespace upgraded::test
