#pragma once

// The daemon's side of the extraction helper: spawns upgraded-extract with posix_spawn, hands it
// the artifact and the destination as file descriptors, and waits for its answer or a cancel.

#include <chrono>
#include <string>

#include "upgraded/artifact/extractor.h"
#include "upgraded/result.h"

namespace upgraded::sandbox {

/// upgraded-extract next to the running executable (a build tree), else in the libexec
/// directory the project was configured with.
std::string default_helper_path();

struct ExtractRequest {
  std::string helper;          ///< path of upgraded-extract
  int artifact_fd = -1;        ///< a regular file, read with pread
  std::string manifest_bytes;  ///< the manifest the caller verified
  artifact::ExtractPolicy policy;
  int dest_dirfd = -1;  ///< empty directory
  int cancel_fd = -1;   ///< optional: readable means cancel (an eventfd)
};

/// The first two members of an artifact, read by a fresh helper process (`--read-head`) in a
/// sandbox that may write nothing: the daemon itself never parses an artifact's container. The
/// bytes are untrusted until artifact::verify_manifest has checked them. At most `timeout`.
struct ArtifactHead {
  std::string manifest_bytes;
  std::string signature_bytes;
};
Result<ArtifactHead> read_head_in_child(const std::string& helper, int artifact_fd,
                                        std::chrono::milliseconds timeout);

/// Runs one extraction in a fresh helper process. The helper confines itself before it reads
/// its request (sandbox.h). A cancel kills it (kCanceled); a helper that dies or answers
/// nonsense is kFailed. On error the destination holds a partial tree: the caller removes it.
Result<artifact::ExtractStats> extract_in_child(const ExtractRequest& request);

}  // namespace upgraded::sandbox
