#include "upgraded/policy/names.h"

#include <array>
#include <cstdio>

namespace upgraded::policy {
namespace {

bool is_alnum(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

Result<void> validate_token(std::string_view what, std::string_view s, std::size_t max_length,
                            std::string_view extra_chars) {
  if (s.empty()) return Error(ErrorCode::kInvalidArgument, std::string(what) + " is empty");
  if (s.size() > max_length)
    return Error(ErrorCode::kInvalidArgument, std::string(what) + " " + quote(s) +
                                                  " is longer than " + std::to_string(max_length) +
                                                  " characters");
  if (!is_alnum(s.front()))
    return Error(ErrorCode::kInvalidArgument,
                 std::string(what) + " " + quote(s) + " must start with a letter or digit");
  for (char c : s) {
    if (!is_alnum(c) && extra_chars.find(c) == std::string_view::npos)
      return Error(ErrorCode::kInvalidArgument, std::string(what) + " " + quote(s) +
                                                    " contains a character outside [A-Za-z0-9" +
                                                    std::string(extra_chars) + "]");
  }
  return {};
}

}  // namespace

Result<void> validate_app_name(std::string_view name) {
  return validate_token("app name", name, kMaxAppNameLength, "._+-");
}

Result<void> validate_version(std::string_view version) {
  return validate_token("version", version, kMaxVersionLength, "._+~-");
}

Result<void> validate_unit_name(std::string_view unit) {
  static constexpr std::array<std::string_view, 11> kSuffixes = {
      ".service",   ".socket", ".target", ".timer", ".path",  ".mount",
      ".automount", ".swap",   ".slice",  ".scope", ".device"};
  if (unit.empty() || unit.size() > kMaxUnitNameLength)
    return Error(ErrorCode::kInvalidArgument,
                 "unit name " + quote(unit) + " has an invalid length");
  for (char c : unit) {
    if (!is_alnum(c) && std::string_view(":_.\\@-").find(c) == std::string_view::npos)
      return Error(ErrorCode::kInvalidArgument,
                   "unit name " + quote(unit) + " contains an invalid character");
  }
  for (auto suffix : kSuffixes) {
    if (unit.size() > suffix.size() && unit.ends_with(suffix)) return {};
  }
  return Error(ErrorCode::kInvalidArgument,
               "unit name " + quote(unit) + " has no known unit suffix");
}

bool is_valid_utf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    int n;
    std::uint32_t cp;
    if ((c & 0xe0) == 0xc0) {
      n = 1;
      cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      n = 2;
      cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + static_cast<std::size_t>(n) >= s.size()) return false;  // truncated sequence
    for (int k = 1; k <= n; ++k) {
      auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3f);
    }
    static constexpr std::uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += static_cast<std::size_t>(n) + 1;
  }
  return true;
}

Result<void> validate_relative_path(std::string_view path, std::size_t max_length) {
  auto refuse = [&](const std::string& why) {
    return Error(ErrorCode::kPolicyRefused, "path " + quote(path) + " " + why);
  };
  if (path.empty()) return refuse("is empty");
  if (path.size() > max_length)
    return refuse("is longer than " + std::to_string(max_length) + " bytes");
  if (path.front() == '/') return refuse("is absolute");
  if (!is_valid_utf8(path)) return refuse("is not valid UTF-8");
  for (char c : path) {
    auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) return refuse("contains a control character");
  }
  std::size_t start = 0;
  while (start <= path.size()) {
    std::size_t end = path.find('/', start);
    if (end == std::string_view::npos) end = path.size();
    std::string_view comp = path.substr(start, end - start);
    if (comp.empty()) return refuse("has an empty component");
    if (comp == ".") return refuse("has a '.' component");
    if (comp == "..") return refuse("has a '..' component");
    if (comp.size() > 255) return refuse("has a component longer than 255 bytes");
    start = end + 1;
    if (end == path.size()) break;
  }
  return {};
}

std::string quote(std::string_view s) {
  std::string out = "'";
  std::size_t shown = 0;
  for (char c : s) {
    if (++shown > 200) {
      out += "...";
      break;
    }
    auto u = static_cast<unsigned char>(c);
    if (c == '\\' || c == '\'') {
      out += '\\';
      out += c;
    } else if (u == '\n') {
      out += "\\n";
    } else if (u < 0x20 || u >= 0x7f) {
      char buf[5];
      std::snprintf(buf, sizeof buf, "\\x%02x", u);
      out += buf;
    } else {
      out += c;
    }
  }
  out += "'";
  return out;
}

}  // namespace upgraded::policy
