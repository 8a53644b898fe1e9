#include "bus_errors.h"

namespace upgraded::daemon::bus_error {

const char* name_for(ErrorCode code) {
  switch (code) {
    case ErrorCode::kFailed:
      return kFailed;
    case ErrorCode::kInvalidArgument:
      return kInvalidArgument;
    case ErrorCode::kNotFound:
      return kNotFound;
    case ErrorCode::kExists:
      return kExists;
    case ErrorCode::kVerificationFailed:
      return kVerificationFailed;
    case ErrorCode::kPolicyRefused:
      return kPolicyRefused;
    case ErrorCode::kNoSpace:
      return kNoSpace;
    case ErrorCode::kBusy:
      return kBusy;
    case ErrorCode::kCanceled:
      return kCanceled;
  }
  return kFailed;
}

}  // namespace upgraded::daemon::bus_error
