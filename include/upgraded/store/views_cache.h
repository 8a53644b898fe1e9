#pragma once

// The encoding of `<store root>/views.cache`, the listing cache of Store::views()
// (lib/store/views.cpp, docs/state.md "views.cache"). Separate so that the reader, a boundary
// (the file is read by whoever lists the store), has a fuzz target of its own.

#include <sys/stat.h>

#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "upgraded/store/store.h"

namespace upgraded::store::views_cache {

constexpr int kFormat = 1;
/// At most this many releases per app are decoded; an app with more is read from its state.
constexpr std::size_t kMaxReleasesPerApp = 1 << 16;

/// What identified a file (or its absence: ino 0) when a view was read from it.
struct FileKey {
  std::uint64_t dev = 0, ino = 0, size = 0;
  std::int64_t mtime_s = 0, mtime_ns = 0, ctime_s = 0, ctime_ns = 0;
  bool operator==(const FileKey&) const = default;
};
FileKey key_of(const struct stat& sb);

/// An app's cached view. Its releases stay encoded (CBOR, as in the file) until the app is
/// listed: a listing decodes one app at a time into the same memory, instead of holding
/// thousands of apps' releases decoded at once.
struct Entry {
  FileKey dir, state;
  bool has_state = false, needs_recovery = false, pre_finalized = false;
  std::vector<std::uint8_t> releases;
  bool operator==(const Entry&) const = default;
};
using Entries = std::map<std::string, Entry>;

struct Document {
  /// What derived the entries' views (Store::for_each_view's kDerivation): a listing made by
  /// other code, whose views may mean something else, is not reused.
  std::string derivation;
  std::int64_t written = 0;  ///< when (CLOCK_REALTIME seconds): a clock now earlier drops it
  Entries entries;
  bool operator==(const Document&) const = default;
};

/// The file: CBOR {"format": 1, "derivation": "...", "written": seconds, "apps": [[app, dir
/// key, state key, has_state, needs_recovery, pre_finalized, releases (a byte string)], ...]},
/// a key being [dev, ino, size, mtime s, mtime ns, ctime s, ctime ns].
std::vector<std::uint8_t> encode(const Document& doc);
/// The document, or none if `bytes` is not exactly such a document: any value out of place or
/// of another type, a key missing or given twice, an app listed twice.
std::optional<Document> decode(std::span<const std::uint8_t> bytes);

/// An entry's releases: CBOR [[version, status, role, staged_at, pinned, size], ...].
std::vector<std::uint8_t> encode_releases(const std::vector<ListedRelease>& releases);
/// Decodes into `out` (its memory reused); false, `out` unspecified, if not such a document.
bool decode_releases(std::span<const std::uint8_t> bytes, std::vector<ListedRelease>& out);

// --- the listing the daemon hands over (ListAllReleasesByFileDescriptor, docs/dbus-api.md) ----

constexpr int kListingFormat = 1;

/// An app of a listing, its releases as encode_releases() writes them.
struct EncodedApp {
  std::string_view app;
  bool pre_finalized = false;
  std::span<const std::uint8_t> releases;
};
/// An app of a decoded listing.
struct ListedApp {
  std::string app;
  bool pre_finalized = false;
  std::vector<ListedRelease> releases;  ///< oldest first, as the daemon listed them
  bool operator==(const ListedApp&) const = default;
};

/// CBOR [1, [[app, pre_finalized, releases (a byte string: encode_releases)], ...]], the apps
/// in the order given (the daemon's: strictly ascending).
std::vector<std::uint8_t> encode_listing(const std::vector<EncodedApp>& apps);
/// The listing, or none if `bytes` is not exactly such a document: a value out of place or of
/// another type, an app name or version that is not valid (policy/names.h), a role other than
/// "", "current" or "previous", apps not in strictly ascending order, an app's releases that
/// do not decode, a byte after the document. (staged_at is any string, as in state.json:
/// whoever prints it makes it printable.)
std::optional<std::vector<ListedApp>> decode_listing(std::span<const std::uint8_t> bytes);

}  // namespace upgraded::store::views_cache
