// Staging with the extraction in this process (the CLI's offline paths, tests). Apart from
// store.cpp so that the daemon, which extracts in a sandboxed helper, links no archive code.

#include "upgraded/artifact/unpack.h"
#include "upgraded/store/store.h"

namespace upgraded::store {

Result<StageResult> Store::stage(int artifact_fd, const artifact::Keyring& keyring,
                                 const artifact::TrustPolicy& trust) const {
  // Verify before touching the store: a bad artifact changes nothing, not even a lock file.
  auto art = artifact::open_verified(artifact_fd, keyring, trust);
  if (!art) return art.error();
  auto lk = lock(art->manifest.app);
  if (!lk) return lk.error();
  return stage(*lk, *art);
}

Result<StageResult> Store::stage(const AppLock& lock, int artifact_fd,
                                 const artifact::Keyring& keyring,
                                 const artifact::TrustPolicy& trust) const {
  auto art = artifact::open_verified(artifact_fd, keyring, trust);
  if (!art) return art.error();
  return stage(lock, *art);
}

Result<StageResult> Store::stage(const AppLock& lock, artifact::VerifiedArtifact& art) const {
  artifact::VerifiedManifest verified{art.manifest, art.manifest_bytes, art.signatures};
  return stage(lock, verified, [&art](const artifact::ExtractPolicy& policy, int dest) {
    return artifact::extract_verified(art, policy, dest);
  });
}

}  // namespace upgraded::store
