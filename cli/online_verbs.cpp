// The verbs that talk to the daemon: their command lines. What they do is in upgradectl-bus.so
// (bus_verbs.cpp), loaded only when one of them runs (cli/verbs.h).

#include "online_verbs.h"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <string>

#include "exit_codes.h"
#include "offline_store.h"
#include "verbs.h"

namespace upgradectl {
namespace {

// How long `install --offline` waits for another process installing the same app
// (docs/upgradectl.md, "Parallel installs"): an offline install holds its app's lock for one
// extraction, seconds for most payloads and about a minute for the largest; longer means the holder
// is stuck, and a package transaction should fail with a clear exit 5 rather than hang.
constexpr double kDefaultWaitLockS = 120;

void add_common(CLI::App* cmd, Common& c, bool job, bool read) {
  cmd->add_flag("--user", c.user, "talk to the per-user instance on the session bus");
  if (read) cmd->add_flag("--json", c.json, "machine-readable output (docs/upgradectl.md)");
  if (job) {
    cmd->add_flag("--no-block", c.no_block, "print the job's path and return at once");
    cmd->add_flag("-q,--quiet", c.quiet, "no progress output");
  }
}

// APP=VERSION arguments, each split at its '=' (app names have none); nullopt if one is not of
// that form.
std::optional<std::vector<std::pair<std::string, std::string>>> parse_set(
    const std::vector<std::string>& args) {
  std::vector<std::pair<std::string, std::string>> set;
  for (const auto& a : args) {
    const auto at = a.find('=');
    if (at == std::string::npos || at == 0 || at + 1 == a.size()) return std::nullopt;
    set.emplace_back(a.substr(0, at), a.substr(at + 1));
  }
  return set;
}

// An argument of plan that names an artifact file: a file that exists, or, without the '=' of
// APP=VERSION, a path ('/') or a name ending in .upd (opening it then says what is wrong). A
// bare APP is a usage error.
bool is_artifact_arg(const std::string& a) {
  struct stat st {};
  if (::stat(a.c_str(), &st) == 0) return true;
  const bool upd = a.size() > 4 && a.compare(a.size() - 4, 4, ".upd") == 0;
  return a.find('=') == std::string::npos && (a.find('/') != std::string::npos || upd);
}

// The system bus passes at most 16 descriptors in a message (dbus-daemon's
// max_message_unix_fds): more artifacts at once would be refused by the bus, unexplained.
constexpr std::size_t kMaxArtifacts = 16;
bool too_many_artifacts(std::size_t n, int& exit_code) {
  if (n <= kMaxArtifacts) return false;
  std::fprintf(stderr,
               "upgradectl: at most %zu artifacts at once (the system bus passes at most %zu "
               "descriptors in a message); stage more with install --stage-only, then activate "
               "APP=VERSION...\n",
               kMaxArtifacts, kMaxArtifacts);
  exit_code = kExitUsage;
  return true;
}

// --through, --allow-bad and --allow-below-floor apply to one installed release: refused (usage)
// for anything else, `what` saying what they apply to.
bool refuse_one_app_flags(bool through, bool allow_bad, bool below_floor, const char* what,
                          int& exit_code) {
  if (!through && !allow_bad && !below_floor) return false;
  std::fprintf(stderr, "upgradectl: --through, --allow-bad and --allow-below-floor apply to %s\n",
               what);
  exit_code = kExitUsage;
  return true;
}

}  // namespace

void add_online_verbs(CLI::App& app, int& exit_code) {
  {
    auto* cmd = app.add_subcommand("status", "Show installed apps: current and rollback releases");
    auto c = std::make_shared<Common>();
    auto name = std::make_shared<std::string>();
    add_common(cmd, *c, false, true);
    cmd->add_option("APP", *name, "only this app");
    cmd->callback([&exit_code, c, name] {
      exit_code = on_bus([&](const BusVerbs& v) { return v.status(*c, *name); });
    });
  }
  {
    auto* cmd = app.add_subcommand("list", "List installed releases");
    auto c = std::make_shared<Common>();
    auto name = std::make_shared<std::string>();
    auto offline = std::make_shared<bool>(false);
    auto root = std::make_shared<std::string>("/");
    add_common(cmd, *c, false, true);
    cmd->add_flag("--offline", *offline, "read the store directly, without the daemon");
    cmd->add_option("--root", *root, "with --offline: the instance whose /var is under DIR")
        ->type_name("DIR")
        ->needs(cmd->get_option("--offline"));
    cmd->get_option("--offline")->excludes("--user");
    cmd->add_option("APP", *name, "only this app");
    cmd->callback([&exit_code, c, name, offline, root] {
      exit_code = *offline ? run_offline_list(*root, *name, c->json)
                           : on_bus([&](const BusVerbs& v) { return v.list(*c, *name); });
    });
  }
  {
    auto* cmd = app.add_subcommand(
        "install", "Install a signed artifact and activate it (unless --stage-only)");
    auto c = std::make_shared<Common>();
    auto files = std::make_shared<std::vector<std::string>>();
    auto stage_only = std::make_shared<bool>(false);
    add_common(cmd, *c, true, false);
    cmd->add_flag("--stage-only", *stage_only, "install without activating");
    auto wait = std::make_shared<bool>(true);
    cmd->add_flag("--wait", *wait, "follow the job to its end (the default; for package hooks)");
    auto offline = std::make_shared<bool>(false);
    auto root = std::make_shared<std::string>("/");
    cmd->add_flag("--offline", *offline,
                  "without the daemon (no systemd running: chroot, image build): stage and "
                  "switch through the store; the daemon restarts the units when it next starts");
    cmd->add_option("--root", *root,
                    "with --offline: the instance whose /etc and /var are under DIR")
        ->type_name("DIR")
        ->needs(cmd->get_option("--offline"));
    cmd->get_option("--offline")->excludes("--user")->excludes("--no-block");
    cmd->add_option("FILE", *files,
                    "artifact (.upd); several: all staged first, then activated in this order "
                    "as one set (a failure rolls back the ones before it, last first)")
        ->required();
    auto force = std::make_shared<bool>(false);
    cmd->add_flag("--force", *force, "with --offline: even where systemd is running")
        ->needs(cmd->get_option("--offline"));
    auto wait_lock = std::make_shared<double>(kDefaultWaitLockS);
    cmd->add_option("--wait-lock", *wait_lock,
                    "with --offline: wait up to SECONDS for another process installing the same "
                    "app (default " +
                        std::to_string(static_cast<int>(kDefaultWaitLockS)) +
                        "; 0: do not wait), then exit 5")
        ->type_name("SECONDS")
        ->check(CLI::Range(0.0, 86400.0))
        ->check(CLI::Validator(
            [](std::string& s) {
              return std::isfinite(std::stod(s)) ? std::string() : "not a number of seconds";
            },
            "", "finite"))
        ->needs(cmd->get_option("--offline"));
    // Every variable an option writes to is captured, so that it outlives the parsing (--wait
    // only says what is the default, but CLI11 still writes to it).
    cmd->callback([&exit_code, c, files, stage_only, wait, offline, root, force, wait_lock] {
      if (*offline && files->size() > 1) {
        std::fprintf(stderr, "upgradectl: install --offline takes one artifact\n");
        exit_code = kExitUsage;
        return;
      }
      if (too_many_artifacts(files->size(), exit_code)) return;
      const std::string& file = files->front();
      if (*offline)
        exit_code = with_artifact([&](const ArtifactVerbs& v) {
          return v.install_offline(*root, file, *stage_only, c->quiet, *force, *wait_lock);
        });
      else if (files->size() > 1)
        exit_code =
            on_bus([&](const BusVerbs& v) { return v.install_set(*c, *files, *stage_only); });
      else
        exit_code = on_bus([&](const BusVerbs& v) { return v.install(*c, file, *stage_only); });
    });
  }
  {
    auto* cmd = app.add_subcommand(
        "plan", "Show every step an activation or rollback would take, and its expected downtime");
    auto c = std::make_shared<Common>();
    auto spec = std::make_shared<std::vector<std::string>>();
    auto rollback = std::make_shared<std::string>();
    auto allow_bad = std::make_shared<bool>(false);
    auto below_floor = std::make_shared<bool>(false);
    auto through = std::make_shared<bool>(false);
    add_common(cmd, *c, false, true);
    cmd->add_option("--rollback", *rollback, "plan the rollback of APP instead");
    cmd->add_flag("--through", *through, "as activate --through");
    cmd->add_flag("--allow-bad", *allow_bad, "as activate --allow-bad");
    cmd->add_flag("--allow-below-floor", *below_floor, "as activate --allow-below-floor");
    cmd->add_option("APP=VERSION... | FILE...", *spec,
                    "installed releases to plan activating (several: a set, in this order), or "
                    "artifact files to plan installing and activating");
    cmd->callback([&exit_code, c, spec, rollback, allow_bad, below_floor, through] {
      std::string name, version;
      if (!rollback->empty() == !spec->empty()) {
        std::fprintf(stderr, "upgradectl: plan takes FILE..., APP=VERSION... or --rollback APP\n");
        exit_code = kExitUsage;
        return;
      }
      if (!rollback->empty() && (*through || *allow_bad)) {
        std::fprintf(stderr, "upgradectl: --through and --allow-bad are not rollback's options\n");
        exit_code = kExitUsage;
        return;
      }
      if (rollback->empty()) {
        const auto files = std::count_if(spec->begin(), spec->end(), is_artifact_arg);
        if (files > 0) {
          if (static_cast<std::size_t>(files) != spec->size()) {
            std::fprintf(stderr,
                         "upgradectl: plan takes artifact FILEs or APP=VERSION, not both\n");
            exit_code = kExitUsage;
            return;
          }
          if (refuse_one_app_flags(*through, *allow_bad, *below_floor, "installed releases",
                                   exit_code) ||
              too_many_artifacts(spec->size(), exit_code))
            return;
          exit_code = on_bus([&](const BusVerbs& v) { return v.plan_install(*c, *spec); });
          return;
        }
        auto set = parse_set(*spec);
        if (!set) {
          std::fprintf(stderr,
                       "upgradectl: plan takes FILE..., APP=VERSION... or --rollback APP\n");
          exit_code = kExitUsage;
          return;
        }
        if (set->size() > 1) {
          if (refuse_one_app_flags(*through, *allow_bad, *below_floor, "one app", exit_code))
            return;
          exit_code = on_bus([&](const BusVerbs& v) { return v.plan_set(*c, *set); });
          return;
        }
        name = set->front().first;
        version = set->front().second;
      } else {
        name = *rollback;
      }
      exit_code = on_bus([&](const BusVerbs& v) {
        return v.plan(*c, name, version, !rollback->empty(), *through, *allow_bad, *below_floor);
      });
    });
  }
  {
    auto* cmd = app.add_subcommand(
        "activate",
        "Make an installed release the running one (APP VERSION), or several, in order, as one "
        "job (APP=VERSION...)");
    auto c = std::make_shared<Common>();
    auto args = std::make_shared<std::vector<std::string>>();
    auto allow_bad = std::make_shared<bool>(false);
    auto below_floor = std::make_shared<bool>(false);
    auto through = std::make_shared<bool>(false);
    add_common(cmd, *c, true, false);
    cmd->add_flag("--through", *through,
                  "when VERSION cannot be reached from the current release, walk the chain of "
                  "installed releases that leads there, each step gated");
    cmd->add_flag("--allow-bad", *allow_bad, "also activate a release marked bad");
    cmd->add_flag("--allow-below-floor", *below_floor,
                  "also activate a kept release below the version floor");
    cmd->add_option("APP VERSION | APP=VERSION...", *args,
                    "an app and its release; or several APP=VERSION, activated in this order "
                    "(a failure rolls back the ones before it, last first)")
        ->required();
    cmd->callback([&exit_code, c, args, allow_bad, below_floor, through] {
      if (args->size() == 2 && args->front().find('=') == std::string::npos &&
          (*args)[1].find('=') == std::string::npos) {
        exit_code = on_bus([&](const BusVerbs& v) {
          return v.activate(*c, (*args)[0], (*args)[1], *through, *allow_bad, *below_floor);
        });
        return;
      }
      auto set = parse_set(*args);
      if (!set) {
        std::fprintf(stderr, "upgradectl: activate takes APP VERSION, or APP=VERSION...\n");
        exit_code = kExitUsage;
        return;
      }
      if (set->size() == 1) {
        exit_code = on_bus([&](const BusVerbs& v) {
          return v.activate(*c, set->front().first, set->front().second, *through, *allow_bad,
                            *below_floor);
        });
        return;
      }
      if (refuse_one_app_flags(*through, *allow_bad, *below_floor, "one app", exit_code)) return;
      exit_code = on_bus([&](const BusVerbs& v) { return v.activate_set(*c, *set); });
    });
  }
  {
    auto* cmd = app.add_subcommand("rollback", "Go back to the previous release");
    auto c = std::make_shared<Common>();
    auto name = std::make_shared<std::string>();
    auto below_floor = std::make_shared<bool>(false);
    add_common(cmd, *c, true, false);
    cmd->add_flag("--allow-below-floor", *below_floor,
                  "also when the previous release is below the version floor");
    cmd->add_option("APP", *name, "app")->required();
    cmd->callback([&exit_code, c, name, below_floor] {
      exit_code = on_bus([&](const BusVerbs& v) { return v.rollback(*c, *name, *below_floor); });
    });
  }
  {
    auto* cmd = app.add_subcommand("remove", "Remove an installed release");
    auto c = std::make_shared<Common>();
    auto name = std::make_shared<std::string>();
    auto version = std::make_shared<std::string>();
    add_common(cmd, *c, true, false);
    cmd->add_option("APP", *name, "app")->required();
    cmd->add_option("VERSION", *version, "release")->required();
    cmd->callback([&exit_code, c, name, version] {
      exit_code = on_bus([&](const BusVerbs& v) { return v.remove(*c, *name, *version); });
    });
  }
  for (bool pin : {true, false}) {
    auto* cmd = app.add_subcommand(
        pin ? "pin" : "unpin",
        pin ? "Pin a release: never removed, by remove or gc" : "Unpin a release");
    auto c = std::make_shared<Common>();
    auto name = std::make_shared<std::string>();
    auto version = std::make_shared<std::string>();
    add_common(cmd, *c, true, false);
    cmd->add_option("APP", *name, "app")->required();
    cmd->add_option("VERSION", *version, "release")->required();
    cmd->callback([&exit_code, c, name, version, pin] {
      exit_code = on_bus([&](const BusVerbs& v) { return v.set_pinned(*c, *name, *version, pin); });
    });
  }
  {
    auto* cmd = app.add_subcommand(
        "floor", "Raise an app's version floor: older releases are never installed or activated");
    auto c = std::make_shared<Common>();
    auto name = std::make_shared<std::string>();
    auto version = std::make_shared<std::string>();
    add_common(cmd, *c, true, false);
    cmd->add_option("APP", *name, "app")->required();
    cmd->add_option("VERSION", *version, "the oldest version allowed from now on")->required();
    cmd->callback([&exit_code, c, name, version] {
      exit_code = on_bus([&](const BusVerbs& v) { return v.floor(*c, *name, *version); });
    });
  }
  {
    auto* cmd = app.add_subcommand(
        "gc", "Remove old releases (never current, previous, pinned or last known-good)");
    auto c = std::make_shared<Common>();
    auto name = std::make_shared<std::string>();
    auto keep = std::make_shared<std::optional<unsigned>>();
    auto max_bytes = std::make_shared<std::optional<std::uint64_t>>();
    add_common(cmd, *c, true, false);
    cmd->add_option("--keep", *keep, "releases to keep (default: the configured retention)")
        ->check(CLI::Range(1u, 10000u));
    cmd->add_option("--max-bytes", *max_bytes, "a byte budget for the app's releases");
    cmd->add_option("APP", *name, "app")->required();
    cmd->callback([&exit_code, c, name, keep, max_bytes] {
      exit_code = on_bus([&](const BusVerbs& v) { return v.gc(*c, *name, *keep, *max_bytes); });
    });
  }
  {
    auto* cmd = app.add_subcommand(
        "finalize", "Make the current release's data format final (backup first; irreversible)");
    auto c = std::make_shared<Common>();
    auto name = std::make_shared<std::string>();
    auto no_backup = std::make_shared<bool>(false);
    auto yes = std::make_shared<bool>(false);
    add_common(cmd, *c, true, false);
    cmd->add_flag("--no-backup", *no_backup,
                  "finalize a release that declares no backup hook (no way back)");
    cmd->add_flag("--yes,-y", *yes, "do not ask for confirmation on a terminal");
    cmd->add_option("APP", *name, "app")->required();
    cmd->callback([&exit_code, c, name, no_backup, yes] {
      exit_code =
          on_bus([&](const BusVerbs& v) { return v.finalize(*c, *name, *no_backup, *yes); });
    });
  }
  {
    auto* cmd = app.add_subcommand(
        "finalization-status",
        "Show each app's data format: none, pre-finalized or finalized, and its rollback targets");
    auto c = std::make_shared<Common>();
    auto name = std::make_shared<std::string>();
    add_common(cmd, *c, false, true);
    cmd->add_option("APP", *name, "app (default: every app)");
    cmd->callback([&exit_code, c, name] {
      exit_code = on_bus([&](const BusVerbs& v) { return v.finalization_status(*c, *name); });
    });
  }
  {
    auto* cmd = app.add_subcommand("jobs", "List running jobs");
    auto c = std::make_shared<Common>();
    add_common(cmd, *c, false, true);
    cmd->callback(
        [&exit_code, c] { exit_code = on_bus([&](const BusVerbs& v) { return v.jobs(*c); }); });
  }
  {
    auto* cmd = app.add_subcommand("cancel", "Cancel a job before its point of no return");
    auto c = std::make_shared<Common>();
    auto id = std::make_shared<unsigned>(0);
    cmd->add_flag("--user", c->user, "talk to the per-user instance on the session bus");
    cmd->add_flag("-q,--quiet", c->quiet, "print nothing on success");
    cmd->add_option("JOB", *id, "job number (upgradectl jobs)")->required();
    cmd->callback([&exit_code, c, id] {
      exit_code = on_bus([&](const BusVerbs& v) { return v.cancel(*c, *id); });
    });
  }
  {
    auto* cmd = app.add_subcommand("history", "Show an app's activations and rollbacks");
    auto c = std::make_shared<Common>();
    auto name = std::make_shared<std::string>();
    auto limit = std::make_shared<unsigned>(20);
    add_common(cmd, *c, false, true);
    cmd->add_option("--limit,-n", *limit, "newest entries to show")->check(CLI::Range(1, 10000));
    cmd->add_option("APP", *name, "app")->required();
    cmd->callback([&exit_code, c, name, limit] {
      exit_code = on_bus([&](const BusVerbs& v) { return v.history(*c, *name, *limit); });
    });
  }
}

}  // namespace upgradectl
