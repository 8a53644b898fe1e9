#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "support/artifact_builder.h"
#include "support/test_dir.h"
#include "upgraded/artifact/encoding.h"
#include "upgraded/artifact/signatures.h"

using namespace upgraded;
using namespace upgraded::artifact;
using namespace upgraded::test;

namespace {

// Writes a private key of another EVP type (EC P-256 or RSA-3072) and its public key.
TestKey make_evp_key(const TempDir& t, const std::string& name, const char* type,
                     const char* param) {
  EVP_PKEY* key = param ? EVP_PKEY_Q_keygen(nullptr, nullptr, type, param)
                        : EVP_PKEY_Q_keygen(nullptr, nullptr, type, static_cast<size_t>(3072));
  EXPECT_NE(key, nullptr);
  TestKey k{t / (name + ".key.pem"), t / (name + ".pub.pem"), ""};
  FILE* f = std::fopen(k.private_path.c_str(), "w");
  PEM_write_PrivateKey(f, key, nullptr, nullptr, 0, nullptr, nullptr);
  std::fclose(f);
  f = std::fopen(k.public_path.c_str(), "w");
  PEM_write_PUBKEY(f, key);
  std::fclose(f);
  EVP_PKEY_free(key);
  auto pub = parse_public_keys_pem(read_file(k.public_path), k.public_path);
  EXPECT_TRUE(pub.ok());
  k.id = pub->at(0).id;
  return k;
}

std::string sign_with(const std::vector<TestKey>& keys, const std::string& msg) {
  std::vector<Signature> sigs;
  for (const auto& k : keys) {
    auto key = PrivateKey::load(k.private_path);
    EXPECT_TRUE(key.ok());
    auto s = key->sign(as_bytes(msg));
    EXPECT_TRUE(s.ok());
    sigs.push_back(Signature{key->id(), key->algorithm(), *s});
  }
  return serialize_signatures(sigs);
}

class Signatures : public ::testing::Test {
 protected:
  TempDir t;
  TestKey a = make_key(t, "a");
  TestKey b = make_key(t, "b");
  TestKey c = make_key(t, "c");
  std::string msg = "{\"app\": \"hello\"}\n";
};

}  // namespace

TEST_F(Signatures, AcceptOneTrustedSignatureByDefault) {
  auto r = verify_signatures(msg, sign_with({a}, msg), keyring_of({a}), TrustPolicy{});
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->trusted, std::vector<std::string>{a.id});
}

TEST_F(Signatures, RefuseAWrongKey) {
  auto r = verify_signatures(msg, sign_with({b}, msg), keyring_of({a}), TrustPolicy{});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), ErrorCode::kVerificationFailed);
  EXPECT_NE(r.error().message().find("unknown keys"), std::string::npos);
}

TEST_F(Signatures, RefuseAMessageThatChangedAfterSigning) {
  auto sig = sign_with({a}, msg);
  auto r = verify_signatures(msg + " ", sig, keyring_of({a}), TrustPolicy{});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("does not match"), std::string::npos);
}

TEST_F(Signatures, NeverCountRevokedKeys) {
  std::vector<PublicKey> pubs;
  for (auto* k : {&a, &b})
    pubs.push_back(parse_public_keys_pem(read_file(k->public_path), "x")->at(0));
  auto ring = Keyring::from_keys(pubs, {a.id});
  auto r = verify_signatures(msg, sign_with({a}, msg), ring, TrustPolicy{});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("revoked"), std::string::npos);
  auto both = verify_signatures(msg, sign_with({a, b}, msg), ring, TrustPolicy{});
  ASSERT_TRUE(both.ok());
  EXPECT_EQ(both->trusted, std::vector<std::string>{b.id});
  EXPECT_EQ(both->revoked, std::vector<std::string>{a.id});
}

