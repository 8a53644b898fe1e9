// Fuzz target `views_cache`: the listing cache `<store root>/views.cache`
// (lib/store/views_cache.cpp, docs/state.md), read by every `upgradectl list --offline`. The
// input is the file's bytes.
//
// Invariants: a document is accepted only whole (the reader checks every value's place and
// type); what is accepted encodes back to a document that decodes to the same one; an
// entry's releases decode, if at all, to at most kMaxReleasesPerApp releases that likewise
// survive a round trip.

#include <vector>

#include "fuzz_support.h"
#include "upgraded/store/views_cache.h"

using namespace upgraded::store;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto doc = views_cache::decode(std::span(data, size));
  if (!doc) return 0;
  auto again = views_cache::decode(views_cache::encode(*doc));
  FUZZ_CHECK(again.has_value());
  FUZZ_CHECK(*again == *doc);
  std::vector<ListedRelease> releases, round;
  for (const auto& [app, e] : doc->entries) {
    if (!views_cache::decode_releases(e.releases, releases)) continue;
    FUZZ_CHECK(releases.size() <= views_cache::kMaxReleasesPerApp);
    FUZZ_CHECK(views_cache::decode_releases(views_cache::encode_releases(releases), round));
    FUZZ_CHECK(round == releases);
  }
  return 0;
}
