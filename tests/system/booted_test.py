#!/usr/bin/python3
"""The package on a booted Debian 12 system, tried as an admin would (issue: packaging).

A container boots with PID 1 systemd, the system bus, journald and polkitd; the .deb from
scripts/package is installed with apt; the daemon runs as the system service, under its unit's
sandbox and the container's system call filter. Everything runs twice: under systemd-nspawn's
default filter, which refuses Landlock with EPERM (the helpers fall back to their uid of their
own) and, with Landlock let through, under the full sandbox. The unit's RestrictSUIDSGID= makes
openat2 fail with ENOSYS in both (the store and the extractor walk paths instead).

usage: booted_test.py DIST_DIR UPGRADECTL
Skips (exit 77) where no container can boot, but fails under CI=true."""
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import booted  # noqa: E402

DIST, UPGRADECTL = sys.argv[1], sys.argv[2]
HERE = os.path.dirname(os.path.abspath(__file__))
ART = "/mnt/art"  # the artifacts and packages, bound read-only into the container
POLKIT_RULE = """polkit.addRule(function(action, subject) {
  if (action.id.indexOf("org.upgraded1.") == 0 && subject.isInGroup("upgraders"))
    return polkit.Result.YES;
});
"""
MESSAGE_IDS = {"a4df541d27ff4d618a82f85c0f76ea2c",  # started
               "3a4c784a76bb409db397595cf85c1aef",  # job started
               "1f2fcc52544e4b45aabc7375fecd86e1",  # job done
               "05d57eb598f74f1fb0008931923c7fbc"}  # rolled back automatically


def build_app_deb(work, name, version, artifact):
    """A package that carries a release and hands it to the daemon from its postinst
    (docs/package-hooks.md)."""
    root = os.path.join(work, "deb-%s-%s" % (name, version))
    share = os.path.join(root, "usr/share", name)
    os.makedirs(share)
    shutil.copy(artifact, share)
    os.makedirs(os.path.join(root, "DEBIAN"))
    with open(os.path.join(root, "DEBIAN/control"), "w") as f:
        f.write("Package: %s\nVersion: %s\nArchitecture: all\nMaintainer: test <t@example.org>\n"
                "Depends: upgraded\nDescription: hello, as a release handed to upgraded\n" %
                (name, version))
    with open(os.path.join(root, "DEBIAN/postinst"), "w") as f:
        f.write("#!/bin/sh\nset -e\nif [ \"$1\" = configure ]; then\n"
                "  upgradectl install --wait /usr/share/%s/%s || [ $? -eq 9 ]\nfi\n" %
                (name, os.path.basename(artifact)))
    os.chmod(os.path.join(root, "DEBIAN/postinst"), 0o755)
    out = os.path.join(work, "%s_%s_all.deb" % (name, version))
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", root, out], check=True,
                   stdout=subprocess.DEVNULL)
    return out


