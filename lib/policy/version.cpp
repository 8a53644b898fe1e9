#include "upgraded/policy/version.h"

#include <cctype>

namespace upgraded::policy {
namespace {

bool is_digit(char c) {
  return c >= '0' && c <= '9';
}

// dpkg's character weight: '~' sorts first, then the end of a run, then letters, then the rest.
int weight(char c) {
  if (c == '~') return -1;
  if (is_digit(c)) return 0;
  if (std::isalpha(static_cast<unsigned char>(c))) return c;
  return c + 256;
}

}  // namespace

int compare_versions(std::string_view a, std::string_view b) {
  std::size_t i = 0, j = 0;
  while (i < a.size() || j < b.size()) {
    int first_diff = 0;
    while ((i < a.size() && !is_digit(a[i])) || (j < b.size() && !is_digit(b[j]))) {
      int wa = i < a.size() ? weight(a[i]) : 0;
      int wb = j < b.size() ? weight(b[j]) : 0;
      if (wa != wb) return wa - wb;
      ++i;
      ++j;
    }
    while (i < a.size() && a[i] == '0')
      ++i;
    while (j < b.size() && b[j] == '0')
      ++j;
    while (i < a.size() && is_digit(a[i]) && j < b.size() && is_digit(b[j])) {
      if (!first_diff) first_diff = a[i] - b[j];
      ++i;
      ++j;
    }
    if (i < a.size() && is_digit(a[i])) return 1;
    if (j < b.size() && is_digit(b[j])) return -1;
    if (first_diff) return first_diff;
  }
  return 0;
}

bool version_matches(std::string_view version, std::string_view pattern) {
  if (pattern == "*") return true;
  if (!pattern.empty() && pattern.back() == '*') {
    pattern.remove_suffix(1);
    return version.starts_with(pattern);
  }
  return version == pattern;
}

}  // namespace upgraded::policy
