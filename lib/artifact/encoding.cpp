#include "upgraded/artifact/encoding.h"

#include <openssl/evp.h>

namespace upgraded::artifact {

std::string to_hex(std::span<const std::byte> data) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(data.size() * 2);
  for (std::byte b : data) {
    auto v = std::to_integer<unsigned>(b);
    out += kDigits[v >> 4];
    out += kDigits[v & 15];
  }
  return out;
}

Result<std::vector<std::byte>> from_hex(std::string_view hex) {
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  if (hex.size() % 2 != 0) return Error(ErrorCode::kInvalidArgument, "odd-length hex string");
  std::vector<std::byte> out(hex.size() / 2);
  for (std::size_t i = 0; i < out.size(); ++i) {
    int hi = nibble(hex[2 * i]);
    int lo = nibble(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return Error(ErrorCode::kInvalidArgument, "not a lowercase hex string");
    out[i] = static_cast<std::byte>((hi << 4) | lo);
  }
  return out;
}

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