class Booted(unittest.TestCase):
    variant = None  # the container's --system-call-filter addition

    @classmethod
    def setUpClass(cls):
        debs = glob.glob(os.path.join(DIST, "upgraded_*.deb"))
        if not debs:
            msg = "no .deb in %s: run scripts/package first" % DIST
            booted.skip_or_fail(msg)
        cls.work = tempfile.mkdtemp(prefix="upgraded-booted-art.", dir="/var/tmp")
        os.chmod(cls.work, 0o755)
        key = os.path.join(cls.work, "release.key")
        subprocess.run([UPGRADECTL, "keygen", "--private", key, "--public",
                        os.path.join(cls.work, "release.pem")], check=True,
                       stdout=subprocess.DEVNULL)
        for v in ("1.0.0", "2.0.0", "4.0.0", "5.0.0"):
            booted.build_hello(UPGRADECTL, cls.work, key, v)
        booted.build_hello(UPGRADECTL, cls.work, key, "3.0.0", broken=True)
        booted.build_hello(UPGRADECTL, cls.work, key, "6.0.0", broken=True)
        build_app_deb(cls.work, "hello-app", "4.0", os.path.join(cls.work, "hello-4.0.0.upd"))
        build_app_deb(cls.work, "hello-app", "6.0", os.path.join(cls.work, "hello-6.0.0.upd"))
        shutil.copy(debs[0], os.path.join(cls.work, "upgraded.deb"))
        cls.c = booted.Container("upgraded-" + cls.name_suffix, cls.variant,
                                 binds=[(cls.work, ART)])
        try:
            cls.c.boot()
        except booted.Unavailable as e:
            cls.c.poweroff()
            shutil.rmtree(cls.work, ignore_errors=True)
            booted.skip_or_fail(str(e))
        try:
            c = cls.c
            # Its dependencies are in the image: apt needs no network for them.
            c.run(["apt-get", "install", "-y", ART + "/upgraded.deb"])
            c.write("/etc/upgraded/keys.d/release.pem",
                    open(os.path.join(cls.work, "release.pem")).read())
            c.write("/etc/systemd/system/hello.service", booted.HELLO_UNIT)
            c.run(["systemctl", "daemon-reload"])
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            cls.c.poweroff()
        finally:
            shutil.rmtree(cls.work, ignore_errors=True)

    # --- helpers ------------------------------------------------------------------------------

    def ctl(self, *args, user=None, check=True):
        return self.c.run(["upgradectl"] + list(args), user=user, check=check)

    def serving(self):
        return self.c.run(["cat", "/run/hello.state"], check=False).stdout.strip()

    def invocation(self, unit):
        return self.c.run(["systemctl", "show", "-P", "InvocationID", unit]).stdout.strip()

    def current(self):
        return self.c.run(["readlink", "/var/lib/upgraded/apps/hello/current"],
                          check=False).stdout.strip()

    def journal(self, *args):
        out = self.c.run(["journalctl", "-o", "json", "--no-pager"] + list(args)).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    # --- the tests, in order (one container for all) ------------------------------------------

    def test_1_the_package_starts_a_service_as_exposed_as_the_unit_says(self):
        self.assertEqual(self.c.run(["systemctl", "is-active", "upgraded"],
                                    check=False).stdout.strip(), "active")
        inside = self.c.run(["systemd-analyze", "security", "--no-pager", "upgraded"]).stdout
        offline = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                                  os.path.join(HERE, "../../units/upgraded.service")],
                                 capture_output=True, text=True).stdout
        score = lambda text: text.strip().splitlines()[-1].split(":")[1].split()[0]
        self.assertEqual(score(inside), score(offline), inside)
        self.assertLessEqual(float(score(inside)), 1.5)

    def test_2_installs_upgrades_rolls_back_and_collects_under_the_sandbox(self):
        self.ctl("install", ART + "/hello-1.0.0.upd")
        self.assertEqual(self.serving(), "1.0.0")
        self.ctl("install", ART + "/hello-2.0.0.upd")
        self.assertEqual(self.serving(), "2.0.0")
        before = self.invocation("hello.service")
        broken = self.ctl("install", ART + "/hello-3.0.0.upd", check=False)
        self.assertNotEqual(broken.returncode, 0)
        self.assertIn("rolled back to 2.0.0", broken.stdout + broken.stderr)
        self.assertEqual(self.current(), "releases/2.0.0")
        self.assertEqual(self.serving(), "2.0.0")
        self.assertNotEqual(self.invocation("hello.service"), before, "restarted on 2.0.0")
        self.ctl("rollback", "hello")
        self.assertEqual(self.current(), "releases/1.0.0")
        self.assertEqual(self.serving(), "1.0.0")
        again = self.ctl("install", ART + "/hello-2.0.0.upd", check=False)
        self.assertEqual(again.returncode, 9, "already installed: " + again.stderr)
        self.ctl("activate", "hello", "2.0.0")
        self.assertEqual(self.serving(), "2.0.0")
        self.ctl("gc", "hello")
        self.assertEqual(self.current(), "releases/2.0.0")
        # The daemon's own messages (systemd's about the unit aside: in a container it cannot set
        # up PrivateNetwork='s loopback device, and says so).
        log = self.c.run(["journalctl", "-u", "upgraded", "-t", "upgraded", "--no-pager"]).stdout
        for bad in ("Operation not permitted", "Function not implemented", "Permission denied",
                    "terminate called"):
            self.assertNotIn(bad, log)
        sandbox = self.c.run(["busctl", "get-property", "org.upgraded1", "/org/upgraded1",
                              "org.upgraded1.Manager", "HelperSandbox"]).stdout
        self.assertIn(self.expected_sandbox, sandbox)
        # The listing through the unit's sandbox: a sealed memfd reopened via /proc/self/fd
        # (ProcSubset=pid) and passed over the system bus.
        r = self.ctl("list", "--json")
        self.assertNotIn("ListAllReleases", r.stderr, "the memfd, not the fallback")
        listed = json.loads(r.stdout)
        self.assertEqual([(r["app"], r["version"]) for r in listed if r["role"] == "current"],
                         [("hello", "2.0.0")])
        status = self.ctl("status")
        if self.expected_sandbox == "degraded":
            self.assertIn("note: the extraction helpers' sandbox is degraded", status.stderr)
        else:
            self.assertNotIn("sandbox", status.stderr)

    def test_3_the_first_call_starts_a_stopped_daemon(self):
        self.c.run(["systemctl", "stop", "upgraded"])
        self.assertNotEqual(self.c.run(["systemctl", "is-active", "upgraded"],
                                       check=False).stdout.strip(), "active")
        out = self.ctl("status").stdout
        self.assertIn("hello", out)
        self.assertEqual(self.c.run(["systemctl", "is-active", "upgraded"],
                                    check=False).stdout.strip(), "active")

    def test_4_a_user_is_refused_unless_polkit_grants_the_group(self):
        self.c.run(["useradd", "-m", "alice"])
        self.c.run(["groupadd", "upgraders"])
        self.c.run(["useradd", "-m", "-G", "upgraders", "bob"])
        before = self.c.run(["find", "/var/lib/upgraded", "-printf", "%p %s %m\n"]).stdout
        alice = self.ctl("install", ART + "/hello-4.0.0.upd", user="alice", check=False)
        self.assertEqual(alice.returncode, 7, alice.stdout + alice.stderr)
        # Reading is open to every user: the listing's descriptor reaches alice.
        r = self.ctl("list", user="alice")
        self.assertIn("hello", r.stdout)
        self.assertNotIn("ListAllReleases", r.stderr, "the memfd, not the fallback")
        self.assertEqual(self.c.run(["find", "/var/lib/upgraded", "-printf",
                                     "%p %s %m\n"]).stdout, before)
        self.c.write("/etc/polkit-1/rules.d/50-upgraders.rules", POLKIT_RULE)
        self.c.run(["systemctl", "reload-or-restart", "polkit"], check=False)
        bob = self.ctl("install", ART + "/hello-5.0.0.upd", user="bob", check=False)
        self.assertEqual(bob.returncode, 0, bob.stdout + bob.stderr)
        self.assertEqual(self.serving(), "5.0.0")

    def test_5_journald_has_the_fields_and_message_ids(self):
        records = self.journal("-u", "upgraded")
        hello = [r for r in records if r.get("UPGRADED_APP") == "hello"]
        self.assertTrue(hello)
        self.assertTrue(any(r.get("UPGRADED_VERSION") for r in hello))
        self.assertTrue(any(r.get("UPGRADED_JOB") for r in hello))
        ids = {r.get("MESSAGE_ID") for r in records}
        self.assertLessEqual(MESSAGE_IDS, ids)
        self.assertEqual(self.journal("UPGRADED_APP=hello",
                                      "MESSAGE_ID=05d57eb598f74f1fb0008931923c7fbc")[0]
                         ["UPGRADED_VERSION"], "3.0.0")

    def test_6_an_app_package_upgrades_the_service_from_its_postinst(self):
        self.ctl("activate", "hello", "2.0.0")
        self.c.run(["apt-get", "install", "-y",
                    ART + "/hello-app_4.0_all.deb"])
        self.assertEqual(self.serving(), "4.0.0")
        self.assertEqual(self.current(), "releases/4.0.0")
        broken = self.c.run(["apt-get", "install", "-y",
                             ART + "/hello-app_6.0_all.deb"], check=False)
        self.assertNotEqual(broken.returncode, 0, "the postinst fails after the rollback")
        self.assertIn("rolled back to 4.0.0", broken.stdout + broken.stderr)
        self.assertEqual(self.current(), "releases/4.0.0")
        self.assertEqual(self.serving(), "4.0.0")
        self.c.run(["dpkg", "--purge", "hello-app"], check=False)

    def test_7_removing_the_package_keeps_the_apps_running_and_reinstalling_finds_them(self):
        before = self.invocation("hello.service")
        releases = self.c.run(["ls", "/var/lib/upgraded/apps/hello/releases"]).stdout
        self.c.run(["apt-get", "remove", "-y", "upgraded"])
        self.assertNotEqual(self.c.run(["systemctl", "is-active", "upgraded"],
                                       check=False).stdout.strip(), "active")
        self.assertEqual(self.invocation("hello.service"), before, "the app kept running")
        self.assertEqual(self.c.run(["ls", "/var/lib/upgraded/apps/hello/releases"]).stdout,
                         releases)
        self.assertEqual(self.current(), "releases/4.0.0")
        self.c.run(["apt-get", "install", "-y", ART + "/upgraded.deb"])
        self.assertEqual(self.c.run(["systemctl", "is-active", "upgraded"],
                                    check=False).stdout.strip(), "active")
        status = json.loads(self.ctl("status", "--json").stdout)
        self.assertEqual([(a["app"], a["current"]) for a in status], [("hello", "4.0.0")])
        history = self.ctl("history", "hello").stdout
        self.assertIn("3.0.0", history)
        self.ctl("activate", "hello", "5.0.0")
        self.assertEqual(self.serving(), "5.0.0")


class DefaultFilter(Booted):
    """systemd-nspawn's default system call filter: Landlock is refused (EPERM)."""
    variant = None
    name_suffix = "default"
    expected_sandbox = "degraded"


class LandlockAllowed(Booted):
    """The same with the Landlock calls let through: the helpers' full sandbox."""
    variant = booted.LANDLOCK_CALLS
    name_suffix = "landlock"
    expected_sandbox = "full"


del Booted  # only the two variants run

if __name__ == "__main__":
    result = unittest.main(argv=[sys.argv[0], "-v"], exit=False).result
    if result.wasSuccessful() and len(result.skipped) == result.testsRun and result.testsRun:
        sys.exit(77)
    sys.exit(0 if result.wasSuccessful() else 1)
