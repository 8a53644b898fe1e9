// Fuzz target `listing`: the listing the daemon hands over as a sealed memfd
// (ListAllReleasesByFileDescriptor, lib/store/views_cache.cpp, docs/dbus-api.md), decoded by
// every `upgradectl list` through the daemon. The input is the memfd's bytes.
//
// Invariants: a listing is accepted only whole; its apps are valid names in strictly
// ascending order, its versions valid, its roles "", "current" or "previous"; what is accepted
// encodes back to bytes that decode to the same listing.

#include <vector>

#include "fuzz_support.h"
#include "upgraded/policy/names.h"
#include "upgraded/store/views_cache.h"

using namespace upgraded;
using namespace upgraded::store;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto apps = views_cache::decode_listing(std::span(data, size));
  if (!apps) return 0;
  std::vector<std::vector<std::uint8_t>> releases;
  std::vector<views_cache::EncodedApp> encoded;
  for (std::size_t i = 0; i < apps->size(); ++i) {
    const auto& a = (*apps)[i];
    FUZZ_CHECK(policy::validate_app_name(a.app).ok());
    FUZZ_CHECK(i == 0 || (*apps)[i - 1].app < a.app);
    for (const auto& r : a.releases) {
      FUZZ_CHECK(policy::validate_version(r.version).ok());
      FUZZ_CHECK(r.role.empty() || r.role == "current" || r.role == "previous");
    }
    releases.push_back(views_cache::encode_releases(a.releases));
  }
  for (std::size_t i = 0; i < apps->size(); ++i)
    encoded.push_back({(*apps)[i].app, (*apps)[i].pre_finalized, releases[i]});
  auto again = views_cache::decode_listing(views_cache::encode_listing(encoded));
  FUZZ_CHECK(again.has_value());
  FUZZ_CHECK(*again == *apps);
  return 0;
}
