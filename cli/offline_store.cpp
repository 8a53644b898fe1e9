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

using namespace upgraded;

// Exit codes as the daemon's verbs give them (upgradectl install/list), not the offline verbs'.
int report_store(const Error& e) {
  int code = report(e);
  if (e.code() == ErrorCode::kNotFound) return kExitNotFound;
  if (e.code() == ErrorCode::kExists) return kExitExists;
  return code;
}

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
  so.persist_views = true;  // list --offline: views.cache
  auto st = store::Store::open(so);
  if (!st) return st.error();
  Opened o{std::move(*config), {}};
  o.store.emplace(std::move(*st));
  return o;
}

int run_offline_list(const std::string& root, const std::string& only, bool json_out) {
  auto opened = open_store(root);
  if (!opened) return report_store(opened.error());
  const store::Store& st = *opened->store;
  nlohmann::json out = nlohmann::json::array();
  Table t({"APP", "VERSION", "STATUS", "ROLE", "STAGED", "PINNED", "SIZE"});
  auto add = [&](const std::string& app, const store::AppView& view) {
    if (view.needs_recovery)
      std::fprintf(stderr,
                   "upgradectl: %s: an operation on it is in progress or was interrupted; an "
                   "interrupted one is recovered by its next install (or upgraded's start); "
                   "listed as its state records it\n",
                   app.c_str());
    for (const auto& r : view.releases)
      add_release_row(json_out, out, t, app, r.version, std::string(store::to_string(r.status)),
                      r.role, r.staged_at, r.pinned, r.size,
                      r.role == "current" && view.pre_finalized);
  };
  if (!only.empty()) {
    auto one = st.view(only);
    if (!one) return report_store(one.error());
    add(only, *one);
    // Its first install never committed.
    if (!one->has_state) return report_store(Error(ErrorCode::kNotFound, "no app '" + only + "'"));
  } else if (auto all = st.for_each_view(add); !all) {
    return report_store(all.error());
  }
  print_rows(json_out, out, t, "No releases are installed.");
  return kExitOk;
}

}  // namespace upgradectl
