#!/usr/bin/python3
"""The daemon end to end on the real-systemd testbed (design.md §10).

Runs `upgraded --user --root DIR` against the testbed's user bus and systemd user manager, and
drives it as its users would: python3-dbus (a configuration-management tool), busctl (a
third-party client), and a caller running as `nobody`. The sample service is a shell script
inside each release that writes its release's VERSION to a file and then stays up (or exits 3,
for a release that must fail its health gate).

    tests/testbed/with-systemd-user tests/integration/daemon_test.py UPGRADED UPGRADECTL

Needs UPGRADED_TESTBED_OPEN_BUS=1 (so that `nobody` may connect to the bus).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../support"))
from sample_service import (Instance, pack_sample, wait_for_content,  # noqa: E402
                            wait_job_removed)

import dbus
from dbus.mainloop.glib import DBusGMainLoop

UPGRADED, UPGRADECTL = sys.argv[1], sys.argv[2]
TESTBED = os.environ["UPGRADED_TESTBED"]
UNITS_DIR = os.environ["UPGRADED_TESTBED_UNITS"]
NAME, PATH = "org.upgraded1", "/org/upgraded1"
MANAGER, JOB = "org.upgraded1.Manager", "org.upgraded1.Job"

DBusGMainLoop(set_as_default=True)


def tree_digest(root):
    """Every name, mode, size and content below root: what 'nothing changed' compares."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for n in sorted(dirs + files):
            p = os.path.join(d, n)
            st = os.lstat(p)
            entry = (os.path.relpath(p, root), st.st_mode, st.st_size)
            if os.path.islink(p):
                entry += (os.readlink(p),)
            elif os.path.isfile(p) and n != ".lock":
                with open(p, "rb") as f:
                    entry += (f.read(),)
            out.append(entry)
    return out


class Daemon:
    def __init__(self, root, env=None):
        self.root = root
        self.env = dict(os.environ, **(env or {}))
        self.proc = None
        self.unique = None
        self.log = open(os.path.join(root, "daemon.log"), "ab")

    def start(self):
        self.proc = subprocess.Popen([UPGRADED, "--user", "--root", self.root], env=self.env,
                                     stdout=self.log, stderr=self.log)
        bus = dbus.SessionBus()
        driver = dbus.Interface(bus.get_object("org.freedesktop.DBus", "/org/freedesktop/DBus"),
                                "org.freedesktop.DBus")
        for _ in range(200):
            if driver.NameHasOwner(NAME):
                # Signals count only from this daemon: the tests share one bus connection, which
                # may still hold an earlier daemon's signals (whose job numbers were the same).
                self.unique = str(driver.GetNameOwner(NAME))
                return
            if self.proc.poll() is not None:
                raise AssertionError("upgraded exited with %s" % self.proc.returncode)
            time.sleep(0.05)
        raise AssertionError("upgraded did not take its bus name")

    def stop(self):
        rc = self.proc.returncode if self.proc else None
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            rc = self.proc.wait(timeout=60)
        self.log.close()
        return rc


class DaemonTest(unittest.TestCase):
    app = "hello"

    def setUp(self):
        inst = Instance(UPGRADECTL, TESTBED, UNITS_DIR, self.app)
        self.dir, self.root, self.key = inst.dir, inst.root, inst.key
        self.out, self.unit = inst.out, inst.unit
        self.daemon = Daemon(self.root)
        self.daemon.start()
        self.bus = dbus.SessionBus()
        self.signals = []  # (name, args) in arrival order
        self.removed = {}  # job path -> (result, message)
        self.bus.add_signal_receiver(self._job_new, "JobNew", MANAGER, sender_keyword="sender")
        self.bus.add_signal_receiver(self._job_removed, "JobRemoved", MANAGER,
                                     sender_keyword="sender")

    def tearDown(self):
        self.assertEqual(self.daemon.stop(), 0, "upgraded did not stop cleanly on SIGTERM")
        subprocess.run(["systemctl", "--user", "stop", self.unit], check=False)
        subprocess.run(["systemctl", "--user", "reset-failed", self.unit], check=False,
                       stderr=subprocess.DEVNULL)
        os.unlink(os.path.join(UNITS_DIR, self.unit))
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- helpers ------------------------------------------------------------------------------

    def _job_new(self, job_id, path, sender=None):
        if sender != self.daemon.unique:
            return
        self.signals.append(("JobNew", str(path)))

    def _job_removed(self, job_id, path, result, message, sender=None):
        if sender != self.daemon.unique:
            return
        self.signals.append(("JobRemoved", str(path)))
        self.removed[str(path)] = (str(result), str(message))

    @property
    def manager(self):
        return dbus.Interface(self.bus.get_object(NAME, PATH), MANAGER)

    def pack(self, version, fail=False, min_ready_s=1):
        return pack_sample(UPGRADECTL, self.key, self.dir, self.app, self.unit, version, fail,
                           min_ready_s)

    def install(self, artifact, activate=True):
        fd = os.open(artifact, os.O_RDONLY)
        try:
            return str(self.manager.Install(dbus.types.UnixFd(fd),
                                            {"activate": dbus.Boolean(activate)}))
        finally:
            os.close(fd)

    def wait_job(self, path, timeout=60):
        return wait_job_removed(self.removed, path, timeout)

    def run_job(self, path):
        result, message = self.wait_job(path)
        self.assertEqual(result, "done", message)

    def serving(self, expect):
        """What the service wrote, once it wrote `expect` (bounded)."""
        return wait_for_content(self.out, expect)

    def unit_property(self, prop):
        return subprocess.run(["systemctl", "--user", "show", "-P", prop, self.unit],
                              capture_output=True, text=True, check=True).stdout.strip()

    def app_root(self):
        return os.path.join(self.root, "var/lib/upgraded/apps", self.app)

    def current(self):
        return os.readlink(os.path.join(self.app_root(), "current"))

    def releases(self):
        return {str(r[0]): (str(r[1]), str(r[2])) for r in self.manager.ListReleases(self.app)}

    def restart_daemon(self, env=None):
        """Stops the daemon and starts another (with `env`); returns the first one's status."""
        status = self.daemon.stop()
        self.removed.clear()  # job numbers start again at 1
        self.daemon = Daemon(self.root, env)
        self.daemon.start()
        return status

    def assertDBusError(self, name, fn, *args):
        with self.assertRaises(dbus.DBusException) as cm:
            fn(*args)
        self.assertEqual(cm.exception.get_dbus_name(), name, cm.exception.get_dbus_message())
        return cm.exception.get_dbus_message()


