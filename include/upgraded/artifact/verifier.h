#pragma once

// Opening an artifact: signatures first, then the manifest, then (streamed) the payload.

#include <memory>
#include <string>
#include <vector>

#include "upgraded/artifact/container.h"
#include "upgraded/artifact/keys.h"
#include "upgraded/artifact/manifest.h"
#include "upgraded/artifact/signatures.h"
#include "upgraded/result.h"

namespace upgraded::artifact {

/// A manifest whose signatures are verified, on its own (its artifact is read elsewhere, e.g.
/// by the daemon's sandboxed helper).
struct VerifiedManifest {
  Manifest manifest;
  std::string manifest_bytes;  ///< exactly as signed
  SignatureReport signatures;
};

/// Verifies `signature_bytes` (manifest.sig) over `manifest_bytes` against `keyring` and
/// `trust` before anything in the manifest is parsed, then parses the manifest. Errors are
/// kVerificationFailed. Uses no archive code: the bytes may come from an untrusted reader.
Result<VerifiedManifest> verify_manifest(std::string manifest_bytes,
                                         std::string_view signature_bytes, const Keyring& keyring,
                                         const TrustPolicy& trust);

/// An artifact whose signatures and manifest are verified; its payload is not read yet.
struct VerifiedArtifact {
  Manifest manifest;
  std::string manifest_bytes;  ///< exactly as signed
  SignatureReport signatures;
  std::unique_ptr<ContainerReader> container;  ///< positioned at the payload's data
};

/// Reads manifest.json and manifest.sig, verifies the signatures against `keyring` and `trust`
/// before anything in the manifest is parsed, then parses the manifest and positions the reader
/// at the payload. Errors are kVerificationFailed unless the artifact could not be read at all.
Result<VerifiedArtifact> open_verified(int fd, const Keyring& keyring, const TrustPolicy& trust);

/// Streams the whole payload through the verifier without extracting: size, every chunk hash,
/// the whole SHA-256 and the container's end are checked.
Result<void> verify_payload(VerifiedArtifact& artifact);

/// What `inspect` shows: the container's first two members read without trusting them.
struct UnverifiedArtifact {
  std::string manifest_bytes;
  std::optional<Manifest> manifest;  ///< set when the manifest passes the schema
  std::optional<std::string> manifest_error;
  std::vector<Signature> signatures;  ///< empty when manifest.sig is malformed
  std::optional<std::string> signature_error;
};
Result<UnverifiedArtifact> inspect_artifact(int fd);

}  // namespace upgraded::artifact
