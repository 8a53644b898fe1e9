#include "upgraded/artifact/verifier.h"

// Kept apart from verifier.cpp so that a program that verifies manifests but never reads an
// artifact itself (the daemon) links no archive code.

namespace upgraded::artifact {

Result<VerifiedManifest> verify_manifest(std::string manifest_bytes,
                                         std::string_view signature_bytes, const Keyring& keyring,
                                         const TrustPolicy& trust) {
  auto report = verify_signatures(manifest_bytes, signature_bytes, keyring, trust);
  if (!report) return report.error();
  auto manifest = parse_manifest(manifest_bytes);
  if (!manifest) return manifest.error();
  return VerifiedManifest{std::move(*manifest), std::move(manifest_bytes), std::move(*report)};
}

}  // namespace upgraded::artifact