class Lifecycle(DaemonTest):
    def test_install_upgrade_failed_health_gate_and_rollbacks(self):
        v1, v2, v3 = self.pack("1.0.0"), self.pack("2.0.0"), self.pack("3.0.0", fail=True)

        job = self.install(v1)
        self.run_job(job)
        self.assertEqual(self.serving("1.0.0"), "1.0.0")
        self.assertEqual(self.unit_property("ActiveState"), "active")
        # JobNew came before JobRemoved, after the reply (we had the path before either).
        self.assertEqual([s for s in self.signals if s[1] == job],
                         [("JobNew", job), ("JobRemoved", job)])

        self.run_job(self.install(v2))
        self.assertEqual(self.serving("2.0.0"), "2.0.0")
        self.assertEqual(self.current(), "releases/2.0.0")

        result, message = self.wait_job(self.install(v3))
        self.assertEqual(result, "failed")
        self.assertIn("health gate: %s exited with status 3 after" % self.unit, message)
        # How jobs ended, for a client that missed JobRemoved.
        self.assertEqual(tuple(map(str, self.manager.GetJobResult(int(job.split("/")[-1])))),
                         ("done", "", ""))
        failed = tuple(map(str, self.manager.GetJobResult(3)))
        self.assertEqual((failed[0], failed[2]), ("failed", "org.upgraded1.Error.Failed"))
        self.assertEqual(failed[1], message)
        self.assertDBusError("org.upgraded1.Error.NotFound", self.manager.GetJobResult, 999)
        self.assertIn("rolled back to 2.0.0", message)
        self.assertEqual(self.current(), "releases/2.0.0")
        self.assertEqual(self.releases()["3.0.0"], ("bad", ""))
        self.assertEqual(self.serving("2.0.0"), "2.0.0")
        self.assertEqual(self.unit_property("ActiveState"), "active")

        # A manual rollback, through busctl: a third-party client.
        out = subprocess.run(["busctl", "--user", "--json=short", "call", NAME, PATH, MANAGER,
                              "Rollback", "sa{sv}", self.app, "0"],
                             capture_output=True, text=True, check=True).stdout
        rollback_job = json.loads(out)["data"][0]
        self.assertTrue(rollback_job.startswith("/org/upgraded1/job/"))
        self.run_job(rollback_job)
        self.assertEqual(self.current(), "releases/1.0.0")
        self.assertEqual(self.serving("1.0.0"), "1.0.0")

        # busctl reads the same state.
        out = subprocess.run(["busctl", "--user", "--json=short", "call", NAME, PATH, MANAGER,
                              "ListReleases", "s", self.app],
                             capture_output=True, text=True, check=True).stdout
        rows = {r[0]: r for r in json.loads(out)["data"][0]}
        self.assertEqual(rows["1.0.0"][1:3], ["good", "current"])
        self.assertEqual(rows["2.0.0"][1:3], ["good", "previous"])
        self.assertEqual(rows["3.0.0"][1], "bad")
        # The bulk reads (one call for every app) say what the per-app ones say.
        self.assertEqual([[str(x) if not isinstance(x, (dbus.Boolean, dbus.UInt64)) else x
                           for x in r[1:7]] for r in self.manager.ListAllReleases()
                          if r[0] == self.app],
                         [[str(x) if not isinstance(x, (dbus.Boolean, dbus.UInt64)) else x
                           for x in r] for r in self.manager.ListReleases(self.app)])
        self.assertEqual(self.manager.GetApps()[self.app], self.manager.GetApp(self.app))

        history = self.manager.GetHistory(self.app, {})
        ops = [(str(h[1]), str(h[3]), str(h[4])) for h in history]
        self.assertEqual(ops, [("activate", "1.0.0", "done"), ("activate", "2.0.0", "done"),
                               ("activate", "3.0.0", "rolled-back"),
                               ("rollback", "1.0.0", "done")])
        # Downtime of the upgrade to 2.0.0, from systemd's timestamps.
        self.assertGreater(int(history[1][6][self.unit]), 0)
        self.assertEqual(len(self.manager.GetHistory(self.app, {"limit": dbus.UInt32(1)})), 1)

        # Plan: read-only, its refusals in the document; what it cannot plan is an error.
        plan = json.loads(str(self.manager.Plan(self.app, "3.0.0", {})))
        self.assertEqual(plan["refusal"]["error"], "PolicyRefused")
        self.assertFalse(plan["changes"])
        plan = json.loads(str(self.manager.Plan(self.app, "3.0.0", {"allow_bad": True})))
        self.assertIsNone(plan["refusal"])
        self.assertEqual(plan["steps"][0], {
            "kind": "switch", "target": "3.0.0", "release": "3.0.0", "unit": "",
            "timeout_s": 0, "min_ready_s": 0, "units_down": [], "reversible": True, "note": ""})
        self.assertEqual(json.loads(str(self.manager.Plan(self.app, "", {"rollback": True})))
                         ["to"], "2.0.0")
        for args, error in [
                (("nope", "1.0.0", {}), "NotFound"),
                ((self.app, "", {}), "InvalidArgument"),
                ((self.app, "1.0.0", {"rollback": True}), "InvalidArgument"),
                ((self.app, "1.0.0", {"rollback": "yes"}), "InvalidArgument"),
                ((self.app, "1.0.0", {"stategy": "one-by-one"}), "InvalidArgument"),
                ((self.app, "", {"rollback": True, "allow_bad": True}), "InvalidArgument"),
                ((self.app, "", {"rollback": True, "through_path": True}), "InvalidArgument"),
                ((self.app, "../1.0.0", {}), "InvalidArgument"),
                (("a/b", "1.0.0", {}), "InvalidArgument")]:
            self.assertDBusError("org.upgraded1.Error." + error, self.manager.Plan, *args)

    def test_activating_a_bad_release_needs_allow_bad(self):
        self.run_job(self.install(self.pack("1.0.0")))
        result, _ = self.wait_job(self.install(self.pack("2.0.0", fail=True)))
        self.assertEqual(result, "failed")
        result, message = self.wait_job(self.manager.Activate(self.app, "2.0.0", {}))
        self.assertEqual(result, "failed")
        self.assertIn("marked bad", message)
        self.assertEqual(self.current(), "releases/1.0.0")
        # Remove: not the current release; the bad one may go.
        self.assertDBusError("org.upgraded1.Error.PolicyRefused", self.manager.Remove, self.app,
                             "1.0.0", {})
        self.run_job(self.manager.Remove(self.app, "2.0.0", {}))
        self.assertEqual(set(self.releases()), {"1.0.0"})
        self.assertFalse(os.path.exists(os.path.join(self.app_root(), "releases/2.0.0")))


