#!/usr/bin/python3
"""Regression tests for the security review's findings, tried as a local attacker would, on the
real-systemd testbed (design.md §10): an unprivileged user (`nobody`) on the same bus forges
signals at the daemon and at upgradectl, an artifact changes after Install replied, and so on.
Each asserts what stayed on disk and what kept running, not only an error text.

    tests/testbed/with-systemd-user tests/integration/security_test.py UPGRADED UPGRADECTL

Needs UPGRADED_TESTBED_OPEN_BUS=1 (so that `nobody` may connect to the bus).
"""

import os
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import daemon_test  # noqa: E402  (its test classes stay out of this module's namespace)
from daemon_test import (DaemonTest, NAME, PATH, MANAGER, UPGRADECTL,  # noqa: E402
                         UNITS_DIR, tree_digest)
from sample_service import TIME_FACTOR  # noqa: E402  (on the path daemon_test set)

import dbus

FORGE = r"""
import dbus, dbus.lowlevel, json, sys
spec = json.load(sys.stdin)
bus = dbus.SessionBus()
driver = dbus.Interface(bus.get_object("org.freedesktop.DBus", "/org/freedesktop/DBus"),
                        "org.freedesktop.DBus")
# Every connection of the victim process: found as any user can, by its pid.
targets = []
for name in driver.ListNames():
    if not name.startswith(":"):
        continue
    try:
        if int(driver.GetConnectionUnixProcessID(name)) == spec["pid"]:
            targets.append(str(name))
    except dbus.DBusException:
        pass
sent = 0
for t in targets:
    for s in spec["signals"]:
        msg = dbus.lowlevel.SignalMessage(s["path"], s["interface"], s["member"])
        msg.set_destination(t)
        msg.append(*s["args"], signature=s["signature"])
        bus.send_message(msg)
        sent += 1
bus.flush()
print(json.dumps({"targets": targets, "sent": sent}))
"""


def forge(pid, signals):
    """Sends `signals` as `nobody` to every bus connection of process `pid`."""
    import json
    out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                          "/usr/bin/python3", "-c", FORGE],
                         input=json.dumps({"pid": pid, "signals": signals}),
                         capture_output=True, text=True, env=dict(os.environ, HOME="/"))
    if out.returncode != 0:
        raise AssertionError("forging failed: " + out.stderr)
    return json.loads(out.stdout)


def systemd_job_removed(job_path, unit, result, job_id=1):
    return {"path": "/org/freedesktop/systemd1", "interface": "org.freedesktop.systemd1.Manager",
            "member": "JobRemoved", "signature": "uoss",
            "args": [job_id, job_path, unit, result]}


