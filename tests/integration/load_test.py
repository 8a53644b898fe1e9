#!/usr/bin/python3
"""The daemon under load, on the real-systemd testbed (design.md §10). It runs as a Type=notify
unit with a 2 s watchdog (times UPGRADED_TEST_TIME_FACTOR, sample_service.py) while clients
press on it: 1,000 read calls at once during 20 installs and activations, 100 Install calls at
once on one connection, 100 and then 1,000 at once (eight per connection), a client that goes
away mid-job, the helper SIGKILLed mid-extraction, a store on a full tmpfs. Every job must end
with a clear result and leave nothing half-installed; afterwards the daemon's descriptors and
threads are back to their baseline, its RSS near it, and the watchdog never fired. The figures
(calls/s, latencies, RSS, fds) are printed; bench/load measures them with more rounds.

    tests/testbed/with-systemd-user tests/integration/load_test.py UPGRADED UPGRADECTL
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "../support"))

import dbus  # noqa: E402
from sample_service import TIME_FACTOR, instance_dir, wait_job_removed  # noqa: E402
from dbus.mainloop.glib import DBusGMainLoop  # noqa: E402
from gi.repository import GLib  # noqa: E402

UPGRADED, UPGRADECTL = sys.argv[1], sys.argv[2]
TESTBED = os.environ["UPGRADED_TESTBED"]
LOAD_CLIENT = os.path.join(HERE, "../support/load_client.py")
NAME, PATH, MANAGER = "org.upgraded1", "/org/upgraded1", "org.upgraded1.Manager"
UNIT = "upgraded-load.service"

DBusGMainLoop(set_as_default=True)


def systemctl(*args, check=True):
    return subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True,
                          check=check).stdout.strip()


def show(prop, unit=UNIT):
    return systemctl("show", "-P", prop, unit)


def proc_status(pid):
    """(descriptors, threads, VmRSS in KiB) of a process."""
    fds = len(os.listdir("/proc/%d/fd" % pid))
    status = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            status[k] = v.strip()
    return fds, int(status["Threads"]), int(status["VmRSS"].split()[0])


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


class Sampler(threading.Thread):
    """Samples a process's descriptors and threads every 5 ms; keeps the maxima."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.stop, self.max_fds, self.max_threads = pid, False, 0, 0

    def run(self):
        while not self.stop:
            try:
                fds, threads, _ = proc_status(self.pid)
            except (FileNotFoundError, ProcessLookupError):
                return
            self.max_fds = max(self.max_fds, fds)
            self.max_threads = max(self.max_threads, threads)
            time.sleep(0.005)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.join()


