#include <gtest/gtest.h>

#include "upgraded/artifact/manifest.h"

using namespace upgraded;
using namespace upgraded::artifact;

namespace {

Manifest sample() {
  Manifest m;
  m.app = "hello";
  m.version = "1.2.0";
  m.data_format = {3, 2};
  m.upgrade_from = {"1.1.*", "1.0.9"};
  m.units = {"hello.service", "hello-worker.service"};
  m.strategy = Strategy::kOneByOne;
  m.hooks["migrate"] = Hook{"bin/migrate", 120};
  m.hooks["pre_upgrade"] = Hook{"bin/pre", 30};
  m.health = {5, 60};
  m.payload.compression = Compression::kZstd;
  m.payload.size = 3 * kMinChunkSize + 1;
  m.payload.chunk_size = kMinChunkSize;
  m.payload.chunks.resize(4);
  m.payload.chunks[2][0] = std::byte{7};
  m.payload.sha256[31] = std::byte{9};
  m.notes = "Fixes the frobnicator.";
  m.created = "2026-11-21T10:00:00Z";
  return m;
}

std::string with(std::string text, const std::string& from, const std::string& to) {
  auto pos = text.find(from);
  EXPECT_NE(pos, std::string::npos) << from;
  if (pos != std::string::npos) text.replace(pos, from.size(), to);
  return text;
}

void expect_refused(const std::string& text, const std::string& needle) {
  auto r = parse_manifest(text);
  ASSERT_FALSE(r.ok()) << "accepted: " << needle;
  EXPECT_EQ(r.error().code(), ErrorCode::kVerificationFailed);
  EXPECT_NE(r.error().message().find(needle), std::string::npos) << r.error().message();
}

}  // namespace

TEST(Manifest, RoundTripsThroughItsCanonicalSerialization) {
  Manifest m = sample();
  std::string text = serialize_manifest(m);
  auto parsed = parse_manifest(text);
  ASSERT_TRUE(parsed.ok()) << parsed.error().message();
  EXPECT_EQ(*parsed, m);
  EXPECT_EQ(serialize_manifest(*parsed), text);
}

TEST(Manifest, RefusesUnknownFieldsAndDuplicateKeys) {
  std::string text = serialize_manifest(sample());
  expect_refused(with(text, "\"notes\"", "\"surprise\": 1,\n  \"notes\""), "unknown field");
  expect_refused(with(text, "\"notes\"", "\"app\": \"evil\",\n  \"notes\""), "duplicate key");
  expect_refused(with(text, "\"min_ready_s\"", "\"grace\": 1, \"min_ready_s\""), "unknown field");
}

TEST(Manifest, RefusesBadNamesVersionsAndUnits) {
  std::string text = serialize_manifest(sample());
  expect_refused(with(text, "\"hello\"", "\"../x\""), "app name");
  expect_refused(with(text, "\"hello\"", "\"a/b\""), "app name");
  expect_refused(with(text, "\"hello\"", "\"\""), "app name");
  expect_refused(with(text, "\"hello\"", "\"" + std::string(300, 'a') + "\""), "app name");
  expect_refused(with(text, "\"1.2.0\"", "\"../1\""), "version");
  expect_refused(with(text, "\"1.2.0\"", "\"" + std::string(300, '1') + "\""), "version");
  expect_refused(with(text, "\"hello.service\"", "\"hello\""), "unit name");
  expect_refused(with(text, "\"hello-worker.service\"", "\"hello.service\""), "listed twice");
}

