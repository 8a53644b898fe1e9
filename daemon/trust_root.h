#pragma once

// The trust root as files: the PEM texts of keys.d/*.pem and revoked.d/*.pem. The daemon only
// reads them; parsing and checking happen in its sandboxed helper.

#include <vector>

#include "config.h"
#include "sandbox/extract_protocol.h"
#include "upgraded/result.h"

namespace upgraded::daemon {

struct TrustRoot {
  std::vector<sandbox::PemFile> keys;
  std::vector<sandbox::PemFile> revoked;
};

/// keys.d must exist and hold at least one *.pem (a broken trust root must not silently
/// shrink); revoked.d is optional. Files are read in name order, at most 64 KiB each.
Result<TrustRoot> read_trust_root(const Config& config);

}  // namespace upgraded::daemon
