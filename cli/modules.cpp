// Loads upgradectl's modules (cli/verbs.h).
//
// Where from: an installed upgradectl (its directory is the configured bin directory) loads
// them from the configured module directory only. Any other upgradectl, a build tree's, loads
// the modules at the same place relative to itself, so that it runs the modules built with it.
// The relative lookup needs a real procfs (in a chroot without one, /proc/self/exe could be
// anything) and is never used in a secure-execution process (setuid, file capabilities: the
// $ORIGIN attack). A module and its directory must belong to root or to the executable's owner
// and be writable by nobody else, which is what an installation and a build tree give.

#include <dlfcn.h>
#include <linux/magic.h>
#include <sys/auxv.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstring>
#include <string>

#include "verbs.h"

#ifndef UPGRADECTL_MODULE_DIR
#error "UPGRADECTL_MODULE_DIR: where the modules are installed (cli/CMakeLists.txt)"
#endif
#ifndef UPGRADECTL_BIN_DIR
#error "UPGRADECTL_BIN_DIR: where upgradectl is installed"
#endif
#ifndef UPGRADECTL_MODULE_DIR_FROM_BIN
#error "UPGRADECTL_MODULE_DIR_FROM_BIN: the module directory relative to the bin directory"
#endif

namespace upgradectl {
namespace {

struct Location {
  std::string dir;
  uid_t trusted_owner = 0;  ///< besides root
};

Location module_dir() {
  Location installed{UPGRADECTL_MODULE_DIR, 0};
  if (::getauxval(AT_SECURE)) return installed;
  struct statfs fs {};
  if (::statfs("/proc", &fs) != 0 || fs.f_type != PROC_SUPER_MAGIC) return installed;
  char exe[PATH_MAX];
  ssize_t n = ::readlink("/proc/self/exe", exe, sizeof exe);
  if (n <= 0 || static_cast<std::size_t>(n) >= sizeof exe) return installed;
  std::string dir(exe, static_cast<std::size_t>(n));
  dir.resize(dir.rfind('/'));
  if (dir == UPGRADECTL_BIN_DIR) return installed;
  struct stat st {};
  if (::stat("/proc/self/exe", &st) != 0) return installed;
  return Location{dir + "/" UPGRADECTL_MODULE_DIR_FROM_BIN, st.st_uid};
}

// Owned by root or `owner`, writable by nobody else.
bool trusted(const std::string& path, uid_t owner, std::string& why) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    why = path + ": " + std::strerror(errno);
    return false;
  }
  if ((st.st_uid != 0 && st.st_uid != owner) || (st.st_mode & (S_IWGRP | S_IWOTH))) {
    why = path + " is writable by others than root or the owner of upgradectl";
    return false;
  }
  return true;
}

template <class Table>
const Table* load(const char* file, const char* symbol) {
  Location where = module_dir();
  std::string path = where.dir + "/" + file, why;
  if (!trusted(where.dir, where.trusted_owner, why) || !trusted(path, where.trusted_owner, why)) {
    std::fprintf(stderr, "upgradectl: cannot load its module %s: %s\n", path.c_str(), why.c_str());
    std::fprintf(stderr, "upgradectl: reinstall upgraded (the package installs it)\n");
    return nullptr;
  }
  // RTLD_NOW: a missing symbol is reported here, not as a crash halfway through a verb.
  void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    const char* error = ::dlerror();
    std::fprintf(stderr, "upgradectl: cannot load its module %s: %s\n", path.c_str(),
                 error ? error : "dlopen failed");
    std::fprintf(stderr, "upgradectl: reinstall upgraded (the package installs it)\n");
    return nullptr;
  }
  auto entry = reinterpret_cast<const Table* (*)()>(::dlsym(handle, symbol));
  const Table* table = entry ? entry() : nullptr;
  if (!table || std::strcmp(table->interface, kModuleInterface) != 0 ||
      table->size != sizeof(Table)) {
    std::fprintf(stderr,
                 "upgradectl: %s is not from the same build as upgradectl; reinstall upgraded\n",
                 path.c_str());
    return nullptr;  // never unloaded: it may have registered destructors
  }
  return table;
}

}  // namespace

const BusVerbs* bus_verbs() {
  static const BusVerbs* table = load<BusVerbs>("upgradectl-bus.so", "upgradectl_bus_verbs");
  return table;
}

const ArtifactVerbs* artifact_verbs() {
  static const ArtifactVerbs* table =
      load<ArtifactVerbs>("upgradectl-artifact.so", "upgradectl_artifact_verbs");
  return table;
}

}  // namespace upgradectl
