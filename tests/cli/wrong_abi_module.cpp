// Modules that are not from upgradectl's build (tests/cli/modules_test.sh): built three times,
// with another interface string, with another table size, and without the entry point.

#include "verbs.h"

#ifndef NO_ENTRY
namespace {
#ifdef WRONG_SIZE
struct Larger {
  upgradectl::BusVerbs table;
  int extra;
};
Larger larger{{upgradectl::kModuleInterface, sizeof(Larger)}, 0};
const upgradectl::BusVerbs* table = &larger.table;
#else
upgradectl::BusVerbs other{"0.0.0-another-build", sizeof(upgradectl::BusVerbs)};
const upgradectl::BusVerbs* table = &other;
#endif
}  // namespace

extern "C" __attribute__((visibility("default"))) const upgradectl::BusVerbs*
upgradectl_bus_verbs() {
  return table;
}
#else
extern "C" __attribute__((visibility("default"))) int upgradectl_something_else() {
  return 0;
}
#endif
