#include <CLI/CLI.hpp>
#include <clocale>
#include <cstdio>

#include "exit_codes.h"
#include "offline_verbs.h"
#include "online_verbs.h"

int main(int argc, char** argv) {
  // Names in payloads are UTF-8; libarchive converts pax names through the C library's locale.
  std::setlocale(LC_CTYPE, "C.UTF-8");
  CLI::App app{"upgradectl - install, verify and manage signed releases"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "upgradectl 0.1.0");
  int exit_code = upgradectl::kExitOk;
  upgradectl::add_online_verbs(app, exit_code);
  upgradectl::add_offline_verbs(app, exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : upgradectl::kExitUsage;
  }
  return exit_code;
}