TEST_F(Signatures, EnforceAThresholdOfDistinctKeys) {
  auto ring = keyring_of({a, b, c});
  EXPECT_FALSE(verify_signatures(msg, sign_with({a}, msg), ring, TrustPolicy{2}).ok());
  EXPECT_TRUE(verify_signatures(msg, sign_with({a, c}, msg), ring, TrustPolicy{2}).ok());
  EXPECT_FALSE(verify_signatures(msg, sign_with({a, c}, msg), ring, TrustPolicy{3}).ok());
  // The same key twice does not count twice: it is refused outright.
  auto twice = sign_with({a}, msg);
  auto doc = nlohmann::json::parse(twice);
  doc["signatures"].push_back(doc["signatures"][0]);
  auto r = verify_signatures(msg, doc.dump(), ring, TrustPolicy{2});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("signs twice"), std::string::npos);
}

TEST_F(Signatures, NeverLetAValidSignatureOutvoteATamperedOne) {
  auto ring = keyring_of({a, b});
  auto doc = nlohmann::json::parse(sign_with({a, b}, msg));
  doc["signatures"][1]["signature"] = doc["signatures"][0]["signature"];
  auto r = verify_signatures(msg, doc.dump(), ring, TrustPolicy{1});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find(b.id), std::string::npos);
}

TEST_F(Signatures, RefuseAnAlgorithmThatDoesNotMatchTheKey) {
  auto doc = nlohmann::json::parse(sign_with({a}, msg));
  doc["signatures"][0]["algorithm"] = "ecdsa-sha256";
  EXPECT_FALSE(verify_signatures(msg, doc.dump(), keyring_of({a}), TrustPolicy{}).ok());
}

TEST_F(Signatures, SupportEcdsaAndRsaPssKeysThroughEvp) {
  TestKey ec = make_evp_key(t, "ec", "EC", "P-256");
  TestKey rsa = make_evp_key(t, "rsa", "RSA", nullptr);
  auto ring = keyring_of({ec, rsa});
  auto r = verify_signatures(msg, sign_with({ec, rsa}, msg), ring, TrustPolicy{2});
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->trusted.size(), 2u);
  EXPECT_FALSE(verify_signatures(msg + "x", sign_with({ec}, msg), ring, TrustPolicy{}).ok());
  EXPECT_FALSE(verify_signatures(msg + "x", sign_with({rsa}, msg), ring, TrustPolicy{}).ok());
}

TEST_F(Signatures, RefuseMalformedSignatureFiles) {
  auto ring = keyring_of({a});
  std::string good = sign_with({a}, msg);
  for (std::string bad : std::initializer_list<std::string>{
           std::string(""), std::string("{}"), std::string("{\"format\":1,\"signatures\":[]}"),
           std::string("{\"format\":2,\"signatures\":[]}"),
           std::string(kMaxSignatureFileSize + 1, ' '),
           std::string("{\"format\":1,\"signatures\":[{\"key_id\":\"x\",\"algorithm\":\"ed25519\","
                       "\"signature\":\"AA==\"}]}")}) {
    auto r = verify_signatures(msg, bad, ring, TrustPolicy{});
    EXPECT_FALSE(r.ok()) << bad.substr(0, 80);
  }
}

TEST(Keyring, LoadsADirectoryAndRefusesABrokenOne) {
  TempDir t;
  make_dirs(t / "keys");
  make_dirs(t / "revoked");
  auto missing = Keyring::load(t / "nope");
  EXPECT_FALSE(missing.ok());
  auto empty = Keyring::load(t / "keys");
  ASSERT_FALSE(empty.ok());
  EXPECT_NE(empty.error().message().find("no trusted keys"), std::string::npos);
  auto id = generate_ed25519_key(t / "k.pem", t / "keys/k.pem");
  ASSERT_TRUE(id.ok());
  auto ring = Keyring::load(t / "keys", t / "revoked");
  ASSERT_TRUE(ring.ok());
  EXPECT_NE(ring->find(*id), nullptr);
  write_file(t / "revoked/k.pem", read_file(t / "keys/k.pem"));
  auto revoked = Keyring::load(t / "keys", t / "revoked");
  ASSERT_TRUE(revoked.ok());
  EXPECT_EQ(revoked->find(*id), nullptr);
  EXPECT_TRUE(revoked->is_revoked(*id));
  write_file(t / "keys/broken.pem", "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n");
  EXPECT_FALSE(Keyring::load(t / "keys").ok());
}

