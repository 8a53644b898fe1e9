#include "offline_verbs.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "exit_codes.h"
#include "output.h"
#include "upgraded/artifact/encoding.h"
#include "upgraded/artifact/keys.h"
#include "upgraded/artifact/packer.h"
#include "upgraded/artifact/unpack.h"
#include "upgraded/artifact/verifier.h"
#include "upgraded/fs/durable.h"
#include "upgraded/fs/unique_fd.h"

namespace upgradectl {
namespace {

using namespace upgraded;
using namespace upgraded::artifact;

struct TrustArgs {
  std::string keys;
  std::optional<std::string> revoked;
  unsigned threshold = 1;
};

void add_trust_options(CLI::App* cmd, TrustArgs& t) {
  cmd->add_option("--keys", t.keys, "directory of trusted public keys (*.pem)")->required();
  cmd->add_option(
      "--revoked", t.revoked,
      "directory of revoked public keys (default: revoked.d next to --keys, if present)");
  cmd->add_option("--threshold", t.threshold, "signatures by distinct trusted keys required")
      ->check(CLI::Range(1u, 16u));
}

Result<Keyring> load_keyring(const TrustArgs& t) {
  std::optional<std::string> revoked = t.revoked;
  if (!revoked) {
    std::string keys = t.keys;
    while (keys.size() > 1 && keys.back() == '/')
      keys.pop_back();
    auto [parent, base] = fs::split_parent(keys);
    std::string candidate = parent + "/revoked.d";
    struct stat st {};
    if (::stat(candidate.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) revoked = candidate;
  }
  return Keyring::load(t.keys, revoked);
}

Result<UniqueFd> open_artifact(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return system_error(errno, "opening '" + path + "'");
  return UniqueFd(fd);
}

void print_manifest(const Manifest& m) {
  std::printf("app:          %s\n", m.app.c_str());
  std::printf("version:      %s\n", m.version.c_str());
  std::printf("created:      %s\n", m.created.c_str());
  std::printf("data format:  writes %llu, reads %llu and newer\n",
              static_cast<unsigned long long>(m.data_format.writes),
              static_cast<unsigned long long>(m.data_format.reads_min));
  std::string from;
  for (const auto& v : m.upgrade_from)
    from += (from.empty() ? "" : ", ") + v;
  std::printf("upgrade from: %s\n", from.empty() ? "any version" : from.c_str());
  std::string units;
  for (const auto& u : m.units)
    units += (units.empty() ? "" : " ") + u;
  std::printf("units:        %s\n", units.empty() ? "(none)" : units.c_str());
  std::printf("strategy:     %s\n", std::string(to_string(m.strategy)).c_str());
  for (const auto& [name, hook] : m.hooks)
    std::printf("hook:         %s = %s (timeout %us)\n", name.c_str(), hook.path.c_str(),
                hook.timeout_s);
  std::printf("health:       ready for %us, within %us\n", m.health.min_ready_s,
              m.health.deadline_s);
  std::printf("payload:      %s, %s in %zu chunk(s) of %s\n",
              std::string(payload_member_name(m.payload.compression)).c_str(),
              human_size(m.payload.size).c_str(), m.payload.chunks.size(),
              human_size(m.payload.chunk_size).c_str());
  std::printf("sha256:       %s\n", to_hex(m.payload.sha256).c_str());
  if (!m.notes.empty()) std::printf("notes:\n%s\n", m.notes.c_str());
}

int run_keygen(const std::string& priv, const std::string& pub) {
  auto id = generate_ed25519_key(priv, pub);
  if (!id) return report(id.error());
  std::printf("Generated Ed25519 key %s\n  private: %s (keep secret)\n  public:  %s\n", id->c_str(),
              priv.c_str(), pub.c_str());
  return kExitOk;
}

struct PackArgs {
  PackOptions o;
  std::optional<std::string> source;
  std::optional<std::int64_t> created;
};

int run_pack(PackArgs& a) {
  a.o.source_dir = a.source;
  if (a.created) {
    a.o.created = a.created;
  } else if (const char* sde = ::secure_getenv("SOURCE_DATE_EPOCH"); sde && *sde) {
    char* end = nullptr;
    long long v = std::strtoll(sde, &end, 10);
    if (*end != 0 || v < 0) {
      std::fprintf(stderr, "upgradectl: SOURCE_DATE_EPOCH must be a non-negative integer\n");
      return kExitUsage;
    }
    a.o.created = v;
  }
  if (a.o.source_dir.has_value() == a.o.payload_path.has_value()) {
    std::fprintf(stderr, "upgradectl: pack needs exactly one of DIR or --payload TARBALL\n");
    return kExitUsage;
  }
  auto r = pack(a.o);
  if (!r) return report(r.error().with_context("packing '" + a.o.output + "'"));
  std::printf("Packed %s %s -> %s (%s, payload %s, %zu signature(s))\n", r->manifest.app.c_str(),
              r->manifest.version.c_str(), a.o.output.c_str(), human_size(r->artifact_size).c_str(),
              human_size(r->manifest.payload.size).c_str(), r->key_ids.size());
  return kExitOk;
}

void print_signers(const SignatureReport& report) {
  for (const auto& id : report.trusted)
    std::printf("  signed by trusted key %s\n", id.c_str());
  for (const auto& id : report.revoked)
    std::printf("  ignored signature by REVOKED key %s\n", id.c_str());
  for (const auto& id : report.unknown)
    std::printf("  ignored signature by unknown key %s\n", id.c_str());
}

int run_verify(const TrustArgs& t, const std::string& file, bool json) {
  auto ring = load_keyring(t);
  if (!ring) return report(ring.error());
  auto fd = open_artifact(file);
  if (!fd) return report(fd.error());
  auto artifact = open_verified(fd->get(), *ring, TrustPolicy{t.threshold});
  if (!artifact) return report(artifact.error().with_context("verifying '" + file + "'"));
  if (auto r = verify_payload(*artifact); !r)
    return report(r.error().with_context("verifying '" + file + "'"));
  const Manifest& m = artifact->manifest;
  if (json) {
    nlohmann::json out = {{"verified", true},
                          {"app", m.app},
                          {"version", m.version},
                          {"trusted_keys", artifact->signatures.trusted},
                          {"revoked_keys", artifact->signatures.revoked},
                          {"unknown_keys", artifact->signatures.unknown},
                          {"payload_size", m.payload.size},
                          {"payload_sha256", to_hex(m.payload.sha256)},
                          {"chunks", m.payload.chunks.size()}};
    std::cout << out.dump(2) << "\n";
    return kExitOk;
  }
  std::printf("%s: OK, %s %s\n", file.c_str(), m.app.c_str(), m.version.c_str());
  print_signers(artifact->signatures);
  std::printf("  %zu of %u required signature(s) valid\n", artifact->signatures.trusted.size(),
              t.threshold);
  std::printf("  payload %s: all %zu chunk(s) match their signed SHA-256 (payload sha256 %s)\n",
              human_size(m.payload.size).c_str(), m.payload.chunks.size(),
              to_hex(m.payload.sha256).c_str());
  return kExitOk;
}

struct UnpackArgs {
  TrustArgs trust;
  std::string file;
  std::string dest;
  bool strip_unsafe = false;
  ExtractLimits limits;
};

int run_unpack(UnpackArgs& a) {
  auto ring = load_keyring(a.trust);
  if (!ring) return report(ring.error());
  auto fd = open_artifact(a.file);
  if (!fd) return report(fd.error());
  std::string dest = a.dest;
  while (dest.size() > 1 && dest.back() == '/')
    dest.pop_back();
  auto [parent, name] = fs::split_parent(dest);
  auto pfd = fs::open_directory(parent);
  if (!pfd) return report(pfd.error());
  ExtractPolicy policy{a.limits, a.strip_unsafe ? UnsafeModes::kStrip : UnsafeModes::kRefuse};
  auto r =
      unpack_artifact(fd->get(), *ring, TrustPolicy{a.trust.threshold}, policy, pfd->get(), name);
  if (!r) return report(r.error().with_context("unpacking '" + a.file + "'"));
  std::printf(
      "Unpacked %s %s into %s: %llu files, %llu directories, %llu symlinks, %llu hardlinks, %s\n",
      r->manifest.app.c_str(), r->manifest.version.c_str(), dest.c_str(),
      static_cast<unsigned long long>(r->stats.files),
      static_cast<unsigned long long>(r->stats.directories),
      static_cast<unsigned long long>(r->stats.symlinks),
      static_cast<unsigned long long>(r->stats.hardlinks), human_size(r->stats.bytes).c_str());
  return kExitOk;
}

int run_inspect(const std::string& file, bool json) {
  auto fd = open_artifact(file);
  if (!fd) return report(fd.error());
  auto info = inspect_artifact(fd->get());
  if (!info) return report(info.error().with_context("inspecting '" + file + "'"));
  if (json) {
    nlohmann::json out;
    out["verified"] = false;
    auto parsed = nlohmann::json::parse(info->manifest_bytes, nullptr, false);
    out["manifest"] = parsed.is_discarded() ? nlohmann::json(nullptr) : parsed;
    if (info->manifest_error) out["manifest_error"] = *info->manifest_error;
    out["signatures"] = nlohmann::json::array();
    for (const auto& s : info->signatures)
      out["signatures"].push_back({{"key_id", s.key_id}, {"algorithm", s.algorithm}});
    if (info->signature_error) out["signature_error"] = *info->signature_error;
    std::cout << out.dump(2) << "\n";
    return kExitOk;
  }
  std::printf(
      "UNVERIFIED: signatures and payload were NOT checked; use 'upgradectl verify' before\n"
      "trusting anything below.\n\n");
  if (info->manifest)
    print_manifest(*info->manifest);
  else
    std::printf("manifest does not match the schema: %s\n", info->manifest_error->c_str());
  if (info->signature_error)
    std::printf("signatures:   malformed: %s\n", info->signature_error->c_str());
  for (const auto& s : info->signatures)
    std::printf("signature:    %s by key %s (not checked)\n", s.algorithm.c_str(),
                s.key_id.c_str());
  return kExitOk;
}

}  // namespace

void add_offline_verbs(CLI::App& app, int& exit_code) {
  {
    auto* cmd = app.add_subcommand("keygen", "Generate an Ed25519 signing key pair");
    auto priv = std::make_shared<std::string>();
    auto pub = std::make_shared<std::string>();
    cmd->add_option("--private", *priv, "private key file to create (mode 0600)")->required();
    cmd->add_option("--public", *pub, "public key file to create")->required();
    cmd->callback([&exit_code, priv, pub] { exit_code = run_keygen(*priv, *pub); });
  }
  {
    auto* cmd = app.add_subcommand(
        "pack", "Build and sign an artifact (.upd) from a directory or a tarball");
    auto a = std::make_shared<PackArgs>();
    cmd->add_option("--key", a->o.key_paths, "private key to sign with (repeat for k-of-n)")
        ->required();
    cmd->add_option("--app", a->o.app, "app name")->required();
    cmd->add_option("--version", a->o.version, "release version")->required();
    cmd->add_option(
        "--manifest", a->o.extra_manifest_path,
        "JSON file with units, strategy, hooks, health, data_format, upgrade_from, notes");
    cmd->add_option("--output,-o", a->o.output, "artifact to write")->required();
    cmd->add_option("--payload", a->o.payload_path,
                    "wrap this .tar/.tar.zst/.tar.xz/.tar.gz as is");
    cmd->add_option(
        "--created", a->created,
        "release time in Unix seconds (default: $SOURCE_DATE_EPOCH, else newest input mtime)");
    cmd->add_option("--level", a->o.zstd_level, "zstd level for a directory payload")
        ->check(CLI::Range(1, 19));
    cmd->add_option("--chunk-size", a->o.chunk_size, "payload chunk size in bytes (power of two)");
    cmd->add_option("--threads", a->o.threads,
                    "zstd threads for a directory (default: online CPUs); the artifact does not "
                    "depend on it")
        ->check(CLI::Range(1u, 256u));
    cmd->add_option("DIR", a->source, "release tree to pack");
    cmd->callback([&exit_code, a] { exit_code = run_pack(*a); });
  }
  {
    auto* cmd = app.add_subcommand("verify", "Verify an artifact completely without extracting it");
    auto t = std::make_shared<TrustArgs>();
    auto file = std::make_shared<std::string>();
    auto json = std::make_shared<bool>(false);
    add_trust_options(cmd, *t);
    cmd->add_flag("--json", *json, "machine-readable output");
    cmd->add_option("FILE", *file, "artifact")->required();
    cmd->callback([&exit_code, t, file, json] { exit_code = run_verify(*t, *file, *json); });
  }
  {
    auto* cmd =
        app.add_subcommand("unpack", "Verify an artifact and extract it into a new directory");
    auto a = std::make_shared<UnpackArgs>();
    add_trust_options(cmd, a->trust);
    cmd->add_flag("--strip-unsafe-modes", a->strip_unsafe,
                  "clear setuid/setgid/world-writable bits instead of refusing the artifact");
    cmd->add_option("--max-entries", a->limits.max_entries, "refuse payloads with more entries");
    cmd->add_option("--max-bytes", a->limits.max_total_bytes, "refuse payloads holding more bytes");
    cmd->add_option("--max-file-size", a->limits.max_file_size, "refuse larger files");
    cmd->add_option("--max-ratio", a->limits.max_expansion_ratio, "refuse payloads expanding more");
    cmd->add_option("--reserve", a->limits.free_space_reserve,
                    "bytes that must stay free on the target");
    cmd->add_option("FILE", a->file, "artifact")->required();
    cmd->add_option("DEST", a->dest, "directory to create (must not exist)")->required();
    cmd->callback([&exit_code, a] { exit_code = run_unpack(*a); });
  }
  {
    auto* cmd = app.add_subcommand("inspect", "Show an artifact's manifest WITHOUT verifying it");
    auto file = std::make_shared<std::string>();
    auto json = std::make_shared<bool>(false);
    cmd->add_flag("--json", *json, "machine-readable output");
    cmd->add_option("FILE", *file, "artifact")->required();
    cmd->callback([&exit_code, file, json] { exit_code = run_inspect(*file, *json); });
  }
}

}  // namespace upgradectl
