#!/usr/bin/python3
"""The seed runbooks (docs/procedures.md), run end to end from their examples/ on the
real-systemd testbed: each example's releases are built with examples/build-release, its units
installed as written (paths taken under the instance's root), and the runbook carried out with
upgradectl against the daemon.

    tests/testbed/with-systemd-user tests/integration/procedures_test.py UPGRADED UPGRADECTL
"""

import glob
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../support"))
from sample_service import TIME_FACTOR, instance_dir  # noqa: E402

UPGRADED, UPGRADECTL = sys.argv[1], sys.argv[2]
TESTBED = os.environ["UPGRADED_TESTBED"]
UNITS_DIR = os.environ["UPGRADED_TESTBED_UNITS"]
EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../examples")


class Runbook(unittest.TestCase):
    example = None  # examples/<example>, also the app's name
    data = None     # the app's data directory, as on a host
    policy = ""     # more of the app's host policy ([apps.<example>])
    apps = None     # the apps, when the example is several (default: [example])

    def setUp(self):
        self.dir, self.root, self.key = instance_dir(UPGRADECTL, TESTBED)
        self.datadir = self.root + self.data
        os.makedirs(self.datadir)
        with open(os.path.join(self.root, "etc/upgraded/upgraded.conf"), "w") as f:
            for app in self.apps or [self.example]:
                f.write('[apps.%s]\ndata_dirs = ["%s"]\n%s' % (app, self.data, self.policy))
        self.units = []
        for path in sorted(glob.glob(os.path.join(EXAMPLES, self.example, "units/*"))):
            with open(path) as f:
                text = f.read()
            # The example's units name host paths: here they live under the instance's root.
            text = self.unit_text(text.replace("=/var/lib/", "=" + self.root + "/var/lib/"))
            name = os.path.basename(path)
            with open(os.path.join(UNITS_DIR, name), "w") as f:
                f.write(text)
            self.units.append(name)
        subprocess.run(["systemctl", "--user", "daemon-reload"], check=True)
        self.log = open(os.path.join(self.dir, "daemon.log"), "ab")
        self.daemon = subprocess.Popen([UPGRADED, "--user", "--root", self.root],
                                       stdout=self.log, stderr=self.log)
        for _ in range(200):
            if self.ctl("jobs", check=None).returncode == 0:
                break
            time.sleep(0.05)
        else:
            self.fail("upgraded did not come up")

    def tearDown(self):
        self.daemon.send_signal(signal.SIGTERM)
        self.assertEqual(self.daemon.wait(timeout=60), 0)
        self.log.close()
        for unit in self.units:
            # A template's instances: every one that is loaded.
            subprocess.run(["systemctl", "--user", "stop", unit.replace("@.", "@*.")],
                           check=False)
            subprocess.run(["systemctl", "--user", "reset-failed", unit], check=False,
                           stderr=subprocess.DEVNULL)
            os.unlink(os.path.join(UNITS_DIR, unit))
        shutil.rmtree(self.dir, ignore_errors=True)

    def unit_text(self, text):
        """An example's unit as installed here (a subclass may adapt more of it)."""
        return text

    def ctl(self, *args, check=0):
        r = subprocess.run([UPGRADECTL, *args, "--user"], capture_output=True, text=True)
        if check is not None:
            self.assertEqual(r.returncode, check, "%s\nstdout: %s\nstderr: %s" %
                             (" ".join(args), r.stdout, r.stderr))
        return r

    def release(self, version, app=None):
        out = os.path.join(self.dir, "%s-%s.upd" % (app or self.example, version))
        subprocess.run([os.path.join(EXAMPLES, "build-release"), self.example, version, self.key,
                        out] + ([app] if app else []), check=True,
                       env=dict(os.environ, UPGRADECTL=UPGRADECTL))
        return out

    def read(self, name):
        with open(os.path.join(self.datadir, name)) as f:
            return f.read().strip()

    def wait_read(self, name, expect):
        for _ in range(200 * TIME_FACTOR):
            try:
                if self.read(name) == expect:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        return self.read(name)

    def finalization(self):
        return json.loads(self.ctl("finalization-status", self.example, "--json").stdout)[0]

    def current(self):
        return os.readlink(os.path.join(self.root, "var/lib/upgraded/apps", self.example,
                                        "current"))

    def invocations(self):
        return [subprocess.run(["systemctl", "--user", "show", "-P", "InvocationID", u],
                               capture_output=True, text=True).stdout.strip()
                for u in self.units]


