// Benchmark of the release store: latency of a durable switch, and listing many apps.
//   bench_switch WORKDIR [SWITCHES]
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "upgraded/artifact/keys.h"
#include "upgraded/artifact/packer.h"
#include "upgraded/fs/unique_fd.h"
#include "upgraded/store/store.h"

using namespace upgraded;
using Clock = std::chrono::steady_clock;

namespace {

void die(const Error& e) {
  std::fprintf(stderr, "bench_switch: %s\n", e.message().c_str());
  std::exit(1);
}

double ms(Clock::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[static_cast<std::size_t>(p * static_cast<double>(v.size() - 1))];
}

std::string pack(const std::string& w, const std::string& app, const std::string& version) {
  std::string src = w + "/src";
  std::string out = w + "/" + app + "-" + version + ".upd";
  artifact::PackOptions o;
  o.key_paths = {w + "/k.pem"};
  o.app = app;
  o.version = version;
  o.output = out;
  o.source_dir = src;
  o.created = 1700000000;
  if (auto r = artifact::pack(o); !r) die(r.error());
  return out;
}

void stage(const store::Store& s, const std::string& path, const artifact::Keyring& ring) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (auto r = s.stage(fd.get(), ring, artifact::TrustPolicy{}); !r) die(r.error());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench_switch WORKDIR [SWITCHES]\n");
    return 2;
  }
  std::string w = argv[1];
  int switches = argc > 2 ? std::atoi(argv[2]) : 10000;
  ::mkdir((w + "/src").c_str(), 0755);
  ::mkdir((w + "/src/bin").c_str(), 0755);
  std::ofstream(w + "/src/bin/run") << "#!/bin/sh\necho run\n";
  ::mkdir((w + "/keys").c_str(), 0755);
  if (auto r = artifact::generate_ed25519_key(w + "/k.pem", w + "/keys/k.pem"); !r) die(r.error());
  auto ring = artifact::Keyring::load(w + "/keys");
  if (!ring) die(ring.error());

  store::StoreOptions o;
  o.root = w + "/state";
  o.extract.limits.free_space_reserve = 0;
  auto s = store::Store::open(o);
  if (!s) die(s.error());

  // 1. Durable switch latency, alternating between two releases.
  stage(*s, pack(w, "app", "1.0.0"), *ring);
  stage(*s, pack(w, "app", "2.0.0"), *ring);
  {
    auto lock = s->lock("app");
    if (!lock) die(lock.error());
    std::vector<double> lat;
    lat.reserve(static_cast<std::size_t>(switches));
    for (int i = 0; i < switches; ++i) {
      auto t0 = Clock::now();
      if (auto r = s->switch_to(*lock, i % 2 ? "1.0.0" : "2.0.0"); !r) die(r.error());
      lat.push_back(ms(Clock::now() - t0));
    }
    std::printf(
        "durable switch x%d: p50 %.3f ms, p90 %.3f ms, p99 %.3f ms, max %.3f ms (target p99 <= 2 "
        "ms)\n",
        switches, percentile(lat, 0.5), percentile(lat, 0.9), percentile(lat, 0.99),
        percentile(lat, 1.0));
  }

  // 2. Listing 100 apps x 10 releases: apps() plus every app's state.
  std::printf("staging 100 apps x 10 releases...\n");
  for (int a = 0; a < 100; ++a)
    for (int v = 1; v <= 10; ++v)
      stage(*s, pack(w, "svc" + std::to_string(a), std::to_string(v) + ".0.0"), *ring);
  std::vector<double> lat;
  std::size_t releases = 0;
  for (int i = 0; i < 50; ++i) {
    auto t0 = Clock::now();
    auto apps = s->apps();
    if (!apps) die(apps.error());
    releases = 0;
    for (const auto& app : *apps) {
      auto st = s->state(app);
      if (!st) die(st.error());
      releases += st->releases.size();
    }
    lat.push_back(ms(Clock::now() - t0));
  }
  std::printf("list %zu releases of 101 apps x50: median %.2f ms, max %.2f ms (target <= 20 ms)\n",
              releases, percentile(lat, 0.5), percentile(lat, 1.0));
  return 0;
}
