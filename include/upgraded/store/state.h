#pragma once

// The per-app state file (state.json): small, replaced atomically, the single source of truth
// for which release is current. docs/state.md describes every field.

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "upgraded/artifact/manifest.h"
#include "upgraded/result.h"

namespace upgraded::store {

/// staged: installed, never activated; active: activated, not yet confirmed healthy;
/// good: confirmed healthy at least once; bad: failed its health gate or was marked bad.
enum class ReleaseStatus { kStaged, kActive, kGood, kBad };
std::string_view to_string(ReleaseStatus s);
std::optional<ReleaseStatus> release_status_from(std::string_view s);

struct ReleaseRecord {
  ReleaseStatus status = ReleaseStatus::kStaged;
  bool pinned = false;
  std::string staged_at;   ///< RFC 3339 UTC
  std::uint64_t size = 0;  ///< bytes of file content in the tree
  artifact::DataFormat data_format;
  bool operator==(const ReleaseRecord&) const = default;
};

struct AppState {
  std::string app;
  std::optional<std::string> current;          ///< what `current` points to
  std::optional<std::string> previous;         ///< the rollback target
  std::optional<std::string> last_known_good;  ///< newest release confirmed healthy
  std::optional<std::string> floor;            ///< versions below it are refused; never lowered
  std::optional<std::uint64_t> finalized_data_format;  ///< never lowered
  std::optional<std::string> finalized_at;             ///< RFC 3339 UTC, when it was last raised
  std::optional<std::string> last_backup;  ///< the name the last finalize's backup printed
  /// RFC 3339 UTC: since when the current release writes a newer data format than the
  /// finalized one (pre-finalized); empty when nothing is pending.
  std::optional<std::string> pending_since;
  /// RFC 3339 UTC: since when the current release has been confirmed healthy (the soak start
  /// of auto-finalize); cleared by every switch.
  std::optional<std::string> good_since;
  std::map<std::string, ReleaseRecord> releases;
  bool operator==(const AppState&) const = default;

  /// Release versions ordered by policy::compare_versions, oldest first.
  std::vector<std::string> versions_in_order() const;
  /// The installed release equal to `version` by policy::compare_versions ("1.0" for "1.00"),
  /// if any: versions that compare equal cannot be told apart by ordering, so only one of them
  /// may be installed.
  std::optional<std::string> installed_as(const std::string& version) const;
  /// The current release writes a data format newer than the finalized one: rolling back is
  /// still free, finalizing is pending.
  bool pre_finalized() const;
};

Result<AppState> parse_state(std::string_view text);
std::string serialize_state(const AppState& state);

}  // namespace upgraded::store