class Ozone(Runbook):
    """seeds/ozone-non-rolling-upgrade.md: prepare, stop all, replace, start, pre-finalized,
    downgrade while pre-finalized, finalize (SCM then OM), no downgrade after."""
    example, data = "ozone", "/var/lib/ozone"

    def test_non_rolling_upgrade_with_prepare_and_finalize(self):
        self.ctl("install", "-q", self.release("1.2.0"))
        self.assertEqual(self.wait_read("om.status", "1.2.0 finalized mlv=1 slv=1"),
                         "1.2.0 finalized mlv=1 slv=1")
        self.ctl("install", "-q", self.release("1.3.0"))
        # Every component restarted on 1.3.0, pre-finalized on the old layout; OM out of
        # prepare mode again.
        for c in ["scm", "datanode", "om"]:
            self.assertEqual(self.read(c + ".status"), "1.3.0 pre-finalized mlv=1 slv=2")
        self.assertFalse(os.path.exists(os.path.join(self.datadir, "om.prepared")))
        f = self.finalization()
        self.assertEqual((f["state"], f["finalized_data_format"], f["current_writes"]),
                         ("pre-finalized", 1, 2))
        # Downgrade while pre-finalized: the same steps with the old release.
        self.ctl("rollback", "-q", self.example)
        self.assertEqual(self.read("om.status"), "1.2.0 finalized mlv=1 slv=1")
        self.ctl("activate", "-q", self.example, "1.3.0")
        self.ctl("finalize", "--yes", "-q", self.example)
        f = self.finalization()
        self.assertEqual((f["state"], f["finalized_data_format"]), ("finalized", 2))
        self.assertRegex(f["last_backup"], r"^snap-\d{8}T\d{6}Z-mlv1$")
        self.assertTrue(os.path.isdir(os.path.join(self.datadir, "backups", f["last_backup"])))
        self.assertEqual(self.read("layout"), "2")
        # "Once the following steps are performed, downgrading will not be possible."
        inv = self.invocations()
        r = self.ctl("rollback", self.example, check=3)
        self.assertIn("restore backup '%s' to go back" % f["last_backup"], r.stderr)
        self.assertEqual((self.current(), self.invocations()), ("releases/1.3.0", inv))


class CockroachDB(Runbook):
    """seeds/cockroachdb-upgrade-and-downgrade.md: patch releases move freely; a major release
    reads the previous one's data until finalized; no skipping; back up, then finalize."""
    example, data = "cockroachdb", "/var/lib/cockroach"

    def test_major_upgrade_with_manual_finalization(self):
        self.ctl("install", "-q", self.release("23.1.0"))
        self.ctl("install", "-q", self.release("23.1.1"))
        self.ctl("rollback", "-q", self.example)  # a patch: down and up freely
        self.ctl("activate", "-q", self.example, "23.1.1")
        for v in ["23.2.0", "24.1.0"]:
            self.ctl("install", "--stage-only", "-q", self.release(v))
        # No skipping a major release: 24.1 only from 23.2, and only once 23.2 is finalized.
        r = self.ctl("activate", self.example, "24.1.0", check=3)
        self.assertIn("24.1.0 cannot be activated from 23.1.1 (upgrade_from: 23.2.*)", r.stderr)
        self.assertIn("no installed release leads there", r.stderr)
        self.ctl("activate", "-q", self.example, "23.2.0")
        self.assertEqual(self.finalization()["state"], "pre-finalized")
        r = self.ctl("activate", self.example, "24.1.0", check=3)
        self.assertIn("24.1.0 reads data formats 232\u2013241, but the data is in format 231",
                      r.stderr)
        self.ctl("rollback", "-q", self.example)  # before finalization: allowed
        self.assertEqual(self.wait_read("node.status", "23.1.1 binary=231 cluster=231"),
                         "23.1.1 binary=231 cluster=231")
        self.ctl("activate", "-q", self.example, "23.2.0")
        self.ctl("finalize", "--yes", "-q", self.example)
        self.assertEqual(self.read("cluster-version"), "232")
        backup = self.finalization()["last_backup"]
        self.assertRegex(backup, r"^backup-\d{14}-cluster231$")
        self.ctl("activate", "-q", self.example, "24.1.0")
        self.assertEqual(self.read("node.status"), "24.1.0 binary=241 cluster=232")
        self.assertEqual(self.finalization()["rollback_targets"], ["23.2.0"])
        r = self.ctl("activate", self.example, "23.1.1", check=3)
        self.assertIn("format 232 was finalized", r.stderr)
        self.assertIn("restore backup '%s'" % backup, r.stderr)


