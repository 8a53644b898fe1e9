#pragma once

// Validation of every caller- or artifact-supplied string that ends up as a path component or is
// handed to systemd. These are allow-lists: anything not described here is refused.

#include <string>
#include <string_view>

#include "upgraded/result.h"

namespace upgraded::policy {

/// Maximum lengths; documented in docs/artifact-format.md.
inline constexpr std::size_t kMaxAppNameLength = 64;
inline constexpr std::size_t kMaxVersionLength = 128;
inline constexpr std::size_t kMaxUnitNameLength = 255;

/// App names: 1-64 chars of [A-Za-z0-9._+-], starting with a letter or digit.
Result<void> validate_app_name(std::string_view name);

/// Versions: 1-128 chars of [A-Za-z0-9._+~-], starting with a letter or digit.
Result<void> validate_version(std::string_view version);

/// systemd unit names: [A-Za-z0-9:_.\\@-], a known unit suffix, at most 255 characters.
Result<void> validate_unit_name(std::string_view unit);

/// True when `s` is well-formed UTF-8 (no overlongs, surrogates or code points above U+10FFFF).
bool is_valid_utf8(std::string_view s);

/// A relative path inside a release: non-empty, no leading '/', no '.' or '..' or empty
/// components, valid UTF-8 without control characters, components of at most 255 bytes and at
/// most `max_length` bytes in all. Used for hook paths and (by the extractor) for entry names.
Result<void> validate_relative_path(std::string_view path, std::size_t max_length = 4095);

/// Quotes a user-controlled string for messages: printable ASCII kept, everything else escaped
/// (\n, \xNN), at most 200 characters shown.
std::string quote(std::string_view s);

}  // namespace upgraded::policy
