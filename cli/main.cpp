#include <malloc.h>
#include <CLI/CLI.hpp>

#include <clocale>
#include <cstdio>

#include "exit_codes.h"
#include "offline_verbs.h"
#include "online_verbs.h"

int main(int argc, char** argv) {
  // A short-lived process: memory it frees is kept for its next allocations rather than given
  // back (and faulted in again, page by page), and large buffers come from the same heap. The
  // cost of a first touch of a page dominates a listing of thousands of releases.
  ::mallopt(M_MMAP_THRESHOLD, 64 << 20);
  ::mallopt(M_TRIM_THRESHOLD, 256 << 20);
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