class OpenMLDB(Runbook):
    """seeds/openmldb-upgrade.md: components in order, pre-upgrade (leaders off the tablet)
    before, post-upgrade (leaders back) after, showopstatus as the check."""
    example, data = "openmldb", "/var/lib/openmldb"
    policy = 'instances = ["1", "2", "3"]\n'  # the tablets on this host

    def ops(self):
        return [line.split(" ", 1)[1] for line in self.read("ops.log").splitlines()]

    def test_ordered_upgrade_with_pre_and_post_upgrade(self):
        self.ctl("install", "-q", self.release("0.8.4"))
        os.unlink(os.path.join(self.datadir, "ops.log"))
        self.ctl("install", "-q", self.release("0.8.5"))
        # pre-upgrade before any component restarted, post-upgrade after all of them; the
        # components in the runbook's order, the host's three tablets (the policy's instances
        # of openmldb-tablet@.service) one at a time, each checked by showopstatus (after
        # min_ready_s) before the next one is touched.
        ops = self.ops()
        components = ["nameserver", "tablet@1", "tablet@2", "tablet@3", "taskmanager",
                      "apiserver"]
        self.assertEqual(ops, ["pre-upgrade: leader partitions moved off the tablets"] +
                         [line for c in components
                          for line in ("%s 0.8.5 started" % c,
                                       "showopstatus %s: no failed operations" % c)] +
                         ["post-upgrade: leader partitions back on the tablets"])
        self.assertEqual(self.read("leaders"), "tablets")
        plan = json.loads(self.ctl("plan", "--rollback", self.example, "--json").stdout)
        self.assertEqual([s["target"] for s in plan["steps"] if s["kind"] == "restart"],
                         ["openmldb-" + c + ".service" for c in components])
        # A failed operation found by showopstatus after the second tablet: the upgrade is
        # rolled back on the components moved so far, the others were never restarted.
        self.ctl("rollback", "-q", self.example)
        tablet3 = self.invocation("openmldb-tablet@3.service")
        tablet1 = self.invocation("openmldb-tablet@1.service")
        os.unlink(os.path.join(self.datadir, "ops.log"))
        with open(os.path.join(self.datadir, "fail-after"), "w") as f:
            f.write("tablet@2")
        r = self.ctl("activate", self.example, "0.8.5", check=1)
        self.assertIn("health gate of openmldb-tablet@2.service", r.stderr)
        self.assertIn("kFailed: op 42 (kReAddReplica)", r.stderr)
        self.assertIn("rolled back to 0.8.4 (never restarted: openmldb-tablet@3.service, "
                      "openmldb-taskmanager.service, openmldb-apiserver.service)", r.stderr)
        for c in ("nameserver", "tablet@1", "tablet@2", "tablet@3"):
            self.assertEqual(self.wait_read(c + ".status", "0.8.4"), "0.8.4", c)
        self.assertEqual(self.invocation("openmldb-tablet@3.service"), tablet3)
        self.assertNotEqual(self.invocation("openmldb-tablet@1.service"), tablet1)
        # Moved one by one, each gated (so in this order); then the same three back on 0.8.4
        # (restarted in turn without a soak: their own log lines may come in any order).
        started = [line for line in self.ops() if "started" in line]
        self.assertEqual(started[:3], ["nameserver 0.8.5 started", "tablet@1 0.8.5 started",
                                       "tablet@2 0.8.5 started"])
        self.assertEqual(sorted(started[3:]), ["nameserver 0.8.4 started",
                                               "tablet@1 0.8.4 started",
                                               "tablet@2 0.8.4 started"])

    def invocation(self, unit):
        return subprocess.run(["systemctl", "--user", "show", "-P", "InvocationID", unit],
                              capture_output=True, text=True, check=True).stdout


