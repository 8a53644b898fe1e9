#include "sandbox/landlock.h"

#include <errno.h>
#include <linux/landlock.h>
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
      return {0, std::string("querying it failed: ") + std::strerror(abi < 0 ? errno : EINVAL)};
  }
}

std::string describe_confinement(const LandlockSupport& landlock, bool own_uid) {
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
