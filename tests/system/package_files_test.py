#!/usr/bin/python3
"""The .deb and the RPM that scripts/package put in dist/ ship the same files (issue: packaging).

What may differ, and only that: the system unit's directory (Debian 12 ships units in
/lib/systemd/system, Fedora in /usr/lib/systemd/system), the man pages' compression, Debian's
changelog.gz and copyright in the doc directory, the RPM's /usr/lib/.build-id links, and the library
directory (/usr/lib/<multiarch> on Debian, /usr/lib64 in the RPM).

usage: package_files_test.py DIST_DIR"""
import glob
import os
import subprocess
import sys
import unittest

DIST = sys.argv[1] if len(sys.argv) > 1 else "dist"
DEB_LIBDIR = "/usr/lib/" + subprocess.run(["dpkg-architecture", "-qDEB_HOST_MULTIARCH"],
                                         capture_output=True, text=True).stdout.strip()


def deb_files(path):
    out = subprocess.run(["dpkg-deb", "--fsys-tarfile", path], capture_output=True, check=True)
    names = subprocess.run(["tar", "-t"], input=out.stdout, capture_output=True,
                           check=True).stdout.decode().split("\n")
    return {"/" + n.lstrip("./").rstrip("/") for n in names if n.strip("./")}


def rpm_files(path):
    out = subprocess.run(["rpm", "-qlp", path], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def normalize(paths):
    out = set()
    for p in paths:
        if p.startswith("/usr/lib/.build-id"):
            continue
        if p in ("/usr/share/doc/upgraded/changelog.gz", "/usr/share/doc/upgraded/copyright"):
            continue
        if p == "/lib" or p.startswith("/lib/"):
            p = "/usr" + p
        for libdir in (DEB_LIBDIR, "/usr/lib64"):
            if (p + "/").startswith(libdir + "/"):
                p = "/usr/LIBDIR" + p[len(libdir):]
        if p.startswith("/usr/share/man/") and p.endswith(".gz"):
            p = p[:-3]
        out.add(p)
    # Directories both imply; only the files and the package's own directories count.
    return {p for p in out if not any(q.startswith(p + "/") for q in out) or
            p in ("/etc/upgraded/keys.d", "/var/lib/upgraded")}


class PackageFiles(unittest.TestCase):
    def test_the_deb_and_the_rpm_ship_the_same_files(self):
        debs = glob.glob(os.path.join(DIST, "upgraded_*.deb"))
        rpms = [p for p in glob.glob(os.path.join(DIST, "upgraded-*.rpm")) if "debug" not in p]
        if not debs or not rpms:
            msg = "no packages in %s: run scripts/package first" % DIST
            if os.environ.get("CI") == "true":
                self.fail(msg)
            raise unittest.SkipTest(msg)
        deb, rpm = normalize(deb_files(debs[0])), normalize(rpm_files(rpms[0]))
        self.assertEqual(sorted(deb - rpm), [], "only in the .deb")
        self.assertEqual(sorted(rpm - deb), [], "only in the RPM")
        for must in ("/usr/sbin/upgraded", "/usr/bin/upgradectl",
                     "/usr/LIBDIR/upgraded/upgradectl-bus.so",
                     "/usr/LIBDIR/upgraded/upgradectl-artifact.so",
                     "/usr/libexec/upgraded/upgraded-extract",
                     "/usr/lib/systemd/system/upgraded.service",
                     "/usr/share/dbus-1/system.d/org.upgraded1.conf",
                     "/usr/share/dbus-1/system-services/org.upgraded1.service",
                     "/usr/share/polkit-1/actions/org.upgraded1.policy",
                     "/usr/share/man/man8/upgraded.8",
                     "/usr/share/bash-completion/completions/upgradectl"):
            self.assertIn(must, deb)
        print("%d paths, the same in both" % len(deb), file=sys.stderr)


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"])
