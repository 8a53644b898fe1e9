#include "upgraded/units/hook_runner.h"

#include <cstdio>

namespace upgraded::units {

std::string HookOutcome::describe(std::chrono::seconds timeout) const {
  char after[48];
  std::snprintf(after, sizeof after, " after %.1f s", static_cast<double>(run_usec) / 1e6);
  switch (how) {
    case How::kExited:
      return "exited with status " + std::to_string(status) + after;
    case How::kKilled:
      return "was killed by signal " + std::to_string(status) + after;
    case How::kTimedOut:
      return "timed out after " + std::to_string(timeout.count()) + " s";
    case How::kCanceled:
      return "was canceled";
    case How::kFailed:
      break;
  }
  return "could not run (" + detail + ")";
}

}  // namespace upgraded::units
