#include "upgraded/store/state.h"

#include <algorithm>

#include "upgraded/artifact/strict_json.h"
#include "upgraded/policy/names.h"
#include "upgraded/policy/version.h"

namespace upgraded::store {
namespace {

using nlohmann::json;

Error corrupt(const std::string& why) {
  return Error(ErrorCode::kFailed, "state.json is corrupt: " + why);
}

Result<std::optional<std::string>> optional_version(const json& doc, const char* key) {
  auto it = doc.find(key);
  if (it == doc.end() || it->is_null()) return std::optional<std::string>();
  if (!it->is_string()) return corrupt(std::string(key) + " must be a string or null");
  auto v = it->get<std::string>();
  if (!policy::validate_version(v)) return corrupt(std::string(key) + " is not a valid version");
  return std::optional<std::string>(v);
}

}  // namespace

std::string_view to_string(ReleaseStatus s) {
  switch (s) {
    case ReleaseStatus::kStaged:
      return "staged";
    case ReleaseStatus::kActive:
      return "active";
    case ReleaseStatus::kGood:
      return "good";
    case ReleaseStatus::kBad:
      return "bad";
  }
  return "";
}

std::optional<ReleaseStatus> release_status_from(std::string_view s) {
  for (auto st :
       {ReleaseStatus::kStaged, ReleaseStatus::kActive, ReleaseStatus::kGood, ReleaseStatus::kBad})
    if (to_string(st) == s) return st;
  return std::nullopt;
}

std::optional<std::string> AppState::installed_as(const std::string& version) const {
  if (releases.count(version)) return version;
  for (const auto& [v, r] : releases)
    if (policy::compare_versions(v, version) == 0) return v;
  return std::nullopt;
}

std::vector<std::string> AppState::versions_in_order() const {
  std::vector<std::string> out;
  for (const auto& [v, r] : releases)
    out.push_back(v);
  std::sort(out.begin(), out.end(), [](const std::string& a, const std::string& b) {
    return policy::compare_versions(a, b) < 0;
  });
  return out;
}

bool AppState::pre_finalized() const {
  if (!current) return false;
  auto it = releases.find(*current);
  return it != releases.end() && it->second.data_format.writes > finalized_data_format.value_or(0);
}

Result<AppState> parse_state(std::string_view text) {
  auto parsed = artifact::parse_strict_json(text, "state.json");
  if (!parsed) return corrupt(parsed.error().message());
  const json& doc = *parsed;
  if (auto r = artifact::json_only_keys(doc,
                                        {"format", "app", "current", "previous", "last_known_good",
                                         "floor", "finalized_data_format", "finalized_at",
                                         "last_backup", "pending_since", "good_since", "releases"},
                                        "state.json");
      !r)
    return corrupt(r.error().message());
  auto format = artifact::json_uint(doc, "format", "state.json", 1000);
  if (!format || *format != 1) return corrupt("unsupported format");
  AppState st;
  auto app = artifact::json_string(doc, "app", "state.json");
  if (!app || !policy::validate_app_name(*app)) return corrupt("invalid app name");
  st.app = *app;
  for (auto [key, field] :
       {std::pair{"current", &st.current}, std::pair{"previous", &st.previous},
        std::pair{"last_known_good", &st.last_known_good}, std::pair{"floor", &st.floor}}) {
    auto v = optional_version(doc, key);
    if (!v) return v.error();
    *field = *v;
  }
  if (auto it = doc.find("finalized_data_format"); it != doc.end() && !it->is_null()) {
    auto v = artifact::json_uint(doc, "finalized_data_format", "state.json", UINT32_MAX);
    if (!v) return corrupt(v.error().message());
    st.finalized_data_format = *v;
  }
  for (auto [key, field] :
       {std::pair{"finalized_at", &st.finalized_at}, std::pair{"last_backup", &st.last_backup},
        std::pair{"pending_since", &st.pending_since}, std::pair{"good_since", &st.good_since}}) {
    auto it = doc.find(key);
    if (it == doc.end() || it->is_null()) continue;
    auto v = artifact::json_string(doc, key, "state.json");
    if (!v || v->size() > 256) return corrupt(std::string("invalid ") + key);
    *field = *v;
  }
  auto rels = doc.find("releases");
  if (rels == doc.end() || !rels->is_object()) return corrupt("releases must be an object");
  for (const auto& [version, r] : rels->items()) {
    if (!policy::validate_version(version)) return corrupt("invalid release version");
    if (auto c = artifact::json_only_keys(
            r, {"status", "pinned", "staged_at", "size", "data_format"}, "state.json release");
        !c)
      return corrupt(c.error().message());
    ReleaseRecord rec;
    auto status = artifact::json_string(r, "status", "release");
    auto st_value = status ? release_status_from(*status) : std::nullopt;
    if (!st_value) return corrupt("invalid status of " + version);
    rec.status = *st_value;
    auto pinned = r.find("pinned");
    if (pinned == r.end() || !pinned->is_boolean()) return corrupt("pinned must be a boolean");
    rec.pinned = pinned->get<bool>();
    auto staged_at = artifact::json_string(r, "staged_at", "release");
    if (!staged_at) return corrupt(staged_at.error().message());
    rec.staged_at = *staged_at;
    auto size = artifact::json_uint(r, "size", "release", UINT64_MAX);
    if (!size) return corrupt(size.error().message());
    rec.size = *size;
    auto df = r.find("data_format");
    if (df == r.end() || !df->is_object()) return corrupt("data_format must be an object");
    auto w = artifact::json_uint(*df, "writes", "data_format", UINT32_MAX);
    auto m = artifact::json_uint(*df, "reads_min", "data_format", UINT32_MAX);
    if (!w || !m) return corrupt("invalid data_format of " + version);
    rec.data_format = {*w, *m};
    st.releases.emplace(version, rec);
  }
  for (const auto* ref : {&st.current, &st.previous, &st.last_known_good})
    if (*ref && !st.releases.count(**ref)) return corrupt("refers to unknown release " + **ref);
  return st;
}

std::string serialize_state(const AppState& st) {
  auto opt = [](const std::optional<std::string>& v) { return v ? json(*v) : json(nullptr); };
  nlohmann::ordered_json doc;
  doc["format"] = 1;
  doc["app"] = st.app;
  doc["current"] = opt(st.current);
  doc["previous"] = opt(st.previous);
  doc["last_known_good"] = opt(st.last_known_good);
  doc["floor"] = opt(st.floor);
  doc["finalized_data_format"] =
      st.finalized_data_format ? json(*st.finalized_data_format) : json(nullptr);
  // Written only once set, so that state files of apps that never used them stay as they were.
  for (auto [key, field] :
       {std::pair{"finalized_at", &st.finalized_at}, std::pair{"last_backup", &st.last_backup},
        std::pair{"pending_since", &st.pending_since}, std::pair{"good_since", &st.good_since}})
    if (*field) doc[key] = **field;
  doc["releases"] = nlohmann::ordered_json::object();
  for (const auto& v : st.versions_in_order()) {
    const auto& r = st.releases.at(v);
    doc["releases"][v] = {
        {"status", std::string(to_string(r.status))},
        {"pinned", r.pinned},
        {"staged_at", r.staged_at},
        {"size", r.size},
        {"data_format",
         {{"writes", r.data_format.writes}, {"reads_min", r.data_format.reads_min}}}};
  }
  return doc.dump(2) + "\n";
}

}  // namespace upgraded::store
