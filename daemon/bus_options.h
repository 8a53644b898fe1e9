#pragma once

// Validation of the a{sv} options every Manager method takes. Unknown keys and wrong value
// types are refused (InvalidArgument), so that a client's typo never silently means "default".
// Kept apart from the adaptor so that it can be fuzzed (tests/fuzz/bus_options_fuzz.cpp).

#include <sdbus-c++/Error.h>
#include <sdbus-c++/Types.h>

#include <initializer_list>
#include <map>
#include <string>
#include <utility>

namespace upgraded::daemon {

using BusOptions = std::map<std::string, sdbus::Variant>;

/// Throws sdbus::Error(InvalidArgument) for a key not in `allowed` (name, D-Bus signature) or a
/// value of another type.
void check_options(const BusOptions& options,
                   std::initializer_list<std::pair<const char*, const char*>> allowed);

/// The value of `key` (already type-checked by check_options), or `fallback`.
template <typename T>
T option(const BusOptions& options, const char* key, T fallback) {
  auto it = options.find(key);
  return it == options.end() ? fallback : it->second.get<T>();
}

}  // namespace upgraded::daemon
