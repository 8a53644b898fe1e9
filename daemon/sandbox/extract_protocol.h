#pragma once

// The conversation between the daemon and its extraction helper (upgraded-extract), both
// sides. `upgraded-extract --read-head` gets only fd 1 and fd 3 and answers with the artifact's
// manifest and signature bytes. `upgraded-extract` (extraction) gets file descriptors, never
// paths:
//   fd 0  the request (JSON, then EOF): the verified manifest's bytes and the extraction policy
//   fd 1  the response (one JSON object): the statistics, or the error's code and message
//   fd 2  /dev/null
//   fd 3  the artifact, read-only
//   fd 4  the empty destination directory
// The extraction parses nothing unverified: it reads the payload member's data at the offset the
// daemon computed from the canonical layout, and hands every chunk to the verifier (hashes from
// the verified manifest) before libarchive sees it; so it needs no keys.

#include <string>

#include <vector>

#include "upgraded/artifact/extractor.h"
#include "upgraded/artifact/signatures.h"
#include "upgraded/result.h"

namespace upgraded::sandbox {

constexpr int kRequestFd = 0;
constexpr int kResponseFd = 1;
constexpr int kArtifactFd = 3;
constexpr int kDestinationFd = 4;
constexpr std::size_t kMaxMessage = 8 << 20;

std::string encode_request(const std::string& manifest_bytes, std::uint64_t payload_offset,
                           const artifact::ExtractPolicy& policy);
struct Request {
  std::string manifest_bytes;
  std::uint64_t payload_offset = 0;
  artifact::ExtractPolicy policy;
};
Result<Request> decode_request(const std::string& text);

/// --read-head's answer: the raw bytes of manifest.json and manifest.sig (hex).
std::string encode_head(const Result<std::pair<std::string, std::string>>& head);
Result<std::pair<std::string, std::string>> decode_head(const std::string& text);

/// --verify: the manifest and signature bytes (from --read-head) and the trust root, as PEM
/// texts read by the daemon; the answer is the signature report. The helper runs with nothing
/// to write to and never sees the container.
struct PemFile {
  std::string source;  ///< file name, for messages
  std::string pem;
};
struct VerifyRequest {
  std::string manifest_bytes;
  std::string signature_bytes;
  unsigned threshold = 1;
  std::vector<PemFile> keys;
  std::vector<PemFile> revoked;
};
std::string encode_verify_request(const VerifyRequest& request);
Result<VerifyRequest> decode_verify_request(const std::string& text);
std::string encode_verify_response(const Result<artifact::SignatureReport>& report);
Result<artifact::SignatureReport> decode_verify_response(const std::string& text);

std::string encode_response(const Result<artifact::ExtractStats>& result);
Result<artifact::ExtractStats> decode_response(const std::string& text);

}  // namespace upgraded::sandbox
