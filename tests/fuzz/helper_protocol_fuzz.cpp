// Fuzz target `helper_protocol`: the messages between the daemon and its extraction helper
// (daemon/sandbox/extract_protocol.cpp). Mainly the daemon's side: the root daemon decodes the
// answers of a helper that a malicious artifact may have subverted (decode_head,
// decode_verify_response, decode_response). The helper's side (decode_request,
// decode_verify_request) gets the same input. Seeds are real encode_* outputs.
//
// Invariants: decoding never throws and reports failure as an error value whose code is one of
// the known ErrorCode values and whose message is valid UTF-8 (the daemon sends it on the bus,
// in JobRemoved and error replies, where sd-bus refuses anything else); whatever decodes
// re-encodes and decodes to the same value.

#include <string>

#include "fuzz_support.h"
#include "sandbox/extract_protocol.h"
#include "upgraded/policy/names.h"

using namespace upgraded;
using namespace upgraded::sandbox;

namespace {

bool known(ErrorCode code) {
  switch (code) {
    case ErrorCode::kFailed:
    case ErrorCode::kInvalidArgument:
    case ErrorCode::kNotFound:
    case ErrorCode::kExists:
    case ErrorCode::kVerificationFailed:
    case ErrorCode::kPolicyRefused:
    case ErrorCode::kNoSpace:
    case ErrorCode::kBusy:
    case ErrorCode::kCanceled:
      return true;
  }
  return false;
}

// `daemon_side`: the message reaches the bus. (The helper's own errors go out through
// encode_*, which replaces invalid UTF-8.)
template <typename T>
void check_error(const Result<T>& r, bool daemon_side) {
  if (r) return;
  FUZZ_CHECK(known(r.error().code()));
  if (daemon_side)
    FUZZ_CHECK_MSG(policy::is_valid_utf8(r.error().message()), policy::quote(r.error().message()));
}

// An error answer survives the round trip with its code and message.
template <typename T, typename Encode, typename Decode>
void check_error_round_trip(const Result<T>& r, Encode encode, Decode decode) {
  if (r) return;
  auto again = decode(encode(r));
  FUZZ_CHECK(!again.ok());
  FUZZ_CHECK(again.error().code() == r.error().code());
  if (policy::is_valid_utf8(r.error().message()))
    FUZZ_CHECK(again.error().message() == r.error().message());
}

bool same(const artifact::ExtractStats& a, const artifact::ExtractStats& b) {
  return a.entries == b.entries && a.files == b.files && a.directories == b.directories &&
         a.symlinks == b.symlinks && a.hardlinks == b.hardlinks && a.bytes == b.bytes;
}

bool same(const artifact::ExtractPolicy& a, const artifact::ExtractPolicy& b) {
  const auto &x = a.limits, &y = b.limits;
  return x.max_entries == y.max_entries && x.max_total_bytes == y.max_total_bytes &&
         x.max_file_size == y.max_file_size && x.max_path_length == y.max_path_length &&
         x.max_depth == y.max_depth && x.max_path_bytes == y.max_path_bytes &&
         x.max_expansion_ratio == y.max_expansion_ratio &&
         x.free_space_reserve == y.free_space_reserve &&
         x.free_inode_reserve == y.free_inode_reserve && a.unsafe_modes == b.unsafe_modes &&
         a.read_only == b.read_only;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(fuzz::as_text(data, size));

  // The daemon's side.
  auto head = decode_head(text);
  check_error(head, true);
  check_error_round_trip(head, encode_head, decode_head);
  if (head) {
    auto again = decode_head(encode_head(head));
    FUZZ_CHECK(again.ok() && again->first == head->first && again->second == head->second);
  }

  auto report = decode_verify_response(text);
  check_error(report, true);
  check_error_round_trip(report, encode_verify_response, decode_verify_response);
  if (report) {
    auto again = decode_verify_response(encode_verify_response(report));
    FUZZ_CHECK(again.ok() && again->trusted == report->trusted &&
               again->unknown == report->unknown && again->revoked == report->revoked);
  }

  auto stats = decode_response(text);
  check_error(stats, true);
  check_error_round_trip(stats, encode_response, decode_response);
  if (stats) {
    auto again = decode_response(encode_response(stats));
    FUZZ_CHECK(again.ok() && same(*again, *stats));
  }

  // The helper's side.
  auto request = decode_request(text);
  check_error(request, false);
  if (request) {
    auto again = decode_request(
        encode_request(request->manifest_bytes, request->payload_offset, request->policy));
    FUZZ_CHECK(again.ok() && again->manifest_bytes == request->manifest_bytes &&
               again->payload_offset == request->payload_offset &&
               same(again->policy, request->policy));
  }

  auto verify = decode_verify_request(text);
  check_error(verify, false);
  if (verify) {
    auto again = decode_verify_request(encode_verify_request(*verify));
    FUZZ_CHECK(again.ok() && again->manifest_bytes == verify->manifest_bytes &&
               again->signature_bytes == verify->signature_bytes &&
               again->threshold == verify->threshold && again->keys.size() == verify->keys.size() &&
               again->revoked.size() == verify->revoked.size());
    for (std::size_t i = 0; i < verify->keys.size(); ++i)
      FUZZ_CHECK(again->keys[i].source == verify->keys[i].source &&
                 again->keys[i].pem == verify->keys[i].pem);
    for (std::size_t i = 0; i < verify->revoked.size(); ++i)
      FUZZ_CHECK(again->revoked[i].source == verify->revoked[i].source &&
                 again->revoked[i].pem == verify->revoked[i].pem);
  }
  return 0;
}
