#pragma once

// `install --offline` and `list --offline`: the release store directly, without the daemon, for
// package hooks where no systemd runs (a chroot, an image build). An install locks and recovers
// only its own app, so parallel installs of different apps never meet; a listing recovers
// nothing and writes nothing.

#include <optional>
#include <string>

#include "config.h"
#include "upgraded/result.h"
#include "upgraded/store/store.h"

namespace upgradectl {

struct Opened {
  upgraded::daemon::Config config;
  std::optional<upgraded::store::Store> store;
};

/// Opens the store under `root` without recovering it: each operation recovers the app it
/// locks, and a listing reports an app left for recovery instead of repairing it.
upgraded::Result<Opened> open_store(const std::string& root);
/// Reports `e` on stderr: the exit code the daemon's verbs give for it.
int report_store(const upgraded::Error& e);

/// The releases in the store under `root`, as `upgradectl list` shows them.
int run_offline_list(const std::string& root, const std::string& app, bool json);

}  // namespace upgradectl
