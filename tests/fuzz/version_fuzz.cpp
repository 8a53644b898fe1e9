// Fuzz target `version`: version ordering and upgrade_from patterns (lib/policy/version.cpp)
// and the version allow-list (lib/policy/names.cpp). The input is versions, one per line.
//
// Invariants: compare_versions is a total preorder (reflexive, antisymmetric, transitive on
// every triple, and versions that compare equal compare alike with everything else), so that
// sorting releases by it (AppState::versions_in_order) is well defined; on valid versions it
// agrees with dpkg's verrevcmp (deb-version(7), applied to the whole string as documented);
// version_matches follows its documented rules.

#include <algorithm>
#include <cctype>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_support.h"
#include "upgraded/policy/names.h"
#include "upgraded/policy/version.h"

using namespace upgraded;
using fuzz::sign;
using policy::compare_versions;
using policy::version_matches;

namespace {

constexpr std::size_t kMaxVersions = 16;

// dpkg's lib/dpkg/version.c (order, verrevcmp), transcribed as independently as possible.
int dpkg_order(int c) {
  if (c >= '0' && c <= '9') return 0;
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return c;
  if (c == '~') return -1;
  if (c) return c + 256;
  return 0;
}

int dpkg_verrevcmp(const std::string& as, const std::string& bs) {
  const char* a = as.c_str();
  const char* b = bs.c_str();
  auto digit = [](char c) { return c >= '0' && c <= '9'; };
  while (*a || *b) {
    int first_diff = 0;
    while ((*a && !digit(*a)) || (*b && !digit(*b))) {
      int ac = dpkg_order(*a);
      int bc = dpkg_order(*b);
      if (ac != bc) return ac - bc;
      a++;
      b++;
    }
    while (*a == '0')
      a++;
    while (*b == '0')
      b++;
    while (digit(*a) && digit(*b)) {
      if (!first_diff) first_diff = *a - *b;
      a++;
      b++;
    }
    if (digit(*a)) return 1;
    if (digit(*b)) return -1;
    if (first_diff) return first_diff;
  }
  return 0;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto input = fuzz::as_text(data, size);
  std::vector<std::string> v;
  std::size_t start = 0;
  while (start <= input.size() && v.size() < kMaxVersions) {
    auto end = input.find('\n', start);
    if (end == std::string_view::npos) end = input.size();
    v.emplace_back(input.substr(start, end - start));
    start = end + 1;
  }

  for (const auto& a : v) {
    FUZZ_CHECK(compare_versions(a, a) == 0);
    FUZZ_CHECK(version_matches(a, "*"));
    FUZZ_CHECK(version_matches(a, a));
    FUZZ_CHECK(version_matches(a, a + "*"));
    bool valid = policy::validate_version(a).ok();
    if (valid) {
      FUZZ_CHECK(!a.empty() && a.size() <= policy::kMaxVersionLength);
      for (char c : a)
        FUZZ_CHECK(std::isalnum(static_cast<unsigned char>(c)) ||
                   std::string_view("._+~-").find(c) != std::string_view::npos);
    }
    for (const auto& b : v) {
      int ab = compare_versions(a, b);
      FUZZ_CHECK(sign(ab) == -sign(compare_versions(b, a)));
      if (ab == 0 && a == b) FUZZ_CHECK(version_matches(a, b));
      if (valid && policy::validate_version(b).ok())
        FUZZ_CHECK(sign(ab) == sign(dpkg_verrevcmp(a, b)));
      // A pattern: "*", a prefix ending in '*', or an exact version.
      if (b == "*")
        FUZZ_CHECK(version_matches(a, b));
      else if (!b.empty() && b.back() == '*')
        FUZZ_CHECK(version_matches(a, b) == a.starts_with(b.substr(0, b.size() - 1)));
      else
        FUZZ_CHECK(version_matches(a, b) == (a == b));
      for (const auto& c : v) {
        int bc = compare_versions(b, c);
        int ac = compare_versions(a, c);
        if (ab <= 0 && bc <= 0) FUZZ_CHECK(ac <= 0);
        if (ab < 0 && bc <= 0) FUZZ_CHECK(ac < 0);
        if (ab <= 0 && bc < 0) FUZZ_CHECK(ac < 0);
        if (ab == 0) FUZZ_CHECK(sign(ac) == sign(bc));
      }
    }
  }

  // What the store does with them: sort (std::sort misbehaves on a broken order).
  auto sorted = v;
  std::sort(sorted.begin(), sorted.end(),
            [](const std::string& a, const std::string& b) { return compare_versions(a, b) < 0; });
  for (std::size_t i = 1; i < sorted.size(); ++i)
    FUZZ_CHECK(compare_versions(sorted[i - 1], sorted[i]) <= 0);
  return 0;
}
