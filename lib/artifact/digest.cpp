#include "upgraded/artifact/digest.h"

#include <openssl/evp.h>

#include <stdexcept>

namespace upgraded::artifact {

struct Sha256::Impl {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx{EVP_MD_CTX_new(), &EVP_MD_CTX_free};
  EVP_MD* md = nullptr;
  ~Impl() { EVP_MD_free(md); }
};

Sha256::Sha256() : m_impl(std::make_unique<Impl>()) {
  // Fetch the implementation once; the per-call lookup of EVP_sha256() costs measurable time
  // for small chunks.
  m_impl->md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  // Failing to get SHA-256 from the default provider is a broken installation, not an input
  // error; there is nothing sensible to return to a caller.
  if (!m_impl->ctx || !m_impl->md ||
      EVP_DigestInit_ex2(m_impl->ctx.get(), m_impl->md, nullptr) != 1)
    throw std::runtime_error("OpenSSL SHA-256 is unavailable");
}

Sha256::~Sha256() = default;
Sha256::Sha256(Sha256&&) noexcept = default;
Sha256& Sha256::operator=(Sha256&&) noexcept = default;

void Sha256::update(std::span<const std::byte> data) {
  EVP_DigestUpdate(m_impl->ctx.get(), data.data(), data.size());
}

Sha256Digest Sha256::finish() {
  Sha256Digest out{};
  unsigned len = 0;
  EVP_DigestFinal_ex(m_impl->ctx.get(), reinterpret_cast<unsigned char*>(out.data()), &len);
  EVP_DigestInit_ex2(m_impl->ctx.get(), m_impl->md, nullptr);
  return out;
}

Sha256Digest Sha256::of(std::span<const std::byte> data) {
  Sha256 h;
  h.update(data);
  return h.finish();
}

}  // namespace upgraded::artifact
