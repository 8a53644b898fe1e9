#pragma once

// Signing keys and the trusted keyring. Keys are identified by their key id: the lowercase hex
// SHA-256 of the DER-encoded SubjectPublicKeyInfo of the public key.

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "upgraded/result.h"

typedef struct evp_pkey_st EVP_PKEY;

namespace upgraded::artifact {

struct PkeyDeleter {
  void operator()(EVP_PKEY* key) const;
};
using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyDeleter>;

/// Signature algorithm names as written in manifest.sig. Each is tied to one key type, so a
/// signature can never be checked with an algorithm its key was not made for.
inline constexpr const char* kAlgEd25519 = "ed25519";
inline constexpr const char* kAlgEcdsaSha256 = "ecdsa-sha256";
inline constexpr const char* kAlgRsaPssSha256 = "rsa-pss-sha256";

/// A public key trusted for verification.
struct PublicKey {
  std::shared_ptr<EVP_PKEY> key;
  std::string id;         ///< hex SHA-256 of the SubjectPublicKeyInfo DER
  std::string algorithm;  ///< one of the kAlg* names
  std::string source;     ///< file it was loaded from, for messages

  /// Checks `signature` over `data`. False for any mismatch or malformed signature.
  bool verify(std::span<const std::byte> data, std::span<const std::byte> signature) const;
};

/// A private key used by `pack`.
class PrivateKey {
 public:
  static Result<PrivateKey> load(const std::string& pem_path);

  const std::string& id() const { return m_id; }
  const std::string& algorithm() const { return m_algorithm; }
  Result<std::vector<std::byte>> sign(std::span<const std::byte> data) const;

 private:
  std::shared_ptr<EVP_PKEY> m_key;
  std::string m_id;
  std::string m_algorithm;
};

/// Parses every PEM public key (SubjectPublicKeyInfo, "-----BEGIN PUBLIC KEY-----") in a file's
/// text, in order; text between blocks is ignored. At least one is needed; a block of another
/// kind (a private key, a certificate), a malformed block or an unsupported key type is an
/// error, never skipped: a keyring or a revocation list must not silently shrink.
Result<std::vector<PublicKey>> parse_public_keys_pem(std::string_view pem,
                                                     const std::string& source);

/// Generates an Ed25519 key pair: the private key (PKCS#8 PEM, mode 0600) and the public key
/// (SubjectPublicKeyInfo PEM, mode 0644). Neither file may exist yet. Returns the key id.
Result<std::string> generate_ed25519_key(const std::string& private_path,
                                         const std::string& public_path);

/// The set of keys an installation trusts, minus the revoked ones.
class Keyring {
 public:
  /// Loads every key of every `*.pem` in `keys_dir`; keys whose id appears among the `*.pem` files
  /// of `revoked_dir` (if given) are remembered as revoked and never trusted. A missing or empty
  /// keys directory, or a file that is not a usable public key, is an error: a broken trust root
  /// must not silently shrink.
  static Result<Keyring> load(const std::string& keys_dir,
                              const std::optional<std::string>& revoked_dir = std::nullopt);

  /// Builds a keyring from keys in memory (tests, embedders).
  static Keyring from_keys(std::vector<PublicKey> trusted, std::set<std::string> revoked_ids = {});

  /// The trusted, non-revoked key with this id, or null.
  const PublicKey* find(const std::string& id) const;
  bool is_revoked(const std::string& id) const { return m_revoked.count(id) > 0; }
  std::size_t size() const { return m_keys.size(); }

 private:
  std::map<std::string, PublicKey> m_keys;
  std::set<std::string> m_revoked;
};

}  // namespace upgraded::artifact
