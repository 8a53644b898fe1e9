// Fuzz target `signatures`: manifest.sig parsing and the k-of-n trust policy
// (lib/artifact/signatures.cpp) against a fixed keyring of real keys (tests/fuzz/keys: Ed25519,
// ECDSA and RSA trusted, one Ed25519 key trusted but revoked). The input is manifest.json's
// bytes, a NUL byte, then manifest.sig's text (no NUL: all of it is manifest.sig, over an empty
// manifest). The seed corpus holds validly signed manifests, so mutations start past the key
// lookup and the signature checks.
//
// Invariants, for every threshold from 0 to 4: the report does not depend on the threshold;
// success needs that many distinct trusted, non-revoked signers (at least one); every signature
// is accounted for exactly once; a higher threshold never succeeds where a lower one failed.

#include <fcntl.h>

#include <algorithm>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "fuzz_support.h"
#include "upgraded/artifact/manifest.h"
#include "upgraded/artifact/signatures.h"
#include "upgraded/fs/durable.h"

using namespace upgraded;
using namespace upgraded::artifact;

namespace {

PublicKey load_key(const std::string& name) {
  std::string path = std::string(UPGRADED_FUZZ_KEYS_DIR) + "/" + name + ".pub.pem";
  auto text = fs::read_file(AT_FDCWD, path, 1 << 16);
  FUZZ_CHECK_MSG(text.ok(), (text ? std::string() : text.error().message()));
  auto keys = parse_public_keys_pem(*text, path);
  FUZZ_CHECK_MSG(keys.ok(), (keys ? std::string() : keys.error().message()));
  FUZZ_CHECK(keys->size() == 1);
  return keys->front();
}

struct Fixture {
  Keyring keyring;
  std::set<std::string> trusted_ids;  // usable: trusted and not revoked
  std::set<std::string> revoked_ids;
};

const Fixture& fixture() {
  static const Fixture f = [] {
    std::vector<PublicKey> keys = {load_key("ed25519"), load_key("ecdsa"), load_key("rsa"),
                                   load_key("revoked")};
    Fixture out{Keyring::from_keys({}), {}, {}};
    for (std::size_t i = 0; i + 1 < keys.size(); ++i)
      out.trusted_ids.insert(keys[i].id);
    out.revoked_ids.insert(keys.back().id);
    out.keyring = Keyring::from_keys(keys, out.revoked_ids);
    return out;
  }();
  return f;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const Fixture& f = fixture();
  auto input = fuzz::as_text(data, size);
  std::string_view manifest, sig = input;
  if (auto nul = input.find('\0'); nul != std::string_view::npos) {
    manifest = input.substr(0, nul);
    sig = input.substr(nul + 1);
  }

  auto parsed = parse_signatures(sig);
  if (!parsed) FUZZ_CHECK(parsed.error().code() == ErrorCode::kVerificationFailed);

  std::optional<SignatureReport> first_report;
  bool failed_below = false;
  for (unsigned threshold = 0; threshold <= 4; ++threshold) {
    auto report = verify_signatures(manifest, sig, f.keyring, TrustPolicy{threshold});
    if (!report) {
      FUZZ_CHECK(report.error().code() == ErrorCode::kVerificationFailed);
      failed_below = true;
      continue;
    }
    FUZZ_CHECK(!failed_below);
    FUZZ_CHECK(parsed.ok());
    FUZZ_CHECK(report->trusted.size() >= std::max(threshold, 1u));
    std::set<std::string> all;
    for (const auto& id : report->trusted) {
      FUZZ_CHECK(f.trusted_ids.count(id) == 1);
      FUZZ_CHECK(all.insert(id).second);
    }
    for (const auto& id : report->revoked) {
      FUZZ_CHECK(f.revoked_ids.count(id) == 1);
      FUZZ_CHECK(all.insert(id).second);
    }
    for (const auto& id : report->unknown) {
      FUZZ_CHECK(f.keyring.find(id) == nullptr && !f.keyring.is_revoked(id));
      FUZZ_CHECK(all.insert(id).second);
    }
    FUZZ_CHECK(all.size() == parsed->size());
    if (!first_report) {
      first_report = *report;
    } else {
      FUZZ_CHECK(first_report->trusted == report->trusted);
      FUZZ_CHECK(first_report->revoked == report->revoked);
      FUZZ_CHECK(first_report->unknown == report->unknown);
    }
  }

  // What the daemon does next with bytes that passed: parse the manifest.
  if (first_report) {
    auto m = parse_manifest(manifest);
    if (!m) FUZZ_CHECK(m.error().code() == ErrorCode::kVerificationFailed);
  }
  return 0;
}