TEST(Keyring, RevokesAndTrustsEveryKeyOfAFileWithSeveral) {
  // `cat a.pem b.pem > revoked.d/old.pem` must revoke both, not only the first.
  TempDir t;
  make_dirs(t / "keys");
  make_dirs(t / "revoked");
  auto a = generate_ed25519_key(t / "a.key", t / "a.pem");
  auto b = generate_ed25519_key(t / "b.key", t / "b.pem");
  ASSERT_TRUE(a.ok() && b.ok());
  std::string both = read_file(t / "a.pem") + "a comment between blocks\n" + read_file(t / "b.pem");
  write_file(t / "keys/both.pem", both);
  auto ring = Keyring::load(t / "keys", t / "revoked");
  ASSERT_TRUE(ring.ok()) << ring.error().message();
  EXPECT_EQ(ring->size(), 2u);
  EXPECT_NE(ring->find(*a), nullptr);
  EXPECT_NE(ring->find(*b), nullptr);
  write_file(t / "revoked/old.pem", both);
  auto revoked = Keyring::load(t / "keys", t / "revoked");
  ASSERT_TRUE(revoked.ok());
  EXPECT_TRUE(revoked->is_revoked(*a));
  EXPECT_TRUE(revoked->is_revoked(*b));
  EXPECT_EQ(revoked->find(*b), nullptr);
}

TEST(Keyring, RefusesAFileWithAnythingButPublicKeyBlocks) {
  TempDir t;
  auto a = generate_ed25519_key(t / "a.key", t / "a.pem");
  ASSERT_TRUE(a.ok());
  std::string pub = read_file(t / "a.pem");
  auto refused = [&](const std::string& text, const std::string& why) {
    auto r = parse_public_keys_pem(text, "f.pem");
    ASSERT_FALSE(r.ok()) << why;
    EXPECT_NE(r.error().message().find(why), std::string::npos) << r.error().message();
  };
  refused("", "holds no PEM public key");
  refused("just text\n", "holds no PEM public key");
  refused(pub + read_file(t / "a.key"), "not a PUBLIC KEY");  // a private key by mistake
  refused(pub + "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "PEM block 2");
  refused(pub + "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n", "PEM block 2");
  // A second block that OpenSSL would skip as commentary (the review's cases): refused, so that
  // it cannot drop out of revoked.d unnoticed.
  auto b = generate_ed25519_key(t / "b.key", t / "b.pem");
  ASSERT_TRUE(b.ok());
  std::string second = read_file(t / "b.pem");
  for (const auto& mangled :
       {"  " + second, "> " + second, second.substr(1), std::string(second).insert(26, " x")}) {
    refused(pub + mangled, "BEGIN lines");
  }
  auto one = parse_public_keys_pem(pub, "f.pem");
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->size(), 1u);
  EXPECT_EQ(one->at(0).id, *a);
}

TEST(Keygen, WritesAPrivateKeyReadableOnlyByItsOwnerAndNeverOverwrites) {
  TempDir t;
  ASSERT_TRUE(generate_ed25519_key(t / "k.pem", t / "k.pub").ok());
  struct stat st {};
  ASSERT_EQ(::stat((t / "k.pem").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  std::string before = read_file(t / "k.pem");
  EXPECT_FALSE(generate_ed25519_key(t / "k.pem", t / "other.pub").ok());
  EXPECT_EQ(read_file(t / "k.pem"), before);
  EXPECT_FALSE(exists(t / "other.pub"));
}
