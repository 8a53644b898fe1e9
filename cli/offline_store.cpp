#include "offline_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "config.h"
#include "exit_codes.h"
#include "output.h"
#include "upgraded/activation/activator.h"
#include "upgraded/artifact/verifier.h"
#include "upgraded/fs/durable.h"
#include "upgraded/store/store.h"

namespace upgradectl {
namespace {

using namespace upgraded;

// Exit codes as the daemon's verbs give them (upgradectl install/list), not the offline verbs'.
int report_store(const Error& e) {
  int code = report(e);
  if (e.code() == ErrorCode::kNotFound) return kExitNotFound;
  if (e.code() == ErrorCode::kExists) return kExitExists;
  return code;
}

struct Opened {
  daemon::Config config;
  std::optional<store::Store> store;
};

// Opens the store without recovering it: each operation recovers the app it locks, and a
// listing reports an app left for recovery instead of repairing it.
Result<Opened> open_store(const std::string& root) {
  // What the daemon's unit sets (UMask=0022): trees a unit's User= can read, whatever the
  // caller's umask.
  ::umask(022);
  auto config = daemon::load_config(root);
  if (!config) return config.error().with_context("configuration");
  UPGRADED_TRY(fs::make_directories(config->state_dir()));
  store::StoreOptions so = config->store_options();
  so.cache_states = false;  // one pass: nothing to reuse
  auto st = store::Store::open(so);
  if (!st) return st.error();
  Opened o{std::move(*config), {}};
  o.store.emplace(std::move(*st));
  return o;
}

}  // namespace

int run_offline_install(const std::string& root, const std::string& file, bool stage_only,
                        bool quiet, bool force, double wait_lock_s) {
  // On a running system the daemon would not notice: `current` would switch under running
  // units, and their next restart would start the new release without a health gate.
  struct stat sd {};
  bool live = (root.empty() || root == "/") && ::stat("/run/systemd/system", &sd) == 0;
  if (live && !force) {
    std::fprintf(stderr,
                 "upgradectl: systemd is running here: use `upgradectl install --wait FILE`, which "
                 "the daemon carries out (D-Bus activation starts it); --offline is for chroots "
                 "and image builds (--root DIR), --force overrides\n");
    return kExitUsage;
  }
  auto opened = open_store(root);
  if (!opened) return report_store(opened.error());
  const auto& config = opened->config;
  const store::Store& st = *opened->store;
  struct stat rv {};
  std::optional<std::string> revoked;
  if (::stat(config.revoked_dir().c_str(), &rv) == 0) revoked = config.revoked_dir();
  auto keyring = artifact::Keyring::load(config.keys_dir(), revoked);
  if (!keyring) return report_store(keyring.error());
  int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return report_store(system_error(errno, "opening '" + file + "'"));
  UniqueFd owner(fd);
  auto art = artifact::open_verified(fd, *keyring, artifact::TrustPolicy{config.threshold});
  if (!art) return report_store(art.error().with_context("verifying '" + file + "'"));
  const std::string app = art->manifest.app, version = art->manifest.version;
  // The signatures are checked before the lock is taken; the payload is hashed as it is
  // extracted, under the lock.
  auto lock = st.lock(app, std::chrono::milliseconds(static_cast<std::int64_t>(
                               std::ceil(std::clamp(wait_lock_s, 0.0, 86400.0) * 1000))));
  if (!lock) return report_store(lock.error());
  auto staged = st.stage(*lock, *art);
  if (!staged) return report_store(staged.error().with_context("installing '" + file + "'"));
  if (!quiet)
    std::printf("Staged %s %s (%llu files, %s).\n", app.c_str(), version.c_str(),
                static_cast<unsigned long long>(staged->stats.files),
                human_size(staged->stats.bytes).c_str());
  if (stage_only) return kExitOk;

  auto state = st.state(app);
  if (!state) return report_store(state.error());
  if (auto ok = activation::check_activation(*state, staged->manifest, {}); !ok)
    return report_store(ok.error());
  // The daemon finishes this activation when it next starts (docs/state.md): it restarts the
  // units of the release `current` names and runs the health gate, rolling back on failure.
  store::PendingActivation pending{"activate", state->current.value_or(""), version,
                                   state->previous.value_or(""), ""};
  // A second offline install before the daemon ran: the release that was running before the
  // first one stays what a failure falls back to (the one in between never passed a gate).
  auto earlier = st.pending_activation(app);
  if (!earlier) return report_store(earlier.error());
  if (activation::has_activation_hooks(staged->manifest)) {
    // Hooks run as systemd units, which only the daemon starts: the whole activation, hooks
    // included, waits for it (docs/hooks.md). Nothing running changes now.
    if (*earlier && (*earlier)->step != "queued")
      return report_store(Error(
          ErrorCode::kPolicyRefused,
          app + " " + version + " declares hooks, and the offline switch to " + (*earlier)->to +
              " is not finished yet; start upgraded once (it finishes that), then install again"));
    pending.step = "queued";
    if (auto r = st.begin_activation(*lock, pending); !r) return report_store(r.error());
    if (!quiet)
      std::printf(
          "%s %s declares hooks, which only the daemon runs: its activation, hooks included, is "
          "queued for upgraded's next start. `current` still names %s.\n",
          app.c_str(), version.c_str(), state->current ? state->current->c_str() : "no release");
    return kExitOk;
  }
  if (*earlier) {
    pending.from = (*earlier)->from;
    pending.previous = (*earlier)->previous;
  }
  if (auto r = st.begin_activation(*lock, pending); !r) return report_store(r.error());
  if (auto r = st.switch_to(*lock, version); !r) {
    (void)st.end_activation(*lock);
    return report_store(r.error());
  }
  if (!quiet)
    std::printf(
        "Switched %s to %s. Its units were not touched: upgraded restarts them and checks their "
        "health when it next starts.\n",
        app.c_str(), version.c_str());
  return kExitOk;
}

int run_offline_list(const std::string& root, const std::string& only, bool json_out) {
  auto opened = open_store(root);
  if (!opened) return report_store(opened.error());
  const store::Store& st = *opened->store;
  std::vector<std::pair<std::string, store::AppView>> apps;
  if (!only.empty()) {
    auto one = st.view(only);
    if (!one) return report_store(one.error());
    apps.emplace_back(only, std::move(*one));
  } else {
    auto all = st.views();
    if (!all) return report_store(all.error());
    apps = std::move(*all);
  }
  nlohmann::json out = nlohmann::json::array();
  Table t({"APP", "VERSION", "STATUS", "ROLE", "STAGED", "PINNED", "SIZE"});
  for (const auto& [app, entry] : apps) {
    const store::AppView* view = &entry;
    if (view->needs_recovery)
      std::fprintf(stderr,
                   "upgradectl: %s: an operation on it is in progress or was interrupted; an "
                   "interrupted one is recovered by its next install (or upgraded's start); "
                   "listed as its state records it\n",
                   app.c_str());
    if (!view->state) {
      if (!only.empty()) return report_store(Error(ErrorCode::kNotFound, "no app '" + app + "'"));
      continue;  // its first install never committed
    }
    const auto& state = view->state;
    for (const auto& v : state->versions_in_order()) {
      const auto& r = state->releases.at(v);
      std::string role = state->current == v ? "current" : state->previous == v ? "previous" : "";
      std::string status(store::to_string(r.status));
      add_release_row(json_out, out, t, app, v, status, role, r.staged_at, r.pinned, r.size,
                      role == "current" && state->pre_finalized());
    }
  }
  print_rows(json_out, out, t, "No releases are installed.");
  return kExitOk;
}

}  // namespace upgradectl
