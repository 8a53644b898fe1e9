#pragma once

#include <CLI/CLI.hpp>

namespace upgradectl {

/// Registers keygen, pack, verify, unpack and inspect: the verbs that work on files alone and
/// need no daemon. Each sets `exit_code` when it runs.
void add_offline_verbs(CLI::App& app, int& exit_code);

}  // namespace upgradectl
