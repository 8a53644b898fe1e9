#pragma once

// A release store under a temporary root, signed artifacts of several versions of one app,
// the tree each version must produce, and a checker for the store's crash invariants.

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "support/artifact_builder.h"
#include "support/test_dir.h"
#include "upgraded/store/store.h"

namespace upgraded::test {

class StoreFixture {
 public:
  /// Builds artifacts of app "hello" for `versions` and learns each version's tree by staging
  /// it into a reference store.
  explicit StoreFixture(std::vector<std::string> versions = {"1.0.0", "1.1.0", "1.2.0", "2.0.0"});

  std::string artifact(const std::string& version) const {
    return m_dir / ("hello-" + version + ".upd");
  }
  std::string keys_dir() const { return m_dir / "keys"; }
  const artifact::Keyring& keyring() const { return m_ring; }
  const std::map<std::string, std::string>& trees() const { return m_trees; }
  const TempDir& dir() const { return m_dir; }

  store::StoreOptions options(const std::string& root) const;
  /// Stages `version` into `store`; fails the test on error.
  void stage(const store::Store& store, const std::string& version) const;

 private:
  TempDir m_dir;
  TestKey m_key;
  artifact::Keyring m_ring;
  std::map<std::string, std::string> m_trees;
};

/// Checks, for an app root after recovery: state.json parses; `current` is a relative symlink
/// to releases/<state.current> whose tree is exactly the expected one (or absent when
/// state.current is null); every release in the state has its tree and manifest and every
/// tree is in the state; staging/ is empty; no journal, current.new or temporary files; the
/// floor is not below `floor_before`. Returns the violations (empty when all hold).
std::vector<std::string> check_store_invariants(
    const std::string& app_root, const std::map<std::string, std::string>& trees,
    const std::optional<std::string>& floor_before = {});

}  // namespace upgraded::test
