// Fuzz target `bus_options`: the a{sv} options every Manager method takes
// (daemon/bus_options.cpp): the bounded deserializer that runs before any handler, and
// check_options. The input is read as a list of options: for each, a key (bytes from the input;
// long ones repeat a byte) and a value of the type a selector byte picks (b, y, n, q, i, u, x,
// t, d, s, o, g, ay, as, a{sv}, (is) or a nested v, built from the following bytes). Keys may
// repeat, as they may on the wire.
//
// Invariants:
// - the options, written as an a{sv} into a message and read back as BusOptions, are accepted
//   exactly when they respect every bound (at most kMaxOptions entries, names of at most
//   kMaxOptionName bytes, each key once, basic types only, strings of at most kMaxOptionString
//   bytes), and then read back as written; a refusal is sdbus::Error(InvalidArgument) with a
//   message sd-bus can send (valid UTF-8);
// - check_options, with every allow-list the Manager uses, throws nothing but that error; it
//   passes exactly when every key is allowed with its type, and then the Manager's reads
//   (option<T>) succeed. It runs on what the deserializer accepted and, to go beyond it, on
//   the options as built.

#include <cstring>
#include <initializer_list>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "bus_errors.h"
#include "bus_options.h"
#include "fuzz_support.h"
#include "upgraded/policy/names.h"

using namespace upgraded;
using daemon::BusOptions;

namespace upgraded::fuzz {

// An a{sv} written entry by entry, duplicate keys included (a std::map cannot hold them).
struct RawOptions {
  std::vector<std::pair<std::string, sdbus::Variant>> entries;
};

}  // namespace upgraded::fuzz

namespace sdbus {
template <>
struct signature_of<upgraded::fuzz::RawOptions>
    : signature_of<std::map<std::string, sdbus::Variant>> {};
}  // namespace sdbus

namespace upgraded::fuzz {

sdbus::Message& operator<<(sdbus::Message& msg, const RawOptions& raw) {
  msg.openContainer("{sv}");
  for (const auto& [key, value] : raw.entries) {
    msg.openDictEntry("sv");
    msg << key << value;
    msg.closeDictEntry();
  }
  msg.closeContainer();
  return msg;
}

}  // namespace upgraded::fuzz

namespace {

using fuzz::RawOptions;

class Reader {
 public:
  Reader(const std::uint8_t* data, std::size_t size) : m_data(data), m_size(size) {}
  bool empty() const { return m_pos >= m_size; }
  std::uint8_t byte() { return m_pos < m_size ? m_data[m_pos++] : 0; }
  template <typename T>
  T number() {
    T v{};
    std::uint8_t raw[sizeof(T)] = {};
    for (auto& b : raw)
      b = byte();
    std::memcpy(&v, raw, sizeof v);
    return v;
  }
  // Up to 127 bytes of the input, or (length byte >= 128) up to 8191 copies of one byte: long
  // names and strings without long inputs.
  std::string text() {
    std::size_t n = byte();
    if (n < 128) {
      std::string s;
      for (std::size_t i = 0; i < n && !empty(); ++i)
        s += static_cast<char>(byte());
      return s;
    }
    n = (n - 128) * 64 + byte() % 64;
    return std::string(n, static_cast<char>(byte()));
  }
  // A D-Bus string: one ends at its first NUL (sd-bus takes C strings), so cut it there, or the
  // harness would compare what it meant to send with less than that.
  std::string dbus_string() {
    std::string s = text();
    if (auto nul = s.find('\0'); nul != std::string::npos) s.resize(nul);
    return s;
  }

