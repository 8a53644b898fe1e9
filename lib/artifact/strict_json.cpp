#include "upgraded/artifact/strict_json.h"

#include <algorithm>
#include <string>
#include <vector>

#include "upgraded/policy/names.h"

namespace upgraded::artifact {
namespace {

struct Rejected {
  std::string why;
};

}  // namespace

Result<nlohmann::json> parse_strict_json(std::string_view text, std::string_view what,
                                         int max_depth) {
  // JSON text never contains a raw NUL (strings escape it as \u0000), but nlohmann's lexer
  // takes one for the end of input: "{...}\0anything" would parse as "{...}".
  if (auto nul = text.find('\0'); nul != std::string_view::npos)
    return Error(
        ErrorCode::kVerificationFailed,
        std::string(what) + " is not valid JSON: a NUL byte at offset " + std::to_string(nul));
  // The keys of each open object, in one flat list: `starts` marks where each object's keys
  // begin.
  // Duplicates are found when the object ends, by sorting its keys (n log n, and no node per
  // key as a set would allocate: state files are parsed by the thousand).
  std::vector<std::string> keys;
  std::vector<std::size_t> starts;
  auto cb = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    if (depth > max_depth) throw Rejected{"nested deeper than " + std::to_string(max_depth)};
    if (event == E::object_start) starts.push_back(keys.size());
    if (event == E::object_end && !starts.empty()) {
      auto first = keys.begin() + static_cast<std::ptrdiff_t>(starts.back());
      std::sort(first, keys.end());
      if (auto dup = std::adjacent_find(first, keys.end()); dup != keys.end())
        throw Rejected{"duplicate key " + policy::quote(*dup)};
      keys.resize(starts.back());
      starts.pop_back();
    }
    if (event == E::key && !starts.empty()) keys.push_back(parsed.get_ref<const std::string&>());
    return true;
  };
  try {
    return nlohmann::json::parse(text.begin(), text.end(), cb, /*allow_exceptions=*/true,
                                 /*ignore_comments=*/false);
  } catch (const Rejected& r) {
    return Error(ErrorCode::kVerificationFailed, std::string(what) + ": " + r.why);
  } catch (const nlohmann::json::exception& e) {
    return Error(ErrorCode::kVerificationFailed,
                 std::string(what) + " is not valid JSON: " + e.what());
  }
}

Result<std::string> json_string(const nlohmann::json& obj, const char* key,
                                std::string_view where) {
  auto it = obj.find(key);
  if (it == obj.end())
    return Error(ErrorCode::kVerificationFailed, std::string(where) + ": missing '" + key + "'");
  if (!it->is_string())
    return Error(ErrorCode::kVerificationFailed,
                 std::string(where) + ": '" + key + "' must be a string");
  return it->get<std::string>();
}

Result<std::uint64_t> json_uint(const nlohmann::json& obj, const char* key, std::string_view where,
                                std::uint64_t max) {
  auto it = obj.find(key);
  if (it == obj.end())
    return Error(ErrorCode::kVerificationFailed, std::string(where) + ": missing '" + key + "'");
  if (!it->is_number_unsigned() && !(it->is_number_integer() && it->get<std::int64_t>() >= 0))
    return Error(ErrorCode::kVerificationFailed,
                 std::string(where) + ": '" + key + "' must be a non-negative integer");
  auto v = it->get<std::uint64_t>();
  if (v > max)
    return Error(ErrorCode::kVerificationFailed,
                 std::string(where) + ": '" + key + "' exceeds " + std::to_string(max));
  return v;
}

Result<void> json_only_keys(const nlohmann::json& obj, std::initializer_list<const char*> allowed,
                            std::string_view where) {
  if (!obj.is_object())
    return Error(ErrorCode::kVerificationFailed, std::string(where) + " must be a JSON object");
  for (const auto& [key, value] : obj.items()) {
    bool known = false;
    for (const char* a : allowed)
      known = known || key == a;
    if (!known)
      return Error(ErrorCode::kVerificationFailed,
                   std::string(where) + ": unknown field " + policy::quote(key));
  }
  return {};
}

}  // namespace upgraded::artifact
