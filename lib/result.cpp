#include "upgraded/result.h"

#include <cerrno>
#include <cstring>

namespace upgraded {

std::string_view to_string(ErrorCode code) {
  switch (code) {
    case ErrorCode::kFailed:
      return "failed";
    case ErrorCode::kInvalidArgument:
      return "invalid argument";
    case ErrorCode::kNotFound:
      return "not found";
    case ErrorCode::kExists:
      return "already exists";
    case ErrorCode::kVerificationFailed:
      return "verification failed";
    case ErrorCode::kPolicyRefused:
      return "refused by policy";
    case ErrorCode::kNoSpace:
      return "no space";
    case ErrorCode::kBusy:
      return "busy";
    case ErrorCode::kCanceled:
      return "canceled";
  }
  return "unknown";
}

Error system_error(int err, std::string_view what) {
  ErrorCode code = ErrorCode::kFailed;
  if (err == ENOSPC || err == EDQUOT) code = ErrorCode::kNoSpace;
  if (err == ENOENT) code = ErrorCode::kNotFound;
  if (err == EEXIST) code = ErrorCode::kExists;
  return Error(code, std::string(what) + ": " + std::strerror(err));
}

}  // namespace upgraded
