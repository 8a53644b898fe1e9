#pragma once

#include <string_view>

namespace upgraded::policy {

/// Orders versions the way dpkg does (deb-version(7) without epochs): the string is split into
/// alternating non-digit and digit runs; non-digit runs compare character by character with
/// letters before non-letters and '~' before everything (so 1.0~rc1 < 1.0), digit runs compare
/// numerically. Returns <0, 0 or >0. "1.10" > "1.9", "2.0-rc.1" > "2.0" (use '~' for
/// pre-releases), "1.0" == "1.00".
int compare_versions(std::string_view a, std::string_view b);

/// True when `version` matches an upgrade_from pattern: "*", an exact version, or a prefix
/// ending in '*' ("1.2.*").
bool version_matches(std::string_view version, std::string_view pattern);

}  // namespace upgraded::policy
