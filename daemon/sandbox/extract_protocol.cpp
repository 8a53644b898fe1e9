#include "sandbox/extract_protocol.h"

#include <nlohmann/json.hpp>

#include "upgraded/artifact/encoding.h"
#include "upgraded/policy/names.h"

namespace upgraded::sandbox {
namespace {

using nlohmann::json;

constexpr ErrorCode kCodes[] = {ErrorCode::kFailed,
                                ErrorCode::kInvalidArgument,
                                ErrorCode::kNotFound,
                                ErrorCode::kExists,
                                ErrorCode::kVerificationFailed,
                                ErrorCode::kPolicyRefused,
                                ErrorCode::kNoSpace,
                                ErrorCode::kBusy,
                                ErrorCode::kCanceled};

Error malformed(const std::string& what) {
  // nlohmann's messages quote bytes of the answer ("last read: ..."), and this message goes out
  // on the bus (error replies, JobRemoved), where sd-bus takes nothing but UTF-8.
  return Error(ErrorCode::kFailed, "extraction helper: malformed " +
                                       (policy::is_valid_utf8(what) ? what : policy::quote(what)));
}

// An integer field. nlohmann converts a JSON float to an integer type with a plain cast, which
// is undefined behaviour out of range ("code": 1e300): such a message is malformed.
template <typename T>
T integer(const json& doc, const char* key) {
  const json& v = doc.at(key);
  if (!v.is_number_integer())
    throw json::type_error::create(302, std::string("'") + key + "' must be an integer", &v);
  return v.get<T>();
}

}  // namespace

std::string encode_request(const std::string& manifest_bytes, std::uint64_t payload_offset,
                           const artifact::ExtractPolicy& policy) {
  const auto& l = policy.limits;
  json doc = {{"manifest", manifest_bytes},
              {"payload_offset", payload_offset},
              {"limits",
               {{"max_entries", l.max_entries},
                {"max_total_bytes", l.max_total_bytes},
                {"max_file_size", l.max_file_size},
                {"max_path_length", l.max_path_length},
                {"max_depth", l.max_depth},
                {"max_path_bytes", l.max_path_bytes},
                {"max_expansion_ratio", l.max_expansion_ratio},
                {"free_space_reserve", l.free_space_reserve},
                {"free_inode_reserve", l.free_inode_reserve}}},
              {"strip_unsafe_modes", policy.unsafe_modes == artifact::UnsafeModes::kStrip},
              {"read_only", policy.read_only}};
  return doc.dump(-1, ' ', false, json::error_handler_t::replace);
}

Result<Request> decode_request(const std::string& text) {
  try {
    json doc = json::parse(text);
    Request r;
    r.manifest_bytes = doc.at("manifest").get<std::string>();
    r.payload_offset = integer<std::uint64_t>(doc, "payload_offset");
    const json& l = doc.at("limits");
    auto& out = r.policy.limits;
    out.max_entries = integer<std::uint64_t>(l, "max_entries");
    out.max_total_bytes = integer<std::uint64_t>(l, "max_total_bytes");
    out.max_file_size = integer<std::uint64_t>(l, "max_file_size");
    out.max_path_length = integer<std::size_t>(l, "max_path_length");
    out.max_depth = integer<std::size_t>(l, "max_depth");
    out.max_path_bytes = integer<std::uint64_t>(l, "max_path_bytes");
    out.max_expansion_ratio = integer<std::uint64_t>(l, "max_expansion_ratio");
    out.free_space_reserve = integer<std::uint64_t>(l, "free_space_reserve");
    out.free_inode_reserve = integer<std::uint64_t>(l, "free_inode_reserve");
    r.policy.unsafe_modes = doc.at("strip_unsafe_modes").get<bool>()
                                ? artifact::UnsafeModes::kStrip
                                : artifact::UnsafeModes::kRefuse;
    r.policy.read_only = doc.at("read_only").get<bool>();
    return r;
  } catch (const json::exception& e) {
    return malformed(std::string("request: ") + e.what());
  }
}

namespace {

// Hex, not base64: the daemon links no libcrypto, and these are a few kilobytes.
std::string hex(const std::string& bytes) {
  return artifact::to_hex(
      std::span<const std::byte>(reinterpret_cast<const std::byte*>(bytes.data()), bytes.size()));
}

Result<std::string> unhex(const std::string& text) {
  auto raw = artifact::from_hex(text);
  if (!raw) return malformed("bytes: bad hex");
  return std::string(reinterpret_cast<const char*>(raw->data()), raw->size());
}

json error_json(const Error& e) {
  return {{"ok", false}, {"code", static_cast<int>(e.code())}, {"message", e.message()}};
}

Error error_from(const json& doc) {
  int code = integer<int>(doc, "code");
  ErrorCode c = ErrorCode::kFailed;
  for (ErrorCode known : kCodes)
    if (static_cast<int>(known) == code) c = known;
  return Error(c, doc.at("message").get<std::string>());
}

}  // namespace

std::string encode_head(const Result<std::pair<std::string, std::string>>& head) {
  json doc =
      head ? json{{"ok", true}, {"manifest", hex(head->first)}, {"signature", hex(head->second)}}
           : error_json(head.error());
  return doc.dump(-1, ' ', false, json::error_handler_t::replace);
}

Result<std::pair<std::string, std::string>> decode_head(const std::string& text) {
  try {
    json doc = json::parse(text);
    if (!doc.at("ok").get<bool>()) return error_from(doc);
    auto m = unhex(doc.at("manifest").get<std::string>());
    if (!m) return m.error();
    auto s = unhex(doc.at("signature").get<std::string>());
    if (!s) return s.error();
    return std::make_pair(std::move(*m), std::move(*s));
  } catch (const json::exception& e) {
    return malformed(std::string("head: ") + e.what());
  }
}

std::string encode_verify_request(const VerifyRequest& r) {
  json keys = json::array(), revoked = json::array();
  for (const auto& k : r.keys)
    keys.push_back({k.source, k.pem});
  for (const auto& k : r.revoked)
    revoked.push_back({k.source, k.pem});
  json doc = {{"manifest", hex(r.manifest_bytes)},
              {"signature", hex(r.signature_bytes)},
              {"threshold", r.threshold},
              {"keys", keys},
              {"revoked", revoked}};
  return doc.dump(-1, ' ', false, json::error_handler_t::replace);
}

Result<VerifyRequest> decode_verify_request(const std::string& text) {
  try {
    json doc = json::parse(text);
    VerifyRequest r;
    auto m = unhex(doc.at("manifest").get<std::string>());
    if (!m) return m.error();
    auto s = unhex(doc.at("signature").get<std::string>());
    if (!s) return s.error();
    r.manifest_bytes = std::move(*m);
    r.signature_bytes = std::move(*s);
    r.threshold = integer<unsigned>(doc, "threshold");
    for (const auto& k : doc.at("keys"))
      r.keys.push_back({k.at(0).get<std::string>(), k.at(1).get<std::string>()});
    for (const auto& k : doc.at("revoked"))
      r.revoked.push_back({k.at(0).get<std::string>(), k.at(1).get<std::string>()});
    return r;
  } catch (const json::exception& e) {
    return malformed(std::string("verify request: ") + e.what());
  }
}

std::string encode_verify_response(const Result<artifact::SignatureReport>& report) {
  json doc = report ? json{{"ok", true},
                           {"trusted", report->trusted},
                           {"unknown", report->unknown},
                           {"revoked", report->revoked}}
                    : error_json(report.error());
  return doc.dump(-1, ' ', false, json::error_handler_t::replace);
}

Result<artifact::SignatureReport> decode_verify_response(const std::string& text) {
  try {
    json doc = json::parse(text);
    if (!doc.at("ok").get<bool>()) return error_from(doc);
    artifact::SignatureReport r;
    r.trusted = doc.at("trusted").get<std::vector<std::string>>();
    r.unknown = doc.at("unknown").get<std::vector<std::string>>();
    r.revoked = doc.at("revoked").get<std::vector<std::string>>();
    return r;
  } catch (const json::exception& e) {
    return malformed(std::string("verify response: ") + e.what());
  }
}

std::string encode_response(const Result<artifact::ExtractStats>& result) {
  json doc;
  if (result) {
    const auto& s = *result;
    doc = {{"ok", true},
           {"stats",
            {{"entries", s.entries},
             {"files", s.files},
             {"directories", s.directories},
             {"symlinks", s.symlinks},
             {"hardlinks", s.hardlinks},
             {"bytes", s.bytes}}}};
  } else {
    doc = error_json(result.error());
  }
  return doc.dump(-1, ' ', false, json::error_handler_t::replace);
}

Result<artifact::ExtractStats> decode_response(const std::string& text) {
  try {
    json doc = json::parse(text);
    if (!doc.at("ok").get<bool>()) return error_from(doc);
    const json& s = doc.at("stats");
    artifact::ExtractStats out;
    out.entries = integer<std::uint64_t>(s, "entries");
    out.files = integer<std::uint64_t>(s, "files");
    out.directories = integer<std::uint64_t>(s, "directories");
    out.symlinks = integer<std::uint64_t>(s, "symlinks");
    out.hardlinks = integer<std::uint64_t>(s, "hardlinks");
    out.bytes = integer<std::uint64_t>(s, "bytes");
    return out;
  } catch (const json::exception& e) {
    return malformed(std::string("response: ") + e.what());
  }
}

}  // namespace upgraded::sandbox
