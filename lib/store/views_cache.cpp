// The encoding of views.cache (upgraded/store/views_cache.h): CBOR written by nlohmann's
// encoder, read through its SAX interface straight into the structures, with the document's
// shape checked value by value.

#include "upgraded/store/views_cache.h"

#include <nlohmann/json.hpp>

#include "upgraded/policy/names.h"

namespace upgraded::store::views_cache {
namespace {

using nlohmann::json;

json key_to_json(const FileKey& k) {
  return json::array({k.dev, k.ino, k.size, k.mtime_s, k.mtime_ns, k.ctime_s, k.ctime_ns});
}

// The SAX events nlohmann's CBOR reader delivers, each refused unless a reader below accepts
// it: the documents are read straight into their structures, without a JSON tree, and any value
// out of place fails the read.
struct StrictSax {
  using Json = json;
  bool null() { return false; }
  bool boolean(bool) { return false; }
  bool number_integer(json::number_integer_t) { return false; }
  bool number_unsigned(json::number_unsigned_t) { return false; }
  bool number_float(json::number_float_t, const std::string&) { return false; }
  bool string(json::string_t&) { return false; }
  bool binary(json::binary_t&) { return false; }
  bool start_object(std::size_t) { return false; }
  bool key(json::string_t&) { return false; }
  bool end_object() { return false; }
  bool start_array(std::size_t) { return false; }
  bool end_array() { return false; }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) {
    return false;
  }
};

// An app's releases: [[version, status, role, staged_at, pinned, size], ...].
class ReleasesReader : public StrictSax {
 public:
  explicit ReleasesReader(std::vector<ListedRelease>& out) : m_out(out) { m_out.clear(); }
  bool done() const { return m_done; }

  bool boolean(bool b) {
    if (!in_release() || m_field != 4) return false;
    m_release.pinned = b;
    return next();
  }
  bool number_unsigned(json::number_unsigned_t n) {
    if (!in_release() || m_field != 5) return false;
    m_release.size = n;
    return next();
  }
  bool string(json::string_t& v) {
    if (!in_release()) return false;
    switch (m_field) {
      case 0:
        m_release.version = std::move(v);
        break;
      case 1: {
        auto status = release_status_from(v);
        if (!status) return false;
        m_release.status = *status;
        break;
      }
      case 2:
        m_release.role = std::move(v);
        break;
      case 3:
        m_release.staged_at = std::move(v);
        break;
      default:
        return false;
    }
    return next();
  }
  bool start_array(std::size_t elements) {
    if (m_depth == 0 && !m_done) {
      // CBOR gives the count: the releases are allocated once.
      if (elements != static_cast<std::size_t>(-1) && elements <= kMaxReleasesPerApp)
        m_out.reserve(elements);
    } else if (m_depth == 1) {
      m_field = 0;
    } else {
      return false;
    }
    ++m_depth;
    return true;
  }
  bool end_array() {
    if (m_depth == 2) {
      if (m_field != 6 || m_out.size() >= kMaxReleasesPerApp) return false;
      m_out.push_back(std::move(m_release));
    } else {
      m_done = true;
    }
    --m_depth;
    return true;
  }

 private:
  bool in_release() const { return m_depth == 2; }
  bool next() {
    ++m_field;
    return true;
  }
  std::vector<ListedRelease>& m_out;
  ListedRelease m_release;
  int m_depth = 0, m_field = 0;
  bool m_done = false;
};

// The file (views_cache.h, encode()), read value by value.
class CacheReader : public StrictSax {
 public:
  Document doc;
  bool complete() const {
    return m_seen == (kFormatSeen | kDerivationSeen | kWrittenSeen | kAppsSeen) && m_stack.empty();
  }

