// Fuzz target `bus_options`: validation of the a{sv} options every Manager method takes
// (daemon/bus_options.cpp). The input is read as a list of options: for each, a type selector,
// a key (bytes from the input) and a value of that D-Bus type (b, y, n, q, i, u, x, t, d, s, o,
// g, ay, as, a{sv}, (is) or a nested v, built from the following bytes).
//
// Invariants: check_options, run with every allow-list the Manager uses, throws nothing but
// sdbus::Error, always InvalidArgument with a message sd-bus can send (valid UTF-8); it passes
// exactly when every key is allowed with its type, and then the Manager's reads (option<T>)
// succeed.

#include <cstring>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "bus_errors.h"
#include "bus_options.h"
#include "fuzz_support.h"
#include "upgraded/policy/names.h"

using namespace upgraded;
using daemon::BusOptions;

namespace {

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
  std::string text() {
    std::size_t n = byte() % 64;
    std::string s;
    for (std::size_t i = 0; i < n && !empty(); ++i)
      s += static_cast<char>(byte());
    return s;
  }

 private:
  const std::uint8_t* m_data;
  std::size_t m_size;
  std::size_t m_pos = 0;
};

BusOptions read_options(Reader& in, int depth);

// A variant of the type the next byte selects. Values D-Bus cannot carry (a string that is not
// UTF-8, a malformed object path) make sdbus-c++ throw sdbus::Error: such an option is skipped,
// as the bus would never have delivered it.
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
      return sdbus::Variant(in.text());
    case 10:
      return sdbus::Variant(sdbus::ObjectPath(in.text()));
    case 11:
      return sdbus::Variant(sdbus::Signature(in.text()));
    case 12: {
      std::string s = in.text();
      return sdbus::Variant(std::vector<std::uint8_t>(s.begin(), s.end()));
    }
    case 13: {
      std::vector<std::string> v(in.byte() % 8);
      for (auto& s : v)
        s = in.text();
      return sdbus::Variant(v);
    }
    case 14:
      if (depth < 4) return sdbus::Variant(read_options(in, depth + 1));
      return sdbus::Variant(BusOptions{});
    case 15:
      return sdbus::Variant(
          sdbus::Struct<std::int32_t, std::string>(in.number<std::int32_t>(), in.text()));
    default:
      if (depth < 4) return sdbus::Variant(read_variant(in, depth + 1));
      return sdbus::Variant(std::string());
  }
}

BusOptions read_options(Reader& in, int depth) {
  BusOptions out;
  std::size_t n = depth == 0 ? 64 : in.byte() % 8;
  for (std::size_t i = 0; i < n && !in.empty(); ++i) {
    std::string key = in.text();
    try {
      out.insert_or_assign(key, read_variant(in, depth));
    } catch (const sdbus::Error&) {
      // not representable on the bus: skipped
    }
  }
  return out;
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
    FUZZ_CHECK(e.getName() == daemon::bus_error::kInvalidArgument);
    FUZZ_CHECK_MSG(policy::is_valid_utf8(e.getMessage()), e.getMessage());
    return;
  }
  FUZZ_CHECK(valid);
  read(options);  // any exception here escapes: a crash
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in(data, size);
  BusOptions options = read_options(in, 0);
  using daemon::option;
  // The allow-lists of Manager.Install, Activate, the methods without options,
  // GarbageCollect and GetHistory.
  check(options, {{"activate", "b"}},
        [](const BusOptions& o) { (void)option<bool>(o, "activate", false); });
  check(options, {{"allow_bad", "b"}},
        [](const BusOptions& o) { (void)option<bool>(o, "allow_bad", false); });
  check(options, {}, [](const BusOptions&) {});
  check(options, {{"keep", "u"}, {"max_bytes", "t"}}, [](const BusOptions& o) {
    (void)option<std::uint32_t>(o, "keep", 0);
    (void)option<std::uint64_t>(o, "max_bytes", 0);
  });
  check(options, {{"limit", "u"}},
        [](const BusOptions& o) { (void)option<std::uint32_t>(o, "limit", 100); });
  return 0;
}