class BadInput(DaemonTest):
    def test_refusals_change_nothing(self):
        self.run_job(self.install(self.pack("1.0.0")))
        v2 = self.pack("2.0.0")
        before = tree_digest(self.app_root())
        pid = self.unit_property("MainPID")

        self.assertDBusError("org.upgraded1.Error.InvalidArgument", self.manager.Install,
                             dbus.types.UnixFd(os.open(v2, os.O_RDONLY)),
                             {"activat": dbus.Boolean(True)})
        self.assertDBusError("org.upgraded1.Error.InvalidArgument", self.manager.Install,
                             dbus.types.UnixFd(os.open(v2, os.O_RDONLY)),
                             {"activate": dbus.String("yes")})
        # A tampered artifact: one byte of the manifest's signature region changed.
        data = bytearray(open(v2, "rb").read())
        data[700] ^= 0x01
        bad = os.path.join(self.dir, "tampered.upd")
        open(bad, "wb").write(bytes(data))
        self.assertDBusError("org.upgraded1.Error.VerificationFailed", self.install, bad)
        # Signed by a key the daemon does not trust.
        other_key = os.path.join(self.dir, "other.key")
        subprocess.run([UPGRADECTL, "keygen", "--private", other_key, "--public",
                        os.path.join(self.dir, "other.pem")], check=True,
                       stdout=subprocess.DEVNULL)
        self.key, trusted_key = other_key, self.key
        foreign = self.pack("2.0.1")
        self.key = trusted_key
        self.assertDBusError("org.upgraded1.Error.VerificationFailed", self.install, foreign)
        # Not readable: an O_PATH descriptor (fstat works on it, read does not), write-only.
        for flags in (os.O_PATH, os.O_WRONLY):
            fd = os.open(v2, flags)
            try:
                msg = self.assertDBusError("org.upgraded1.Error.InvalidArgument",
                                           self.manager.Install, dbus.types.UnixFd(fd), {})
                self.assertIn("not open for reading", msg)
            finally:
                os.close(fd)
        # Not a regular file.
        r, w = os.pipe()
        self.assertDBusError("org.upgraded1.Error.InvalidArgument", self.manager.Install,
                             dbus.types.UnixFd(r), {})
        os.close(r)
        os.close(w)
        self.assertDBusError("org.upgraded1.Error.InvalidArgument", self.manager.Activate,
                             "../etc", "1.0.0", {})
        self.assertDBusError("org.upgraded1.Error.NotFound", self.manager.Activate, self.app,
                             "9.9.9", {})
        self.assertDBusError("org.upgraded1.Error.NotFound", self.manager.ListReleases, "nosuch")
        self.assertDBusError("org.upgraded1.Error.InvalidArgument", self.manager.Rollback,
                             self.app, {"force": dbus.Boolean(True)})
        self.assertDBusError("org.upgraded1.Error.Exists", self.install,
                             os.path.join(self.dir, "1.0.0.upd"))

        self.assertEqual(tree_digest(self.app_root()), before)
        self.assertEqual(self.unit_property("MainPID"), pid)
        self.assertEqual(self.serving("1.0.0"), "1.0.0")