  bool boolean(bool b) {
    if (!top(kApp) || field() < 3 || field() > 5) return false;
    (field() == 3   ? m_entry.has_state
     : field() == 4 ? m_entry.needs_recovery
                    : m_entry.pre_finalized) = b;
    return next();
  }
  bool number_integer(json::number_integer_t n) { return signed_number(n); }
  bool number_unsigned(json::number_unsigned_t n) {
    // dev, ino and size are unsigned, to their last bit; the times are signed.
    if (top(kKey) && field() < 3) {
      (field() == 0 ? m_key_value.dev : field() == 1 ? m_key_value.ino : m_key_value.size) = n;
      return next();
    }
    return n <= static_cast<std::uint64_t>(INT64_MAX) &&
           signed_number(static_cast<std::int64_t>(n));
  }
  bool string(json::string_t& v) {
    if (top(kTop) && m_key == "derivation" && once(kDerivationSeen)) {
      doc.derivation = std::move(v);
      return true;
    }
    if (!top(kApp) || field() != 0) return false;
    m_app = std::move(v);
    return next();
  }
  bool binary(json::binary_t& v) {
    if (!top(kApp) || field() != 6) return false;
    m_entry.releases = std::move(static_cast<std::vector<std::uint8_t>&>(v));
    return next();
  }
  bool start_object(std::size_t) {
    if (!m_stack.empty() || m_seen != 0) return false;
    m_stack.push_back({kTop, 0});
    return true;
  }
  bool key(json::string_t& k) {
    if (!top(kTop)) return false;
    m_key = std::move(k);
    return true;
  }
  bool end_object() {
    if (!top(kTop)) return false;
    m_stack.pop_back();
    return true;
  }
  bool start_array(std::size_t) {
    if (top(kTop) && m_key == "apps" && (m_seen & kAppsSeen) == 0) return push(kApps);
    if (top(kApps)) {
      m_entry = Entry{};
      return push(kApp);
    }
    if (top(kApp) && (field() == 1 || field() == 2)) {
      m_key_value = FileKey{};
      return push(kKey);
    }
    return false;
  }
  bool end_array() {
    if (m_stack.empty()) return false;
    auto [ctx, n] = m_stack.back();
    m_stack.pop_back();
    switch (ctx) {
      case kKey:
        if (n != 7) return false;
        (field() == 1 ? m_entry.dir : m_entry.state) = m_key_value;
        return next();
      case kApp:
        // Each app once: a second entry for one is not something encode() writes.
        if (n != 7 || !doc.entries.try_emplace(std::move(m_app), std::move(m_entry)).second)
          return false;
        return next();
      case kApps:
        m_seen |= kAppsSeen;
        return true;
      default:
        return false;
    }
  }

 private:
  enum Ctx { kTop, kApps, kApp, kKey };
  enum Seen : unsigned { kFormatSeen = 1, kDerivationSeen = 2, kWrittenSeen = 4, kAppsSeen = 8 };
  bool top(Ctx c) const { return !m_stack.empty() && m_stack.back().first == c; }
  int field() const { return m_stack.back().second; }
  bool next() {
    ++m_stack.back().second;
    return true;
  }
  bool push(Ctx c) {
    m_stack.push_back({c, 0});
    return true;
  }
  bool once(Seen s) {
    if (m_seen & s) return false;
    m_seen |= s;
    return true;
  }
  bool signed_number(std::int64_t n) {
    if (top(kTop) && m_key == "format" && once(kFormatSeen)) return n == kFormat;
    if (top(kTop) && m_key == "written" && once(kWrittenSeen)) {
      doc.written = n;
      return true;
    }
    if (!top(kKey) || field() < 3 || field() >= 7) return false;
    (field() == 3   ? m_key_value.mtime_s
     : field() == 4 ? m_key_value.mtime_ns
     : field() == 5 ? m_key_value.ctime_s
                    : m_key_value.ctime_ns) = n;
    return next();
  }

  std::vector<std::pair<Ctx, int>> m_stack;
  std::string m_key, m_app;
  unsigned m_seen = 0;
  Entry m_entry;
  FileKey m_key_value;
};

// A listing (views_cache.h, encode_listing()), read value by value.
class ListingReader : public StrictSax {
 public:
  std::vector<ListedApp> apps;
  bool complete() const { return m_done; }

