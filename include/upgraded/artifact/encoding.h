#pragma once

#include <cstddef>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "upgraded/result.h"

namespace upgraded::artifact {

/// Lowercase hexadecimal.
std::string to_hex(std::span<const std::byte> data);
/// Strict: an even number of [0-9a-f] characters (lowercase only, so encodings are canonical).
Result<std::vector<std::byte>> from_hex(std::string_view hex);

/// Standard base64 (RFC 4648 §4) with padding, no line breaks.
std::string base64_encode(std::span<const std::byte> data);
/// Strict: canonical padded base64, no whitespace.
Result<std::vector<std::byte>> base64_decode(std::string_view text);

inline std::span<const std::byte> as_bytes(std::string_view s) {
  return std::as_bytes(std::span(s.data(), s.size()));
}

}  // namespace upgraded::artifact
