#include "upgraded/artifact/keys.h"

#include <fcntl.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>

#include "upgraded/artifact/digest.h"
#include "upgraded/artifact/encoding.h"
#include "upgraded/fs/durable.h"
#include "upgraded/fs/unique_fd.h"
#include "upgraded/policy/names.h"

namespace upgraded::artifact {
namespace {

constexpr std::size_t kMaxKeyFileSize = 64 * 1024;

struct BioDeleter {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct MdCtxDeleter {
  void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
};

std::string openssl_reason() {
  unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return "unknown OpenSSL error";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof buf);
  return buf;
}

std::string algorithm_of(EVP_PKEY* key) {
  if (EVP_PKEY_is_a(key, "ED25519")) return kAlgEd25519;
  if (EVP_PKEY_is_a(key, "EC")) return kAlgEcdsaSha256;
  if (EVP_PKEY_is_a(key, "RSA") || EVP_PKEY_is_a(key, "RSA-PSS")) return kAlgRsaPssSha256;
  return {};
}

Result<std::string> key_id_of(EVP_PKEY* key) {
  unsigned char* der = nullptr;
  int len = i2d_PUBKEY(key, &der);
  if (len <= 0) return Error(ErrorCode::kFailed, "encoding public key: " + openssl_reason());
  auto digest = Sha256::of(std::as_bytes(std::span(der, static_cast<std::size_t>(len))));
  OPENSSL_free(der);
  return to_hex(digest);
}

// Configures a digest-sign/verify context for the key's algorithm. Ed25519 signs the message
// itself (no digest); ECDSA and RSA-PSS hash with SHA-256 (PSS: salt length = digest length).
bool init_ctx(EVP_MD_CTX* ctx, EVP_PKEY* key, const std::string& algorithm, bool sign) {
  const char* md = algorithm == kAlgEd25519 ? nullptr : "SHA256";
  EVP_PKEY_CTX* pctx = nullptr;
  int ok = sign ? EVP_DigestSignInit_ex(ctx, &pctx, md, nullptr, nullptr, key, nullptr)
                : EVP_DigestVerifyInit_ex(ctx, &pctx, md, nullptr, nullptr, key, nullptr);
  if (ok != 1) return false;
  if (algorithm == kAlgRsaPssSha256) {
    if (EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) != 1) return false;
    if (EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_DIGEST) != 1) return false;
  }
  return true;
}

}  // namespace

void PkeyDeleter::operator()(EVP_PKEY* key) const {
  EVP_PKEY_free(key);
}

bool PublicKey::verify(std::span<const std::byte> data,
                       std::span<const std::byte> signature) const {
  std::unique_ptr<EVP_MD_CTX, MdCtxDeleter> ctx(EVP_MD_CTX_new());
  if (!ctx || !init_ctx(ctx.get(), key.get(), algorithm, false)) {
    ERR_clear_error();
    return false;
  }
  int ok = EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(signature.data()),
                            signature.size(), reinterpret_cast<const unsigned char*>(data.data()),
                            data.size());
  ERR_clear_error();
  return ok == 1;
}

namespace {

Result<PublicKey> public_key_from(EVP_PKEY* raw, const std::string& source) {
  PublicKey key;
  key.key.reset(raw, EVP_PKEY_free);
  key.algorithm = algorithm_of(raw);
  if (key.algorithm.empty())
    return Error(ErrorCode::kInvalidArgument,
                 "'" + source + "': unsupported key type (use Ed25519, EC or RSA)");
  auto id = key_id_of(raw);
  if (!id) return id.error();
  key.id = std::move(*id);
  key.source = source;
  return key;
}

struct PemBlock {
  char* name = nullptr;
  char* header = nullptr;
  unsigned char* data = nullptr;
  long length = 0;
  ~PemBlock() {
    OPENSSL_free(name);
    OPENSSL_free(header);
    OPENSSL_free(data);
  }
};

}  // namespace

