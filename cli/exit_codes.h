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
};

int exit_code_for(const upgraded::Error& error);

/// Prints "upgradectl: <message>" to stderr and returns the exit code for `error`.
int report(const upgraded::Error& error);

}  // namespace upgradectl