class ForgedSystemdSignals(DaemonTest):
    """Finding 1: a JobRemoved that did not come from systemd must not decide a restart."""

    def setUp(self):
        super().setUp()
        # A restart that takes a while: the window in which a forged signal would land.
        with open(os.path.join(UNITS_DIR, self.unit), "w") as f:
            f.write("[Service]\nExecStartPre=/bin/sleep 1.5\n"
                    "ExecStart=%s/var/lib/upgraded/apps/%s/current/bin/hello\n"
                    "Environment=OUT=%s\n" % (self.root, self.app, self.out))
        subprocess.run(["systemctl", "--user", "daemon-reload"], check=True)

    def systemd_jobs_for_unit(self):
        out = subprocess.run(["busctl", "--user", "--json=short", "call",
                              "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                              "org.freedesktop.systemd1.Manager", "ListJobs"],
                             capture_output=True, text=True, check=True).stdout
        import json
        return [(j[0], j[4]) for j in json.loads(out)["data"][0] if j[1] == self.unit]

    def test_a_forged_job_removed_does_not_fail_the_upgrade(self):
        self.run_job(self.install(self.pack("1.0.0")))
        job = self.install(self.pack("2.0.0"))
        for _ in range(300):  # the restart's systemd job, as any user can see it
            jobs = self.systemd_jobs_for_unit()
            if jobs:
                break
            time.sleep(0.01)
        self.assertTrue(jobs, "the restart never showed up in systemd's job list")
        job_id, job_path = jobs[0]
        # The real job's path with "failed", and a flood of made-up paths (what is remembered
        # while waiting is bounded).
        signals = [systemd_job_removed(job_path, self.unit, "failed", job_id)]
        signals += [systemd_job_removed("/org/freedesktop/systemd1/job/%d" % (100000 + i),
                                        self.unit, "failed") for i in range(2000)]
        sent = forge(self.daemon.proc.pid, signals)
        self.assertGreaterEqual(len(sent["targets"]), 2, sent)  # the daemon has several
        result, message = self.wait_job(job)
        self.assertEqual(result, "done", message)
        self.assertEqual(self.current(), "releases/2.0.0")
        self.assertEqual(self.releases()["2.0.0"][0], "good")
        self.assertEqual(self.serving("2.0.0"), "2.0.0")
        self.assertEqual(self.unit_property("ActiveState"), "active")


class ForgedDaemonSignals(DaemonTest):
    """Finding 2: upgradectl's exit code, which package hooks trust, comes only from the daemon
    that started its job."""

    def follow_and_forge(self, artifact, make_signals):
        proc = subprocess.Popen([UPGRADECTL, "install", "--user", artifact],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Forge as soon as the job exists (the daemon pauses before its switch, so the window
        # is wide), at upgradectl's connection.
        for _ in range(500):
            jobs = self.manager.ListJobs()
            if jobs:
                break
            time.sleep(0.01)
        self.assertTrue(jobs)
        path = str(jobs[0][5])
        sent = forge(proc.pid, make_signals(path, int(jobs[0][0])))
        self.assertEqual(len(sent["targets"]), 1, sent)
        out, err = proc.communicate(timeout=60)
        return proc.returncode, out, err

    def restart_paused(self):
        self.restart_daemon({"UPGRADED_PAUSE_AT": "activation.before_commit:1500"})

    def test_forged_job_removed_and_properties_do_not_make_a_failed_install_succeed(self):
        self.run_job(self.install(self.pack("1.0.0")))
        failing = self.pack("2.0.0", fail=True)
        self.restart_paused()

        def signals(path, job_id):
            return [{"path": PATH, "interface": MANAGER, "member": "JobRemoved",
                     "signature": "uoss", "args": [job_id, path, "done", ""]},
                    {"path": path, "interface": "org.freedesktop.DBus.Properties",
                     "member": "PropertiesChanged", "signature": "sa{sv}as",
                     "args": ["org.upgraded1.Job", {"Error": dbus.String("")}, []]}]
        rc, out, err = self.follow_and_forge(failing, signals)
        self.assertEqual(rc, 1, err)  # the job failed (health gate), exit 1
        self.assertIn("rolled back to 1.0.0", err)
        self.assertEqual(self.current(), "releases/1.0.0")
        self.assertEqual(self.releases()["2.0.0"][0], "bad")

    def test_forged_failure_and_a_forged_daemon_exit_do_not_fail_a_good_install(self):
        self.run_job(self.install(self.pack("1.0.0")))
        good = self.pack("2.0.0")
        self.restart_paused()
        daemon_names = forge(self.daemon.proc.pid, [])["targets"]

        def signals(path, job_id):
            out = [{"path": PATH, "interface": MANAGER, "member": "JobRemoved",
                    "signature": "uoss", "args": [job_id, path, "failed", "forged"]},
                   {"path": path, "interface": "org.freedesktop.DBus.Properties",
                    "member": "PropertiesChanged", "signature": "sa{sv}as",
                    "args": ["org.upgraded1.Job",
                             {"Error": dbus.String("org.upgraded1.Error.PolicyRefused")}, []]}]
            for name in daemon_names:  # "the daemon left the bus"
                out.append({"path": "/org/freedesktop/DBus", "interface": "org.freedesktop.DBus",
                            "member": "NameOwnerChanged", "signature": "sss",
                            "args": [NAME, name, ""]})
            return out
        rc, out, err = self.follow_and_forge(good, signals)
        self.assertEqual(rc, 0, err)
        self.assertEqual(self.current(), "releases/2.0.0")
        self.assertEqual(self.serving("2.0.0"), "2.0.0")


class ArtifactChangedAfterInstall(DaemonTest):
    """Finding 3: the extraction reads only the payload, at the offset the verified head fixed;
    it parses no byte of the head again."""

    def install_then_change(self, offsets, version="2.0.0"):
        """Install (stage only) with the extraction paused, change bytes of the file meanwhile
        (in place: the daemon holds the descriptor), then wait for the job."""
        self.restart_daemon({"UPGRADED_PAUSE_AT": "install.before_extract:1000"})
        artifact = self.pack(version)
        with open(artifact, "rb") as f:
            original = f.read()
        job = self.install(artifact, activate=False)
        with open(artifact, "r+b") as f:
            for at in offsets(original):
                f.seek(at)
                f.write(bytes([original[at] ^ 0x01]))
        return self.wait_job(job)

    @staticmethod
    def payload_offset(data):
        msize = int(data[124:135], 8)
        sig_header = 512 + (msize + 511) // 512 * 512
        ssize = int(data[sig_header + 124:sig_header + 135], 8)
        return 3 * 512 + (msize + 511) // 512 * 512 + (ssize + 511) // 512 * 512

    def test_a_changed_head_has_no_effect_and_the_verified_release_is_installed(self):
        self.run_job(self.install(self.pack("1.0.0")))
        # A byte of manifest.json's tar header (its mtime), of manifest.json and of
        # manifest.sig: before the fix, libarchive re-read the head ("Damaged tar archive").
        result, message = self.install_then_change(
            lambda d: [140, 600, 512 + (int(d[124:135], 8) + 511) // 512 * 512 + 700])
        self.assertEqual(result, "done", message)
        self.assertEqual(self.releases()["2.0.0"][0], "staged")
        with open(os.path.join(self.app_root(), "releases/2.0.0/VERSION")) as f:
            self.assertEqual(f.read(), "2.0.0")

    def test_a_changed_payload_byte_fails_and_nothing_is_installed(self):
        self.run_job(self.install(self.pack("1.0.0")))
        before = tree_digest(self.app_root())
        result, message = self.install_then_change(lambda d: [self.payload_offset(d) + 20])
        self.assertEqual(result, "failed")
        self.assertIn("does not match its signed SHA-256", message)
        self.assertEqual(tree_digest(self.app_root()), before)
        self.assertEqual(self.serving("1.0.0"), "1.0.0")

    def test_a_changed_payload_header_or_end_fails(self):
        self.run_job(self.install(self.pack("1.0.0")))
        before = tree_digest(self.app_root())
        result, message = self.install_then_change(lambda d: [self.payload_offset(d) - 512 + 140])
        self.assertEqual(result, "failed")
        self.assertIn("not canonical", message)
        result, message = self.install_then_change(lambda d: [len(d) - 3], "2.0.1")
        self.assertEqual(result, "failed")
        self.assertIn("end of archive", message)
        self.assertEqual(tree_digest(self.app_root()), before)


class BoundedRequests(DaemonTest):
    """Finding 9: options are read with bounds before anything else, for every caller."""

    def test_large_or_nested_options_are_refused_before_they_are_read(self):
        self.run_job(self.install(self.pack("1.0.0")))
        before = tree_digest(self.app_root())
        # As nobody: 200,000 entries (before the fix, each became a Variant before the handler,
        # and before authorization).
        out = daemon_test.Authorization.as_nobody(
            self, "m.Rollback('%s', dict(('k%%d' %% i, dbus.Boolean(True)) for i in "
                  "range(200000)))" % self.app)
        self.assertTrue(out.startswith("org.upgraded1.Error.InvalidArgument"), out)
        self.assertIn("more than 16 options", out)
        out = daemon_test.Authorization.as_nobody(
            self, "m.Rollback('%s', {'x': dbus.Array(['a'] * 100000, signature='s')})" % self.app)
        self.assertTrue(out.startswith("org.upgraded1.Error.InvalidArgument"), out)
        self.assertIn("must have a basic type, not 'as'", out)
        out = daemon_test.Authorization.as_nobody(
            self, "m.Rollback('%s', {'x': dbus.String('y' * 100000)})" % self.app)
        self.assertIn("longer than 1024 bytes", out)
        # A key given twice (a D-Bus dictionary may carry one, a map may not hold it).
        r = subprocess.run(["busctl", "--user", "call", NAME, PATH, MANAGER, "GetHistory",
                            "sa{sv}", self.app, "2", "limit", "u", "1", "limit", "u", "5"],
                           capture_output=True, text=True)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("given twice", r.stderr)
        # Within the bounds, the usual answers.
        self.assertEqual(len(self.manager.GetHistory(self.app, {"limit": dbus.UInt32(1)})), 1)
        self.assertEqual(tree_digest(self.app_root()), before)


FLOOD = r"""
import dbus, os, sys, time
from dbus.mainloop.glib import DBusGMainLoop
from gi.repository import GLib
DBusGMainLoop(set_as_default=True)
artifact, seconds = sys.argv[1], float(sys.argv[2])
# Several connections, each keeping 32 Install calls in flight (four times what the daemon lets
# one connection have waiting for authorization): a new call as soon as one is answered.
buses = [dbus.bus.BusConnection(os.environ["DBUS_SESSION_BUS_ADDRESS"]) for _ in range(8)]
managers = [dbus.Interface(b.get_object("org.upgraded1", "/org/upgraded1"),
                           "org.upgraded1.Manager") for b in buses]
end, sent, answers = time.monotonic() + seconds, [0], {}
in_flight = [0] * len(managers)
def answer(i, name):
    answers[name] = answers.get(name, 0) + 1
    in_flight[i] -= 1
def pump():
    if time.monotonic() > end:
        loop.quit()
        return False
    for i, m in enumerate(managers):
        while in_flight[i] < 32:
            fd = os.open(artifact, os.O_RDONLY)
            m.Install(dbus.types.UnixFd(fd), {},
                      reply_handler=lambda p, i=i: answer(i, "job"),
                      error_handler=lambda e, i=i: answer(i, e.get_dbus_name()), timeout=60)
            os.close(fd)
            in_flight[i] += 1
            sent[0] += 1
    return True
loop = GLib.MainLoop()
GLib.timeout_add(5, pump)
loop.run()
print(sent[0], answers)
"""


class InstallFlood(DaemonTest):
    """Finding 8, as the second review tried it: a local user floods Install calls from several
    connections; root's own Install must still get through (what a caller holds before its uid
    is known is bounded per connection)."""

    def test_root_installs_during_a_flood_by_nobody(self):
        self.run_job(self.install(self.pack("1.0.0")))
        v2 = self.pack("2.0.0")
        flood = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                                  "/usr/bin/python3", "-c", FLOOD, v2, "4"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=dict(os.environ, HOME="/"))
        time.sleep(1.5)  # the flood is on
        results = []
        for _ in range(3):
            try:
                results.append(self.wait_job(self.install(v2, activate=False))[0])
                break
            except dbus.DBusException as e:
                results.append(e.get_dbus_name())
        out, err = flood.communicate(timeout=120 * TIME_FACTOR)
        self.assertEqual(flood.returncode, 0, err)
        self.assertEqual(results, ["done"], "root's install during the flood (flood: %s)" % out)
        self.assertIn("AccessDenied", out, "the flood itself got answers")
        self.assertEqual(self.releases()["2.0.0"][0], "staged")


BURST = r"""
import dbus, os, sys
from dbus.mainloop.glib import DBusGMainLoop
from gi.repository import GLib
DBusGMainLoop(set_as_default=True)
m = dbus.Interface(dbus.SessionBus().get_object("org.upgraded1", "/org/upgraded1"),
                   "org.upgraded1.Manager")
answers, n = [], 40
loop = GLib.MainLoop()
def answer(text):
    answers.append(text)
    if len(answers) == n:
        loop.quit()
for _ in range(n):  # all sent before any reply is read
    fd = os.open(sys.argv[1], os.O_RDONLY)
    m.Install(dbus.types.UnixFd(fd), {}, reply_handler=lambda p: answer("job"),
              error_handler=lambda e: answer(e.get_dbus_name() + ": " + e.get_dbus_message()),
              timeout=60)
    os.close(fd)
loop.run()
# Once those are answered, the same connection may call again, one call at a time, for ever.
for _ in range(12):
    fd = os.open(sys.argv[1], os.O_RDONLY)
    try:
        m.Install(dbus.types.UnixFd(fd), {}, timeout=60)
        answers.append("later: job")
    except dbus.DBusException as e:
        answers.append("later: " + e.get_dbus_name() + ": " + e.get_dbus_message())
    os.close(fd)
print("\n".join(answers))
"""


class UndecidedCallsPerConnection(DaemonTest):
    def test_a_connection_gets_at_most_eight_installs_awaiting_authorization(self):
        """What a connection holds before its uid is known is bounded, so that one user
        cannot fill the daemon's budget for everyone (the review's flood made root's Install
        Busy)."""
        self.run_job(self.install(self.pack("1.0.0")))
        v2 = self.pack("2.0.0")
        out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                              "/usr/bin/python3", "-c", BURST, v2], capture_output=True,
                             text=True, check=True, env=dict(os.environ, HOME="/")).stdout
        answers = out.splitlines()
        later = answers[40:]
        answers = answers[:40]
        self.assertEqual(len(answers), 40)
        # Decided calls no longer count: nobody's later calls are refused for what nobody is
        # (not authorized), never as Busy.
        self.assertEqual(len(later), 12)
        self.assertTrue(all(a.startswith("later: org.upgraded1.Error.AccessDenied")
                            for a in later), later)
        busy = [a for a in answers if "waiting for authorization" in a]
        self.assertGreater(len(busy), 0, answers)
        self.assertTrue(all(a.startswith("org.upgraded1.Error.") for a in answers), answers)
        self.assertNotIn("job", answers)


class TrustRootAndTrees(DaemonTest):
    def pack_tree(self, version, extra):
        """The sample release, with `extra(src)` applied to its tree before packing."""
        import json
        src = os.path.join(self.dir, "tree-" + version)
        os.makedirs(os.path.join(src, "bin"))
        with open(os.path.join(src, "VERSION"), "w") as f:
            f.write(version)
        with open(os.path.join(src, "bin/hello"), "w") as f:
            f.write('#!/bin/sh\nhere=$(dirname "$(readlink -f "$0")")\n'
                    'cat "$here/../VERSION" > "$OUT"\nexec sleep 1000\n')
        os.chmod(os.path.join(src, "bin/hello"), 0o755)
        extra(src)
        manifest = os.path.join(self.dir, "m-%s.json" % version)
        with open(manifest, "w") as f:
            json.dump({"units": [self.unit], "health": {"min_ready_s": 0, "deadline_s": 30}}, f)
        out = os.path.join(self.dir, "t-%s.upd" % version)
        subprocess.run([UPGRADECTL, "pack", "--key", self.key, "--app", self.app, "--version",
                        version, "--manifest", manifest, "-o", out, src], check=True,
                       stdout=subprocess.DEVNULL)
        return out

    def test_a_release_with_hard_links_installs_as_root(self):
        """Finding 6: the helper's tree is handed back to root with its hard links."""
        self.assertEqual(os.geteuid(), 0, "the testbed runs as root: the helper gets a uid")

        def links(src):
            os.link(os.path.join(src, "bin/hello"), os.path.join(src, "bin/hello-alias"))
            os.link(os.path.join(src, "VERSION"), os.path.join(src, "VERSION.copy"))
        self.run_job(self.install(self.pack_tree("1.0.0", links)))
        self.assertEqual(self.serving("1.0.0"), "1.0.0")
        rel = os.path.join(self.app_root(), "releases/1.0.0")
        a, b = os.stat(os.path.join(rel, "bin/hello")), os.stat(os.path.join(rel, "bin/hello-alias"))
        self.assertEqual((a.st_ino, a.st_nlink, a.st_uid), (b.st_ino, 2, 0))
        self.assertEqual(os.stat(os.path.join(rel, "VERSION.copy")).st_ino,
                         os.stat(os.path.join(rel, "VERSION")).st_ino)

    def test_a_sticky_directory_is_refused_alike_offline_and_through_the_daemon(self):
        """A sticky bit is refused by the extractor's entry policy, with its message, in both
        paths; before, `unpack` kept it and the daemon's hand-over refused the tree."""
        self.run_job(self.install(self.pack("1.0.0")))
        before = tree_digest(self.app_root())
        invocation = self.unit_property("InvocationID")
        sticky = self.pack_tree("2.0.0", lambda src: os.chmod(os.path.join(src, "bin"), 0o1755))
        why = "entry 'bin' has mode 1755 (setuid, setgid, sticky or world-writable)"
        result, message = self.wait_job(self.install(sticky))
        self.assertEqual(result, "failed")
        self.assertIn(why, message)
        self.assertEqual(tree_digest(self.app_root()), before)
        self.assertEqual(self.unit_property("InvocationID"), invocation)
        self.assertEqual(self.serving("1.0.0"), "1.0.0")
        keys = os.path.join(self.root, "etc/upgraded/keys.d")
        dest = os.path.join(self.dir, "unpacked")
        offline = subprocess.run([UPGRADECTL, "unpack", "--keys", keys, sticky, dest],
                                 capture_output=True, text=True)
        self.assertEqual(offline.returncode, 3, offline.stderr)  # refused by policy
        self.assertIn(why, offline.stderr)
        self.assertFalse(os.path.exists(dest))
        self.assertEqual([n for n in os.listdir(self.dir) if n.startswith(".unpacked")], [])
        stripped = subprocess.run([UPGRADECTL, "unpack", "--keys", keys, "--strip-unsafe-modes",
                                   sticky, dest], capture_output=True, text=True)
        self.assertEqual(stripped.returncode, 0, stripped.stderr)
        self.assertEqual(os.stat(os.path.join(dest, "bin")).st_mode & 0o7777, 0o755)
        # The daemon told to strip: the same artifact installs, without the bit (read-only).
        with open(os.path.join(self.root, "etc/upgraded/upgraded.conf"), "w") as f:
            f.write("[extract]\nstrip_unsafe_modes = true\n")
        self.assertEqual(self.restart_daemon(), 0)
        self.run_job(self.install(sticky))
        self.assertEqual(self.serving("2.0.0"), "2.0.0")
        bin_dir = os.path.join(self.app_root(), "releases/2.0.0/bin")
        self.assertEqual(os.stat(bin_dir).st_mode & 0o7777, 0o555)

    def test_every_key_of_a_revocation_file_is_revoked(self):
        """Finding 5: `cat other.pem trusted.pem > revoked.d/old.pem` revokes both keys."""
        self.run_job(self.install(self.pack("1.0.0")))
        v2 = self.pack("2.0.0")
        etc = os.path.join(self.root, "etc/upgraded")
        other = os.path.join(self.dir, "other")
        subprocess.run([UPGRADECTL, "keygen", "--private", other + ".key", "--public",
                        other + ".pem"], check=True, stdout=subprocess.DEVNULL)
        os.makedirs(os.path.join(etc, "revoked.d"))
        with open(os.path.join(etc, "revoked.d/old.pem"), "w") as f:
            for pem in (other + ".pem", os.path.join(etc, "keys.d/release.pem")):
                with open(pem) as k:
                    f.write(k.read())
        before = tree_digest(self.app_root())
        pid = self.unit_property("MainPID")
        message = self.assertDBusError("org.upgraded1.Error.VerificationFailed", self.install, v2)
        self.assertIn("revoked", message)
        self.assertEqual(tree_digest(self.app_root()), before)
        self.assertEqual(self.unit_property("MainPID"), pid)
        # The same file in keys.d trusts both keys; with the revocation gone, v2 installs.
        os.unlink(os.path.join(etc, "revoked.d/old.pem"))
        self.run_job(self.install(v2))
        self.assertEqual(self.serving("2.0.0"), "2.0.0")


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"])
