#include "upgraded/units/hook_runner.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>

namespace upgraded::units {

std::string printable_line(std::string_view in, std::size_t max_bytes) {
  static constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD
  std::string out;
  out.reserve(std::min(in.size(), max_bytes));
  std::size_t i = 0;
  while (i < in.size()) {
    const auto c = static_cast<unsigned char>(in[i]);
    std::size_t len = 0;
    std::uint32_t cp = 0;
    if (c < 0x80) {
      len = 1;
      cp = c;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    }
    bool valid = len > 0 && i + len <= in.size();
    for (std::size_t k = 1; valid && k < len; ++k) {
      const auto cc = static_cast<unsigned char>(in[i + k]);
      valid = (cc & 0xC0) == 0x80;
      cp = (cp << 6) | (cc & 0x3F);
    }
    // Overlong forms, surrogates and code points beyond U+10FFFF are invalid too.
    if (valid && ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) ||
                  (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF)))
      valid = false;
    const bool control =
        valid && (cp < 0x20 ? cp != '\t' : cp == 0x7F || (cp >= 0x80 && cp < 0xA0));
    std::string_view piece = valid && !control ? in.substr(i, len) : kReplacement;
    if (out.size() + piece.size() > max_bytes) break;
    out += piece;
    i += valid ? len : 1;
  }
  return out;
}

std::string HookOutcome::describe(std::chrono::seconds timeout) const {
  char after[48];
  std::snprintf(after, sizeof after, " after %.1f s", static_cast<double>(run_usec) / 1e6);
  switch (how) {
    case How::kExited:
      return "exited with status " + std::to_string(status) + after;
    case How::kKilled:
      return "was killed by signal " + std::to_string(status) + after;
    case How::kTimedOut:
      return "timed out after " + std::to_string(timeout.count()) + " s";
    case How::kCanceled:
      return "was canceled";
    case How::kFailed:
      break;
  }
  return "could not run (" + detail + ")";
}

}  // namespace upgraded::units