Result<std::vector<PublicKey>> parse_public_keys_pem(std::string_view pem,
                                                     const std::string& source) {
  if (pem.size() > kMaxKeyFileSize)
    return Error(ErrorCode::kInvalidArgument, "'" + source + "' is larger than 64 KiB");
  std::unique_ptr<BIO, BioDeleter> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!bio) return Error(ErrorCode::kFailed, "allocating BIO");
  std::vector<PublicKey> keys;
  ERR_clear_error();
  for (;;) {
    PemBlock block;
    if (PEM_read_bio(bio.get(), &block.name, &block.header, &block.data, &block.length) != 1) {
      unsigned long e = ERR_peek_last_error();
      if (ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE) {
        ERR_clear_error();
        break;  // no further block: the text after the last one is commentary
      }
      return Error(ErrorCode::kInvalidArgument, "'" + source + "': PEM block " +
                                                    std::to_string(keys.size() + 1) +
                                                    " is malformed: " + openssl_reason());
    }
    std::string where = "'" + source + "', PEM block " + std::to_string(keys.size() + 1);
    if (std::string_view(block.name) != "PUBLIC KEY")
      return Error(ErrorCode::kInvalidArgument,
                   where + " is a " + policy::quote(block.name) + ", not a PUBLIC KEY");
    if (block.header && block.header[0] != '\0')
      return Error(ErrorCode::kInvalidArgument, where + " has PEM headers (encrypted?)");
    const unsigned char* p = block.data;
    EVP_PKEY* raw = d2i_PUBKEY(nullptr, &p, block.length);
    if (!raw || p != block.data + block.length) {
      if (raw) EVP_PKEY_free(raw);
      return Error(ErrorCode::kInvalidArgument,
                   where + " is not a SubjectPublicKeyInfo: " + openssl_reason());
    }
    auto key = public_key_from(raw, source);
    if (!key) return key.error();
    keys.push_back(std::move(*key));
  }
  if (keys.empty())
    return Error(ErrorCode::kInvalidArgument, "'" + source + "' holds no PEM public key");
  // OpenSSL skips any line that is not exactly a BEGIN line: an indented, quoted or otherwise
  // mangled block would silently drop out of a revocation list. Every BEGIN must have been a
  // block that was read.
  std::size_t begins = 0;
  for (std::size_t at = pem.find("BEGIN"); at != std::string_view::npos;
       at = pem.find("BEGIN", at + 5))
    ++begins;
  if (begins != keys.size())
    return Error(ErrorCode::kInvalidArgument,
                 "'" + source + "' has " + std::to_string(begins) + " BEGIN lines but " +
                     std::to_string(keys.size()) +
                     " well-formed PEM public key blocks (a block is malformed)");
  return keys;
}

Result<PrivateKey> PrivateKey::load(const std::string& pem_path) {
  auto text = fs::read_file(AT_FDCWD, pem_path, kMaxKeyFileSize);
  if (!text) return text.error().with_context("reading private key");
  std::unique_ptr<BIO, BioDeleter> bio(
      BIO_new_mem_buf(text->data(), static_cast<int>(text->size())));
  EVP_PKEY* raw = PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr);
  OPENSSL_cleanse(text->data(), text->size());
  if (!raw)
    return Error(ErrorCode::kInvalidArgument,
                 "'" + pem_path + "' is not a PEM private key: " + openssl_reason());
  PrivateKey key;
  key.m_key.reset(raw, EVP_PKEY_free);
  key.m_algorithm = algorithm_of(raw);
  if (key.m_algorithm.empty())
    return Error(ErrorCode::kInvalidArgument,
                 "'" + pem_path + "': unsupported key type (use Ed25519, EC or RSA)");
  auto id = key_id_of(raw);
  if (!id) return id.error();
  key.m_id = std::move(*id);
  return key;
}

Result<std::vector<std::byte>> PrivateKey::sign(std::span<const std::byte> data) const {
  std::unique_ptr<EVP_MD_CTX, MdCtxDeleter> ctx(EVP_MD_CTX_new());
  if (!ctx || !init_ctx(ctx.get(), m_key.get(), m_algorithm, true))
    return Error(ErrorCode::kFailed, "initialising signature: " + openssl_reason());
  std::size_t len = 0;
  auto* in = reinterpret_cast<const unsigned char*>(data.data());
  if (EVP_DigestSign(ctx.get(), nullptr, &len, in, data.size()) != 1)
    return Error(ErrorCode::kFailed, "signing: " + openssl_reason());
  std::vector<std::byte> sig(len);
  if (EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(sig.data()), &len, in,
                     data.size()) != 1)
    return Error(ErrorCode::kFailed, "signing: " + openssl_reason());
  sig.resize(len);
  return sig;
}

