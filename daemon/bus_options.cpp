#include "bus_options.h"

#include "bus_errors.h"
#include "upgraded/policy/names.h"

namespace upgraded::daemon {

void check_options(const BusOptions& options,
                   std::initializer_list<std::pair<const char*, const char*>> allowed) {
  for (const auto& [key, value] : options) {
    const char* want = nullptr;
    for (const auto& [name, signature] : allowed)
      if (key == name) want = signature;
    if (!want)
      throw sdbus::Error(bus_error::kInvalidArgument, "unknown option " + policy::quote(key));
    if (value.peekValueType() != want)
      throw sdbus::Error(bus_error::kInvalidArgument,
                         "option " + policy::quote(key) + " must have type '" + want +
                             "', not '" + value.peekValueType() + "'");
  }
}

}  // namespace upgraded::daemon
