#include "upgraded/artifact/signatures.h"

#include <set>

#include "upgraded/artifact/encoding.h"
#include "upgraded/artifact/strict_json.h"

namespace upgraded::artifact {
namespace {

Error bad(const std::string& why) {
  return Error(ErrorCode::kVerificationFailed, "manifest.sig: " + why);
}

}  // namespace

Result<std::vector<Signature>> parse_signatures(std::string_view text) {
  if (text.size() > kMaxSignatureFileSize) return bad("larger than 64 KiB");
  auto doc = parse_strict_json(text, "manifest.sig", 4);
  if (!doc) return doc.error();
  UPGRADED_TRY(json_only_keys(*doc, {"format", "signatures"}, "manifest.sig"));
  auto format = json_uint(*doc, "format", "manifest.sig", 1000);
  if (!format) return format.error();
  if (*format != 1) return bad("unsupported format " + std::to_string(*format));
  auto it = doc->find("signatures");
  if (it == doc->end() || !it->is_array()) return bad("'signatures' must be an array");
  if (it->empty()) return bad("no signatures");
  if (it->size() > kMaxSignatures) return bad("more than 16 signatures");
  std::vector<Signature> out;
  std::set<std::string> ids;
  for (const auto& entry : *it) {
    UPGRADED_TRY(json_only_keys(entry, {"key_id", "algorithm", "signature"}, "manifest.sig entry"));
    auto id = json_string(entry, "key_id", "manifest.sig entry");
    if (!id) return id.error();
    if (id->size() != 64 || !from_hex(*id)) return bad("key_id must be 64 lowercase hex digits");
    if (!ids.insert(*id).second) return bad("key " + *id + " signs twice");
    auto alg = json_string(entry, "algorithm", "manifest.sig entry");
    if (!alg) return alg.error();
    if (*alg != kAlgEd25519 && *alg != kAlgEcdsaSha256 && *alg != kAlgRsaPssSha256)
      return bad("unknown algorithm '" + *alg + "'");
    auto sig64 = json_string(entry, "signature", "manifest.sig entry");
    if (!sig64) return sig64.error();
    auto value = base64_decode(*sig64);
    if (!value || value->empty() || value->size() > 1024) return bad("malformed signature value");
    out.push_back(Signature{std::move(*id), std::move(*alg), std::move(*value)});
  }
  return out;
}

std::string serialize_signatures(const std::vector<Signature>& sigs) {
  nlohmann::ordered_json doc;
  doc["format"] = 1;
  doc["signatures"] = nlohmann::ordered_json::array();
  for (const auto& s : sigs) {
    nlohmann::ordered_json e;
    e["key_id"] = s.key_id;
    e["algorithm"] = s.algorithm;
    e["signature"] = base64_encode(s.value);
    doc["signatures"].push_back(std::move(e));
  }
  return doc.dump(2) + "\n";
}

Result<SignatureReport> verify_signatures(std::string_view manifest_bytes,
                                          std::string_view sig_text, const Keyring& keyring,
                                          const TrustPolicy& policy) {
  auto sigs = parse_signatures(sig_text);
  if (!sigs) return sigs.error();
  SignatureReport report;
  for (const auto& s : *sigs) {
    if (keyring.is_revoked(s.key_id)) {
      report.revoked.push_back(s.key_id);
      continue;
    }
    const PublicKey* key = keyring.find(s.key_id);
    if (!key) {
      report.unknown.push_back(s.key_id);
      continue;
    }
    if (key->algorithm != s.algorithm)
      return bad("key " + s.key_id + " is " + key->algorithm + " but the signature claims " +
                 s.algorithm);
    if (!key->verify(as_bytes(manifest_bytes), s.value))
      return bad("signature by trusted key " + s.key_id + " (" + key->source +
                 ") does not match manifest.json");
    report.trusted.push_back(s.key_id);
  }
  unsigned need = policy.threshold == 0 ? 1 : policy.threshold;
  if (report.trusted.size() < need) {
    std::string why = "needs " + std::to_string(need) +
                      " valid signature(s) by trusted keys, found " +
                      std::to_string(report.trusted.size());
    if (!report.revoked.empty())
      why += " (" + std::to_string(report.revoked.size()) + " by revoked keys)";
    if (!report.unknown.empty())
      why += " (" + std::to_string(report.unknown.size()) + " by unknown keys)";
    return bad(why);
  }
  return report;
}

}  // namespace upgraded::artifact
