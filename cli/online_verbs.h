#pragma once

// The verbs that change or read state through the daemon (docs/dbus-api.md).

#include <CLI/CLI.hpp>

namespace upgradectl {

void add_online_verbs(CLI::App& app, int& exit_code);

}  // namespace upgradectl
