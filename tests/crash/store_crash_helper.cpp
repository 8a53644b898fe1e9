// Runs one store operation, for crash tests: the parent sets UPGRADED_CRASH_AT (or kills this
// process at a random moment) and then checks what recovery makes of the store.
//
//   store_crash_helper ROOT stage ARTIFACT KEYS_DIR
//   store_crash_helper ROOT switch|remove|pin|good|bad|floor APP VERSION
//   store_crash_helper ROOT gc APP KEEP
//   store_crash_helper ROOT cycle APP KEYS_DIR ARTIFACT...   (endless: stage, switch, gc, ...)
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "upgraded/artifact/keys.h"
#include "upgraded/fs/unique_fd.h"
#include "upgraded/store/store.h"

using namespace upgraded;

namespace {

int fail(const Error& e) {
  std::fprintf(stderr, "store_crash_helper: %s\n", e.message().c_str());
  return 1;
}

Result<void> stage(const store::Store& s, const std::string& path, const artifact::Keyring& ring) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  auto r = s.stage(fd.get(), ring, artifact::TrustPolicy{});
  if (!r && r.error().code() != ErrorCode::kExists) return r.error();
  return {};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) return 2;
  std::vector<std::string> a(argv + 1, argv + argc);
  store::StoreOptions o;
  o.root = a[0];
  o.extract.limits.free_space_reserve = 0;
  auto s = store::Store::open(o);
  if (!s) return fail(s.error());
  const std::string& op = a[1];
  if (op == "stage" || op == "cycle") {
    auto ring = artifact::Keyring::load(op == "stage" ? a[3] : a[3]);
    if (!ring) return fail(ring.error());
    if (op == "stage") {
      auto r = stage(*s, a[2], *ring);
      return r ? 0 : fail(r.error());
    }
    // cycle: install and activate each artifact in turn, mark it good, collect garbage, remove
    // what is left over; forever, until killed.
    for (std::size_t i = 0;; ++i) {
      const std::string& path = a[4 + i % (a.size() - 4)];
      auto r = stage(*s, path, *ring);
      if (!r) return fail(r.error());
      auto lock = s->lock(a[2]);
      if (!lock) return fail(lock.error());
      auto st = s->state(a[2]);
      if (!st) return fail(st.error());
      auto versions = st->versions_in_order();
      const std::string& target = versions[i % versions.size()];
      if (auto w = s->switch_to(*lock, target); !w) return fail(w.error());
      if (auto g = s->set_status(*lock, target, store::ReleaseStatus::kGood); !g)
        return fail(g.error());
      if (auto g = s->gc(*lock, store::GcPolicy{2, {}}); !g) return fail(g.error());
    }
  }
  auto lock = s->lock(a[2]);
  if (!lock) return fail(lock.error());
  Result<void> r;
  if (op == "switch")
    r = s->switch_to(*lock, a[3]);
  else if (op == "remove")
    r = s->remove(*lock, a[3]);
  else if (op == "pin")
    r = s->set_pinned(*lock, a[3], true);
  else if (op == "good")
    r = s->set_status(*lock, a[3], store::ReleaseStatus::kGood);
  else if (op == "bad")
    r = s->set_status(*lock, a[3], store::ReleaseStatus::kBad);
  else if (op == "floor")
    r = s->raise_floor(*lock, a[3]);
  else if (op == "gc") {
    auto g = s->gc(*lock, store::GcPolicy{static_cast<std::size_t>(std::atoi(a[3].c_str())), {}});
    if (!g) r = g.error();
  } else
    return 2;
  return r ? 0 : fail(r.error());
}