class OpenStack(Runbook):
    """seeds/rdo-upgrading.md, option 2: service by service, keystone, glance, cinder, nova, each
    taken down, its database synced, started and checked before the next is touched; as one set,
    undone as a whole if a service fails."""
    example, data = "openstack", "/var/lib/openstack"
    apps = ["keystone", "glance", "cinder", "nova"]

    def ops(self):
        lines = [line.split(" ", 1)[1] for line in self.read("ops.log").splitlines()]
        os.unlink(os.path.join(self.datadir, "ops.log"))
        return lines

    def test_service_by_service_as_one_set(self):
        for app in self.apps:
            self.ctl("install", "-q", self.release("26.0.0", app))
            self.ctl("install", "--stage-only", "-q", self.release("27.0.0", app))
        self.ops()
        spec = [app + "=27.0.0" for app in self.apps]
        plan = json.loads(self.ctl("plan", *spec, "--json").stdout)
        self.assertEqual([[s["kind"] + ":" + s["target"] for s in m["steps"]]
                          for m in plan["members"]],
                         [["stop:%s.service" % a, "switch:27.0.0", "hook:migrate",
                           "start:%s.service" % a, "gate:", "hook:health", "mark-good:27.0.0"]
                          for a in self.apps])
        # A service whose db sync fails: it goes back by itself, the ones before it are
        # rolled back last first, and every service serves 26.0.0 again.
        open(os.path.join(self.datadir, "fail-db-sync-nova"), "w").close()
        r = self.ctl("activate", *spec, check=1)
        self.assertIn("nova 27.0.0: the migrate hook", r.stderr)
        self.assertIn("undone, cinder back on 26.0.0, glance back on 26.0.0, keystone back on "
                      "26.0.0", r.stderr)
        for app in self.apps:
            self.assertEqual(self.wait_read(app + ".serving", "26.0.0"), "26.0.0", app)
        self.ops()
        # Then the upgrade, service by service: each synced, started and checked before the
        # next one is taken down.
        os.unlink(os.path.join(self.datadir, "fail-db-sync-nova"))
        for app in self.apps:
            self.ctl("install", "--stage-only", "-q", self.release("27.0.1", app))
        self.ctl("activate", "-q", *[app + "=27.0.1" for app in self.apps])
        self.assertEqual(self.ops(), [line for app in self.apps for line in (
            "%s db sync to schema 27" % app, "%s 27.0.1 started" % app,
            "%s 27.0.1 checked" % app)])
        tx = {json.loads(self.ctl("history", app, "--json").stdout)[-1]["transaction"]
              for app in self.apps}
        self.assertEqual(len(tx), 1)


