#pragma once

// Builds signed artifacts around arbitrary payload bytes (and, if asked, arbitrary manifests),
// so that adversarial payloads reach the extractor with a valid signature.

#include <functional>
#include <string>
#include <vector>

#include "support/test_dir.h"
#include "upgraded/artifact/keys.h"
#include "upgraded/artifact/manifest.h"

namespace upgraded::test {

struct TestKey {
  std::string private_path;
  std::string public_path;
  std::string id;
};

/// Generates an Ed25519 key pair under `dir` with file names based on `name`.
TestKey make_key(const TempDir& dir, const std::string& name);

struct BuildOptions {
  std::string app = "hello";
  std::string version = "1.0.0";
  artifact::Compression compression = artifact::Compression::kNone;
  std::uint64_t chunk_size = artifact::kMinChunkSize;
  std::function<void(artifact::Manifest&)> tweak_manifest;  ///< before serialization
  std::function<void(std::string&)> tweak_manifest_bytes;   ///< after serialization
};

/// Writes `payload` to a file, describes it, builds a manifest, signs it with `keys` and writes
/// the artifact to `output`.
void build_artifact(const std::string& output, const std::vector<TestKey>& keys,
                    const std::string& payload, const BuildOptions& options = {});

/// A keyring trusting exactly `keys`.
artifact::Keyring keyring_of(const std::vector<TestKey>& keys);

}  // namespace upgraded::test
