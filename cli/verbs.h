#pragma once

// upgradectl's verbs, split by the libraries they need (docs/architecture.md, "upgradectl's
// modules"). The executable parses the command line and runs `list --offline` itself; the verbs
// that talk to the daemon live in upgradectl-bus.so (sd-bus, sdbus-c++), and those that read
// or write artifacts in upgradectl-artifact.so (OpenSSL, libarchive, zstd). Each module is
// loaded only by the verb that needs it, so that no invocation pays for loading libraries it
// does not use: loading all of them took about 13 ms of every invocation.
//
// The modules are built from the same tree as the executable and are installed with it; the
// tables below are their whole interface, checked by kModuleInterface and their size.

#include <cstdint>
#include <cstdio>
#include <exception>
#include <optional>
#include <string>
#include <utility>

#include "exit_codes.h"
#include "upgraded/artifact/extractor.h"
#include "upgraded/artifact/packer.h"

namespace upgradectl {

#ifndef UPGRADECTL_MODULE_INTERFACE
#error "UPGRADECTL_MODULE_INTERFACE: the version and the hash of this file and the headers it uses"
#endif
/// The project's version and a SHA-256 of this header and of the engine's headers whose types
/// the tables use (cli/CMakeLists.txt): an executable and a module agree on it only when
/// they were built from the same interface.
inline constexpr const char* kModuleInterface = UPGRADECTL_MODULE_INTERFACE;

/// Options of every verb that talks to the daemon.
struct Common {
  bool user = false;
  bool json = false;
  bool quiet = false;
  bool no_block = false;
};

struct TrustArgs {
  std::string keys;
  std::optional<std::string> revoked;
  unsigned threshold = 1;
};

struct PackArgs {
  upgraded::artifact::PackOptions o;
  std::optional<std::string> source;
  std::optional<std::int64_t> created;
};

struct UnpackArgs {
  TrustArgs trust;
  std::string file;
  std::string dest;
  bool strip_unsafe = false;
  upgraded::artifact::ExtractLimits limits;
};

/// upgradectl-bus.so: each returns the exit code (docs/upgradectl.md).
struct BusVerbs {
  const char* interface;
  std::uint32_t size;
  int (*status)(const Common&, const std::string& app);
  int (*list)(const Common&, const std::string& only);
  int (*jobs)(const Common&);
  int (*history)(const Common&, const std::string& app, unsigned limit);
  int (*finalization_status)(const Common&, const std::string& app);
  int (*cancel)(const Common&, unsigned id);
  int (*install)(const Common&, const std::string& file, bool stage_only);
  int (*activate)(const Common&, const std::string& app, const std::string& version, bool through,
                  bool allow_bad, bool allow_below_floor);
  int (*rollback)(const Common&, const std::string& app, bool allow_below_floor);
  int (*remove)(const Common&, const std::string& app, const std::string& version);
  int (*set_pinned)(const Common&, const std::string& app, const std::string& version, bool pin);
  int (*floor)(const Common&, const std::string& app, const std::string& version);
  int (*gc)(const Common&, const std::string& app, std::optional<unsigned> keep,
            std::optional<std::uint64_t> max_bytes);
  int (*finalize)(const Common&, const std::string& app, bool no_backup, bool yes);
  int (*plan)(const Common&, const std::string& app, const std::string& version, bool rollback,
              bool through, bool allow_bad, bool allow_below_floor);
  /// ActivateSet: (app, version) pairs, activated in this order as one job.
  int (*activate_set)(const Common&, const std::vector<std::pair<std::string, std::string>>& set);
  /// PlanSet: the plan of activate_set.
  int (*plan_set)(const Common&, const std::vector<std::pair<std::string, std::string>>& set);
  /// InstallSet: the artifacts staged, then (unless stage_only) activated in this order.
  int (*install_set)(const Common&, const std::vector<std::string>& files, bool stage_only);
  /// PlanInstall: the plan of installing and activating the artifacts.
  int (*plan_install)(const Common&, const std::vector<std::string>& files);
};

/// upgradectl-artifact.so.
struct ArtifactVerbs {
  const char* interface;
  std::uint32_t size;
  int (*keygen)(const std::string& private_key, const std::string& public_key);
  int (*pack)(PackArgs&);
  int (*verify)(const TrustArgs&, const std::string& file, bool json);
  int (*unpack)(UnpackArgs&);
  int (*inspect)(const std::string& file, bool json);
  /// `install --offline`: verifies and stages FILE in the store under `root` (as the daemon
  /// would: `root`/etc/upgraded for keys and config, `root`/var/lib/upgraded for the store) and,
  /// unless `stage_only`, switches `current` to it with an activation record: the daemon restarts
  /// the release's units and runs the health gate when it next starts. On a host where systemd runs
  /// (`root` is /), refused unless `force`: the running daemon would not restart the units. Another
  /// process installing the same app: waits up to `wait_lock_s` seconds for its lock, then exits 5
  /// (busy). Different apps never wait for each other.
  int (*install_offline)(const std::string& root, const std::string& file, bool stage_only,
                         bool quiet, bool force, double wait_lock_s);
};

/// The module's table, loaded on first use; null after printing why it could not be loaded
/// (the caller exits with kExitFailed).
const BusVerbs* bus_verbs();
const ArtifactVerbs* artifact_verbs();

/// A table entry that lets no exception out: one that escapes a verb (a bug) is reported and
/// gives kExitFailed instead of aborting through the executable's frames.
template <auto F>
struct Guarded;
template <class... A, int (*F)(A...)>
struct Guarded<F> {
  static int call(A... a) noexcept {
    try {
      return F(std::forward<A>(a)...);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "upgradectl: internal error: %s\n", e.what());
    } catch (...) {
      std::fprintf(stderr, "upgradectl: internal error\n");
    }
    return kExitFailed;
  }
};
template <auto F>
inline constexpr auto guarded = &Guarded<F>::call;

/// Runs `f` with the module's table: its exit code, or kExitFailed if the module is missing.
template <class F>
int on_bus(F&& f) {
  const BusVerbs* v = bus_verbs();
  return v ? f(*v) : kExitFailed;
}

template <class F>
int with_artifact(F&& f) {
  const ArtifactVerbs* v = artifact_verbs();
  return v ? f(*v) : kExitFailed;
}

}  // namespace upgradectl

/// What each module exports (C linkage: one unmangled symbol per module).
extern "C" const upgradectl::BusVerbs* upgradectl_bus_verbs();
extern "C" const upgradectl::ArtifactVerbs* upgradectl_artifact_verbs();
