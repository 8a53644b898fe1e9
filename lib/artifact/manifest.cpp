#include "upgraded/artifact/manifest.h"

#include <ctime>

#include "upgraded/artifact/encoding.h"
#include "upgraded/artifact/strict_json.h"
#include "upgraded/policy/names.h"

namespace upgraded::artifact {
namespace {

using nlohmann::json;
constexpr std::size_t kMaxNotes = 64 * 1024;
constexpr std::size_t kMaxUnits = 64;
constexpr std::size_t kMaxUpgradeFrom = 256;
constexpr std::uint64_t kMaxHookTimeout = 86400;

Error bad(const std::string& why) {
  return Error(ErrorCode::kVerificationFailed, "manifest: " + why);
}

Result<Sha256Digest> digest_field(const json& v, const std::string& where) {
  if (!v.is_string()) return bad(where + " must be a hex string");
  auto s = v.get<std::string>();
  auto bytes = from_hex(s);
  if (!bytes || bytes->size() != 32) return bad(where + " must be 64 lowercase hex digits");
  Sha256Digest d{};
  std::copy(bytes->begin(), bytes->end(), d.begin());
  return d;
}

bool valid_rfc3339(std::string_view s) {
  // YYYY-MM-DDTHH:MM:SSZ
  if (s.size() != 20) return false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    bool digit = c >= '0' && c <= '9';
    switch (i) {
      case 4:
      case 7:
        if (c != '-') return false;
        break;
      case 10:
        if (c != 'T') return false;
        break;
      case 13:
      case 16:
        if (c != ':') return false;
        break;
      case 19:
        if (c != 'Z') return false;
        break;
      default:
        if (!digit) return false;
    }
  }
  auto num = [&](std::size_t pos, std::size_t len) {
    return std::stoi(std::string(s.substr(pos, len)));
  };
  return num(5, 2) >= 1 && num(5, 2) <= 12 && num(8, 2) >= 1 && num(8, 2) <= 31 &&
         num(11, 2) <= 23 && num(14, 2) <= 59 && num(17, 2) <= 60;
}

Result<void> check_version_pattern(const std::string& p) {
  std::string_view v = p;
  if (v.ends_with('*')) {
    v.remove_suffix(1);
    if (v.empty()) return {};  // "*": any version
  }
  if (auto r = policy::validate_version(v); !r) return bad("upgrade_from: " + r.error().message());
  return {};
}

// Fields an author may set through pack --manifest; shared by parse and apply_extras.
Result<void> read_author_fields(Manifest& m, const json& doc) {
  if (auto it = doc.find("data_format"); it != doc.end()) {
    UPGRADED_TRY(json_only_keys(*it, {"writes", "reads_min"}, "manifest data_format"));
    auto w = json_uint(*it, "writes", "manifest data_format", UINT32_MAX);
    if (!w) return w.error();
    auto r = json_uint(*it, "reads_min", "manifest data_format", UINT32_MAX);
    if (!r) return r.error();
    if (*r > *w) return bad("data_format.reads_min is greater than data_format.writes");
    m.data_format = DataFormat{*w, *r};
  }
  if (auto it = doc.find("upgrade_from"); it != doc.end()) {
    if (!it->is_array() || it->size() > kMaxUpgradeFrom)
      return bad("upgrade_from must be an array of at most 256 version patterns");
    m.upgrade_from.clear();
    for (const auto& v : *it) {
      if (!v.is_string()) return bad("upgrade_from entries must be strings");
      UPGRADED_TRY(check_version_pattern(v.get<std::string>()));
      m.upgrade_from.push_back(v.get<std::string>());
    }
  }
  if (auto it = doc.find("units"); it != doc.end()) {
    if (!it->is_array() || it->size() > kMaxUnits)
      return bad("units must be an array of at most 64 unit names");
    m.units.clear();
    for (const auto& v : *it) {
      if (!v.is_string()) return bad("units entries must be strings");
      auto name = v.get<std::string>();
      if (auto r = policy::validate_unit_name(name); !r) return bad(r.error().message());
      for (const auto& u : m.units)
        if (u == name) return bad("unit " + policy::quote(name) + " is listed twice");
      m.units.push_back(std::move(name));
    }
  }
  if (auto it = doc.find("strategy"); it != doc.end()) {
    if (!it->is_string()) return bad("strategy must be a string");
    auto s = it->get<std::string>();
    if (s == "all-at-once")
      m.strategy = Strategy::kAllAtOnce;
    else if (s == "one-by-one")
      m.strategy = Strategy::kOneByOne;
    else if (s == "rolling")
      m.strategy = Strategy::kRolling;
    else
      return bad("unknown strategy " + policy::quote(s));
  }
  if (auto it = doc.find("hooks"); it != doc.end()) {
    if (!it->is_object()) return bad("hooks must be an object");
    m.hooks.clear();
    for (const auto& [name, h] : it->items()) {
      bool known = false;
      for (const char* k : kHookNames)
        known = known || name == k;
      if (!known) return bad("unknown hook " + policy::quote(name));
      std::string where = "manifest hooks." + name;
      UPGRADED_TRY(json_only_keys(h, {"path", "timeout_s"}, where));
      auto path = json_string(h, "path", where);
      if (!path) return path.error();
      if (auto r = policy::validate_relative_path(*path); !r)
        return bad("hooks." + name + ": " + r.error().message());
      auto timeout = json_uint(h, "timeout_s", where, kMaxHookTimeout);
      if (!timeout) return timeout.error();
      if (*timeout == 0) return bad("hooks." + name + ".timeout_s must be at least 1");
      m.hooks[name] = Hook{*path, static_cast<std::uint32_t>(*timeout)};
    }
  }
  if (auto it = doc.find("health"); it != doc.end()) {
    UPGRADED_TRY(json_only_keys(*it, {"min_ready_s", "deadline_s"}, "manifest health"));
    auto min_ready = json_uint(*it, "min_ready_s", "manifest health", 3600);
    if (!min_ready) return min_ready.error();
    auto deadline = json_uint(*it, "deadline_s", "manifest health", kMaxHookTimeout);
    if (!deadline) return deadline.error();
    if (*deadline == 0 || *deadline < *min_ready)
      return bad("health.deadline_s must be at least 1 and at least min_ready_s");
    m.health =
        Health{static_cast<std::uint32_t>(*min_ready), static_cast<std::uint32_t>(*deadline)};
  }
  if (auto it = doc.find("notes"); it != doc.end()) {
    if (!it->is_string()) return bad("notes must be a string");
    m.notes = it->get<std::string>();
    if (m.notes.size() > kMaxNotes) return bad("notes are longer than 64 KiB");
  }
  return {};
}

}  // namespace

