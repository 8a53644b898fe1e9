#pragma once

// The a{sv} options every Manager method takes: deserialized with bounds, then validated.
//
// Deserialization happens before a handler runs, and so before authorization: a caller that
// anyone may be could otherwise make the daemon build millions of Variants out of one large
// message (24 MB cost 2.2 s of the event loop). BusOptions reads at most kMaxOptions entries
// of basic types, and stops at the first entry beyond a bound: InvalidArgument, for every
// caller. The Manager adaptor generated from dbus/org.upgraded1.Manager.xml takes its options
// as BusOptions (daemon/CMakeLists.txt substitutes the type in the generated header).
//
// Then unknown keys and wrong value types are refused (InvalidArgument), so that a client's
// typo never silently means "default". Both are fuzzed (tests/fuzz/).

#include <sdbus-c++/Error.h>
#include <sdbus-c++/Message.h>
#include <sdbus-c++/TypeTraits.h>
#include <sdbus-c++/Types.h>

#include <cstddef>
#include <initializer_list>
#include <map>
#include <string>
#include <utility>

namespace upgraded::daemon {

inline constexpr std::size_t kMaxOptions = 16;
inline constexpr std::size_t kMaxOptionName = 64;
inline constexpr std::size_t kMaxOptionString = 1024;

struct BusOptions : std::map<std::string, sdbus::Variant> {
  using std::map<std::string, sdbus::Variant>::map;
};

/// Reads an a{sv} into `out`, bounded: at most kMaxOptions entries, names of at most
/// kMaxOptionName bytes, each key once, values of a basic D-Bus type (no containers, no
/// descriptors), strings of at most kMaxOptionString bytes. Throws sdbus::Error(InvalidArgument)
/// at the first entry beyond a bound, having read nothing after it.
sdbus::Message& operator>>(sdbus::Message& msg, BusOptions& out);

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

namespace sdbus {
template <>
struct signature_of<upgraded::daemon::BusOptions>
    : signature_of<std::map<std::string, sdbus::Variant>> {};
}  // namespace sdbus
