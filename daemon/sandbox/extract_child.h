#pragma once

// The daemon's side of its helper (upgraded-extract): spawns it with posix_spawn, hands it file
// descriptors (never paths), and waits for its answer, a cancel or a deadline. Every helper
// run is a fresh process that confines itself before reading its input (sandbox.h).

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include "sandbox/extract_protocol.h"
#include "upgraded/artifact/extractor.h"
#include "upgraded/artifact/signatures.h"
#include "upgraded/result.h"

namespace upgraded::sandbox {

/// upgraded-extract next to the running executable (a build tree), else in the libexec
/// directory the project was configured with.
std::string default_helper_path();

struct Helper {
  std::string path;
  /// The unprivileged uid/gid it runs as (when the daemon runs as root); none: the daemon's.
  std::optional<std::pair<uid_t, gid_t>> as;
  /// Holds `as` for this run while any copy of the Helper lives: no other run is given that uid
  /// meanwhile (Manager::next_helper).
  std::shared_ptr<const void> lease;
};

/// The first two members of an artifact, read by `--read-head` in a sandbox that may write
/// nothing. The bytes are untrusted until their signatures are checked.
struct ArtifactHead {
  std::string manifest_bytes;
  std::string signature_bytes;
};
Result<ArtifactHead> read_head_in_child(const Helper& helper, int artifact_fd,
                                        std::chrono::milliseconds timeout);

/// Checks the signatures with `--verify`: the helper gets the bytes and the PEM texts of the
/// trust root, never the artifact. Errors as artifact::verify_signatures.
Result<artifact::SignatureReport> verify_in_child(const Helper& helper,
                                                  const VerifyRequest& request,
                                                  std::chrono::milliseconds timeout);

struct ExtractRequest {
  int artifact_fd = -1;              ///< a regular file, read with pread
  std::string manifest_bytes;        ///< the manifest the caller verified
  std::uint64_t payload_offset = 0;  ///< artifact::canonical_payload_offset of the artifact
  artifact::ExtractPolicy policy;
  int dest_dirfd = -1;  ///< empty directory, owned by the daemon
  int cancel_fd = -1;   ///< optional: readable means cancel (an eventfd)
};

/// Runs one extraction. With `helper.as`, the destination is handed to that uid for the
/// extraction and the finished tree handed back to the daemon's uid and gid (fs::chown_tree,
/// which refuses anything the helper did not create), then synced. A cancel kills the helper
/// (kCanceled); a helper that dies or answers nonsense is kFailed. On error the destination
/// holds a partial tree: the caller removes it.
Result<artifact::ExtractStats> extract_in_child(const Helper& helper,
                                                const ExtractRequest& request);

}  // namespace upgraded::sandbox