Result<std::string> generate_ed25519_key(const std::string& private_path,
                                         const std::string& public_path) {
  EVP_PKEY* raw = EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519");
  if (!raw) return Error(ErrorCode::kFailed, "generating Ed25519 key: " + openssl_reason());
  PkeyPtr key(raw);

  auto pem_of = [&](bool priv) -> Result<std::string> {
    std::unique_ptr<BIO, BioDeleter> bio(BIO_new(BIO_s_mem()));
    int ok = priv ? PEM_write_bio_PrivateKey(bio.get(), raw, nullptr, nullptr, 0, nullptr, nullptr)
                  : PEM_write_bio_PUBKEY(bio.get(), raw);
    if (ok != 1) return Error(ErrorCode::kFailed, "encoding key: " + openssl_reason());
    char* data = nullptr;
    long len = BIO_get_mem_data(bio.get(), &data);
    return std::string(data, static_cast<std::size_t>(len));
  };
  auto priv = pem_of(true);
  if (!priv) return priv.error();
  auto pub = pem_of(false);
  if (!pub) return pub.error();

  // The private key is created 0600 from the first byte: it never exists with a wider mode.
  auto r = fs::write_file_atomic(AT_FDCWD, private_path, *priv, 0600, /*replace=*/false);
  OPENSSL_cleanse(priv->data(), priv->size());
  if (!r) return r.error().with_context("writing private key");
  if (auto w = fs::write_file_atomic(AT_FDCWD, public_path, *pub, 0644, /*replace=*/false); !w) {
    ::unlink(private_path.c_str());
    return w.error().with_context("writing public key");
  }
  return key_id_of(raw);
}

namespace {

Result<std::vector<PublicKey>> load_dir(const std::string& dir, bool must_exist) {
  std::vector<PublicKey> keys;
  auto all = fs::list_names(AT_FDCWD, dir);
  if (!all) {
    if (!must_exist && all.error().code() == ErrorCode::kNotFound) return keys;
    return all.error().with_context("reading key directory");
  }
  std::vector<std::string> names;
  for (const auto& name : *all)
    if (name.size() > 4 && name.ends_with(".pem") && name.front() != '.') names.push_back(name);
  for (const auto& name : names) {
    std::string path = dir + "/" + name;
    auto text = fs::read_file(AT_FDCWD, path, kMaxKeyFileSize);
    if (!text) return text.error();
    // Every key of the file: `cat a.pem b.pem > revoked.d/old.pem` revokes both.
    auto file_keys = parse_public_keys_pem(*text, path);
    if (!file_keys) return file_keys.error();
    for (auto& k : *file_keys)
      keys.push_back(std::move(k));
  }
  return keys;
}

}  // namespace

Result<Keyring> Keyring::load(const std::string& keys_dir,
                              const std::optional<std::string>& revoked_dir) {
  auto trusted = load_dir(keys_dir, true);
  if (!trusted) return trusted.error();
  if (trusted->empty())
    return Error(ErrorCode::kNotFound, "no trusted keys (*.pem) in '" + keys_dir + "'");
  std::set<std::string> revoked;
  if (revoked_dir) {
    auto keys = load_dir(*revoked_dir, false);
    if (!keys) return keys.error();
    for (auto& k : *keys)
      revoked.insert(k.id);
  }
  return from_keys(std::move(*trusted), std::move(revoked));
}

Keyring Keyring::from_keys(std::vector<PublicKey> trusted, std::set<std::string> revoked_ids) {
  Keyring ring;
  ring.m_revoked = std::move(revoked_ids);
  for (auto& k : trusted) {
    std::string id = k.id;
    ring.m_keys.emplace(std::move(id), std::move(k));
  }
  return ring;
}

const PublicKey* Keyring::find(const std::string& id) const {
  if (m_revoked.count(id)) return nullptr;
  auto it = m_keys.find(id);
  return it == m_keys.end() ? nullptr : &it->second;
}

}  // namespace upgraded::artifact