class Concurrency(DaemonTest):
    def test_second_job_for_an_app_is_busy(self):
        self.run_job(self.install(self.pack("1.0.0")))
        self.run_job(self.install(self.pack("2.0.0", min_ready_s=3), activate=False))
        v3 = self.pack("3.0.0")
        job = self.manager.Activate(self.app, "2.0.0", {})
        jobs = self.manager.ListJobs()
        self.assertEqual([(int(j[0]), str(j[1]), str(j[2]), str(j[3])) for j in jobs],
                         [(int(job.split("/")[-1]), "activate", self.app, "2.0.0")])
        self.assertEqual(str(self.manager.GetJobResult(int(job.split("/")[-1]))[0]), "running")
        before = sorted(os.listdir(os.path.join(self.app_root(), "releases")))
        self.assertDBusError("org.upgraded1.Error.Busy", self.manager.Activate, self.app,
                             "1.0.0", {})
        self.assertDBusError("org.upgraded1.Error.Busy", self.install, v3)
        self.assertDBusError("org.upgraded1.Error.Busy", self.manager.Rollback, self.app, {})
        self.assertEqual(sorted(os.listdir(os.path.join(self.app_root(), "releases"))), before)
        # The job's properties, read by busctl.
        out = subprocess.run(["busctl", "--user", "--json=short", "get-property", NAME, job,
                              JOB, "Type", "App", "Version"],
                             capture_output=True, text=True, check=True).stdout.split("\n")
        self.assertEqual([json.loads(line)["data"] for line in out if line],
                         ["activate", self.app, "2.0.0"])
        self.run_job(job)
        self.assertEqual(self.serving("2.0.0"), "2.0.0")
        self.assertEqual(list(self.manager.ListJobs()), [])
        # The lock is free again at once.
        self.run_job(self.install(v3))


class Cancel(DaemonTest):
    def test_cancel_during_install_leaves_nothing(self):
        self.run_job(self.install(self.pack("1.0.0")))
        before = tree_digest(self.app_root())
        self.restart_daemon({"UPGRADED_PAUSE_AT": "install.before_extract:1500"})
        job = self.install(self.pack("2.0.0"))
        self.bus.get_object(NAME, job).Cancel(dbus_interface=JOB)
        result, message = self.wait_job(job)
        self.assertEqual(result, "canceled", message)
        self.assertEqual(tree_digest(self.app_root()), before)
        self.assertEqual(self.serving("1.0.0"), "1.0.0")

    def test_a_plan_while_the_app_has_a_job_says_busy(self):
        self.run_job(self.install(self.pack("1.0.0")))
        self.run_job(self.install(self.pack("2.0.0"), activate=False))
        self.restart_daemon({"UPGRADED_PAUSE_AT": "activation.before_commit:1500"})
        job = self.manager.Activate(self.app, "2.0.0", {})
        plan = json.loads(str(self.manager.Plan(self.app, "2.0.0", {})))
        self.assertEqual(plan["refusal"]["error"], "Busy")
        self.assertIn("has a job running", plan["refusal"]["message"])
        self.assertEqual(self.wait_job(job)[0], "done")
        plan = json.loads(str(self.manager.Plan(self.app, "2.0.0", {})))
        self.assertIsNone(plan["refusal"])
        self.assertFalse(plan["changes"], "2.0.0 is current now")

    def test_cancel_before_the_switch_and_too_late_after_it(self):
        self.run_job(self.install(self.pack("1.0.0")))
        self.run_job(self.install(self.pack("2.0.0", min_ready_s=2), activate=False))
        before = tree_digest(self.app_root())
        pid = self.unit_property("MainPID")
        self.restart_daemon({"UPGRADED_PAUSE_AT": "activation.before_commit:1500"})
        job = self.manager.Activate(self.app, "2.0.0", {})
        self.bus.get_object(NAME, job).Cancel(dbus_interface=JOB)
        self.assertEqual(self.wait_job(job)[0], "canceled")
        self.assertEqual(tree_digest(self.app_root()), before)
        self.assertEqual(self.unit_property("MainPID"), pid)

        self.restart_daemon({})
        job = self.manager.Activate(self.app, "2.0.0", {})
        obj = self.bus.get_object(NAME, job)
        for _ in range(200):  # until it is committed (the switch), bounded
            if obj.Get(JOB, "State", dbus_interface="org.freedesktop.DBus.Properties") == \
                    "committed":
                break
            time.sleep(0.02)
        self.assertDBusError("org.upgraded1.Error.NotCancelable",
                             lambda: obj.Cancel(dbus_interface=JOB))
        self.run_job(job)
        self.assertEqual(self.serving("2.0.0"), "2.0.0")


