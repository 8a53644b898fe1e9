#pragma once

// manifest.json: the signed description of a release. Every field is specified in
// docs/artifact-format.md; parse_manifest enforces that schema strictly (unknown fields, wrong
// types and out-of-range values are refused).

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "upgraded/artifact/digest.h"
#include "upgraded/result.h"

namespace upgraded::artifact {

inline constexpr std::size_t kMaxManifestSize = 1024 * 1024;
inline constexpr std::uint64_t kManifestFormat = 1;
/// The outer container is plain ustar: a member is at most 8 GiB - 1 bytes.
inline constexpr std::uint64_t kMaxPayloadSize = 077777777777ULL;
inline constexpr std::uint64_t kMinChunkSize = 64 * 1024;
inline constexpr std::uint64_t kMaxChunkSize = 16 * 1024 * 1024;
inline constexpr std::uint64_t kDefaultChunkSize = 1024 * 1024;
/// At most this many chunk hashes (docs/artifact-format.md §3); pack doubles chunk_size until
/// the payload fits.
inline constexpr std::size_t kMaxChunks = 12 * 1024;

enum class Strategy { kAllAtOnce, kOneByOne, kRolling };
enum class Compression { kZstd, kXz, kGzip, kNone };

std::string_view to_string(Strategy s);
std::string_view to_string(Compression c);
/// The payload member's name for a compression ("payload.tar.zst").
std::string_view payload_member_name(Compression c);

/// The hook names a manifest may declare, in the order they run during an upgrade.
inline constexpr const char* kHookNames[] = {"pre_upgrade", "migrate", "post_upgrade",
                                             "health",      "backup",  "finalize"};

struct Hook {
  std::string path;         ///< relative path inside the release
  std::uint32_t timeout_s;  ///< killed after this many seconds
  bool operator==(const Hook&) const = default;
};

struct DataFormat {
  std::uint64_t writes = 0;     ///< generation of persistent data this release writes
  std::uint64_t reads_min = 0;  ///< oldest generation it can still read
  bool operator==(const DataFormat&) const = default;
};

struct Health {
  std::uint32_t min_ready_s = 0;  ///< units must stay active this long
  std::uint32_t deadline_s = 60;  ///< the whole gate must pass within this time
  bool operator==(const Health&) const = default;
};

struct PayloadInfo {
  Compression compression = Compression::kZstd;
  std::uint64_t size = 0;
  Sha256Digest sha256{};
  std::uint64_t chunk_size = kDefaultChunkSize;
  std::vector<Sha256Digest> chunks;
  bool operator==(const PayloadInfo&) const = default;
};

struct Manifest {
  std::string app;
  std::string version;
  DataFormat data_format;
  std::vector<std::string> upgrade_from;  ///< exact versions or prefixes ending in '*'
  std::vector<std::string> units;         ///< systemd units, in start order
  Strategy strategy = Strategy::kAllAtOnce;
  std::map<std::string, Hook> hooks;
  Health health;
  PayloadInfo payload;
  std::string notes;
  std::string created;  ///< RFC 3339 UTC, "YYYY-MM-DDTHH:MM:SSZ"
  bool operator==(const Manifest&) const = default;
};

/// Parses and validates manifest.json. Call only on bytes whose signature was verified (or,
/// for `inspect`, with the result labelled unverified). Errors are kVerificationFailed.
Result<Manifest> parse_manifest(std::string_view bytes);

/// Canonical serialization (what pack signs). parse_manifest(serialize_manifest(m)) == m.
std::string serialize_manifest(const Manifest& m);

/// Merges the release-author fields of `extra_json` (pack --manifest) into `m`: data_format,
/// upgrade_from, units, strategy, hooks, health, notes. Fields that pack itself owns (format,
/// app, version, payload, created) and unknown fields are refused (kInvalidArgument).
Result<void> apply_manifest_extras(Manifest& m, std::string_view extra_json);

/// "YYYY-MM-DDTHH:MM:SSZ" for a Unix time.
std::string format_rfc3339(std::int64_t unix_seconds);
/// The Unix time of "YYYY-MM-DDTHH:MM:SSZ" (nothing else is accepted).
std::optional<std::int64_t> parse_rfc3339(std::string_view text);

}  // namespace upgraded::artifact
