#include "sandbox/landlock.h"

#include <errno.h>
#include <grp.h>
#include <linux/landlock.h>
#include <pwd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>

namespace upgraded::sandbox {

LandlockSupport probe_landlock() {
  long abi = ::syscall(SYS_landlock_create_ruleset, nullptr, 0, LANDLOCK_CREATE_RULESET_VERSION);
  if (abi > 0) return {static_cast<int>(abi), ""};
  switch (abi < 0 ? errno : 0) {
    case ENOSYS:
      return {0, "the kernel has none"};
    case EOPNOTSUPP:
      return {0, "the kernel has it disabled"};
    case EPERM:
      return {0, "a system call filter refuses it (EPERM), as systemd-nspawn's default one does"};
    default:
      return {0, std::string("querying it failed: ") + std::strerror(abi < 0 ? errno : EINVAL),
              true};
  }
}

std::string accounts_in_range(unsigned first, unsigned count) {
  const unsigned long long end = static_cast<unsigned long long>(first) + count;
  if (first < 65536)
    return "the range starts at " + std::to_string(first) +
           ", below 65536, where users, nobody and system accounts are";
  std::string found;
  ::setpwent();
  while (passwd* pw = ::getpwent())
    if (pw->pw_uid >= first && pw->pw_uid < end) {
      found = "user '" + std::string(pw->pw_name) + "' has uid " + std::to_string(pw->pw_uid);
      break;
    }
  ::endpwent();
  if (!found.empty()) return found;
  ::setgrent();
  while (group* gr = ::getgrent())
    if (gr->gr_gid >= first && gr->gr_gid < end) {
      found = "group '" + std::string(gr->gr_name) + "' has gid " + std::to_string(gr->gr_gid);
      break;
    }
  ::endgrent();
  return found;
}

std::string describe_confinement(const LandlockSupport& landlock, bool own_uid,
                                 const std::string& ids_taken) {
  if (landlock.error)
    return "unusable: Landlock could not be queried (" + landlock.reason +
           "); installs are refused";
  if (landlock.abi == 0 && own_uid && !ids_taken.empty())
    return "unusable: no Landlock (" + landlock.reason +
           "), and the helpers' uid of their own is their only wall, but their id range is not "
           "free: " +
           ids_taken +
           "; installs are refused until extract.helper_ids names a free "
           "range (docs/configuration.md)";
  if (landlock.abi > 0)
    return "full: Landlock (ABI " + std::to_string(landlock.abi) + ")" +
           (own_uid ? ", a uid of its own for each run" : "") +
           ", a seccomp allowlist, no capabilities";
  if (own_uid)
    return "degraded: no Landlock (" + landlock.reason +
           "); each helper runs as a uid of its own, which owns nothing but its tree, under a "
           "seccomp allowlist, with no capabilities";
  return "unusable: no Landlock (" + landlock.reason +
         "), which the helpers of an instance that is not root need; installs are refused";
}

}  // namespace upgraded::sandbox
