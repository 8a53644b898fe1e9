#pragma once

// manifest.sig: the detached signatures over the exact bytes of manifest.json, and the trust
// policy that decides whether they are enough.

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "upgraded/artifact/keys.h"
#include "upgraded/result.h"

namespace upgraded::artifact {

inline constexpr std::size_t kMaxSignatureFileSize = 64 * 1024;
inline constexpr std::size_t kMaxSignatures = 16;

struct Signature {
  std::string key_id;
  std::string algorithm;
  std::vector<std::byte> value;
};

/// Parses manifest.sig strictly (schema in docs/artifact-format.md).
Result<std::vector<Signature>> parse_signatures(std::string_view text);
/// Serializes signatures in the canonical form pack writes.
std::string serialize_signatures(const std::vector<Signature>& sigs);

struct TrustPolicy {
  /// How many distinct trusted keys must have signed (k of n).
  unsigned threshold = 1;
};

struct SignatureReport {
  std::vector<std::string> trusted;  ///< key ids of valid signatures by trusted keys
  std::vector<std::string> unknown;  ///< key ids not in the keyring (not counted)
  std::vector<std::string> revoked;  ///< key ids in the revoked set (not counted)
};

/// Verifies `sig_text` over `manifest_bytes` against `keyring`. Fails (kVerificationFailed) when
/// the file is malformed, names a key twice, carries a signature by a trusted key that does not
/// verify (tampering is never outvoted), or has fewer valid trusted signatures than required.
Result<SignatureReport> verify_signatures(std::string_view manifest_bytes,
                                          std::string_view sig_text, const Keyring& keyring,
                                          const TrustPolicy& policy);

}  // namespace upgraded::artifact
