#pragma once

// upgraded.conf: TOML, in <root>/etc/upgraded/upgraded.conf, then the drop-ins
// <root>/etc/upgraded/upgraded.conf.d/*.conf in lexical order, each overriding what came before
// key by key. Unknown sections or keys, wrong types and out-of-range values are errors: the
// daemon refuses to start rather than run with a setting it misread. docs/configuration.md
// lists every key.

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "upgraded/artifact/extractor.h"
#include "upgraded/result.h"
#include "upgraded/store/store.h"

namespace upgraded::daemon {

/// Host policy for one app ([apps.<name>]): where its data lives and whom its hooks run as.
struct AppPolicy {
  /// The only paths its hooks may write (absolute; interpreted under Config::root).
  std::vector<std::string> data_dirs;
  std::string user;   ///< whom hooks run as (empty: root, the service manager's user)
  std::string group;  ///< their group (empty: the user's)
  /// Finalize on its own once the current release has been good this long (0: never).
  std::uint64_t auto_finalize_after_s = 0;
  /// The instances of its template units ("1", "2"...); empty: those running.
  std::vector<std::string> instances;
  /// Strategy rolling: instances of one template restarted and gated together.
  std::uint32_t max_unavailable = 1;
};

struct Config {
  std::string root = "/";          ///< every path below lives under it (--root)
  std::vector<std::string> files;  ///< the files read, in order

  // [trust]
  unsigned threshold = 1;
  // [store]
  std::size_t keep = 3;
  std::optional<std::uint64_t> max_bytes;
  // [activation]
  std::uint32_t job_timeout_s = 90;
  // [extract]
  artifact::ExtractPolicy extract;
  /// When the daemon runs as root, each run of its helper gets a uid (and the same gid) of its
  /// own from [helper_ids, helper_ids + kHelperIds): ids that own nothing on the host.
  std::uint32_t helper_ids = kDefaultHelperIds;
  static constexpr std::uint32_t kDefaultHelperIds = 2147418112;  // 0x7fff0000
  static constexpr std::uint32_t kHelperIds = 65536;
  // [limits]: how much work callers can make the daemon do at once
  std::uint32_t verifications = 4;            ///< Install calls whose artifact is verified at once
  std::uint32_t queued_installs = 64;         ///< authorized Install calls waiting for their turn
  std::uint32_t authorizations_per_user = 8;  ///< calls of one non-root uid awaiting polkit
  // [apps.<name>] root = "/opt/<name>" (absolute; interpreted under `root`)
  std::map<std::string, std::string> app_roots;
  // [apps.<name>] data_dirs, user, group, auto_finalize_after_s
  std::map<std::string, AppPolicy> app_policies;

  std::string path(const std::string& absolute) const;  ///< `absolute` under root
  std::string config_dir() const { return path("/etc/upgraded"); }
  std::string keys_dir() const { return path("/etc/upgraded/keys.d"); }
  std::string revoked_dir() const { return path("/etc/upgraded/revoked.d"); }
  std::string state_dir() const { return path("/var/lib/upgraded"); }
  /// The release store this configuration describes (its root, app roots, extraction policy).
  store::StoreOptions store_options() const;
};

/// Reads the configuration of the instance rooted at `root` (missing files: defaults).
Result<Config> load_config(const std::string& root);

/// Applies one file's text over `config` exactly as load_config applies each file it reads
/// (`file` names it in messages; `config.files` is left alone). For the config fuzz target.
Result<void> apply_config_text(Config& config, std::string_view text, const std::string& file);

}  // namespace upgraded::daemon
