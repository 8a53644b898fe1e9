#include "support/artifact_builder.h"

#include <fcntl.h>
#include <unistd.h>

#include <stdexcept>

#include "upgraded/artifact/packer.h"
#include "upgraded/fs/unique_fd.h"

namespace upgraded::test {

TestKey make_key(const TempDir& dir, const std::string& name) {
  TestKey k{dir / (name + ".key.pem"), dir / (name + ".pub.pem"), ""};
  auto id = artifact::generate_ed25519_key(k.private_path, k.public_path);
  if (!id) throw std::runtime_error(id.error().message());
  k.id = *id;
  return k;
}

void build_artifact(const std::string& output, const std::vector<TestKey>& keys,
                    const std::string& payload, const BuildOptions& o) {
  std::string payload_path = output + ".payload";
  write_file(payload_path, payload);
  UniqueFd fd(::open(payload_path.c_str(), O_RDONLY | O_CLOEXEC));
  auto info = artifact::describe_payload(fd.get(), o.compression, o.chunk_size);
  if (!info) throw std::runtime_error(info.error().message());
  artifact::Manifest m;
  m.app = o.app;
  m.version = o.version;
  m.created = "2026-11-21T00:00:00Z";
  m.payload = *info;
  if (o.tweak_manifest) o.tweak_manifest(m);
  std::string bytes = artifact::serialize_manifest(m);
  if (o.tweak_manifest_bytes) o.tweak_manifest_bytes(bytes);
  std::vector<std::string> paths;
  for (const auto& k : keys)
    paths.push_back(k.private_path);
  auto r = artifact::sign_and_write(bytes, paths, fd.get(), m.payload, output);
  if (!r) throw std::runtime_error(r.error().message());
  ::unlink(payload_path.c_str());
}

artifact::Keyring keyring_of(const std::vector<TestKey>& keys) {
  std::vector<artifact::PublicKey> pubs;
  for (const auto& k : keys) {
    auto pem = read_file(k.public_path);
    auto key = artifact::parse_public_keys_pem(pem, k.public_path);
    if (!key) throw std::runtime_error(key.error().message());
    pubs.push_back(key->at(0));
  }
  return artifact::Keyring::from_keys(std::move(pubs));
}

}  // namespace upgraded::test
