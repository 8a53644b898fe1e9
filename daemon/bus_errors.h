#pragma once

// The one place where engine errors become D-Bus errors. Names are stable API
// (docs/dbus-api.md): clients branch on them.

#include <sdbus-c++/Error.h>

#include "upgraded/result.h"

namespace upgraded::daemon::bus_error {

inline constexpr const char* kFailed = "org.upgraded1.Error.Failed";
inline constexpr const char* kInvalidArgument = "org.upgraded1.Error.InvalidArgument";
inline constexpr const char* kNotFound = "org.upgraded1.Error.NotFound";
inline constexpr const char* kExists = "org.upgraded1.Error.Exists";
inline constexpr const char* kVerificationFailed = "org.upgraded1.Error.VerificationFailed";
inline constexpr const char* kPolicyRefused = "org.upgraded1.Error.PolicyRefused";
inline constexpr const char* kNoSpace = "org.upgraded1.Error.NoSpace";
inline constexpr const char* kBusy = "org.upgraded1.Error.Busy";
inline constexpr const char* kCanceled = "org.upgraded1.Error.Canceled";
inline constexpr const char* kAccessDenied = "org.upgraded1.Error.AccessDenied";
inline constexpr const char* kNotCancelable = "org.upgraded1.Error.NotCancelable";
inline constexpr const char* kShuttingDown = "org.upgraded1.Error.ShuttingDown";

const char* name_for(ErrorCode code);
inline sdbus::Error from(const Error& e) {
  return sdbus::Error(name_for(e.code()), e.message());
}

}  // namespace upgraded::daemon::bus_error
