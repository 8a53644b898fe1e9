#pragma once

// `install --offline` and `list --offline`: the release store directly, without the daemon, for
// package hooks where no systemd runs (a chroot, an image build). They respect the store's
// lock and run its recovery first, like the daemon.

#include <string>

namespace upgradectl {

/// Verifies and stages FILE in the store under `root` (as the daemon would: `root`/etc/upgraded
/// for keys and config, `root`/var/lib/upgraded for the store) and, unless `stage_only`, switches
/// `current` to it with an activation record: the daemon restarts the release's units and runs
/// the health gate when it next starts.
/// On a host where systemd runs (`root` is /), refused unless `force`: the running daemon would
/// not restart the units.
int run_offline_install(const std::string& root, const std::string& file, bool stage_only,
                        bool quiet, bool force);
/// The releases in the store under `root`, as `upgradectl list` shows them.
int run_offline_list(const std::string& root, const std::string& app, bool json);

}  // namespace upgradectl