TEST(Manifest, RefusesWrongTypesAndRanges) {
  std::string text = serialize_manifest(sample());
  expect_refused(with(text, "\"format\": 1", "\"format\": 2"), "unsupported format");
  expect_refused(with(text, "\"writes\": 3", "\"writes\": 1"), "reads_min");
  expect_refused(with(text, "\"writes\": 3", "\"writes\": -3"), "non-negative integer");
  expect_refused(with(text, "\"writes\": 3", "\"writes\": 3.5"), "non-negative integer");
  expect_refused(with(text, "\"strategy\": \"one-by-one\"", "\"strategy\": \"yolo\""), "strategy");
  expect_refused(with(text, "\"timeout_s\": 120", "\"timeout_s\": 0"), "timeout_s");
  expect_refused(with(text, "\"path\": \"bin/migrate\"", "\"path\": \"../migrate\""),
                 "hooks.migrate");
  expect_refused(with(text, "\"migrate\"", "\"rm_rf\""), "unknown hook");
  expect_refused(with(text, "\"deadline_s\": 60", "\"deadline_s\": 1"), "deadline_s");
  expect_refused(with(text, "\"created\": \"2026-11-21T10:00:00Z\"", "\"created\": \"yesterday\""),
                 "created");
  expect_refused(with(text, "\"compression\": \"zstd\"", "\"compression\": \"lz4\""),
                 "compression");
  expect_refused(with(text, "\"chunk_size\": 65536", "\"chunk_size\": 65537"), "chunk_size");
  expect_refused(with(text, "\"size\": 196609", "\"size\": 196608"), "chunks has 4 entries");
  expect_refused(with(text, "\"size\": 196609", "\"size\": 0"), "payload.size");
  expect_refused(with(text, "\"upgrade_from\": [", "\"upgrade_from\": [\"a/b\","), "upgrade_from");
}

TEST(Manifest, RefusesMalformedJsonAndInvalidUtf8) {
  expect_refused("", "not valid JSON");
  expect_refused("{", "not valid JSON");
  expect_refused("[]", "must be a JSON object");
  std::string text = serialize_manifest(sample());
  expect_refused(with(text, "frobnicator", "frob\xff"), "not valid JSON");
  std::string deep(100, '[');
  expect_refused("{\"notes\": " + deep + "}", "nested deeper");
  expect_refused(std::string(kMaxManifestSize + 1, ' '), "larger than 1 MiB");
}

TEST(ManifestExtras, MergeAuthorFieldsAndRefusePackOwnedOnes) {
  Manifest m = sample();
  ASSERT_TRUE(
      apply_manifest_extras(m, R"({"units": ["a.service"], "notes": "n", "strategy": "rolling"})")
          .ok());
  EXPECT_EQ(m.units, std::vector<std::string>{"a.service"});
  EXPECT_EQ(m.strategy, Strategy::kRolling);
  Manifest before = m;
  for (const char* bad : {R"({"app": "x"})", R"({"payload": {}})", R"({"created": "x"})",
                          R"({"colour": "blue"})", R"({"units": ["nope"]})", "not json"}) {
    auto r = apply_manifest_extras(m, bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.error().code(), ErrorCode::kInvalidArgument);
    EXPECT_EQ(m, before) << "a refused extra must change nothing";
  }
}

TEST(Manifest, RefusesARawNulByteWhichTheJsonLexerWouldTakeForTheEnd) {
  std::string text = serialize_manifest(sample());
  expect_refused(text + std::string(1, '\0'), "NUL byte");
  expect_refused(text + std::string("\0{\"app\": \"evil\"}", 17), "NUL byte");
  expect_refused(with(text, "\"notes\"", std::string("\0\"notes\"", 8)), "NUL byte");
}

TEST(Manifest, RefusesMoreChunksThanTheFormatAllows) {
  Manifest m = sample();
  m.payload.chunk_size = kMinChunkSize;
  m.payload.size = (kMaxChunks + 1) * kMinChunkSize;
  m.payload.chunks.assign(kMaxChunks + 1, Sha256Digest{});
  expect_refused(serialize_manifest(m), "at most 12288");
  m.payload.size = kMaxChunks * kMinChunkSize;
  m.payload.chunks.resize(kMaxChunks);
  auto ok = parse_manifest(serialize_manifest(m));
  EXPECT_TRUE(ok.ok()) << ok.error().message();
}
