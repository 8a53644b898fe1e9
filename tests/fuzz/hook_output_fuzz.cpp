// Fuzz target `hook_output`: what a hook prints (lib/units/hook_runner.cpp printable_line), the
// bytes a hook controls that end up in the journal, in the job's error on the bus and in
// state.json (a backup's name). The first input byte picks the size limit; the rest is the line.
//
// Invariants: the result is valid UTF-8 with no control character but tab (nlohmann::json,
// whose dump() validates UTF-8, accepts it, as D-Bus would), within the limit, and unchanged
// by a second pass.

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "fuzz_support.h"
#include "upgraded/units/hook_runner.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::size_t limit = 1 + data[0] * 17u;
  std::string_view in(reinterpret_cast<const char*>(data + 1), size - 1);
  const std::string out = upgraded::units::printable_line(in, limit);
  FUZZ_CHECK(out.size() <= limit);
  for (char c : out)
    FUZZ_CHECK((static_cast<unsigned char>(c) >= 0x20 || c == '\t') && c != 0x7F);
  FUZZ_CHECK(upgraded::units::printable_line(out, limit) == out);
  bool json_ok = true;
  try {
    (void)nlohmann::json(out).dump();
  } catch (const nlohmann::json::exception&) {
    json_ok = false;
  }
  FUZZ_CHECK(json_ok);
  // Plain text passes through untouched.
  bool plain = in.size() <= limit;
  for (char c : in)
    plain = plain && static_cast<unsigned char>(c) >= 0x20 && static_cast<unsigned char>(c) < 0x7F;
  FUZZ_CHECK(!plain || out == in);
  return 0;
}
