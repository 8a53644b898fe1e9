// Fuzz target `manifest`: strict JSON (lib/artifact/strict_json.cpp) and the manifest.json
// schema (lib/artifact/manifest.cpp). The input is a manifest.json candidate; it is also tried
// as `pack --manifest` extras over a valid manifest.
//
// Invariants: errors have the documented codes; what the strict parser accepts reparses to the
// same document; an accepted manifest satisfies every rule the rest of the engine relies on and
// round-trips through the canonical serialization; accepted extras give a manifest that
// parse_manifest accepts (pack must never sign what no reader can read).

#include <set>
#include <string>

#include "fuzz_support.h"
#include "upgraded/artifact/manifest.h"
#include "upgraded/artifact/strict_json.h"
#include "upgraded/policy/names.h"

using namespace upgraded;
using namespace upgraded::artifact;

namespace {

void check_valid(const Manifest& m) {
  FUZZ_CHECK(policy::validate_app_name(m.app).ok());
  FUZZ_CHECK(policy::validate_version(m.version).ok());
  FUZZ_CHECK(m.created.size() == 20);
  FUZZ_CHECK(m.data_format.reads_min <= m.data_format.writes);
  std::set<std::string> units;
  for (const auto& u : m.units) {
    FUZZ_CHECK(policy::validate_unit_name(u).ok());
    FUZZ_CHECK(units.insert(u).second);
  }
  for (const auto& p : m.upgrade_from)
    FUZZ_CHECK(!p.empty());
  for (const auto& [name, hook] : m.hooks) {
    FUZZ_CHECK(policy::validate_relative_path(hook.path).ok());
    FUZZ_CHECK(hook.timeout_s >= 1);
  }
  FUZZ_CHECK(m.health.deadline_s >= 1 && m.health.deadline_s >= m.health.min_ready_s);
  const auto& p = m.payload;
  FUZZ_CHECK(p.size >= 1 && p.size <= kMaxPayloadSize);
  FUZZ_CHECK(p.chunk_size >= kMinChunkSize && p.chunk_size <= kMaxChunkSize);
  FUZZ_CHECK((p.chunk_size & (p.chunk_size - 1)) == 0);
  FUZZ_CHECK(p.chunks.size() == (p.size + p.chunk_size - 1) / p.chunk_size);
  FUZZ_CHECK(p.chunks.size() <= kMaxChunks);
}

void check_round_trip(const Manifest& m) {
  std::string canonical = serialize_manifest(m);
  auto again = parse_manifest(canonical);
  FUZZ_CHECK_MSG(again.ok(), (again ? std::string() : again.error().message()));
  FUZZ_CHECK(*again == m);
  FUZZ_CHECK(serialize_manifest(*again) == canonical);
}

Manifest base_manifest() {
  Manifest m;
  m.app = "hello";
  m.version = "1.0";
  m.created = "2024-01-01T00:00:00Z";
  m.payload.compression = Compression::kNone;
  m.payload.size = 1;
  m.payload.chunk_size = kMinChunkSize;
  m.payload.chunks.resize(1);
  return m;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto text = fuzz::as_text(data, size);

  auto doc = parse_strict_json(text, "input");
  if (!doc) {
    FUZZ_CHECK(doc.error().code() == ErrorCode::kVerificationFailed);
  } else {
    auto again = parse_strict_json(doc->dump(), "dump");
    FUZZ_CHECK_MSG(again.ok(), (again ? std::string() : again.error().message()));
    FUZZ_CHECK(*again == *doc);
  }

  auto m = parse_manifest(text);
  if (!m) {
    FUZZ_CHECK(m.error().code() == ErrorCode::kVerificationFailed);
  } else {
    FUZZ_CHECK(doc.ok());
    check_valid(*m);
    check_round_trip(*m);
  }

  Manifest extras = base_manifest();
  const Manifest before = extras;
  if (auto r = apply_manifest_extras(extras, text); !r) {
    FUZZ_CHECK(r.error().code() == ErrorCode::kInvalidArgument);
    FUZZ_CHECK(extras == before);
  } else {
    FUZZ_CHECK(extras.app == before.app && extras.version == before.version);
    FUZZ_CHECK(extras.payload == before.payload && extras.created == before.created);
    check_valid(extras);
    check_round_trip(extras);
  }
  return 0;
}
