#pragma once

// Whether Landlock can be used here: asked by the daemon once at start (its helpers inherit its
// system call filters, so they would see the same) and by each helper as it confines itself.

#include <string>

namespace upgraded::sandbox {

/// Whether this process (and so the helpers it spawns, which inherit its seccomp filters) can
/// use Landlock.
struct LandlockSupport {
  int abi = 0;         ///< the ABI version; 0: not available
  std::string reason;  ///< why not, when abi is 0
};

/// Asks the kernel (landlock_create_ruleset's version query). ENOSYS or EOPNOTSUPP: the kernel
/// has none or has it disabled; EPERM: a system call filter refuses it (systemd-nspawn's
/// default filter does). None of these is an error: the caller decides what to do without it.
LandlockSupport probe_landlock();

/// One line on how helpers are confined given `landlock` and whether they run as a uid of their
/// own: "full: ...", "degraded: ..." or "unusable: ..." (the D-Bus property HelperSandbox).
std::string describe_confinement(const LandlockSupport& landlock, bool own_uid);

}  // namespace upgraded::sandbox
