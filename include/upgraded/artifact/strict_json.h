#pragma once

#include <nlohmann/json.hpp>
#include <string_view>

#include "upgraded/result.h"

namespace upgraded::artifact {

/// Parses JSON for signed documents: valid UTF-8 (nlohmann's lexer checks it), no duplicate
/// object keys (readers that keep the first and readers that keep the last must never see
/// different documents), nesting at most `max_depth` deep. Errors are kVerificationFailed and
/// name `what`.
Result<nlohmann::json> parse_strict_json(std::string_view text, std::string_view what,
                                         int max_depth = 16);

/// Strict field accessors for schema checks: each returns kVerificationFailed naming `where`
/// and the field when the type is wrong. Integers must be JSON integers (no fractions) in range.
Result<std::string> json_string(const nlohmann::json& obj, const char* key, std::string_view where);
Result<std::uint64_t> json_uint(const nlohmann::json& obj, const char* key, std::string_view where,
                                std::uint64_t max);
/// Checks that `obj` is an object whose keys are all in `allowed`.
Result<void> json_only_keys(const nlohmann::json& obj, std::initializer_list<const char*> allowed,
                            std::string_view where);

}  // namespace upgraded::artifact
