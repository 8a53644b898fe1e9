#pragma once

// Verify-and-extract into a new directory, all or nothing.

#include <string>

#include "upgraded/artifact/extractor.h"
#include "upgraded/artifact/verifier.h"

namespace upgraded::artifact {

struct UnpackResult {
  Manifest manifest;
  SignatureReport signatures;
  ExtractStats stats;
};

/// Verifies the artifact on `artifact_fd` and extracts it to `dest_parent_fd/dest_name`, which
/// must not exist. Nothing is created until the signatures and the manifest are verified. The
/// tree is built in a hidden sibling ".<dest_name>.partial.<random>",
/// made durable with one syncfs(2), renamed into place (RENAME_NOREPLACE) and the parent
/// fsynced. On any failure the partial tree is removed and `dest_name` does not exist.
Result<UnpackResult> unpack_artifact(int artifact_fd, const Keyring& keyring,
                                     const TrustPolicy& trust, const ExtractPolicy& policy,
                                     int dest_parent_fd, const std::string& dest_name);

/// Extracts the payload of an artifact whose signatures and manifest are verified into the
/// existing, empty directory `dest_dirfd`, verifying every chunk on the way, then syncs the
/// filesystem (one syncfs). The building block for unpack_artifact and the release store. On
/// failure the directory's content is unspecified and the caller removes it. `sync` false
/// leaves the syncfs to the caller (who has more to change before making it durable). `umask`:
/// as for extract_payload.
Result<ExtractStats> extract_verified(VerifiedArtifact& artifact, const ExtractPolicy& policy,
                                      int dest_dirfd, bool sync = true,
                                      std::optional<mode_t> umask = std::nullopt);

}  // namespace upgraded::artifact