std::string_view to_string(Strategy s) {
  switch (s) {
    case Strategy::kAllAtOnce:
      return "all-at-once";
    case Strategy::kOneByOne:
      return "one-by-one";
    case Strategy::kRolling:
      return "rolling";
  }
  return "";
}

std::string_view to_string(Compression c) {
  switch (c) {
    case Compression::kZstd:
      return "zstd";
    case Compression::kXz:
      return "xz";
    case Compression::kGzip:
      return "gzip";
    case Compression::kNone:
      return "none";
  }
  return "";
}

std::string_view payload_member_name(Compression c) {
  switch (c) {
    case Compression::kZstd:
      return "payload.tar.zst";
    case Compression::kXz:
      return "payload.tar.xz";
    case Compression::kGzip:
      return "payload.tar.gz";
    case Compression::kNone:
      return "payload.tar";
  }
  return "";
}

Result<Manifest> parse_manifest(std::string_view bytes) {
  if (bytes.size() > kMaxManifestSize) return bad("larger than 1 MiB");
  auto parsed = parse_strict_json(bytes, "manifest.json");
  if (!parsed) return parsed.error();
  const json& doc = *parsed;
  UPGRADED_TRY(json_only_keys(doc,
                              {"format", "app", "version", "data_format", "upgrade_from", "units",
                               "strategy", "hooks", "health", "payload", "notes", "created"},
                              "manifest"));
  auto format = json_uint(doc, "format", "manifest", 1000000);
  if (!format) return format.error();
  if (*format != kManifestFormat)
    return bad("unsupported format " + std::to_string(*format) + " (this build reads format 1)");

  Manifest m;
  auto app = json_string(doc, "app", "manifest");
  if (!app) return app.error();
  if (auto r = policy::validate_app_name(*app); !r) return bad(r.error().message());
  m.app = *app;
  auto version = json_string(doc, "version", "manifest");
  if (!version) return version.error();
  if (auto r = policy::validate_version(*version); !r) return bad(r.error().message());
  m.version = *version;
  auto created = json_string(doc, "created", "manifest");
  if (!created) return created.error();
  if (!valid_rfc3339(*created)) return bad("created must be \"YYYY-MM-DDTHH:MM:SSZ\"");
  m.created = *created;

  UPGRADED_TRY(read_author_fields(m, doc));

  auto pit = doc.find("payload");
  if (pit == doc.end()) return bad("missing 'payload'");
  const json& p = *pit;
  UPGRADED_TRY(json_only_keys(p, {"compression", "size", "sha256", "chunk_size", "chunks"},
                              "manifest payload"));
  auto comp = json_string(p, "compression", "manifest payload");
  if (!comp) return comp.error();
  if (*comp == "zstd")
    m.payload.compression = Compression::kZstd;
  else if (*comp == "xz")
    m.payload.compression = Compression::kXz;
  else if (*comp == "gzip")
    m.payload.compression = Compression::kGzip;
  else if (*comp == "none")
    m.payload.compression = Compression::kNone;
  else
    return bad("unknown payload compression " + policy::quote(*comp));
  auto size = json_uint(p, "size", "manifest payload", kMaxPayloadSize);
  if (!size) return size.error();
  if (*size == 0) return bad("payload.size is 0");
  m.payload.size = *size;
  auto sha = p.find("sha256");
  if (sha == p.end()) return bad("missing payload.sha256");
  auto digest = digest_field(*sha, "payload.sha256");
  if (!digest) return digest.error();
  m.payload.sha256 = *digest;
  auto chunk = json_uint(p, "chunk_size", "manifest payload", kMaxChunkSize);
  if (!chunk) return chunk.error();
  if (*chunk < kMinChunkSize || (*chunk & (*chunk - 1)) != 0)
    return bad("payload.chunk_size must be a power of two from 64 KiB to 16 MiB");
  m.payload.chunk_size = *chunk;
  auto chunks = p.find("chunks");
  if (chunks == p.end() || !chunks->is_array()) return bad("payload.chunks must be an array");
  std::uint64_t expected = (m.payload.size + m.payload.chunk_size - 1) / m.payload.chunk_size;
  if (expected > kMaxChunks)
    return bad("payload.size and chunk_size need " + std::to_string(expected) +
               " chunks; at most " + std::to_string(kMaxChunks) + " are allowed");
  if (chunks->size() != expected)
    return bad("payload.chunks has " + std::to_string(chunks->size()) +
               " entries, size and "
               "chunk_size need " +
               std::to_string(expected));
  m.payload.chunks.reserve(chunks->size());
  for (const auto& c : *chunks) {
    auto d = digest_field(c, "payload.chunks[]");
    if (!d) return d.error();
    m.payload.chunks.push_back(*d);
  }
  return m;
}

