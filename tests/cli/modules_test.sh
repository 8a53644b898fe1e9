#!/usr/bin/env bash
# upgradectl's modules (docs/architecture.md, "upgradectl's modules"): each verb loads only the
# libraries it needs, a missing or foreign module is a clear error (exit 1) that changes
# nothing, and the command lines work without any module.
set -uo pipefail
. "$(dirname "$(realpath "${BASH_SOURCE[0]}")")/../support/checks.sh"
U=$(realpath "${1:?usage: modules_test.sh UPGRADECTL BUS ARTIFACT WRONG_INTERFACE WRONG_SIZE NO_ENTRY CONFIGURED_DIR}")
BUS=$(realpath "$2")
ART=$(realpath "$3")
WRONG_INTERFACE=$(realpath "$4")
WRONG_SIZE=$(realpath "$5")
NO_ENTRY=$(realpath "$6")
CONFIGURED=$7
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
cd "$T"

# The shared objects a run maps, from the dynamic loader's own account.
loaded() {  # loaded COMMAND... -> one file name per line
  LD_DEBUG=files "$@" 2>&1 >/dev/null | sed -n 's/.*file=\([^ ]*\) .*\[0\];  *needed by.*/\1/p;
    s/.*file=\([^ ]*\) .*\[0\];  *dynamically loaded by.*/\1/p' | sort -u
}

mkdir -p root/etc/upgraded/keys.d root/var/lib/upgraded
"$U" keygen --private k.key --public root/etc/upgraded/keys.d/k.pem >/dev/null || exit 1
mkdir tree && echo hi >tree/f
"$U" pack --key k.key --app a --version 1.0.0 -o a.upd tree >/dev/null || exit 1

# What each verb loads, with the modules of the build. The C and C++ runtimes only (and the
# sanitizers' in a sanitizer build):
runtime='^(libstdc\+\+\.so\.6|libm\.so\.6|libgcc_s\.so\.1|libc\.so\.6|libasan\.so\.[0-9]+|libubsan\.so\.[0-9]+)$'
loaded "$U" --version >v.txt
expect "--version loads something" test -s v.txt
expect "--version loads the C and C++ runtimes only" bash -c "! grep -Evq '$runtime' v.txt"
loaded "$U" list --offline --root root >l.txt
expect "list --offline loads the C and C++ runtimes only" bash -c "! grep -Evq '$runtime' l.txt"
loaded "$U" verify --keys root/etc/upgraded/keys.d a.upd >a.txt
expect "verify loads the artifact module and its libraries" \
  bash -c 'grep -q upgradectl-artifact.so a.txt && grep -q libarchive a.txt && grep -q libcrypto a.txt'
expect "verify loads neither the bus module nor sd-bus" \
  bash -c '! grep -Eq "upgradectl-bus|libsdbus|libsystemd" a.txt'
DBUS_SESSION_BUS_ADDRESS=unix:path=$T/no-bus loaded "$U" status --user >b.txt
expect "status loads the bus module and sdbus-c++" \
  bash -c 'grep -q upgradectl-bus.so b.txt && grep -q libsdbus-c++ b.txt'
expect "status loads neither the artifact module nor libarchive" \
  bash -c '! grep -Eq "upgradectl-artifact|libarchive|libcrypto" b.txt'

# The same executable, alone: it looks for its modules relative to itself, and only there.
mkdir -p alone/cli
cp "$U" alone/cli/upgradectl
check "--version without modules" 0 alone/cli/upgradectl --version
check "--help without modules" 0 alone/cli/upgradectl --help
expect "--help lists the verbs of both modules" \
  bash -c 'grep -q "verify" out.txt && grep -q "rollback" out.txt'
check "list --offline without modules" 0 alone/cli/upgradectl list --offline --root root
check "verify without its module" 1 alone/cli/upgradectl verify --keys root/etc/upgraded/keys.d a.upd
expect "says which module, where, and what to do" \
  bash -c 'grep -q "cannot load its module .*alone/cli/.*upgradectl-artifact.so" err.txt && grep -q "reinstall upgraded" err.txt'
check "install --offline without its module" 1 \
  alone/cli/upgradectl install --offline --root root a.upd
expect "nothing installed" test ! -e root/var/lib/upgraded/apps/a/state.json
check "status without its module" 1 alone/cli/upgradectl status --user
expect "names the bus module" grep -q "upgradectl-bus.so" err.txt
check "a usage error is still one without modules" 2 alone/cli/upgradectl verify

# Without procfs (a chroot without /proc): the configured directory, never the relative one.
if [ "$(id -u)" -eq 0 ] && unshare -m true 2>/dev/null; then
  check "status without /proc" 1 unshare -m sh -c \
    'mount -t tmpfs none /proc && exec "$1" status --user' sh "$PWD/alone/cli/upgradectl"
  expect "looks in the configured directory" grep -q "$CONFIGURED/upgradectl-bus.so" err.txt
elif [ "${CI:-}" = true ]; then
  echo "FAIL: the test without /proc needs root and unshare (CI runs as root)"
  failed=$((failed + 1))
else
  echo "SKIP: the test without /proc: needs root and unshare -m"
fi

# Next to it, laid out as in the build: a module from another build, and a file that is not one.
rel=$(realpath --relative-to="$(dirname "$U")" "$(dirname "$BUS")")
mkdir -p "alone/cli/$rel"
head -c 4096 /dev/zero | tr "\\0" x >"alone/cli/$rel/upgradectl-artifact.so"  # not an ELF file
for wrong in "$WRONG_INTERFACE" "$WRONG_SIZE" "$NO_ENTRY"; do
  cp "$wrong" "alone/cli/$rel/upgradectl-bus.so"
  check "a module from another build: $(basename "$wrong")" 1 alone/cli/upgradectl status --user
  expect "is refused, by name: $(basename "$wrong")" \
    grep -q "upgradectl-bus.so is not from the same build as upgradectl" err.txt
done
chmod g+w "alone/cli/$rel/upgradectl-artifact.so"
check "a module others may write" 1 alone/cli/upgradectl verify --keys root/etc/upgraded/keys.d a.upd
expect "is refused, with why" grep -q "upgradectl-artifact.so is writable by others" err.txt
chmod g-w "alone/cli/$rel/upgradectl-artifact.so"
check "a module that is not one" 1 alone/cli/upgradectl install --offline --root root a.upd
expect "dlopen's reason" grep -q "cannot load its module .*upgradectl-artifact.so: .*invalid ELF header" err.txt
expect "nothing installed" test ! -e root/var/lib/upgraded/apps/a/state.json
# The real ones, copied there: found relative to the executable.
cp "$BUS" "$ART" "alone/cli/$rel/"
check "install --offline with the modules next to it" 0 \
  alone/cli/upgradectl install --offline --root root --force -q a.upd
check "list --offline" 0 alone/cli/upgradectl list --offline --root root
expect "lists it" grep -q "^a  *1.0.0" out.txt

report modules
