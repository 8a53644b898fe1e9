#include "upgraded/artifact/verifier.h"

#include "upgraded/artifact/payload_stream.h"

namespace upgraded::artifact {

Result<VerifiedArtifact> open_verified(int fd, const Keyring& keyring, const TrustPolicy& trust) {
  auto container = ContainerReader::open(fd);
  if (!container) return container.error();
  auto report = verify_signatures((*container)->manifest_bytes(), (*container)->signature_bytes(),
                                  keyring, trust);
  if (!report) return report.error();
  auto manifest = parse_manifest((*container)->manifest_bytes());
  if (!manifest) return manifest.error();
  UPGRADED_TRY((*container)->begin_payload(manifest->payload));
  std::string bytes = (*container)->manifest_bytes();
  return VerifiedArtifact{std::move(*manifest), std::move(bytes), std::move(*report),
                          std::move(*container)};
}

Result<void> verify_payload(VerifiedArtifact& artifact) {
  VerifiedPayloadStream stream(*artifact.container, artifact.manifest.payload);
  for (;;) {
    auto piece = stream.next();
    if (!piece) return piece.error();
    if (piece->empty()) return {};
  }
}

Result<UnverifiedArtifact> inspect_artifact(int fd) {
  auto container = ContainerReader::open(fd);
  if (!container) return container.error();
  UnverifiedArtifact out;
  out.manifest_bytes = (*container)->manifest_bytes();
  auto manifest = parse_manifest(out.manifest_bytes);
  if (manifest)
    out.manifest = std::move(*manifest);
  else
    out.manifest_error = manifest.error().message();
  auto sigs = parse_signatures((*container)->signature_bytes());
  if (sigs)
    out.signatures = std::move(*sigs);
  else
    out.signature_error = sigs.error().message();
  return out;
}

}  // namespace upgraded::artifact
