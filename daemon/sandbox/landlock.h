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
  bool error = false;  ///< the answer was none of the documented ones: treat as a failure
};

/// Asks the kernel (landlock_create_ruleset's version query). ENOSYS or EOPNOTSUPP: the kernel
/// has none or has it disabled; EPERM: a system call filter refuses it (systemd-nspawn's
/// default filter does). None of these is an error: the caller decides what to do without it.
/// Any other answer is (`error`): the helper then refuses to run.
LandlockSupport probe_landlock();

/// Without Landlock, a root daemon's helper is walled in by its uid of its own alone: the range
/// [first, first + count) must hold no account. Empty when it holds none, else what it holds
/// (a range below 65536, where Debian's users and nobody are, or a passwd or group entry in it).
std::string accounts_in_range(unsigned first, unsigned count);

/// One line on how helpers are confined given `landlock`, whether they run as a uid of their
/// own and (for those) what accounts_in_range found: "full: ...", "degraded: ..." or
/// "unusable: ..." (the D-Bus property HelperSandbox; an unusable sandbox refuses installs).
std::string describe_confinement(const LandlockSupport& landlock, bool own_uid,
                                 const std::string& ids_taken = "");

}  // namespace upgraded::sandbox
