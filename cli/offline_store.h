#pragma once

// `install --offline` and `list --offline`: the release store directly, without the daemon, for
// package hooks where no systemd runs (a chroot, an image build). An install locks and recovers
// only its own app, so parallel installs of different apps never meet; a listing recovers
// nothing and writes nothing.

#include <string>

namespace upgradectl {

/// Verifies and stages FILE in the store under `root` (as the daemon would: `root`/etc/upgraded
/// for keys and config, `root`/var/lib/upgraded for the store) and, unless `stage_only`, switches
/// `current` to it with an activation record: the daemon restarts the release's units and runs
/// the health gate when it next starts.
/// On a host where systemd runs (`root` is /), refused unless `force`: the running daemon would
/// not restart the units.
/// Another process installing the same app: waits up to `wait_lock_s` seconds for its lock,
/// then exits 5 (busy). Different apps never wait for each other.
int run_offline_install(const std::string& root, const std::string& file, bool stage_only,
                        bool quiet, bool force, double wait_lock_s);
/// The releases in the store under `root`, as `upgradectl list` shows them.
int run_offline_list(const std::string& root, const std::string& app, bool json);

}  // namespace upgradectl