  bool number_unsigned(json::number_unsigned_t n) {
    if (m_depth != 1 || m_field != 0 || n != kListingFormat) return false;
    ++m_field;
    return true;
  }
  bool string(json::string_t& v) {
    if (m_depth != 3 || m_app_field != 0 || !policy::validate_app_name(v)) return false;
    // Strictly ascending: each app once, in the daemon's order.
    if (!apps.empty() && !(apps.back().app < v)) return false;
    m_app.app = std::move(v);
    ++m_app_field;
    return true;
  }
  bool boolean(bool b) {
    if (m_depth != 3 || m_app_field != 1) return false;
    m_app.pre_finalized = b;
    ++m_app_field;
    return true;
  }
  bool binary(json::binary_t& v) {
    if (m_depth != 3 || m_app_field != 2 || !decode_releases(v, m_app.releases)) return false;
    for (const auto& r : m_app.releases)
      if (!policy::validate_version(r.version) ||
          (r.role != "" && r.role != "current" && r.role != "previous"))
        return false;
    ++m_app_field;
    return true;
  }
  bool start_array(std::size_t) {
    if (m_done) return false;
    if (m_depth == 0 || (m_depth == 1 && m_field == 1)) {
      ++m_depth;
      return true;
    }
    if (m_depth == 2) {
      m_app = ListedApp{};
      m_app_field = 0;
      ++m_depth;
      return true;
    }
    return false;
  }
  bool end_array() {
    switch (m_depth) {
      case 3:
        if (m_app_field != 3) return false;
        apps.push_back(std::move(m_app));
        break;
      case 2:
        m_field = 2;  // the apps
        break;
      case 1:
        if (m_field != 2) return false;
        m_done = true;
        break;
      default:
        return false;
    }
    --m_depth;
    return true;
  }

 private:
  ListedApp m_app;
  int m_depth = 0, m_field = 0, m_app_field = 0;
  bool m_done = false;
};

}  // namespace

FileKey key_of(const struct stat& sb) {
  return {static_cast<std::uint64_t>(sb.st_dev),
          static_cast<std::uint64_t>(sb.st_ino),
          static_cast<std::uint64_t>(sb.st_size),
          sb.st_mtim.tv_sec,
          sb.st_mtim.tv_nsec,
          sb.st_ctim.tv_sec,
          sb.st_ctim.tv_nsec};
}

std::vector<std::uint8_t> encode_releases(const std::vector<ListedRelease>& releases) {
  json out = json::array();
  for (const auto& r : releases)
    out.push_back(json::array(
        {r.version, std::string(to_string(r.status)), r.role, r.staged_at, r.pinned, r.size}));
  return json::to_cbor(out);
}

bool decode_releases(std::span<const std::uint8_t> bytes, std::vector<ListedRelease>& out) {
  ReleasesReader reader(out);
  return json::sax_parse(bytes.begin(), bytes.end(), &reader, json::input_format_t::cbor) &&
         reader.done();
}

std::vector<std::uint8_t> encode(const Document& doc) {
  json apps = json::array();
  for (const auto& [app, e] : doc.entries)
    apps.push_back(json::array({app, key_to_json(e.dir), key_to_json(e.state), e.has_state,
                                e.needs_recovery, e.pre_finalized, json::binary(e.releases)}));
  return json::to_cbor(json{{"format", kFormat},
                            {"derivation", doc.derivation},
                            {"written", doc.written},
                            {"apps", std::move(apps)}});
}

std::optional<Document> decode(std::span<const std::uint8_t> bytes) {
  CacheReader reader;
  if (!json::sax_parse(bytes.begin(), bytes.end(), &reader, json::input_format_t::cbor) ||
      !reader.complete())
    return std::nullopt;
  return std::move(reader.doc);
}

std::vector<std::uint8_t> encode_listing(const std::vector<EncodedApp>& apps) {
  json out = json::array();
  for (const auto& a : apps)
    out.push_back(json::array(
        {a.app, a.pre_finalized,
         json::binary(std::vector<std::uint8_t>(a.releases.begin(), a.releases.end()))}));
  return json::to_cbor(json::array({kListingFormat, std::move(out)}));
}

std::optional<std::vector<ListedApp>> decode_listing(std::span<const std::uint8_t> bytes) {
  ListingReader reader;
  if (!json::sax_parse(bytes.begin(), bytes.end(), &reader, json::input_format_t::cbor) ||
      !reader.complete())
    return std::nullopt;
  return std::move(reader.apps);
}

}  // namespace upgraded::store::views_cache
