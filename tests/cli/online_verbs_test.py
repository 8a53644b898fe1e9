#!/usr/bin/python3
"""upgradectl's verbs that talk to the daemon, end to end on the real-systemd testbed: output
for people and --json, and the documented exit codes.

    tests/testbed/with-systemd-user tests/cli/online_verbs_test.py UPGRADED UPGRADECTL

Needs UPGRADED_TESTBED_OPEN_BUS=1 (a caller running as nobody).
"""

import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../support"))
from sample_service import (TIME_FACTOR, DaemonRunner, Instance, pack_sample,  # noqa: E402
                            wait_for_content)

UPGRADED, UPGRADECTL = sys.argv[1], sys.argv[2]
TESTBED = os.environ["UPGRADED_TESTBED"]
UNITS_DIR = os.environ["UPGRADED_TESTBED_UNITS"]


def upgradectl_for_nobody():
    """A copy of upgradectl and its modules, laid out as in the build (cli/verbs.h), that nobody
    can read: the build tree may be in a directory only its owner can enter."""
    modules = os.environ.get("UPGRADECTL_MODULES")
    if not modules:
        return UPGRADECTL
    top = os.path.join(TESTBED, "nobody-upgradectl")
    bindir = os.path.join(top, "bin")
    copy = os.path.join(bindir, os.path.basename(UPGRADECTL))
    if not os.path.exists(copy):
        moddir = os.path.normpath(os.path.join(
            bindir, os.path.relpath(modules, os.path.dirname(os.path.realpath(UPGRADECTL)))))
        for d in (top, bindir, moddir):
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o755)
        for m in ("upgradectl-bus.so", "upgradectl-artifact.so"):
            shutil.copy(os.path.join(modules, m), moddir)
        shutil.copy(UPGRADECTL, copy)
    return copy


# A stand-in owning org.upgraded1 on the session bus (argv: mode, file): its
# ListAllReleasesByFileDescriptor hands over the file's bytes in a sealed memfd ("sealed"), an
# unsealed one ("unsealed") or a pipe ("pipe"), an emptied listing ("empty"), or fails with
# org.upgraded1.Error.<mode> ("Failed", "Busy"); "old" has only the typed ListAllReleases, as a
# daemon from before the method.
FAKE_DAEMON = r"""
import fcntl, os, sys
import dbus, dbus.service
from dbus.mainloop.glib import DBusGMainLoop
from gi.repository import GLib
mode, path = sys.argv[1], sys.argv[2]
DBusGMainLoop(set_as_default=True)
bus = dbus.SessionBus()
name = dbus.service.BusName("org.upgraded1", bus, do_not_queue=True)

class Manager(dbus.service.Object):
    @dbus.service.method("org.upgraded1.Manager", out_signature="a(sssssbtb)")
    def ListAllReleases(self):
        # A time that would clear the screen, printed or not.
        return [("old", "9.9.9", "good", "current", "2026-01-01\x1b[2J", False, 1, False)]

class Listing(Manager):
    @dbus.service.method("org.upgraded1.Manager", out_signature="h")
    def ListAllReleasesByFileDescriptor(self):
        if mode in ("Failed", "Busy"):
            raise dbus.exceptions.DBusException("no listing", name="org.upgraded1.Error." + mode)
        data = open(path, "rb").read() if mode != "empty" else b""
        if mode == "pipe":
            r, w = os.pipe()
            os.write(w, data)
            os.close(w)
            return dbus.types.UnixFd(r)
        fd = os.memfd_create("listing", os.MFD_ALLOW_SEALING)
        os.write(fd, data)
        if mode in ("sealed", "empty"):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK |
                        fcntl.F_SEAL_GROW)
        return dbus.types.UnixFd(fd)

(Manager if mode == "old" else Listing)(bus, "/org/upgraded1")
print("ready", flush=True)
GLib.MainLoop().run()
"""


