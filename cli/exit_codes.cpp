#include "exit_codes.h"

#include <cstdio>

namespace upgradectl {

int exit_code_for(const upgraded::Error& error) {
  using upgraded::ErrorCode;
  switch (error.code()) {
    case ErrorCode::kVerificationFailed:
      return kExitVerificationFailed;
    case ErrorCode::kPolicyRefused:
      return kExitPolicyRefused;
    case ErrorCode::kInvalidArgument:
      return kExitUsage;
    case ErrorCode::kBusy:
      return kExitBusy;
    default:
      return kExitFailed;
  }
}

int report(const upgraded::Error& error) {
  std::fprintf(stderr, "upgradectl: %s\n", error.message().c_str());
  return exit_code_for(error);
}

}  // namespace upgradectl