std::string serialize_manifest(const Manifest& m) {
  nlohmann::ordered_json doc;
  doc["format"] = kManifestFormat;
  doc["app"] = m.app;
  doc["version"] = m.version;
  doc["data_format"] = {{"writes", m.data_format.writes}, {"reads_min", m.data_format.reads_min}};
  doc["upgrade_from"] = m.upgrade_from;
  doc["units"] = m.units;
  doc["strategy"] = std::string(to_string(m.strategy));
  doc["hooks"] = nlohmann::ordered_json::object();
  for (const char* name : kHookNames) {
    auto it = m.hooks.find(name);
    if (it == m.hooks.end()) continue;
    doc["hooks"][name] = {{"path", it->second.path}, {"timeout_s", it->second.timeout_s}};
  }
  doc["health"] = {{"min_ready_s", m.health.min_ready_s}, {"deadline_s", m.health.deadline_s}};
  nlohmann::ordered_json chunks = nlohmann::ordered_json::array();
  for (const auto& c : m.payload.chunks)
    chunks.push_back(to_hex(c));
  doc["payload"] = {{"compression", std::string(to_string(m.payload.compression))},
                    {"size", m.payload.size},
                    {"sha256", to_hex(m.payload.sha256)},
                    {"chunk_size", m.payload.chunk_size},
                    {"chunks", std::move(chunks)}};
  doc["notes"] = m.notes;
  doc["created"] = m.created;
  return doc.dump(2) + "\n";
}

