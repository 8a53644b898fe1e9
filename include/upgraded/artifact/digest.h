#pragma once

#include <array>
#include <cstddef>
#include <memory>
#include <span>
#include <string>

namespace upgraded::artifact {

using Sha256Digest = std::array<std::byte, 32>;

/// Incremental SHA-256 through OpenSSL EVP (SHA-NI accelerated where the CPU has it).
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(Sha256&&) noexcept;
  Sha256& operator=(Sha256&&) noexcept;

  void update(std::span<const std::byte> data);
  /// Returns the digest and resets the context for a new message.
  Sha256Digest finish();

  static Sha256Digest of(std::span<const std::byte> data);

 private:
  struct Impl;
  std::unique_ptr<Impl> m_impl;
};

}  // namespace upgraded::artifact