 private:
  const std::uint8_t* m_data;
  std::size_t m_size;
  std::size_t m_pos = 0;
};

RawOptions read_options(Reader& in, int depth);

BusOptions as_map(const RawOptions& raw) {
  BusOptions out;
  for (const auto& [key, value] : raw.entries)
    out.insert_or_assign(key, value);
  return out;
}

// A variant of the type the next byte selects. Values D-Bus cannot carry (a string that is not
// UTF-8, a malformed object path) make sdbus-c++ throw sdbus::Error: the caller skips them, as
// the bus would never have delivered them.
sdbus::Variant read_variant(Reader& in, int depth) {
  switch (in.byte() % 17) {
    case 0:
      return sdbus::Variant(static_cast<bool>(in.byte() & 1));
    case 1:
      return sdbus::Variant(in.byte());
    case 2:
      return sdbus::Variant(in.number<std::int16_t>());
    case 3:
      return sdbus::Variant(in.number<std::uint16_t>());
    case 4:
      return sdbus::Variant(in.number<std::int32_t>());
    case 5:
      return sdbus::Variant(in.number<std::uint32_t>());
    case 6:
      return sdbus::Variant(in.number<std::int64_t>());
    case 7:
      return sdbus::Variant(in.number<std::uint64_t>());
    case 8:
      return sdbus::Variant(in.number<double>());
    case 9:
      return sdbus::Variant(in.dbus_string());
    case 10:
      return sdbus::Variant(sdbus::ObjectPath(in.dbus_string()));
    case 11:
      return sdbus::Variant(sdbus::Signature(in.dbus_string()));
    case 12: {
      std::string s = in.text();
      return sdbus::Variant(std::vector<std::uint8_t>(s.begin(), s.end()));
    }
    case 13: {
      std::vector<std::string> v(in.byte() % 8);
      for (auto& s : v)
        s = in.dbus_string();
      return sdbus::Variant(v);
    }
    case 14:
      if (depth < 4) return sdbus::Variant(read_options(in, depth + 1));
      return sdbus::Variant(RawOptions{});
    case 15:
      return sdbus::Variant(
          sdbus::Struct<std::int32_t, std::string>(in.number<std::int32_t>(), in.dbus_string()));
    default:
      if (depth < 4) return sdbus::Variant(read_variant(in, depth + 1));
      return sdbus::Variant(std::string());
  }
}

RawOptions read_options(Reader& in, int depth) {
  RawOptions out;
  std::size_t n = depth == 0 ? 64 : in.byte() % 8;
  for (std::size_t i = 0; i < n && !in.empty(); ++i) {
    std::string key = in.dbus_string();
    try {
      (void)sdbus::Variant(key);  // a key D-Bus can carry (UTF-8)
      out.entries.emplace_back(std::move(key), read_variant(in, depth));
    } catch (const sdbus::Error&) {
      // not representable on the bus: skipped
    }
  }
  return out;
}

bool is_string_type(const std::string& t) {
  return t == "s" || t == "o" || t == "g";
}

std::string string_of(const sdbus::Variant& v) {
  auto t = v.peekValueType();
  if (t == "o") return v.get<sdbus::ObjectPath>();
  if (t == "g") return v.get<sdbus::Signature>();
  return v.get<std::string>();
}

// What the bounded deserializer must accept.
bool within_bounds(const RawOptions& raw) {
  if (raw.entries.size() > daemon::kMaxOptions) return false;
  std::set<std::string> keys;
  for (const auto& [key, value] : raw.entries) {
    if (key.size() > daemon::kMaxOptionName || !keys.insert(key).second) return false;
    auto t = value.peekValueType();
    if (t.size() != 1 || std::string_view("bynqiuxtdsog").find(t[0]) == std::string_view::npos)
      return false;
    if (is_string_type(t) && string_of(value).size() > daemon::kMaxOptionString) return false;
  }
  return true;
}

void check_refusal(const sdbus::Error& e) {
  FUZZ_CHECK_MSG(e.getName() == daemon::bus_error::kInvalidArgument,
                 (e.getName() + " " + e.getMessage()));
  FUZZ_CHECK_MSG(policy::is_valid_utf8(e.getMessage()), e.getMessage());
}

using Allowed = std::initializer_list<std::pair<const char*, const char*>>;

void check(const BusOptions& options, Allowed allowed, void (*read)(const BusOptions&)) {
  bool valid = true;
  for (const auto& [key, value] : options) {
    bool ok = false;
    for (const auto& [name, signature] : allowed)
      ok = ok || (key == name && value.peekValueType() == signature);
    valid = valid && ok;
  }
  try {
    daemon::check_options(options, allowed);
  } catch (const sdbus::Error& e) {
    FUZZ_CHECK(!valid);
    check_refusal(e);
    return;
  }
  FUZZ_CHECK(valid);
  read(options);  // any exception here escapes: a crash
}

// The allow-lists of the Manager's methods (daemon/manager.cpp), each with its reads.
void check_all(const BusOptions& options) {
  using daemon::option;
  check(options, {{"activate", "b"}},
        [](const BusOptions& o) { (void)option<bool>(o, "activate", false); });
  check(options, {{"allow_bad", "b"}, {"allow_below_floor", "b"}}, [](const BusOptions& o) {
    (void)option<bool>(o, "allow_bad", false);
    (void)option<bool>(o, "allow_below_floor", false);
  });
  check(options, {{"allow_below_floor", "b"}},
        [](const BusOptions& o) { (void)option<bool>(o, "allow_below_floor", false); });
  check(options, {}, [](const BusOptions&) {});
  check(options, {{"keep", "u"}, {"max_bytes", "t"}}, [](const BusOptions& o) {
    (void)option<std::uint32_t>(o, "keep", 0);
    (void)option<std::uint64_t>(o, "max_bytes", 0);
  });
  check(options, {{"limit", "u"}},
        [](const BusOptions& o) { (void)option<std::uint32_t>(o, "limit", 100); });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in(data, size);
  RawOptions raw = read_options(in, 0);

  // As the adaptor receives them: written on the wire, read back with bounds.
  const bool bounded = within_bounds(raw);
  sdbus::Variant wire(raw);
  BusOptions got;
  bool accepted = true;
  try {
    got = wire.get<BusOptions>();
  } catch (const sdbus::Error& e) {
    accepted = false;
    check_refusal(e);
  }
  FUZZ_CHECK(accepted == bounded);
  if (accepted) {
    FUZZ_CHECK(got.size() == raw.entries.size());
    for (const auto& [key, value] : raw.entries) {
      auto it = got.find(key);
      FUZZ_CHECK(it != got.end());
      FUZZ_CHECK(it->second.peekValueType() == value.peekValueType());
      if (is_string_type(value.peekValueType()))
        FUZZ_CHECK(string_of(it->second) == string_of(value));
    }
    check_all(got);
  }

  // Validation alone, on every shape of value.
  check_all(as_map(raw));
  return 0;
}