class OnlineVerbs(DaemonRunner, unittest.TestCase):
    upgraded, upgradectl = UPGRADED, UPGRADECTL
    app = "hello"

    def setUp(self):
        inst = Instance(UPGRADECTL, TESTBED, UNITS_DIR, self.app)
        self.dir, self.root, self.key = inst.dir, inst.root, inst.key
        self.out, self.unit = inst.out, inst.unit
        self.daemon = None

    def tearDown(self):
        self.stop_daemon()
        subprocess.run(["systemctl", "--user", "stop", self.unit], check=False)
        subprocess.run(["systemctl", "--user", "reset-failed", self.unit], check=False,
                       stderr=subprocess.DEVNULL)
        os.unlink(os.path.join(UNITS_DIR, self.unit))
        shutil.rmtree(self.dir, ignore_errors=True)

    def ctl(self, *args, user=True, check=0, as_nobody=False):
        cmd = [UPGRADECTL, *args] + (["--user"] if user else [])
        if as_nobody:
            cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                   upgradectl_for_nobody()] + cmd[1:]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if check is not None:
            self.assertEqual(r.returncode, check, "%s\nstdout: %s\nstderr: %s" %
                             (" ".join(args), r.stdout, r.stderr))
        self.assertNotIn("\033", r.stdout + r.stderr, "no colour when not on a terminal")
        return r

    def pack(self, version, fail=False, min_ready_s=1):
        return pack_sample(UPGRADECTL, self.key, self.dir, self.app, self.unit, version, fail,
                           min_ready_s)

    def serving(self, expect):
        """What the service wrote, once it wrote `expect` (bounded)."""
        return wait_for_content(self.out, expect)

    def test_every_verb_its_output_and_its_exit_code(self):
        # No daemon: exit 6 and what to do.
        r = self.ctl("status", check=6)
        self.assertIn("upgraded --user", r.stderr)
        self.start_daemon()
        self.assertIn("No apps are installed", self.ctl("status").stdout)

        r = self.ctl("install", self.pack("1.0.0"))
        self.assertIn("install", r.stderr)
        self.assertIn("health gate", r.stderr, "plain progress lines when not on a terminal")
        self.assertEqual(self.serving("1.0.0"), "1.0.0")
        # Its health gate keeps its activation below running through the next two calls.
        self.ctl("install", "--stage-only", "-q", self.pack("2.0.0", min_ready_s=TIME_FACTOR))
        self.assertEqual(self.serving("1.0.0"), "1.0.0")

        releases = json.loads(self.ctl("list", "--json").stdout)
        self.assertEqual([(r["version"], r["status"], r["role"]) for r in releases],
                         [("1.0.0", "good", "current"), ("2.0.0", "staged", "")])
        self.assertEqual(set(releases[0]),
                         {"app", "version", "status", "role", "staged_at", "pinned", "size",
                          "pre_finalized"})
        table = self.ctl("list", self.app).stdout.splitlines()
        self.assertEqual(table[0].split(), ["APP", "VERSION", "STATUS", "ROLE", "STAGED",
                                            "PINNED", "SIZE"])
        self.assertEqual(len(table), 3)
        status = json.loads(self.ctl("status", "--json").stdout)
        self.assertEqual(status, [{"app": self.app, "current": "1.0.0", "previous": "",
                                   "last_known_good": "1.0.0", "floor": "",
                                   "finalization": "finalized", "finalized_data_format": 0,
                                   "job": ""}])
        self.ctl("status", "nosuch", check=8)

        # --no-block prints the job; a second job for the app is busy (5).
        job = self.ctl("activate", self.app, "2.0.0", "--no-block").stdout.strip()
        self.assertRegex(job, r"^/org/upgraded1/job/\d+$")
        jobs = json.loads(self.ctl("jobs", "--json").stdout)
        self.assertEqual([(j["type"], j["app"], j["version"], j["path"]) for j in jobs],
                         [("activate", self.app, "2.0.0", job)])
        r = self.ctl("rollback", self.app, check=5)
        self.assertIn("busy", r.stderr)
        for _ in range(300):
            if not json.loads(self.ctl("jobs", "--json").stdout):
                break
            time.sleep(0.05)
        self.assertEqual(self.serving("2.0.0"), "2.0.0")

        # A release that fails its health gate: exit 1, rolled back, then refused as bad (3).
        r = self.ctl("install", self.pack("3.0.0", fail=True), check=1)
        self.assertIn("health gate", r.stderr)
        self.assertIn("rolled back to 2.0.0", r.stderr)
        r = self.ctl("activate", self.app, "3.0.0", check=3)
        self.assertIn("marked bad", r.stderr)
        self.ctl("activate", self.app, "9.9.9", check=8)
        self.ctl("remove", self.app, "2.0.0", check=3)  # the current release

        self.ctl("rollback", self.app)
        self.assertEqual(self.serving("1.0.0"), "1.0.0")
        history = json.loads(self.ctl("history", self.app, "--json").stdout)
        self.assertEqual([(h["op"], h["to"], h["result"]) for h in history],
                         [("activate", "1.0.0", "done"), ("activate", "2.0.0", "done"),
                          ("activate", "3.0.0", "rolled-back"), ("rollback", "1.0.0", "done")])
        self.assertGreater(history[1]["downtime_usec"][self.unit], 0)
        self.assertEqual(len(json.loads(self.ctl("history", self.app, "-n", "2",
                                                 "--json").stdout)), 2)
        self.assertIn("rolled-back", self.ctl("history", self.app).stdout)
        self.ctl("remove", self.app, "3.0.0")
        self.assertNotIn("3.0.0", self.ctl("list").stdout)

        # pin, unpin, gc: a pinned release survives remove (3) and gc.
        self.ctl("install", "--stage-only", "-q", self.pack("5.0.0"))
        self.ctl("install", "--stage-only", "-q", self.pack("6.0.0"))
        self.ctl("pin", self.app, "5.0.0", "-q")
        pinned = {r["version"]: r["pinned"] for r in json.loads(self.ctl("list", "--json").stdout)}
        self.assertEqual(pinned, {"1.0.0": False, "2.0.0": False, "5.0.0": True, "6.0.0": False})
        self.ctl("remove", self.app, "5.0.0", check=3)
        self.ctl("gc", self.app, "--keep", "1", "-q")
        left = [r["version"] for r in json.loads(self.ctl("list", "--json").stdout)]
        self.assertEqual(left, ["1.0.0", "2.0.0", "5.0.0"], "current, previous and pinned stay")
        self.ctl("unpin", self.app, "5.0.0", "-q")
        self.ctl("gc", self.app, "--keep", "1", "-q")
        left = [r["version"] for r in json.loads(self.ctl("list", "--json").stdout)]
        self.assertEqual(left, ["1.0.0", "2.0.0"])
        gc = [h for h in json.loads(self.ctl("history", self.app, "--json").stdout)
              if h["op"] == "gc"]
        self.assertIn("removed 6.0.0", gc[0]["message"])
        self.assertIn("removed 5.0.0", gc[1]["message"])

        # Verification failure (4), usage (2), an unknown job (8), and nobody (7).
        with open(self.pack("4.0.0"), "rb") as f:
            data = bytearray(f.read())
        data[700] ^= 1
        bad = os.path.join(self.dir, "bad.upd")
        with open(bad, "wb") as f:
            f.write(bytes(data))
        self.ctl("install", bad, check=4)
        self.ctl("activate", self.app, check=2)
        self.ctl("cancel", "999", check=8)
        r = self.ctl("rollback", self.app, check=7, as_nobody=True)
        self.assertIn("not authorized", r.stderr)
        self.assertIn("root", r.stderr)
        self.assertEqual(self.serving("1.0.0"), "1.0.0")

    def test_plan_shows_the_steps_and_predicted_downtime_and_changes_nothing(self):
        self.start_daemon()
        self.ctl("install", "-q", self.pack("1.0.0", min_ready_s=0))
        self.ctl("install", "-q", "--stage-only", self.pack("2.0.0", min_ready_s=0))

        def tree():
            out = {}
            for top, dirs, files in os.walk(self.root):
                for name in dirs + files:
                    path = os.path.join(top, name)
                    st = os.lstat(path)
                    out[path] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
            return out

        before, invocation = tree(), subprocess.run(
            ["systemctl", "--user", "show", "-P", "InvocationID", self.unit],
            capture_output=True, text=True, check=True).stdout
        r = self.ctl("plan", "hello=2.0.0")
        self.assertIn("Plan: activate hello 1.0.0 \u2192 2.0.0 (strategy all-at-once)", r.stdout)
        self.assertRegex(r.stdout, r"2 +restart hello\.service +hello\.service +\d+ s")
        self.assertIn("hello.service: no history", r.stdout)
        self.assertIn("If a step fails: 2.0.0 is marked bad; 1.0.0 comes back", r.stdout)
        # As nobody too: planning needs no authorization.
        plan = json.loads(self.ctl("plan", "hello=2.0.0", "--json", as_nobody=True).stdout)
        self.assertEqual(tree(), before, "a plan changes nothing")
        self.assertEqual(subprocess.run(
            ["systemctl", "--user", "show", "-P", "InvocationID", self.unit],
            capture_output=True, text=True, check=True).stdout, invocation)
        self.assertEqual((plan["format"], plan["from"], plan["to"], plan["changes"]),
                         (1, "1.0.0", "2.0.0", True))
        self.assertEqual([s["kind"] for s in plan["steps"]],
                         ["switch", "restart", "gate", "mark-good"])
        # With history: a prediction per unit and in total.
        for version in ("2.0.0", "1.0.0", "2.0.0", "1.0.0"):
            self.ctl("activate", "-q", self.app, version)
        plan = json.loads(self.ctl("plan", "hello=2.0.0", "--json").stdout)
        windows = [h["downtime_usec"][self.unit] for h in
                   json.loads(self.ctl("history", self.app, "--json").stdout)
                   if self.unit in h["downtime_usec"]]
        self.assertEqual(plan["downtime"][0]["samples"], len(windows))
        self.assertEqual(plan["predicted_total_usec"], plan["downtime"][0]["median_usec"])
        self.assertIn("windows)", self.ctl("plan", "hello=2.0.0").stdout)
        # Refusals are the plan, with the activation's exit code; usage errors are 2.
        r = self.ctl("plan", "hello=9.9.9", check=8)
        self.assertIn("no release 9.9.9 of hello", r.stderr)
        r = self.ctl("plan", "hello=1.0.0")
        self.assertIn("already current", r.stdout)
        self.ctl("activate", "-q", self.app, "2.0.0")
        self.ctl("install", "-q", "--stage-only", self.pack("3.0.0", fail=True))
        self.ctl("activate", "-q", self.app, "3.0.0", check=1)
        r = self.ctl("plan", "hello=3.0.0", check=3)
        self.assertIn("marked bad", r.stderr)
        self.assertEqual(json.loads(self.ctl("plan", "hello=3.0.0", "--json", check=3).stdout)
                         ["refusal"]["error"], "PolicyRefused")
        self.assertIn("rollback", self.ctl("plan", "--rollback", self.app).stdout)
        self.ctl("plan", "hello", check=2)
        self.ctl("plan", "--rollback", self.app, "--allow-bad", check=2)
        # Several: a set's plan (tests/integration/sets_test.py), each app checked.
        self.assertIn("no app 'other'",
                      self.ctl("plan", "hello=1.0.0", "other=1.0.0", check=8).stderr)
        self.ctl("plan", "hello=1.0.0", "other", check=2)
        self.ctl("plan", "hello=1.0.0", "other=1.0.0", "--through", check=2)
        self.ctl("plan", "hel/lo=1.0.0", check=2)
        self.ctl("plan", "nope=1.0.0", check=8)

    def test_the_version_floor_keeps_older_releases_out(self):
        self.start_daemon()
        self.ctl("install", "-q", self.pack("1.0.0"))
        self.ctl("install", "-q", self.pack("2.0.0"))
        self.ctl("install", "--stage-only", "-q", self.pack("1.5.0"))
        r = self.ctl("floor", self.app, "3.0.0", check=3)
        self.assertIn("activate a release at or above it first", r.stderr)
        self.ctl("floor", self.app, "2.0.0", "-q")
        status = json.loads(self.ctl("status", "--json").stdout)
        self.assertEqual(status[0]["floor"], "2.0.0")
        self.assertEqual(self.ctl("status").stdout.splitlines()[0].split(),
                         ["APP", "CURRENT", "PREVIOUS", "LAST", "GOOD", "FLOOR", "DATA", "FORMAT",
                          "JOB"])
        app_root = os.path.join(self.root, "var/lib/upgraded/apps", self.app)
        before = sorted(os.listdir(os.path.join(app_root, "releases")))

        # Below the floor: not installed, not activated, not rolled back to (exit 3), and the
        # service keeps running what it ran.
        r = self.ctl("install", self.pack("1.9.0"), check=3)
        self.assertIn("older than the version floor 2.0.0", r.stderr)
        r = self.ctl("activate", self.app, "1.5.0", check=3)
        self.assertIn("below the version floor 2.0.0", r.stderr)
        r = self.ctl("rollback", self.app, check=3)
        self.assertIn("1.0.0 is below the version floor 2.0.0", r.stderr)
        self.assertEqual(sorted(os.listdir(os.path.join(app_root, "releases"))), before)
        self.assertEqual(self.serving("2.0.0"), "2.0.0")
        # ... unless asked for explicitly.
        self.ctl("rollback", self.app, "--allow-below-floor", "-q")
        self.assertEqual(self.serving("1.0.0"), "1.0.0")
        self.ctl("activate", self.app, "2.0.0", "-q")

        # It only rises; the same floor again changes nothing; nobody may not raise it.
        r = self.ctl("floor", self.app, "1.0.0", check=3)
        self.assertIn("never goes down", r.stderr)
        self.ctl("floor", self.app, "2.00.0", "-q")
        self.ctl("floor", self.app, "2.0.0", check=7, as_nobody=True)
        floors = [(h["from"], h["to"]) for h in
                  json.loads(self.ctl("history", self.app, "--json").stdout) if h["op"] == "floor"]
        self.assertEqual(floors, [("", "2.0.0")])
        # Versions that compare equal are one release (finding 11): "2.00.0" is 2.0.0 (exit 9).
        r = self.ctl("install", self.pack("2.00.0"), check=9)
        self.assertIn("as 2.0.0", r.stderr)

    def offline(self, *args, check=0):
        """upgradectl as a package hook runs it in a chroot: no bus, no systemd, no daemon."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR")}
        r = subprocess.run([UPGRADECTL, *args, "--offline", "--root", self.root],
                           capture_output=True, text=True, env=env)
        self.assertEqual(r.returncode, check, "%s\n%s%s" % (args, r.stdout, r.stderr))
        return r

    def test_offline_install_defers_the_units_to_the_daemons_next_start(self):
        v1, v2 = self.pack("1.0.0"), self.pack("2.0.0")
        r = self.offline("install", v1)
        self.assertIn("Switched hello to 1.0.0", r.stdout)
        self.offline("install", "--stage-only", v2)
        releases = json.loads(self.offline("list", "--json").stdout)
        self.assertEqual([(r["version"], r["status"], r["role"]) for r in releases],
                         [("1.0.0", "active", "current"), ("2.0.0", "staged", "")])
        self.assertFalse(os.path.exists(self.out), "no unit was started")
        app_root = os.path.join(self.root, "var/lib/upgraded/apps", self.app)
        self.assertTrue(os.path.exists(os.path.join(app_root, "activation.json")))
        # A second offline activation keeps what the first one would fall back to.
        self.offline("install", self.pack("1.5.0"))
        with open(os.path.join(app_root, "activation.json")) as f:
            record = json.load(f)
        self.assertEqual((record["from"], record["to"]), ("", "1.5.0"))
        self.offline("install", "--stage-only", v1, check=9)  # already installed
        # Where systemd runs, --offline on / is refused: the daemon would not notice.
        r = subprocess.run([UPGRADECTL, "install", "--offline", v2], capture_output=True, text=True)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("systemd is running", r.stderr)
        # A tampered artifact: refused (4), nothing changes.
        with open(v2, "rb") as f:
            data = bytearray(f.read())
        data[len(data) // 2] ^= 1
        bad = os.path.join(self.dir, "bad.upd")
        with open(bad, "wb") as f:
            f.write(bytes(data))
        before = sorted(os.listdir(os.path.join(app_root, "releases")))
        self.offline("install", bad, check=4)
        self.assertEqual(sorted(os.listdir(os.path.join(app_root, "releases"))), before)

        # The daemon's first start finishes the activation: the unit runs 1.0.0, proven healthy.
        self.start_daemon()
        for _ in range(300):
            if not os.path.exists(os.path.join(app_root, "activation.json")):
                break
            time.sleep(0.05)
        self.assertEqual(self.serving("1.5.0"), "1.5.0")
        releases = {r["version"]: r["status"] for r in json.loads(self.ctl("list", "--json").stdout)}
        self.assertEqual(releases["1.5.0"], "good")
        history = json.loads(self.ctl("history", self.app, "--json").stdout)
        self.assertEqual((history[-1]["op"], history[-1]["result"]), ("recover", "done"))

    def test_parallel_offline_installs_never_meet_and_the_same_app_waits_bounded(self):
        src = os.path.join(self.dir, "tree")
        os.makedirs(src)
        with open(os.path.join(src, "f"), "w") as f:
            f.write("x")
        apps, versions = ["p%d" % i for i in range(8)], ["1.0.%d" % v for v in range(4)]
        arts = {}
        for a in apps:
            for v in versions:
                arts[a, v] = os.path.join(self.dir, "%s-%s.upd" % (a, v))
                subprocess.run([UPGRADECTL, "pack", "--key", self.key, "--app", a, "--version",
                                v, "-o", arts[a, v], src], check=True, stdout=subprocess.DEVNULL)
        env = {k: v for k, v in os.environ.items()
               if k not in ("DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR")}

        def install(*args):
            return subprocess.Popen([UPGRADECTL, "install", "--offline", "--root", self.root,
                                     "-q", *args], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        # Eight package hooks at once, one app each, each installing four releases in a row:
        # no install waits for or fails because of another app.
        for v in versions:
            procs = [install(arts[a, v]) for a in apps]
            for p in procs:
                out, err = p.communicate(timeout=120)
                self.assertEqual(p.returncode, 0, err)
        listing = json.loads(self.offline("list", "--json").stdout)
        self.assertEqual(sorted((r["app"], r["version"]) for r in listing),
                         sorted(arts))
        # Isolation, not luck: with one app's lock held, another app installs without waiting.
        with open(os.path.join(self.root, "var/lib/upgraded/apps/p0/.lock"), "r+") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            src1 = os.path.join(self.dir, "p1-8.upd")
            subprocess.run([UPGRADECTL, "pack", "--key", self.key, "--app", "p1", "--version",
                            "8.0.0", "-o", src1, src], check=True, stdout=subprocess.DEVNULL)
            self.offline("install", "-q", "--wait-lock", "0", src1)
        # The same app from two processes: the second waits for the lock, as long as it is
        # told to, then exits 5 having changed nothing.
        app_root = os.path.join(self.root, "var/lib/upgraded/apps/p0")
        extra = os.path.join(self.dir, "p0-2.upd")
        subprocess.run([UPGRADECTL, "pack", "--key", self.key, "--app", "p0", "--version",
                        "2.0.0", "-o", extra, src], check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(app_root, ".lock"), "r+") as holder:
            fcntl.flock(holder, fcntl.LOCK_EX)
            before = sorted(os.listdir(os.path.join(app_root, "releases")))
            t0 = time.monotonic()
            r = self.offline("install", "--wait-lock", "0.5", extra, check=5)
            self.assertGreaterEqual(time.monotonic() - t0, 0.5)
            self.assertIn("busy", r.stderr)
            self.assertIn("waited 0.5", r.stderr)
            self.assertEqual(sorted(os.listdir(os.path.join(app_root, "releases"))), before)
            # Released while it waits: it goes ahead.
            waiting = install(extra)
            time.sleep(0.5)
            self.assertIsNone(waiting.poll(), "it waits for the lock")
        out, err = waiting.communicate(timeout=60)
        self.assertEqual(waiting.returncode, 0, err)
        self.assertIn("2.0.0", os.listdir(os.path.join(app_root, "releases")))

        # A listing recovers nothing and writes nothing but its cache: an app an interrupted
        # install left behind is reported as such, and stays as it is until its next install.
        victim = os.path.join(self.root, "var/lib/upgraded/apps/p1")
        os.makedirs(os.path.join(victim, "releases/.partial.0badc0de/tree"))
        with open(os.path.join(victim, "journal.json"), "w") as f:
            json.dump({"op": "stage", "txid": "0badc0de", "versions": ["9.0.0"]}, f)

        def tree(d):
            return sorted((os.path.relpath(os.path.join(p, n), d), os.lstat(os.path.join(p, n)).st_mtime_ns)
                          for p, ds, fs in os.walk(d) for n in ds + fs if n != "views.cache")
        store = os.path.join(self.root, "var/lib/upgraded")
        before = tree(store)
        trace = os.path.join(self.dir, "list.trace")
        # LeakSanitizer cannot run under ptrace (a sanitizer build): leaks are checked elsewhere.
        traced_env = dict(env, ASAN_OPTIONS=env.get("ASAN_OPTIONS", "") + ":detect_leaks=0")
        r = subprocess.run(["strace", "-f", "-o", trace, "-e",
                            "trace=fsync,fdatasync,syncfs,sync,sync_file_range,flock",
                            UPGRADECTL, "list", "--offline", "--root", self.root],
                           env=traced_env, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("p1: an operation on it is in progress or was interrupted", r.stderr)
        with open(trace) as f:
            calls = [line for line in f if "(" in line and "+++" not in line]
        self.assertEqual(calls, [], "a listing syncs and locks nothing")
        self.assertEqual(tree(store), before)
        self.assertIn("p1", r.stdout)
        self.offline("install", "-q", os.path.join(self.dir, "p1-1.0.0.upd"), check=9)
        self.assertFalse(os.path.exists(os.path.join(victim, "journal.json")))
        self.assertFalse(os.path.exists(os.path.join(victim, "releases/.partial.0badc0de")))
        r = self.offline("list")
        self.assertNotIn("recovery", r.stderr)

    def test_colour_and_a_progress_bar_only_on_a_terminal_and_never_with_no_color(self):
        self.start_daemon()
        self.ctl("install", self.pack("1.0.0"))

        def on_tty(cmd, env=None):
            # script(1) gives the command a terminal and copies what it shows.
            return subprocess.run(["script", "-qec", " ".join(cmd), "/dev/null"],
                                  capture_output=True, text=True,
                                  env=dict(os.environ, **(env or {}))).stdout
        listing = on_tty([UPGRADECTL, "list", "--user"])
        self.assertIn("\033[32mgood\033[0m", listing)
        self.assertNotIn("\033[", on_tty([UPGRADECTL, "list", "--user"], {"NO_COLOR": "1"}))
        shown = on_tty([UPGRADECTL, "install", "--user", self.pack("2.0.0")])
        self.assertIn("\033[K", shown, "the progress line is redrawn in place")
        self.assertRegex(shown, r"\[#+\.*\] +\d+% ")

    def listing_fd(self):
        """ListAllReleasesByFileDescriptor's descriptor, called as a third-party client would."""
        import dbus
        bus = dbus.SessionBus()
        manager = dbus.Interface(bus.get_object("org.upgraded1", "/org/upgraded1"),
                                 "org.upgraded1.Manager")
        fd = manager.ListAllReleasesByFileDescriptor().take()
        self.addCleanup(os.close, fd)
        typed = [[bool(x) if i in (5, 7) else int(x) if i == 6 else str(x)
                  for i, x in enumerate(r)] for r in manager.ListAllReleases()]
        bus.close()
        return fd, typed

    def test_list_reads_the_daemons_sealed_listing_which_follows_the_store(self):
        self.start_daemon()
        self.ctl("install", "-q", self.pack("1.0.0"))
        self.ctl("install", "--stage-only", "-q", self.pack("2.0.0"))
        sealed = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        # Within seconds of a change the daemon reads states again (docs/state.md): the same
        # listing all the same, not a new memfd per call.
        # Touched: its state is read again by each call for the next two seconds.
        os.utime(os.path.join(self.root, "var/lib/upgraded/apps", self.app, "state.json"))
        fd, typed = self.listing_fd()
        st = os.fstat(fd)
        self.assertTrue(stat.S_ISREG(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o444)
        self.assertEqual(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & sealed, sealed)
        first = os.pread(fd, st.st_size + 1, 0)
        self.assertEqual(len(first), st.st_size)
        again, _ = self.listing_fd()
        self.assertEqual(os.fstat(again).st_ino, st.st_ino)
        self.assertEqual(os.pread(again, st.st_size + 1, 0), first)
        # Nobody can change it: not through the descriptor (read-only), not reopened for
        # writing (mode 0444; root can, and the seals stop writes and growth).
        with self.assertRaises(OSError):
            os.ftruncate(fd, 0)
        rw = os.open("/proc/self/fd/%d" % fd, os.O_RDWR)
        self.addCleanup(os.close, rw)
        for change in (lambda: os.pwrite(rw, b"x", 0), lambda: os.ftruncate(rw, st.st_size + 1)):
            with self.assertRaises(PermissionError):
                change()
        reopen = ("import os, sys\ntry:\n os.open('/proc/self/fd/3', os.O_RDWR)\n"
                  "except PermissionError:\n sys.exit(0)\nsys.exit(1)\n")
        os.dup2(fd, 3, inheritable=True)
        self.addCleanup(os.close, 3)
        self.assertEqual(subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup",
                                         "--clear-groups", "/usr/bin/python3", "-c", reopen],
                                        pass_fds=(3,)).returncode, 0,
                         "another user cannot reopen it for writing")
        self.assertEqual(os.pread(fd, st.st_size + 1, 0), first)
        # upgradectl list reads it: the same rows as the typed ListAllReleases.
        keys = ["app", "version", "status", "role", "staged_at", "pinned", "size",
                "pre_finalized"]
        r = self.ctl("list", "--json")
        self.assertNotIn("ListAllReleases", r.stderr, "the memfd, not the fallback")
        listed = json.loads(r.stdout)
        self.assertEqual(os.fstat(self.listing_fd()[0]).st_ino, st.st_ino)
        self.assertEqual(listed, [dict(zip(keys, r)) for r in typed])
        self.assertEqual([(r["version"], r["role"], r["pinned"]) for r in listed],
                         [("1.0.0", "current", False), ("2.0.0", "", False)])
        # A change: a new listing; the one it replaces is emptied, whoever still holds it.
        self.ctl("pin", self.app, "2.0.0", "-q")
        changed, typed = self.listing_fd()
        self.assertNotEqual(os.fstat(changed).st_ino, st.st_ino)
        self.assertEqual(os.fstat(fd).st_size, 0)
        listed = json.loads(self.ctl("list", "--json").stdout)
        self.assertEqual(listed, [dict(zip(keys, r)) for r in typed])
        self.assertEqual([(r["version"], r["pinned"]) for r in listed],
                         [("1.0.0", False), ("2.0.0", True)])
        self.assertEqual(self.ctl("list").stdout.splitlines()[2].split()[:5],
                         [self.app, "2.0.0", "staged", listed[1]["staged_at"], "yes"])

    def test_list_prints_nothing_from_a_listing_it_cannot_trust(self):
        # The real daemon's listing of one release, then a stand-in owning the daemon's name
        # that hands it over in various ways: only whole, sealed and well-formed is printed.
        self.start_daemon()
        self.ctl("install", "-q", self.pack("1.0.0"))
        fd, _ = self.listing_fd()
        good = os.pread(fd, 1 << 20, 0)
        expected = self.ctl("list").stdout
        self.stop_daemon()
        listing = os.path.join(self.dir, "listing")
        with open(listing, "wb") as f:
            f.write(good)
        self.assertIn(b"current", good)
        cases = [("sealed", good, 0, ""), ("unsealed", good, 1, "not sealed against changes"),
                 ("sealed", good[:-1], 1, "not a listing"),
                 ("sealed", good + b"\0", 1, "not a listing"),
                 # A string that moves the cursor and clears the screen, in place of a role.
                 ("sealed", good.replace(b"current", b"\x1b[H\x1b[2J"), 1, "not a listing"),
                 ("pipe", good, 1, "not a regular file"),
                 ("old", good, 0, "UnknownMethod"), ("Failed", good, 0, "Error.Failed: no listing"),
                 ("empty", good, 0, "replaced three times"), ("Busy", good, 5, "no listing")]
        for mode, data, code, error in cases:
            with self.subTest(mode=mode, size=len(data)):
                with open(listing, "wb") as f:
                    f.write(data)
                fake = subprocess.Popen(["/usr/bin/python3", "-c", FAKE_DAEMON, mode, listing],
                                        stdout=subprocess.PIPE, text=True)
                try:
                    self.assertEqual(fake.stdout.readline().strip(), "ready")
                    r = self.ctl("list", check=code)
                    if mode == "sealed" and code == 0:
                        self.assertEqual(r.stdout, expected)
                        self.assertNotIn("ListAllReleases", r.stderr)
                    elif code == 0:  # the typed ListAllReleases instead, and a note saying so
                        self.assertEqual(r.stdout.splitlines()[1].split()[:5],
                                         ["old", "9.9.9", "good", "current", "2026-01-01?[2J"])
                        self.assertIn(error, r.stderr)
                        self.assertIn("listing through ListAllReleases", r.stderr)
                    elif mode == "Busy":  # not a reason to ask otherwise: the caller's error
                        self.assertEqual(r.stdout, "")
                        self.assertTrue(r.stderr.startswith("upgradectl: no listing\n"), r.stderr)
                        self.assertNotIn("ListAllReleases", r.stderr)
                    else:
                        self.assertEqual(r.stdout, "", "nothing printed")
                        self.assertIn("the daemon's listing cannot be read: " + error,
                                      r.stderr)
                finally:
                    fake.terminate()
                    fake.wait()
                    fake.stdout.close()

    def test_the_first_call_starts_the_daemon_by_d_bus_activation(self):
        # As dbus/org.upgraded1.service does on the system bus: the bus asks systemd to start
        # the unit that owns the name.
        services = os.path.join(os.environ["XDG_RUNTIME_DIR"], "dbus-1/services")
        os.makedirs(services, exist_ok=True)
        unit = "upgraded-activated.service"
        with open(os.path.join(UNITS_DIR, unit), "w") as f:
            f.write("[Service]\nType=notify\nBusName=org.upgraded1\n"
                    "ExecStart=%s --user --root %s\n" % (os.path.abspath(UPGRADED), self.root))
        with open(os.path.join(services, "org.upgraded1.service"), "w") as f:
            f.write("[D-BUS Service]\nName=org.upgraded1\nExec=/bin/false\n"
                    "SystemdService=%s\n" % unit)
        subprocess.run(["systemctl", "--user", "daemon-reload"], check=True)
        subprocess.run(["busctl", "--user", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                        "org.freedesktop.DBus", "ReloadConfig"], check=True)
        try:
            r = self.ctl("install", "--wait", self.pack("1.0.0"))
            self.assertIn("done", r.stderr)
            self.assertEqual(self.serving("1.0.0"), "1.0.0")
            state = subprocess.run(["systemctl", "--user", "is-active", unit],
                                   capture_output=True, text=True).stdout.strip()
            self.assertEqual(state, "active")
        finally:
            subprocess.run(["systemctl", "--user", "stop", unit], check=False)
            os.unlink(os.path.join(services, "org.upgraded1.service"))
            os.unlink(os.path.join(UNITS_DIR, unit))
            subprocess.run(["busctl", "--user", "call", "org.freedesktop.DBus",
                            "/org/freedesktop/DBus", "org.freedesktop.DBus", "ReloadConfig"],
                           check=False)

    def test_a_follower_does_not_wait_for_ever_when_the_daemon_dies(self):
        self.start_daemon({"UPGRADED_PAUSE_AT": "install.before_extract:5000"})
        follower = subprocess.Popen([UPGRADECTL, "install", "--user", self.pack("1.0.0")],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(100):
            if json.loads(self.ctl("jobs", "--json").stdout):
                break
            time.sleep(0.05)
        self.daemon.kill()
        self.daemon.wait()
        _, err = follower.communicate(timeout=10)
        self.assertEqual(follower.returncode, 1, err)
        self.assertIn("upgraded stopped while the job ran", err)

    def test_cancel_stops_a_job_its_follower_reports_it(self):
        self.start_daemon()
        self.ctl("install", self.pack("1.0.0"))
        self.ctl("install", "--stage-only", self.pack("2.0.0"))
        self.stop_daemon()
        self.start_daemon({"UPGRADED_PAUSE_AT": "activation.before_commit:2000"})
        follower = subprocess.Popen([UPGRADECTL, "activate", self.app, "2.0.0", "--user"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(100):
            jobs = json.loads(self.ctl("jobs", "--json").stdout)
            if jobs:
                break
            time.sleep(0.05)
        self.assertIn("Asked job", self.ctl("cancel", str(jobs[0]["id"])).stdout)
        _, err = follower.communicate(timeout=30)
        self.assertEqual(follower.returncode, 1, err)
        self.assertIn("canceled", err)
        self.assertEqual(self.serving("1.0.0"), "1.0.0")


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"])