class Keystone(Runbook):
    """seeds/rdo-upgrading.md, one service: stop, upgrade, db sync (expand, migrate), start;
    contract (finalize) once the new release has proved itself."""
    example, data = "keystone", "/var/lib/keystone"

    def test_db_sync_between_stop_and_start_then_contract(self):
        self.ctl("install", "-q", self.release("25.0.0"))
        self.assertEqual(self.wait_read("serving", "25.0.0"), "25.0.0")
        self.ctl("install", "-q", self.release("26.0.0"))
        self.assertEqual(self.wait_read("serving", "26.0.0"), "26.0.0")
        self.assertEqual((self.read("contracted"), self.read("expanded")), ("25", "26"))
        self.ctl("rollback", "-q", self.example)  # the expanded schema still serves 25
        self.assertEqual(self.wait_read("serving", "25.0.0"), "25.0.0")
        self.ctl("activate", "-q", self.example, "26.0.0")
        self.ctl("finalize", "--yes", "-q", self.example)
        self.assertEqual(self.read("contracted"), "26")
        dump = self.finalization()["last_backup"]
        self.assertRegex(dump, r"^keystone-\d{14}-schema25\.sql$")
        self.assertTrue(os.path.exists(os.path.join(self.datadir, "dumps", dump)))
        r = self.ctl("rollback", self.example, check=3)
        self.assertIn("restore backup '%s'" % dump, r.stderr)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Load:
    """Requests without a pause from `threads` threads, each on a new connection (as
    examples/webapp answers: HTTP/1.0), until stopped: what came back, and every failure."""

    def __init__(self, port, threads=4):
        self.port, self.stop_at = port, None
        self.lock = threading.Lock()
        self.ok = 0
        self.refused, self.errors, self.bad = [], [], []
        self.versions = set()
        self.threads = [threading.Thread(target=self.run) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def run(self):
        while self.stop_at is None:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                c.request("GET", "/")
                r = c.getresponse()
                body = r.read().decode()
                with self.lock:
                    if r.status == 200:
                        self.ok += 1
                        self.versions.add(body.strip())
                    else:
                        self.bad.append(r.status)
            except ConnectionRefusedError as e:
                with self.lock:
                    self.refused.append(str(e))
            except Exception as e:  # noqa: B902 - any failure counts, none may end the thread
                with self.lock:
                    self.errors.append(repr(e))
            finally:
                c.close()

    def stop(self):
        self.alive = all(t.is_alive() for t in self.threads)
        self.stop_at = time.monotonic()
        for t in self.threads:
            t.join(timeout=60)


class WebApp(Runbook):
    """A service behind a socket unit: upgraded and rolled back under load, not one connection
    refused (examples/webapp)."""
    example = "webapp"
    data = "/var/lib/webapp"

    def unit_text(self, text):
        if not hasattr(self, "port"):
            self.port = free_port()
        return text.replace("127.0.0.1:8089", "127.0.0.1:%d" % self.port)

    def get(self, port=None):
        c = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=10)
        try:
            c.request("GET", "/")
            return c.getresponse().read().decode().strip()
        finally:
            c.close()

    def show(self, unit, prop):
        return subprocess.run(["systemctl", "--user", "show", "-P", prop, unit],
                              capture_output=True, text=True, check=True).stdout.strip()

    def test_upgrades_and_rollbacks_refuse_no_connection(self):
        # 0.9.0 binds its port itself; 1.0.0 adds the socket unit, which is not listening yet:
        # the service stops first (it holds the port), then the socket starts, then the service.
        self.ctl("install", "-q", self.release("0.9.0"))
        self.assertEqual(self.get(), "webapp 0.9.0")
        self.ctl("install", "--stage-only", "-q", self.release("1.0.0"))
        plan = json.loads(self.ctl("plan", "webapp=1.0.0", "--json").stdout)
        self.assertEqual([(s["kind"], s["target"]) for s in plan["steps"]],
                         [("switch", "1.0.0"), ("stop", "webapp.service"),
                          ("start", "webapp.socket"), ("restart", "webapp.service"),
                          ("gate", ""), ("mark-good", "1.0.0")])
        self.assertIn("connections are refused until it listens", plan["steps"][2]["note"])
        self.ctl("activate", "-q", "webapp", "1.0.0")
        self.assertEqual(self.get(), "webapp 1.0.0")
        self.assertEqual(self.show("webapp.socket", "ActiveState"), "active")
        self.ctl("install", "--stage-only", "-q", self.release("1.1.0"))
        # The plan: the socket held, the service restarted behind it.
        plan = json.loads(self.ctl("plan", "webapp=1.1.0", "--json").stdout)
        self.assertEqual([(s["kind"], s["target"]) for s in plan["steps"]],
                         [("switch", "1.1.0"), ("hold", "webapp.socket"),
                          ("restart", "webapp.service"), ("gate", ""), ("mark-good", "1.1.0")])
        self.assertEqual(plan["steps"][1]["units_down"], [])
        self.assertEqual([(d["unit"], d["held_by"]) for d in plan["downtime"]],
                         [("webapp.service", ["webapp.socket"])])
        text = self.ctl("plan", "webapp=1.1.0").stdout
        self.assertIn("hold webapp.socket (never stopped", text)
        self.assertIn("socket held (webapp.socket): 0 refused expected", text)

        listening = self.show("webapp.socket", "ActiveEnterTimestampMonotonic")
        service = self.show("webapp.service", "InvocationID")
        load = Load(self.port)
        try:
            for args in [("activate", "webapp", "1.1.0"), ("rollback", "webapp"),
                         ("activate", "webapp", "1.1.0")]:
                self.ctl(*args, "-q")
                invocation = self.show("webapp.service", "InvocationID")
                self.assertNotEqual(invocation, service, args)
                service = invocation
        finally:
            load.stop()
        self.assertTrue(load.alive, "a load thread ended early")
        self.assertEqual(load.refused, [])
        self.assertEqual(load.errors, [])
        self.assertEqual(load.bad, [])
        self.assertGreater(load.ok, 100)
        self.assertEqual(load.versions, {"webapp 1.0.0", "webapp 1.1.0"})
        # The socket never went down.
        self.assertEqual(self.show("webapp.socket", "ActiveEnterTimestampMonotonic"), listening)
        steps = [h for h in json.loads(self.ctl("history", "webapp", "--json").stdout)]
        self.assertEqual([sorted(h["downtime_usec"]) for h in steps[-3:]],
                         [["webapp.service"]] * 3)

        # A socket whose unit file changed on disk (a new port) is kept as it runs: restarting
        # it would refuse connections, which is the operator's call; the plan says so.
        new_port = free_port()
        with open(os.path.join(UNITS_DIR, "webapp.socket")) as f:
            text = f.read()
        with open(os.path.join(UNITS_DIR, "webapp.socket"), "w") as f:
            f.write(text.replace(":%d" % self.port, ":%d" % new_port))
        plan = json.loads(self.ctl("plan", "--rollback", "webapp", "--json").stdout)
        socket_step = [s for s in plan["steps"] if s["target"] == "webapp.socket"][0]
        self.assertEqual(socket_step["kind"], "hold")
        self.assertIn("unit file changed on disk", socket_step["note"])
        self.ctl("rollback", "-q", "webapp")
        self.assertEqual(self.get(), "webapp 1.0.0")
        self.assertEqual(self.show("webapp.socket", "ActiveEnterTimestampMonotonic"), listening)
        with self.assertRaises(ConnectionRefusedError):
            self.get(new_port)


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
