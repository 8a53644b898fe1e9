// base64 through OpenSSL, apart from encoding.cpp so that programs that need only hex (the
// daemon) do not link libcrypto.

#include <openssl/evp.h>

#include "upgraded/artifact/encoding.h"

namespace upgraded::artifact {

std::string base64_encode(std::span<const std::byte> data) {
  std::string out(4 * ((data.size() + 2) / 3), '\0');
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(data.data()),
                          static_cast<int>(data.size()));
  out.resize(static_cast<std::size_t>(n));
  return out;
}

Result<std::vector<std::byte>> base64_decode(std::string_view text) {
  auto bad = [] { return Error(ErrorCode::kInvalidArgument, "not canonical base64"); };
  if (text.size() % 4 != 0) return bad();
  std::size_t pad = 0;
  for (std::size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    bool alpha = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                 c == '+' || c == '/';
    if (c == '=') {
      if (i + 2 < text.size()) return bad();
      ++pad;
    } else if (!alpha || pad > 0) {
      return bad();
    }
  }
  std::vector<std::byte> out(text.size() / 4 * 3);
  int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(text.data()),
                          static_cast<int>(text.size()));
  if (n < 0) return bad();
  out.resize(static_cast<std::size_t>(n) - pad);
  // Reject non-canonical encodings (unused bits set) by re-encoding.
  if (base64_encode(out) != text) return bad();
  return out;
}

}  // namespace upgraded::artifact
