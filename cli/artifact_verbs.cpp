// upgradectl-artifact.so: keygen, pack, verify, unpack, inspect and `install --offline`
// (cli/verbs.h).

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "exit_codes.h"
#include "offline_store.h"
#include "output.h"
#include "upgraded/activation/activator.h"
#include "upgraded/artifact/encoding.h"
#include "upgraded/artifact/keys.h"
#include "upgraded/artifact/packer.h"
#include "upgraded/artifact/unpack.h"
#include "upgraded/artifact/verifier.h"
#include "upgraded/fs/durable.h"
#include "upgraded/fs/unique_fd.h"
#include "upgraded/store/store.h"
#include "verbs.h"

namespace upgradectl {
namespace {

using namespace upgraded;
using namespace upgraded::artifact;

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
    std::cout << out.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
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
    std::cout << out.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
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

int run_offline_install(const std::string& root, const std::string& file, bool stage_only,
                        bool quiet, bool force, double wait_lock_s) {
  // On a running system the daemon would not notice: `current` would switch under running
  // units, and their next restart would start the new release without a health gate.
  struct stat sd {};
  bool live = (root.empty() || root == "/") && ::stat("/run/systemd/system", &sd) == 0;
  if (live && !force) {
    std::fprintf(stderr,
                 "upgradectl: systemd is running here: use `upgradectl install --wait FILE`, which "
                 "the daemon carries out (D-Bus activation starts it); --offline is for chroots "
                 "and image builds (--root DIR), --force overrides\n");
    return kExitUsage;
  }
  auto opened = open_store(root);
  if (!opened) return report_store(opened.error());
  const auto& config = opened->config;
  const store::Store& st = *opened->store;
  struct stat rv {};
  std::optional<std::string> revoked;
  if (::stat(config.revoked_dir().c_str(), &rv) == 0) revoked = config.revoked_dir();
  auto keyring = artifact::Keyring::load(config.keys_dir(), revoked);
  if (!keyring) return report_store(keyring.error());
  int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return report_store(system_error(errno, "opening '" + file + "'"));
  UniqueFd owner(fd);
  auto art = artifact::open_verified(fd, *keyring, artifact::TrustPolicy{config.threshold});
  if (!art) return report_store(art.error().with_context("verifying '" + file + "'"));
  const std::string app = art->manifest.app, version = art->manifest.version;
  // The signatures are checked before the lock is taken; the payload is hashed as it is
  // extracted, under the lock.
  auto lock = st.lock(app, std::chrono::milliseconds(static_cast<std::int64_t>(
                               std::ceil(std::clamp(wait_lock_s, 0.0, 86400.0) * 1000))));
  if (!lock) return report_store(lock.error());
  auto staged = st.stage(*lock, *art);
  if (!staged) return report_store(staged.error().with_context("installing '" + file + "'"));
  if (!quiet)
    std::printf("Staged %s %s (%llu files, %s).\n", app.c_str(), version.c_str(),
                static_cast<unsigned long long>(staged->stats.files),
                human_size(staged->stats.bytes).c_str());
  if (stage_only) return kExitOk;

  auto state = st.state(app);
  if (!state) return report_store(state.error());
  if (auto ok = activation::check_activation(*state, staged->manifest, {}); !ok)
    return report_store(ok.error());
  // The daemon finishes this activation when it next starts (docs/state.md): it restarts the
  // units of the release `current` names and runs the health gate, rolling back on failure.
  store::PendingActivation pending{"activate", state->current.value_or(""), version,
                                   state->previous.value_or(""), ""};
  // A second offline install before the daemon ran: the release that was running before the
  // first one stays what a failure falls back to (the one in between never passed a gate).
  auto earlier = st.pending_activation(app);
  if (!earlier) return report_store(earlier.error());
  if (activation::has_activation_hooks(staged->manifest)) {
    // Hooks run as systemd units, which only the daemon starts: the whole activation, hooks
    // included, waits for it (docs/hooks.md). Nothing running changes now.
    if (*earlier && (*earlier)->step != "queued")
      return report_store(Error(
          ErrorCode::kPolicyRefused,
          app + " " + version + " declares hooks, and the offline switch to " + (*earlier)->to +
              " is not finished yet; start upgraded once (it finishes that), then install again"));
    pending.step = "queued";
    if (auto r = st.begin_activation(*lock, pending); !r) return report_store(r.error());
    if (!quiet)
      std::printf(
          "%s %s declares hooks, which only the daemon runs: its activation, hooks included, is "
          "queued for upgraded's next start. `current` still names %s.\n",
          app.c_str(), version.c_str(), state->current ? state->current->c_str() : "no release");
    return kExitOk;
  }
  if (*earlier) {
    pending.from = (*earlier)->from;
    pending.previous = (*earlier)->previous;
  }
  if (auto r = st.begin_activation(*lock, pending); !r) return report_store(r.error());
  if (auto r = st.switch_to(*lock, version); !r) {
    (void)st.end_activation(*lock);
    return report_store(r.error());
  }
  if (!quiet)
    std::printf(
        "Switched %s to %s. Its units were not touched: upgraded restarts them and checks their "
        "health when it next starts.\n",
        app.c_str(), version.c_str());
  return kExitOk;
}

constexpr ArtifactVerbs kVerbs{
    kModuleInterface,    sizeof(ArtifactVerbs), guarded<run_keygen>,  guarded<run_pack>,
    guarded<run_verify>, guarded<run_unpack>,   guarded<run_inspect>, guarded<run_offline_install>,
};

}  // namespace
}  // namespace upgradectl

extern "C" __attribute__((visibility("default"))) const upgradectl::ArtifactVerbs*
upgradectl_artifact_verbs() {
  return &upgradectl::kVerbs;
}