Result<void> apply_manifest_extras(Manifest& m, std::string_view extra_json) {
  auto parsed = parse_strict_json(extra_json, "extra manifest");
  auto as_invalid = [](const Error& e) { return Error(ErrorCode::kInvalidArgument, e.message()); };
  if (!parsed) return as_invalid(parsed.error());
  if (!parsed->is_object())
    return Error(ErrorCode::kInvalidArgument, "extra manifest must be a JSON object");
  for (const auto& [key, value] : parsed->items()) {
    if (key == "format" || key == "app" || key == "version" || key == "payload" || key == "created")
      return Error(ErrorCode::kInvalidArgument,
                   "extra manifest: '" + key + "' is set by pack itself (use its options)");
  }
  if (auto r = json_only_keys(
          *parsed, {"data_format", "upgrade_from", "units", "strategy", "hooks", "health", "notes"},
          "extra manifest");
      !r)
    return as_invalid(r.error());
  Manifest copy = m;
  if (auto r = read_author_fields(copy, *parsed); !r) return as_invalid(r.error());
  m = std::move(copy);
  return {};
}

std::string format_rfc3339(std::int64_t unix_seconds) {
  std::time_t t = static_cast<std::time_t>(unix_seconds);
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::optional<std::int64_t> parse_rfc3339(std::string_view text) {
  if (text.size() != 20 || text[4] != '-' || text[7] != '-' || text[10] != 'T' || text[13] != ':' ||
      text[16] != ':' || text[19] != 'Z')
    return std::nullopt;
  for (std::size_t i : {0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18})
    if (text[i] < '0' || text[i] > '9') return std::nullopt;
  auto num = [&](std::size_t at, std::size_t n) {
    int v = 0;
    for (std::size_t i = at; i < at + n; ++i)
      v = v * 10 + (text[i] - '0');
    return v;
  };
  std::tm tm{};
  tm.tm_year = num(0, 4) - 1900;
  tm.tm_mon = num(5, 2) - 1;
  tm.tm_mday = num(8, 2);
  tm.tm_hour = num(11, 2);
  tm.tm_min = num(14, 2);
  tm.tm_sec = num(17, 2);
  if (tm.tm_mon > 11 || tm.tm_mday < 1 || tm.tm_mday > 31 || tm.tm_hour > 23 || tm.tm_min > 59 ||
      tm.tm_sec > 60)
    return std::nullopt;
  return static_cast<std::int64_t>(::timegm(&tm));
}

}  // namespace upgraded::artifact
