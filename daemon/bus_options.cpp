#include "bus_options.h"

#include <cstring>

#include "bus_errors.h"
#include "upgraded/policy/names.h"

namespace upgraded::daemon {
namespace {

sdbus::Error invalid(const std::string& message) {
  return sdbus::Error(bus_error::kInvalidArgument, message);
}

// A zero-copy read of a string-like value (sd-bus hands out a pointer into the message).
std::string read_bounded_string(sdbus::Message& msg, std::size_t max, const std::string& what) {
  char* text = nullptr;
  msg >> text;
  std::size_t n = text ? ::strnlen(text, max + 1) : 0;
  if (n > max) throw invalid(what + " is longer than " + std::to_string(max) + " bytes");
  return std::string(text ? text : "", n);
}

// An object path or a signature: sdbus-c++ reads a char* as 's' only, which sd-bus refuses for
// these (ENXIO), so they are read as their own types (a copy of at most the message), then
// bounded.
template <typename T>
std::string read_copied_string(sdbus::Message& msg, std::size_t max, const std::string& what) {
  T value;
  msg >> value;
  if (value.size() > max) throw invalid(what + " is longer than " + std::to_string(max) + " bytes");
  return std::string(std::move(value));
}

}  // namespace

sdbus::Message& operator>>(sdbus::Message& msg, BusOptions& out) {
  if (!msg.enterContainer("{sv}")) return msg;
  for (std::size_t n = 0;; ++n) {
    if (!msg.enterDictEntry("sv")) break;
    if (n == kMaxOptions) throw invalid("more than " + std::to_string(kMaxOptions) + " options");
    std::string key = read_bounded_string(msg, kMaxOptionName, "an option's name");
    std::string type, contents;
    msg.peekType(type, contents);
    if (type != "v" || contents.size() != 1 || !std::strchr("bynqiuxtdsog", contents[0]))
      throw invalid("option " + policy::quote(key) + " must have a basic type, not '" + contents +
                    "'");
    if (out.count(key)) throw invalid("option " + policy::quote(key) + " is given twice");
    sdbus::Variant value;
    if (contents == "s" || contents == "o" || contents == "g") {
      msg.enterVariant(contents);
      std::string what = "option " + policy::quote(key);
      std::string text = contents == "s" ? read_bounded_string(msg, kMaxOptionString, what)
                         : contents == "o"
                             ? read_copied_string<sdbus::ObjectPath>(msg, kMaxOptionString, what)
                             : read_copied_string<sdbus::Signature>(msg, kMaxOptionString, what);
      msg.exitVariant();
      if (contents == "s")
        value = sdbus::Variant(text);
      else if (contents == "o")
        value = sdbus::Variant(sdbus::ObjectPath(text));
      else
        value = sdbus::Variant(sdbus::Signature(text));
    } else {
      msg >> value;  // a fixed-size basic value
    }
    out.emplace(std::move(key), std::move(value));
    msg.exitDictEntry();
  }
  msg.clearFlags();
  msg.exitContainer();
  return msg;
}

void check_options(const BusOptions& options,
                   std::initializer_list<std::pair<const char*, const char*>> allowed) {
  for (const auto& [key, value] : options) {
    const char* want = nullptr;
    for (const auto& [name, signature] : allowed)
      if (key == name) want = signature;
    if (!want) throw invalid("unknown option " + policy::quote(key));
    if (value.peekValueType() != want)
      throw invalid("option " + policy::quote(key) + " must have type '" + want + "', not '" +
                    value.peekValueType() + "'");
  }
}

}  // namespace upgraded::daemon