class Authorization(DaemonTest):
    def as_nobody(self, code):  # also used by PolkitAuthorization
        script = ("import dbus, os, sys\n"
                  "m = dbus.Interface(dbus.SessionBus().get_object('%s', '%s'), '%s')\n"
                  "try:\n"
                  "    r = %s\n"
                  "    print('ok', r)\n"
                  "except dbus.DBusException as e:\n"
                  "    print(e.get_dbus_name(), e.get_dbus_message())\n" %
                  (NAME, PATH, MANAGER, code))
        return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                               "/usr/bin/python3", "-c", script], capture_output=True, text=True,
                              check=True, env=dict(os.environ, HOME="/")).stdout.strip()

    def test_nobody_is_refused_and_nothing_changes(self):
        self.run_job(self.install(self.pack("1.0.0")))
        self.run_job(self.install(self.pack("2.0.0")))
        v3 = self.pack("3.0.0")
        before = tree_digest(self.app_root())
        pid = self.unit_property("MainPID")
        for call in ["m.Activate('%s', '1.0.0', {})" % self.app,
                     "m.Rollback('%s', {})" % self.app,
                     "m.Remove('%s', '1.0.0', {})" % self.app,
                     "m.Install(dbus.types.UnixFd(os.open('%s', os.O_RDONLY)), {})" % v3]:
            out = self.as_nobody(call)
            self.assertTrue(out.startswith("org.upgraded1.Error.AccessDenied"), out)
            self.assertIn("not authorized", out)
        # Read-only methods are open.
        self.assertIn("'2.0.0'", self.as_nobody("m.ListApps()"))
        self.assertEqual(tree_digest(self.app_root()), before)
        self.assertEqual(self.unit_property("MainPID"), pid)
        self.assertEqual(self.serving("2.0.0"), "2.0.0")


class ServiceManagement(DaemonTest):
    def wait_state(self, job, state):
        obj = self.bus.get_object(NAME, job)
        for _ in range(300):
            if obj.Get(JOB, "State", dbus_interface="org.freedesktop.DBus.Properties") == state:
                return
            time.sleep(0.02)
        self.fail("job %s never reached state %s" % (job, state))

    def test_sigterm_finishes_a_committed_job_and_cancels_the_others(self):
        self.run_job(self.install(self.pack("1.0.0")))
        self.run_job(self.install(self.pack("2.0.0", min_ready_s=2), activate=False))
        job = self.manager.Activate(self.app, "2.0.0", {})
        self.wait_state(job, "committed")
        self.daemon.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        self.assertIsNone(self.daemon.proc.poll(), "it waits for the job past its point of no "
                                                   "return")
        self.assertDBusError("org.upgraded1.Error.ShuttingDown", self.manager.Rollback,
                             self.app, {})
        self.assertEqual(self.wait_job(job)[0], "done")
        self.daemon.proc.wait(timeout=30)
        self.assertEqual(self.daemon.stop(), 0)
        self.assertEqual(self.serving("2.0.0"), "2.0.0")

        self.removed.clear()
        self.daemon = Daemon(self.root, {"UPGRADED_PAUSE_AT": "activation.before_commit:2000"})
        self.daemon.start()
        before = tree_digest(self.app_root())
        job = self.manager.Activate(self.app, "1.0.0", {})
        time.sleep(0.3)
        self.daemon.proc.send_signal(signal.SIGTERM)
        self.assertEqual(self.wait_job(job)[0], "canceled")
        self.daemon.proc.wait(timeout=30)
        self.assertEqual(self.daemon.stop(), 0)
        self.assertEqual(tree_digest(self.app_root()), before)
        self.assertEqual(self.serving("2.0.0"), "2.0.0")

    def test_runs_as_a_notify_service_under_a_watchdog(self):
        self.daemon.stop()
        unit = "upgraded-under-test.service"
        subprocess.run(["systemd-run", "--user", "--quiet", "--unit", unit,
                        "-p", "Type=notify", "-p", "WatchdogSec=2", "-p", "NotifyAccess=main",
                        "-E", "DBUS_SESSION_BUS_ADDRESS=" + os.environ["DBUS_SESSION_BUS_ADDRESS"],
                        UPGRADED, "--user", "--root", self.root], check=True)
        try:
            show = lambda p: subprocess.run(["systemctl", "--user", "show", "-P", p, unit],
                                            capture_output=True, text=True).stdout.strip()
            # systemd-run returned once the start job was done: for Type=notify, at READY=1.
            self.assertEqual(show("ActiveState"), "active")
            self.assertEqual(show("StatusText"), "Ready")
            pid = show("MainPID")
            time.sleep(5)  # two and a half watchdog periods: without pings it would be killed
            self.assertEqual(show("ActiveState"), "active")
            self.assertEqual(show("MainPID"), pid)
            self.assertEqual(len(self.manager.ListApps()), 0)
            subprocess.run(["systemctl", "--user", "stop", unit], check=True)
            self.assertEqual(show("Result"), "success")
            self.assertEqual(show("ExecMainStatus"), "0")
        finally:
            subprocess.run(["systemctl", "--user", "stop", unit], check=False,
                           stderr=subprocess.DEVNULL)


