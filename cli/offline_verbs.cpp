// The verbs that work on files alone, without the daemon: their command lines. What they do is
// in upgradectl-artifact.so (artifact_verbs.cpp), loaded only when one of them runs
// (cli/verbs.h).

#include "offline_verbs.h"

#include <memory>
#include <string>

#include "verbs.h"

namespace upgradectl {
namespace {

using upgraded::artifact::PackOptions;

void add_trust_options(CLI::App* cmd, TrustArgs& t) {
  cmd->add_option("--keys", t.keys, "directory of trusted public keys (*.pem)")->required();
  cmd->add_option(
      "--revoked", t.revoked,
      "directory of revoked public keys (default: revoked.d next to --keys, if present)");
  cmd->add_option("--threshold", t.threshold, "signatures by distinct trusted keys required")
      ->check(CLI::Range(1u, 16u));
}

}  // namespace

void add_offline_verbs(CLI::App& app, int& exit_code) {
  {
    auto* cmd = app.add_subcommand("keygen", "Generate an Ed25519 signing key pair");
    auto priv = std::make_shared<std::string>();
    auto pub = std::make_shared<std::string>();
    cmd->add_option("--private", *priv, "private key file to create (mode 0600)")->required();
    cmd->add_option("--public", *pub, "public key file to create")->required();
    cmd->callback([&exit_code, priv, pub] {
      exit_code = with_artifact([&](const ArtifactVerbs& v) { return v.keygen(*priv, *pub); });
    });
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
    cmd->callback([&exit_code, a] {
      exit_code = with_artifact([&](const ArtifactVerbs& v) { return v.pack(*a); });
    });
  }
  {
    auto* cmd = app.add_subcommand("verify", "Verify an artifact completely without extracting it");
    auto t = std::make_shared<TrustArgs>();
    auto file = std::make_shared<std::string>();
    auto json = std::make_shared<bool>(false);
    add_trust_options(cmd, *t);
    cmd->add_flag("--json", *json, "machine-readable output");
    cmd->add_option("FILE", *file, "artifact")->required();
    cmd->callback([&exit_code, t, file, json] {
      exit_code = with_artifact([&](const ArtifactVerbs& v) { return v.verify(*t, *file, *json); });
    });
  }
  {
    auto* cmd =
        app.add_subcommand("unpack", "Verify an artifact and extract it into a new directory");
    auto a = std::make_shared<UnpackArgs>();
    add_trust_options(cmd, a->trust);
    cmd->add_flag(
        "--strip-unsafe-modes", a->strip_unsafe,
        "clear setuid/setgid/sticky/world-writable bits instead of refusing the artifact");
    cmd->add_option("--max-entries", a->limits.max_entries, "refuse payloads with more entries");
    cmd->add_option("--max-bytes", a->limits.max_total_bytes, "refuse payloads holding more bytes");
    cmd->add_option("--max-file-size", a->limits.max_file_size, "refuse larger files");
    cmd->add_option("--max-ratio", a->limits.max_expansion_ratio, "refuse payloads expanding more");
    cmd->add_option("--reserve", a->limits.free_space_reserve,
                    "bytes that must stay free on the target");
    cmd->add_option("FILE", a->file, "artifact")->required();
    cmd->add_option("DEST", a->dest, "directory to create (must not exist)")->required();
    cmd->callback([&exit_code, a] {
      exit_code = with_artifact([&](const ArtifactVerbs& v) { return v.unpack(*a); });
    });
  }
  {
    auto* cmd = app.add_subcommand("inspect", "Show an artifact's manifest WITHOUT verifying it");
    auto file = std::make_shared<std::string>();
    auto json = std::make_shared<bool>(false);
    cmd->add_flag("--json", *json, "machine-readable output");
    cmd->add_option("FILE", *file, "artifact")->required();
    cmd->callback([&exit_code, file, json] {
      exit_code = with_artifact([&](const ArtifactVerbs& v) { return v.inspect(*file, *json); });
    });
  }
}

}  // namespace upgradectl