class Load(unittest.TestCase):
    """One daemon, as a Type=notify unit under a 2 s watchdog, for the whole class."""

    @classmethod
    def setUpClass(cls):
        cls.dir, cls.root, cls.key = instance_dir(UPGRADECTL, TESTBED)
        subprocess.run(["systemd-run", "--user", "--quiet", "--unit", UNIT, "-p", "Type=notify",
                        "-p", "WatchdogSec=%d" % (2 * TIME_FACTOR), "-p", "NotifyAccess=main",
                        "-E", "DBUS_SESSION_BUS_ADDRESS=" + os.environ["DBUS_SESSION_BUS_ADDRESS"],
                        UPGRADED, "--user", "--root", cls.root], check=True)
        cls.pid = int(show("MainPID"))
        cls.bus = dbus.SessionBus()
        cls.manager = dbus.Interface(cls.bus.get_object(NAME, PATH), MANAGER)
        cls.daemon_name = str(dbus.Interface(
            cls.bus.get_object("org.freedesktop.DBus", "/org/freedesktop/DBus"),
            "org.freedesktop.DBus").GetNameOwner(NAME))
        cls.removed = {}
        cls.bus.add_signal_receiver(cls._job_removed, "JobRemoved", MANAGER,
                                    sender_keyword="sender")
        cls.artifacts = {}
        # Warm up (the first install loads what every later one uses), then the baseline.
        cls.wait_job(cls.install(cls.pack("warm", "1.0.0")))
        cls.run_readers(4, 50)
        cls.settle()
        cls.baseline = proc_status(cls.pid)
        print("\nbaseline: %d fds, %d threads, %.1f MiB RSS" %
              (cls.baseline[0], cls.baseline[1], cls.baseline[2] / 1024), file=sys.stderr)

    @classmethod
    def tearDownClass(cls):
        systemctl("stop", UNIT, check=False)
        shutil.rmtree(cls.dir, ignore_errors=True)

    @classmethod
    def _job_removed(cls, job_id, path, result, message, sender=None):
        if sender == cls.daemon_name:
            cls.removed[str(path)] = (str(result), str(message))

    @classmethod
    def pack(cls, app, version, payload_bytes=0):
        """An artifact of `app` with no units (activation is a switch and an empty gate)."""
        key = (app, version, payload_bytes)
        if key in cls.artifacts:
            return cls.artifacts[key]
        src = os.path.join(cls.dir, "src-%s-%s" % (app, version))
        os.makedirs(os.path.join(src, "bin"))
        with open(os.path.join(src, "VERSION"), "w") as f:
            f.write(version)
        if payload_bytes:
            with open(os.path.join(src, "blob"), "wb") as f:
                f.write(os.urandom(payload_bytes))
        manifest = os.path.join(cls.dir, "m.json")
        with open(manifest, "w") as f:
            json.dump({"health": {"min_ready_s": 0, "deadline_s": 60}}, f)
        out = os.path.join(cls.dir, "%s-%s.upd" % (app, version))
        subprocess.run([UPGRADECTL, "pack", "--key", cls.key, "--app", app, "--version", version,
                        "--manifest", manifest, "--level", "1", "-o", out, src], check=True,
                       stdout=subprocess.DEVNULL)
        cls.artifacts[key] = out
        return out

    @classmethod
    def install(cls, artifact, activate=True):
        fd = os.open(artifact, os.O_RDONLY)
        try:
            return str(cls.manager.Install(dbus.types.UnixFd(fd),
                                           {"activate": dbus.Boolean(activate)}))
        finally:
            os.close(fd)

    @classmethod
    def install_async(cls, artifacts, activate=True, per_connection=8):
        """Sends one Install per artifact at once, as many clients would: eight calls per bus
        connection (the most one connection may have waiting for authorization) unless told
        otherwise; returns [(job path or None, error name)]."""
        loop = GLib.MainLoop()
        out = [None] * len(artifacts)
        left = [len(artifacts)]
        connections = [dbus.SessionBus(private=True)
                       for _ in range(0, len(artifacts), per_connection)]
        managers = [dbus.Interface(c.get_object(NAME, PATH), MANAGER) for c in connections]

        def finish(i, value):
            out[i] = value
            left[0] -= 1
            if left[0] == 0:
                loop.quit()
        for i, artifact in enumerate(artifacts):
            fd = os.open(artifact, os.O_RDONLY)
            managers[i // per_connection].Install(
                dbus.types.UnixFd(fd), {"activate": dbus.Boolean(activate)},
                reply_handler=lambda p, i=i: finish(i, (str(p), None)),
                error_handler=lambda e, i=i: finish(
                    i, (None, e.get_dbus_name(), e.get_dbus_message())),
                timeout=300)
            os.close(fd)  # the message holds its own duplicate
        loop.run()
        for c in connections:
            c.set_exit_on_disconnect(False)  # libdbus would _exit(1) on its own close
            c.close()
        return out

    @classmethod
    def wait_job(cls, path, timeout=120):
        return wait_job_removed(cls.removed, path, timeout)

    @classmethod
    def run_readers(cls, processes, calls_each, method="ListApps"):
        """`processes` clients, each with `calls_each` calls in flight at once. Returns (all
        latencies, errors by name, wall time of the slowest client)."""
        procs = [subprocess.Popen(["/usr/bin/python3", LOAD_CLIENT, method, str(calls_each)],
                                  stdout=subprocess.PIPE, text=True) for _ in range(processes)]
        latencies, errors, wall = [], {}, 0.0
        for p in procs:
            out, _ = p.communicate(timeout=300)
            r = json.loads(out)
            latencies += r["latencies"]
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
            wall = max(wall, r["wall"])
        return latencies, errors, wall

    @classmethod
    def settle(cls):
        """Until no job runs and no Install is in flight, then a moment of idleness."""
        for _ in range(600):
            if not cls.manager.ListJobs():
                break
            time.sleep(0.05)
        # Drain our own queue of signals, too.
        ctx = GLib.MainContext.default()
        while ctx.iteration(False):
            pass
        time.sleep(1.0)

    @classmethod
    def nofile(cls):
        """The daemon's soft RLIMIT_NOFILE."""
        with open("/proc/%d/limits" % cls.pid) as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
        raise AssertionError("no 'Max open files' in /proc/%d/limits" % cls.pid)

    @classmethod
    def sanitized(cls):
        with open("/proc/%d/maps" % cls.pid) as f:
            return "libasan" in f.read()

    def app_dir(self, app):
        return os.path.join(self.root, "var/lib/upgraded/apps", app)

    def assert_nothing_half_installed(self, app):
        """No partial tree, no journal, no activation record; state.json names only releases
        that exist."""
        d = self.app_dir(app)
        if not os.path.isdir(d):
            return
        leftovers = [n for n in os.listdir(d) + (os.listdir(os.path.join(d, "releases"))
                                                 if os.path.isdir(os.path.join(d, "releases"))
                                                 else [])
                     if "partial" in n or n in ("journal.json", "activation.json")]
        self.assertEqual(leftovers, [], app)
        if os.path.exists(os.path.join(d, "state.json")):
            with open(os.path.join(d, "state.json")) as f:
                state = json.load(f)
            for version in state["releases"]:
                self.assertTrue(os.path.isdir(os.path.join(d, "releases", version)),
                                "%s %s" % (app, version))

    # The tests run in name order; the last one checks what the others left behind.

    def test_1_reads_during_installs(self):
        artifacts = [self.pack("app%02d" % i, "1.0.0") for i in range(20)]
        started = time.monotonic()
        installs = threading.Thread(target=lambda: setattr(
            self, "jobs", self.install_async(artifacts)))
        installs.start()
        latencies, errors, wall = self.run_readers(4, 250)
        installs.join()
        self.assertEqual(errors, {})
        self.assertEqual(len(latencies), 1000)
        for path, *error in self.jobs:
            self.assertIsNotNone(path, error)
            self.assertEqual(self.wait_job(path)[0], "done")
        took = time.monotonic() - started
        apps = {str(a[0]): str(a[1]) for a in self.manager.ListApps()}
        for i in range(20):
            self.assertEqual(apps["app%02d" % i], "1.0.0")
            self.assert_nothing_half_installed("app%02d" % i)
        print("1,000 ListApps during 20 installs: %.0f calls/s, p50 %.1f ms, p99 %.1f ms, "
              "max %.1f ms; the installs took %.2f s" %
              (len(latencies) / wall, 1000 * statistics.median(latencies),
               1000 * percentile(latencies, 99), 1000 * max(latencies), took), file=sys.stderr)

    def hundred_installs(self, prefix, busy_says, **install):
        """100 Installs of different apps at once: every call got a job that ended done, or
        Busy saying `busy_says`; nothing is half-installed. (started, busy)."""
        artifacts = [self.pack("%s%03d" % (prefix, i), "1.0.0") for i in range(100)]
        results = self.install_async(artifacts, activate=False, **install)
        started = [r for r in results if r[0]]
        busy = [r for r in results if not r[0]]
        ended = {r[0]: self.wait_job(r[0]) for r in started}
        for r in busy:
            self.assertEqual(r[1], "org.upgraded1.Error.Busy", r)
            self.assertIn(busy_says, r[2])
        self.assertEqual({v[0] for v in ended.values()}, {"done"})
        for i in range(100):
            self.assert_nothing_half_installed("%s%03d" % (prefix, i))
        return started, busy

    def test_2_a_hundred_installs_at_once_from_one_connection(self):
        # At most eight may wait for authorization on one connection; those decided before the
        # next arrived make room.
        started, busy = self.hundred_installs("one", "on this connection", per_connection=100)
        self.assertGreaterEqual(len(started), 8)
        print("100 Install calls at once on one connection: %d jobs, %d Busy" %
              (len(started), len(busy)), file=sys.stderr)

    def test_2_a_hundred_installs_at_once(self):
        # Busy when more than verifications + queued_installs (4 + 64) arrived together.
        with Sampler(self.pid) as s:
            started, busy = self.hundred_installs("many", "too many installs at once")
        self.assertGreaterEqual(len(started), 68)
        print("100 Install calls at once: %d jobs, %d Busy; at most %d fds, %d threads" %
              (len(started), len(busy), s.max_fds, s.max_threads), file=sys.stderr)

    def test_3_a_thousand_installs_at_once_are_bounded(self):
        artifact = self.pack("same", "1.0.0")
        with Sampler(self.pid) as s:
            results = self.install_async([artifact] * 1000, activate=False)
            for r in results:
                if r[0]:
                    self.assertEqual(self.wait_job(r[0])[0], "done")
        jobs = [r for r in results if r[0]]
        self.assertEqual(len(jobs), 1, "one app, one version: one job")
        names = {r[1] for r in results if not r[0]}
        self.assertLessEqual(names, {"org.upgraded1.Error.Busy", "org.upgraded1.Error.Exists"})
        base_fds, base_threads, _ = self.baseline
        # 4 verifications (a thread each, up to 10 descriptors each), 64 more waiting and at
        # most max_undecided waiting for authorization (two descriptors each: the call's and
        # the daemon's), one job (docs/configuration.md), and always below RLIMIT_NOFILE.
        # The job is a thread, and while it hands its tree over, min(CPUs, 4) - 1 more walk
        # the tree and one writes the contents back (docs/architecture.md).
        nofile = self.nofile()
        max_undecided = max(1, min(4096, (nofile - 64 - 2 * 64 - 10 * 4) // 4))
        job_threads = 1 + (min(os.cpu_count(), 4) - 1) + 1
        self.assertLessEqual(s.max_threads, base_threads + 4 + job_threads,
                             "threads stay bounded")
        self.assertLessEqual(s.max_fds, base_fds + 4 * 10 + 2 * 64 + 2 * max_undecided,
                             "descriptors stay bounded")
        self.assertLess(s.max_fds, nofile // 2 + base_fds + 4 * 10 + 2 * 64)
        self.assert_nothing_half_installed("same")
        print("1,000 Install calls at once (125 connections): 1 job, %d Busy/Exists; at most "
              "%d fds (baseline %d, RLIMIT_NOFILE %d), %d threads (baseline %d)" %
              (len(results) - 1, s.max_fds, base_fds, nofile, s.max_threads, base_threads),
              file=sys.stderr)

    def test_4_a_client_that_leaves_mid_job(self):
        artifact = self.pack("leaver", "1.0.0", payload_bytes=48 << 20)
        script = ("import dbus, os, sys\n"
                  "m = dbus.Interface(dbus.SessionBus().get_object('%s', '%s'), '%s')\n"
                  "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
                  "print(m.Install(dbus.types.UnixFd(fd), {'activate': dbus.Boolean(True)}),"
                  " flush=True)\n"
                  "os._exit(0)\n" % (NAME, PATH, MANAGER))
        out = subprocess.run(["/usr/bin/python3", "-c", script, artifact], capture_output=True,
                             text=True, check=True).stdout.strip()
        self.assertTrue(out.startswith("/org/upgraded1/job/"), out)
        self.assertEqual(self.wait_job(out)[0], "done", "the job goes on without its caller")
        self.assertEqual(os.readlink(os.path.join(self.app_dir("leaver"), "current")),
                         "releases/1.0.0")
        self.assert_nothing_half_installed("leaver")

    def test_5_the_helper_killed_mid_extraction(self):
        artifact = self.pack("victim", "1.0.0", payload_bytes=96 << 20)
        job = self.install(artifact)
        killed = None
        for _ in range(4000):  # the extraction helper: a child of the daemon, no mode argument
            children = []
            for task in os.listdir("/proc/%d/task" % self.pid):  # spawned by a job's thread
                try:
                    with open("/proc/%d/task/%s/children" % (self.pid, task)) as f:
                        children += f.read().split()
                except FileNotFoundError:
                    continue
            for child in children:
                try:
                    with open("/proc/%s/cmdline" % child) as f:
                        argv = f.read().split("\0")
                except FileNotFoundError:
                    continue
                if argv[0].endswith("upgraded-extract") and "--read-head" not in argv and \
                        "--verify" not in argv:
                    os.kill(int(child), signal.SIGKILL)
                    killed = child
            if killed:
                break
            time.sleep(0.001)
        self.assertIsNotNone(killed, "never saw the extraction helper")
        result, message = self.wait_job(job)
        self.assertEqual(result, "failed")
        self.assertIn("killed by signal 9", message)
        self.assertNotIn("victim", [str(a[0]) for a in self.manager.ListApps()],
                         "a first install that failed leaves no app behind")
        self.assert_nothing_half_installed("victim")

    def test_6_a_store_on_a_full_tmpfs(self):
        # A second root for this: the store's filesystem is a 24 MiB tmpfs, the payload 48 MiB.
        artifact = self.pack("big", "1.0.0", payload_bytes=48 << 20)
        state = os.path.join(self.root, "var/lib/upgraded/apps/big")
        os.makedirs(state, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", state], check=True)
        try:
            job = self.install(artifact)
            result, message = self.wait_job(job)
            self.assertEqual(result, "failed")
            self.assertRegex(message, "space|No space")
            left = []
            for d, dirs, files in os.walk(state):
                left += [os.path.relpath(os.path.join(d, f), state) for f in files]
            self.assertEqual(left, [".lock"], "nothing of the release is left")
            self.assert_nothing_half_installed("big")
            self.assertGreater(len(self.manager.ListApps()), 0, "the daemon goes on serving")
        finally:
            subprocess.run(["umount", state], check=True)

    def test_7_afterwards_back_to_the_baseline_and_never_killed(self):
        self.settle()
        fds, threads, rss = proc_status(self.pid)
        base_fds, base_threads, base_rss = self.baseline
        print("after the load: %d fds (baseline %d), %d threads (baseline %d), %.1f MiB RSS "
              "(baseline %.1f MiB)" % (fds, base_fds, threads, base_threads, rss / 1024,
                                       base_rss / 1024), file=sys.stderr)
        self.assertEqual(fds, base_fds)
        self.assertEqual(threads, base_threads)
        # Not under AddressSanitizer: its quarantine keeps up to 256 MiB of freed memory (to
        # catch uses after free), so there the RSS says nothing about the daemon. LeakSanitizer
        # checks it for leaks instead, when it stops.
        if not self.sanitized():
            self.assertLessEqual(rss, base_rss * 1.25 + 2048, "RSS back near its baseline")
        # The watchdog never fired: same process, no restart, still active.
        self.assertEqual(int(show("MainPID")), self.pid)
        self.assertEqual(show("NRestarts"), "0")
        self.assertEqual(show("ActiveState"), "active")


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"])
