#include "upgraded/crash_point.h"

#ifdef UPGRADED_CRASH_POINTS
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include <unistd.h>
#include <cstring>

#include <atomic>
#include <string>

namespace upgraded {

// UPGRADED_CRASH_AT=name kills at the first time `name` is reached; name#N at the N-th time.
void crash_point(const char* name) {
  static const std::string target = [] {
    const char* v = ::secure_getenv("UPGRADED_CRASH_AT");
    return std::string(v ? v : "");
  }();
  static const std::string target_name = target.substr(0, target.find('#'));
  static const long target_count =
      target.find('#') == std::string::npos
          ? 1
          : ::strtol(target.c_str() + target.find('#') + 1, nullptr, 10);
  static std::atomic<long> reached{0};
  if (target.empty() || target_name != name) return;
  if (reached.fetch_add(1) + 1 == target_count) {
    ::kill(::getpid(), SIGKILL);
    ::pause();
  }
}

void pause_point(const char* name) {
  static const std::string target = [] {
    const char* v = ::secure_getenv("UPGRADED_PAUSE_AT");
    return std::string(v ? v : "");
  }();
  auto colon = target.rfind(':');
  if (colon == std::string::npos || target.compare(0, colon, name) != 0 ||
      std::strlen(name) != colon)
    return;
  long ms = ::strtol(target.c_str() + colon + 1, nullptr, 10);
  if (ms > 0) ::usleep(static_cast<useconds_t>(ms) * 1000);
}

}  // namespace upgraded
#endif
