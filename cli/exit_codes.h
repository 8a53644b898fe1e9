#pragma once

#include "upgraded/result.h"

namespace upgradectl {

/// Documented, stable exit codes (docs/upgradectl.md).
enum ExitCode : int {
  kExitOk = 0,
  kExitFailed = 1,
  kExitUsage = 2,
  kExitPolicyRefused = 3,
  kExitVerificationFailed = 4,
  kExitBusy = 5,
  kExitUnreachable = 6,   ///< the daemon cannot be reached (not running, no bus)
  kExitAccessDenied = 7,  ///< not authorized (root or polkit needed)
  kExitNotFound = 8,      ///< no such app, release or job
  kExitExists = 9,        ///< install: that release is already installed
};

int exit_code_for(const upgraded::Error& error);

/// Prints "upgradectl: <message>" to stderr and returns the exit code for `error`.
int report(const upgraded::Error& error);

}  // namespace upgradectl