class LostBus(unittest.TestCase):
    """The bus goes away under the daemon: dbus-daemon dies, or stops at the same moment as the
    daemon gets SIGTERM (a host shutting down). The daemon logs it and exits; it never aborts
    (an sdbus::Error escaping a thread used to: SIGABRT and a core dump at every shutdown)."""

    def run_daemon_on_private_bus(self, also_sigterm):
        d = tempfile.mkdtemp(dir=TESTBED)
        try:
            os.makedirs(os.path.join(d, "root"))
            bus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--print-address=1"],
                                   stdout=subprocess.PIPE, text=True)
            address = bus.stdout.readline().strip()
            bus.stdout.close()
            env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=address)
            log = os.path.join(d, "log")
            with open(log, "wb") as f:
                daemon = subprocess.Popen([UPGRADED, "--user", "--root", os.path.join(d, "root")],
                                          env=env, stdout=f, stderr=f)
            for _ in range(200):
                if subprocess.run(["busctl", "--user", "status", NAME], env=env,
                                  stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL).returncode == 0:
                    break
                time.sleep(0.05)
            else:
                self.fail("upgraded did not take its name on the private bus")
            # Calls in flight as the bus goes.
            callers = [subprocess.Popen([UPGRADECTL, "status", "--user"], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                       for _ in range(3)]
            if also_sigterm:
                daemon.send_signal(signal.SIGTERM)
            bus.kill()
            bus.wait()
            rc = daemon.wait(timeout=60)
            for c in callers:
                c.wait(timeout=60)
            with open(log, errors="replace") as f:
                return rc, f.read()
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def test_ends_cleanly_when_the_bus_goes_away(self):
        for round in range(4):
            rc, log = self.run_daemon_on_private_bus(also_sigterm=round % 2 == 1)
            self.assertNotIn("terminate called", log)
            self.assertIn(rc, (0, 1), "killed by signal %d?\n%s" % (-rc, log))
            if rc == 1:
                self.assertIn("lost the connection to the bus", log)
            self.assertIn("stopped", log)


def unit_sandbox_properties(path):
    """The [Service] settings of a shipped unit that confine the daemon, as systemd-run -p
    arguments: what the test below runs the daemon under."""
    skip = {"Type", "BusName", "ExecStart", "Restart", "TimeoutStopSec", "KillMode",
            "StateDirectory", "StateDirectoryMode", "ConfigurationDirectory", "WatchdogSec",
            # The testbed's private mount namespace cannot remount /proc/sys and /proc/kmsg
            # (226/NAMESPACE); the booted-system testbed applies them.
            "ProtectKernelTunables", "ProtectKernelLogs"}
    props, section = [], None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("["):
                section = line
            elif section == "[Service]" and "=" in line and not line.startswith("#"):
                key = line.split("=", 1)[0]
                if key not in skip:
                    props.append(line)
    return props


class ShippedUnitSandbox(DaemonTest):
    """The daemon under the sandbox of units/upgraded.service (as far as a user manager running
    as root applies it): installs, an upgrade, an automatic rollback. Its RestrictSUIDSGID= makes
    openat2 fail with ENOSYS, so the store and the extractor walk paths instead
    (docs/architecture.md, "Paths beneath a directory"); a setting that breaks installs shows up
    here and not only on a host. Then again with the Landlock calls refused as systemd-nspawn's
    default filter refuses them: the helpers fall back to their uid, and the daemon says so."""

    def run_under_unit(self, extra=(), unusable=False):
        self.daemon.stop()
        # A name of its own for each test: a transient unit that ended badly (a sanitizer build's
        # exit status) stays loaded until reset, and its name could not be used again.
        unit = "upgraded-sandboxed-%s.service" % self._testMethodName.replace("_", "-")[5:40]
        here = os.path.dirname(os.path.abspath(__file__))
        props = unit_sandbox_properties(os.path.join(here, "../../units/upgraded.service"))
        self.assertIn("ProtectSystem=strict", props)
        self.assertIn("RestrictSUIDSGID=yes", props)
        args = ["systemd-run", "--user", "--quiet", "--unit", unit, "-p", "Type=notify",
                "-p", "NotifyAccess=main",
                # The testbed lives in /tmp, which PrivateTmp= would hide: bound back in; so
                # is the build tree, which may be in /tmp too (a clone there).
                "-p", "BindPaths=" + TESTBED,
                "-p", "BindReadOnlyPaths=" + os.path.dirname(os.path.dirname(
                    os.path.realpath(UPGRADED))),
                # What an admin's drop-in says for a store outside /var/lib/upgraded.
                "-p", "ReadWritePaths=" + self.root,
                "-E", "DBUS_SESSION_BUS_ADDRESS=" + os.environ["DBUS_SESSION_BUS_ADDRESS"]]
        for p in list(props) + list(extra):
            args += ["-p", p]
        subprocess.run(args + [UPGRADED, "--user", "--root", self.root], check=True)
        try:
            self.removed.clear()
            bus = dbus.SessionBus()
            driver = dbus.Interface(bus.get_object("org.freedesktop.DBus",
                                                   "/org/freedesktop/DBus"),
                                    "org.freedesktop.DBus")
            self.daemon.unique = str(driver.GetNameOwner(NAME))
            sandbox = str(self.bus.get_object(NAME, PATH).Get(
                MANAGER, "HelperSandbox", dbus_interface="org.freedesktop.DBus.Properties"))
            if unusable:
                # No helper is started: the install is refused, saying why, and nothing changes.
                before = tree_digest(self.root)
                with self.assertRaises(dbus.exceptions.DBusException) as refused:
                    self.install(self.pack("1.0.0"))
                self.assertIn("sandbox is unusable", str(refused.exception))
                self.assertEqual(tree_digest(self.root), before)
                return sandbox, ""
            self.run_job(self.install(self.pack("1.0.0")))
            self.run_job(self.install(self.pack("2.0.0")))
            self.assertEqual(self.serving("2.0.0"), "2.0.0")
            result, message = self.wait_job(self.install(self.pack("3.0.0", fail=True)))
            self.assertEqual(result, "failed")
            self.assertIn("rolled back to 2.0.0", message)
            self.assertEqual(self.current(), "releases/2.0.0")
            status = subprocess.run([UPGRADECTL, "status", "--user"], capture_output=True,
                                    text=True)
            self.assertEqual(status.returncode, 0, status.stderr)
            return sandbox, status.stderr
        finally:
            subprocess.run(["systemctl", "--user", "stop", unit], check=False)
            subprocess.run(["systemctl", "--user", "reset-failed", unit], check=False,
                           stderr=subprocess.DEVNULL)

    def test_installs_upgrades_and_rolls_back_under_the_units_sandbox(self):
        sandbox, notes = self.run_under_unit()
        self.assertTrue(sandbox.startswith("full: Landlock (ABI "), sandbox)
        self.assertNotIn("sandbox", notes)

    def test_without_landlock_helper_ids_that_overlap_accounts_refuse_every_install(self):
        with open(os.path.join(self.root, "etc/upgraded/upgraded.conf"), "w") as f:
            f.write("[extract]\nhelper_ids = 1000\n")
        sandbox, _ = self.run_under_unit([
            "SystemCallFilter=~landlock_create_ruleset landlock_add_rule landlock_restrict_self"],
            unusable=True)
        self.assertTrue(sandbox.startswith("unusable: no Landlock"), sandbox)
        self.assertIn("below 65536", sandbox)

    def test_without_landlock_a_root_daemon_confines_helpers_by_uid_and_says_so(self):
        sandbox, notes = self.run_under_unit([
            "SystemCallFilter=~landlock_create_ruleset landlock_add_rule landlock_restrict_self"])
        self.assertTrue(sandbox.startswith("degraded: no Landlock (a system call filter refuses "
                                           "it (EPERM)"), sandbox)
        self.assertIn("uid of its own", sandbox)
        self.assertIn("note: the extraction helpers' sandbox is " + sandbox, notes)


class NotifyService(DaemonTest):
    """A Type=notify unit: the health gate starts counting only once the service said READY=1,
    and a release that never does fails the gate and is rolled back."""

    def setUp(self):
        super().setUp()
        with open(os.path.join(UNITS_DIR, self.unit), "w") as f:
            f.write("[Service]\nType=notify\nNotifyAccess=all\nTimeoutStartSec=3\n"
                    "ExecStart=%s/var/lib/upgraded/apps/%s/current/bin/hello\n"
                    "Environment=OUT=%s\n" % (self.root, self.app, self.out))
        subprocess.run(["systemctl", "--user", "daemon-reload"], check=True)

    def pack_notify(self, version, ready=True):
        src = os.path.join(self.dir, "src-" + version)
        os.makedirs(os.path.join(src, "bin"))
        with open(os.path.join(src, "bin/hello"), "w") as f:
            f.write("#!/bin/sh\nsleep 1\necho %s > \"$OUT\"\n%sexec sleep 1000\n" %
                    (version, "systemd-notify --ready\n" if ready else ""))
        os.chmod(os.path.join(src, "bin/hello"), 0o755)
        extra = os.path.join(self.dir, "manifest-%s.json" % version)
        with open(extra, "w") as f:
            json.dump({"units": [self.unit], "health": {"min_ready_s": 1, "deadline_s": 30}}, f)
        out = os.path.join(self.dir, version + ".upd")
        subprocess.run([UPGRADECTL, "pack", "--key", self.key, "--app", self.app, "--version",
                        version, "--manifest", extra, "-o", out, src], check=True,
                       stdout=subprocess.DEVNULL)
        return out

    def test_readiness_is_awaited_and_a_service_that_never_gets_ready_is_rolled_back(self):
        self.run_job(self.install(self.pack_notify("1.0.0")))
        # The restart's job ended only at READY=1, which the script sends after writing OUT.
        with open(self.out) as f:
            self.assertEqual(f.read().strip(), "1.0.0")
        self.assertEqual(self.unit_property("ActiveState"), "active")
        result, message = self.wait_job(self.install(self.pack_notify("2.0.0", ready=False)))
        self.assertEqual(result, "failed")
        self.assertIn("rolled back to 1.0.0", message)
        self.assertEqual(self.releases()["2.0.0"][0], "bad")
        self.assertEqual(self.current(), "releases/1.0.0")
        self.assertEqual(self.unit_property("ActiveState"), "active")


class PolkitAuthorization(DaemonTest):
    """A real polkitd (the Debian package), started on the testbed's bus with this project's
    actions and a rule that lets `nobody` activate, and nothing else."""

    RULES = """
polkit.addRule(function(action, subject) {
  if (action.id.indexOf("org.upgraded1.") != 0 || subject.user != "nobody") return;
  return action.id == "org.upgraded1.activate" ? polkit.Result.YES : polkit.Result.NO;
});
"""

    def setUp(self):
        if not os.access("/usr/lib/polkit-1/polkitd", os.X_OK):
            if os.environ.get("CI") == "true":
                self.fail("polkitd is not installed (scripts/install-deps installs it)")
            self.skipTest("polkitd is not installed")
        super().setUp()
        here = os.path.dirname(os.path.abspath(__file__))
        actions = os.path.join(self.dir, "polkit-actions")
        rules = os.path.join(self.dir, "polkit-rules")
        os.makedirs(actions)
        os.makedirs(rules)
        shutil.copy(os.path.join(here, "../../dbus/org.upgraded1.policy"), actions)
        with open(os.path.join(rules, "50-upgraded-test.rules"), "w") as f:
            f.write(self.RULES)
        # Bind mounts inside the testbed's private mount namespace: the host sees nothing.
        self.mounts = []
        for src, dst in ((actions, "/usr/share/polkit-1/actions"),
                         (rules, "/etc/polkit-1/rules.d")):
            subprocess.run(["mount", "--bind", src, dst], check=True)
            self.mounts.append(dst)
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=os.environ["DBUS_SESSION_BUS_ADDRESS"])
        self.polkitd = subprocess.Popen(["/usr/lib/polkit-1/polkitd", "--no-debug"], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        driver = dbus.Interface(self.bus.get_object("org.freedesktop.DBus",
                                                    "/org/freedesktop/DBus"),
                                "org.freedesktop.DBus")
        for _ in range(200):
            if driver.NameHasOwner("org.freedesktop.PolicyKit1"):
                break
            time.sleep(0.05)
        else:
            self.fail("polkitd did not take its name")

    def tearDown(self):
        if hasattr(self, "polkitd"):
            self.polkitd.terminate()
            self.polkitd.wait(timeout=10)
        for m in getattr(self, "mounts", []):
            subprocess.run(["umount", m], check=False)
        super().tearDown()

    def test_polkit_decides_for_a_caller_that_is_not_root(self):
        self.run_job(self.install(self.pack("1.0.0")))
        self.run_job(self.install(self.pack("2.0.0")))
        before = tree_digest(self.app_root())
        out = Authorization.as_nobody(self, "m.Rollback('%s', {})" % self.app)
        self.assertTrue(out.startswith("org.upgraded1.Error.AccessDenied"), out)
        self.assertIn("polkit denied org.upgraded1.rollback", out)
        out = Authorization.as_nobody(self, "m.Remove('%s', '1.0.0', {})" % self.app)
        self.assertTrue(out.startswith("org.upgraded1.Error.AccessDenied"), out)
        self.assertEqual(tree_digest(self.app_root()), before)
        # Activating below the version floor needs org.upgraded1.floor as well, which the rule
        # does not grant.
        out = Authorization.as_nobody(
            self, "m.Activate('%s', '1.0.0', {'allow_below_floor': dbus.Boolean(True)})" % self.app)
        self.assertTrue(out.startswith("org.upgraded1.Error.AccessDenied"), out)
        self.assertIn("polkit denied org.upgraded1.floor", out)
        self.assertEqual(tree_digest(self.app_root()), before)
        # The rule allows nobody to activate: the job runs and is nobody's to cancel.
        out = Authorization.as_nobody(self, "m.Activate('%s', '1.0.0', {})" % self.app)
        self.assertTrue(out.startswith("ok /org/upgraded1/job/"), out)
        self.run_job(out.split()[1])
        self.assertEqual(self.current(), "releases/1.0.0")
        self.assertEqual(self.serving("1.0.0"), "1.0.0")


class CrashRecovery(DaemonTest):
    def crash_during(self, version, expect_current, expect_serving):
        self.daemon.stop()
        self.daemon = Daemon(self.root, {"UPGRADED_CRASH_AT": "activation.after_switch"})
        self.daemon.start()
        self.manager.Activate(self.app, version, {})
        self.assertEqual(self.daemon.proc.wait(timeout=30), -signal.SIGKILL)
        self.daemon.log.close()
        # Switched, but the units still run the old release.
        self.assertEqual(self.current(), "releases/" + version)
        self.assertTrue(os.path.exists(os.path.join(self.app_root(), "activation.json")))
        self.removed.clear()  # job numbers start again at 1
        self.daemon = Daemon(self.root)
        self.daemon.start()
        # The recovery is the new daemon's first job; JobRemoved is caught even if it ended
        # before we look.
        self.wait_job("/org/upgraded1/job/1")
        self.assertEqual(self.current(), "releases/" + expect_current)
        self.assertEqual(self.serving(expect_serving), expect_serving)
        self.assertEqual(self.unit_property("ActiveState"), "active")
        self.assertFalse(os.path.exists(os.path.join(self.app_root(), "activation.json")))
        last = self.manager.GetHistory(self.app, {"limit": dbus.UInt32(1)})[0]
        self.assertEqual(str(last[1]), "recover")
        return last

    def test_sigkill_after_the_switch_then_restart_matches_units_to_current(self):
        self.run_job(self.install(self.pack("1.0.0")))
        self.run_job(self.install(self.pack("2.0.0"), activate=False))
        self.assertEqual(self.serving("1.0.0"), "1.0.0")
        last = self.crash_during("2.0.0", "2.0.0", "2.0.0")
        self.assertEqual(str(last[4]), "done")
        self.assertEqual(self.releases()["2.0.0"][0], "good")

    def test_sigkill_while_activating_a_failing_release_rolls_back_after_restart(self):
        self.run_job(self.install(self.pack("1.0.0")))
        self.run_job(self.install(self.pack("2.0.0", fail=True), activate=False))
        last = self.crash_during("2.0.0", "1.0.0", "1.0.0")
        self.assertEqual(str(last[4]), "rolled-back")
        self.assertEqual(self.releases()["2.0.0"][0], "bad")


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"])
