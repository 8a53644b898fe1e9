#!/usr/bin/python3
"""The Ansible collection upgraded.fleet on three booted hosts (issue: fleets).

Three Debian 12 containers boot with PID 1 systemd (tests/system/fleet.py), each with sshd and
the freshly built .deb installed with apt, on a network of their own inside network namespaces
this test creates. ansible-playbook runs on this machine, over SSH, with the collection as
scripts/package builds it: the rolling upgrade of examples/hello 1.0.0 -> 2.0.0 and its finalize, a rerun that
changes nothing, a 3.0.0 that fails its health gate on host2 only (the rollout halts there),
finalize refused while the hosts disagree, the rollback of the host that moved, and the status
table. Each step prints what happened (scripts/fleet-demo shows this test's output).

usage: fleet_test.py DIST_DIR UPGRADECTL
Skips (exit 77) where no container can boot, but fails under CI=true."""
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import booted  # noqa: E402
import fleet  # noqa: E402

DIST, UPGRADECTL = sys.argv[1], sys.argv[2]
ART = "/mnt/art"  # the package, bound read-only into every host


def say(text):
    print("fleet: " + text, flush=True)


def recap(output):
    """PLAY RECAP of ansible-playbook's output: {host: {"ok": n, "changed": n, ...}}."""
    hosts = {}
    for line in output.split("PLAY RECAP")[-1].splitlines():
        m = re.match(r"^(\S+)\s+:\s+(.*)$", line.strip())
        if m:
            hosts[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return hosts


def usec(timestamp):
    """systemctl show --timestamp=us+utc's "Mon 2026-11-30 03:00:00.123456 UTC" in µs."""
    t = datetime.datetime.strptime(timestamp.strip(), "%a %Y-%m-%d %H:%M:%S.%f UTC")
    return int(t.replace(tzinfo=datetime.timezone.utc).timestamp() * 1e6)


class Fleet(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        debs = glob.glob(os.path.join(DIST, "upgraded_*.deb"))
        collection = glob.glob(os.path.join(DIST, "upgraded-fleet-*.tar.gz"))
        problem = None
        if not debs or not collection:
            problem = "no .deb or collection in %s: run scripts/package first" % DIST
        elif not shutil.which("ansible-playbook"):
            problem = "ansible-core is not installed (scripts/install-deps installs it)"
        if problem:
            booted.skip_or_fail(problem)
        cls.work = tempfile.mkdtemp(prefix="upgraded-fleet-art.", dir="/var/tmp")
        os.chmod(cls.work, 0o755)
        cls.key = os.path.join(cls.work, "release.key")
        subprocess.run([UPGRADECTL, "keygen", "--private", cls.key, "--public",
                        os.path.join(cls.work, "release.pem")], check=True,
                       stdout=subprocess.DEVNULL)
        cls.v1 = booted.build_hello(UPGRADECTL, cls.work, cls.key, "1.0.0")
        cls.v2 = booted.build_hello(UPGRADECTL, cls.work, cls.key, "2.0.0",
                                    "manifest-format2.json")
        shutil.copy(debs[0], os.path.join(cls.work, "upgraded.deb"))
        cls.v4 = booted.build_hello(UPGRADECTL, cls.work, cls.key, "4.0.0",
                                    "manifest-format2.json")
        # The collection as packaged (scripts/package), installed as an operator would.
        cls.collections = os.path.join(cls.work, "collections")
        subprocess.run(["ansible-galaxy", "collection", "install", "-p", cls.collections,
                        collection[0]], check=True, capture_output=True,
                       stdin=subprocess.DEVNULL,
                       env=dict(os.environ, ANSIBLE_HOME=os.path.join(cls.work, "ansible")))
        cls.fleet = fleet.Fleet(3, binds=[(cls.work, ART)])
        try:
            cls.fleet.boot()
        except booted.Unavailable as e:
            shutil.rmtree(cls.work, ignore_errors=True)
            booted.skip_or_fail(str(e))
        try:
            say("3 hosts booted and reachable over SSH (%s)" % ", ".join(
                "%s %.1f s" % kv for kv in sorted(cls.fleet.timings.items())))
            cls.hosts = dict(zip(cls.fleet.names, cls.fleet.hosts))
            errors = fleet.in_parallel([lambda c=c: cls.install(c) for c in cls.fleet.hosts])
            if errors:
                raise errors[0]
            cls.hostnames = {name: c.run(["cat", "/proc/sys/kernel/hostname"]).stdout.strip()
                             for name, c in cls.hosts.items()}
            # 3.0.0 fails its health gate on host2 only (examples/hello's broken-on).
            cls.v3 = booted.build_hello(UPGRADECTL, cls.work, cls.key, "3.0.0",
                                        "manifest-format2.json",
                                        broken_on=[cls.hostnames["host2"]])
            say("each host runs the upgraded package and hello 1.0.0")
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def install(cls, c):
        c.run(["apt-get", "install", "-y", ART + "/upgraded.deb"])
        with open(os.path.join(cls.work, "release.pem")) as f:
            c.write("/etc/upgraded/keys.d/release.pem", f.read())
        c.write("/etc/systemd/system/hello.service", booted.HELLO_UNIT)
        c.run(["systemctl", "daemon-reload"])
        c.run(["upgradectl", "install", ART + "/hello-1.0.0.upd"])

    @classmethod
    def tearDownClass(cls):
        try:
            cls.fleet.close()
        finally:
            shutil.rmtree(cls.work, ignore_errors=True)

    # --- helpers ------------------------------------------------------------------------------

    def play(self, playbook, *options, **variables):
        """ansible-playbook upgraded.fleet.<playbook> over SSH: (exit code, output, recap,
        wall seconds)."""
        started = time.monotonic()
        r = self.fleet.controller(["ansible-playbook", "upgraded.fleet." + playbook,
                                   "-e", json.dumps(variables)] + list(options),
                                  env={"ANSIBLE_COLLECTIONS_PATH": self.collections,
                                       "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"},
                                  timeout=900)
        wall = time.monotonic() - started
        output = r.stdout + r.stderr
        return r.returncode, output, recap(output), wall

    def on(self, name, *cmd, check=True):
        return self.hosts[name].run(list(cmd), check=check).stdout.strip()

    def current(self, name):
        return self.on(name, "readlink", "/var/lib/upgraded/apps/hello/current",
                       check=False).replace("releases/", "")

    def serving(self, name):
        return self.on(name, "cat", "/run/hello.state", check=False)

    def invocations(self):
        return {n: self.on(n, "systemctl", "show", "-P", "InvocationID", "hello.service")
                for n in self.hosts}

    def entered(self, name):
        """When hello.service last became active, µs of the realtime clock (one kernel: the
        hosts' clocks are the same)."""
        return usec(self.on(name, "systemctl", "show", "--timestamp=us+utc", "-P",
                            "ActiveEnterTimestamp", "hello.service"))

    def staged_at(self, name, version):
        """When the release directory was committed (its mtime, µs)."""
        out = self.on(name, "stat", "-c", "%.6Y",
                      "/var/lib/upgraded/apps/hello/releases/" + version)
        return int(float(out) * 1e6)

    def jobs(self, name, kind, version):
        """Durations (s) of the daemon's `kind` jobs of hello `version`, from its journal."""
        out = self.on(name, "journalctl", "-u", "upgraded", "-o", "json", "--no-pager",
                      "UPGRADED_APP=hello", "UPGRADED_VERSION=" + version)
        started, ended = {}, {}
        for line in out.splitlines():
            rec = json.loads(line)
            job, msg = rec.get("UPGRADED_JOB"), rec.get("MESSAGE", "")
            when = int(rec["__REALTIME_TIMESTAMP"])
            if rec.get("MESSAGE_ID") == "3a4c784a76bb409db397595cf85c1aef" and \
                    msg.startswith(kind + " "):
                started[job] = when
            elif rec.get("MESSAGE_ID") in ("1f2fcc52544e4b45aabc7375fecd86e1",
                                           "bc811cb679cc4d178788370f8d403479"):
                ended[job] = when
        return [(ended[j] - started[j]) / 1e6 for j in started if j in ended]

    def finalization(self, name):
        return json.loads(self.on(name, "upgradectl", "finalization-status", "hello",
                                  "--json"))

    # --- the tests, in order (one fleet for all) ----------------------------------------------

    def test_0_check_mode_plans_on_every_host_and_changes_nothing(self):
        before = self.invocations()
        code, out, rc, wall = self.play("rolling_upgrade", "--check", "--diff",
                                        upgraded_artifact=self.v2)
        self.assertEqual(code, 0, out)
        for name in self.hosts:
            self.assertIn("%s: hello 1.0.0 -> 2.0.0: would-change" % name, out)
            self.assertEqual(self.on(name, "ls", "/var/lib/upgraded/apps/hello/releases"),
                             "1.0.0")
            self.assertEqual(self.on(name, "sh", "-c", "ls -d /var/cache/upgraded-fleet; find "
                                     "/tmp /var/tmp /root -name '*hello-2.0.0.upd'",
                                     check=False), "")
        self.assertRegex(out, r'-\s+"current": "1\.0\.0"')
        self.assertRegex(out, r'\+\s+"current": "2\.0\.0"')
        self.assertEqual({n: rc[n]["changed"] for n in self.hosts}, {n: 2 for n in self.hosts},
                         "would stage and activate: nothing else")
        self.assertRegex(out, r'\+\s+"2\.0\.0"\n')
        self.assertRegex(out, r'\+\s+"finalization": "pre-finalized"')
        self.assertEqual(self.invocations(), before)
        say("rolling_upgrade --check --diff: each host would go 1.0.0 -> 2.0.0 "
            "(pre-finalized); nothing changed, nothing left on the hosts (%.1f s)" % wall)

    def test_1_rolling_upgrade_in_a_given_order_then_finalize_then_a_rerun(self):
        # An order that leaves a host out is refused before anything happens.
        code, out, rc, wall = self.play("rolling_upgrade", upgraded_artifact=self.v2,
                                        upgraded_hosts="fleet", upgraded_order="host2,host1")
        self.assertNotEqual(code, 0, out)
        self.assertIn("leaves out host3 of upgraded_hosts", out)
        for name in self.hosts:
            self.assertEqual(self.on(name, "ls", "/var/lib/upgraded/apps/hello/releases"),
                             "1.0.0")
        say("rolling_upgrade with an order that leaves out host3: refused, nothing staged")

        code, out, rc, wall = self.play("rolling_upgrade", upgraded_artifact=self.v2,
                                        upgraded_hosts="fleet", upgraded_order="host2,fleet")
        self.assertEqual(code, 0, out)
        say("rolling_upgrade 1.0.0 -> 2.0.0, host2 first: exit 0 in %.1f s; %s" % (wall, rc))
        for name in self.hosts:
            self.assertEqual((self.current(name), self.serving(name)), ("2.0.0", "2.0.0"))
            self.assertEqual(rc[name]["failed"], 0)
            self.assertGreater(rc[name]["changed"], 0)
        # Staged everywhere before anything restarted; then one host at a time, in inventory
        # order, each after the one before passed its gate (min_ready_s 1).
        last_staged = max(self.staged_at(n, "2.0.0") for n in self.hosts)
        entered = [self.entered(n) for n in ("host2", "host1", "host3")]
        self.assertLess(last_staged, entered[0])
        self.assertGreater(entered[1] - entered[0], 1000000)
        self.assertGreater(entered[2] - entered[1], 1000000)
        for name in self.hosts:
            self.assertRegex(out, r"%s: hello 1\.0\.0 -> 2\.0\.0: activated, downtime [0-9.]+ ms"
                             % name)
            self.assertEqual(self.finalization(name)[0]["state"], "pre-finalized")
        jobs = {n: self.jobs(n, "activate", "2.0.0") for n in self.hosts}
        own = sum(sum(j) for j in jobs.values())
        say("the hosts' own activation jobs took %s s, %.2f s together: the rollout took %.2f "
            "times that (staging, SSH and Ansible included)" %
            (", ".join("%.2f" % sum(j) for j in jobs.values()), own, wall / own))

        code, out, rc, wall = self.play("finalize", upgraded_app="hello",
                                        upgraded_version="2.0.0", upgraded_order="host3,all")
        self.assertEqual(code, 0, out)
        backups = {}
        for name in self.hosts:
            status = self.finalization(name)[0]
            self.assertEqual(status["state"], "finalized")
            backups[name] = status["last_backup"]
            self.assertTrue(backups[name].startswith("hello-format-1-" + self.hostnames[name]),
                            backups[name])
            self.assertIn("%s: hello 2.0.0 finalized, backup %s" % (name, backups[name]), out)
        self.assertLess(out.index("host3: hello 2.0.0 finalized"),
                        out.index("host1: hello 2.0.0 finalized"))
        self.assertLess(out.index("host1: hello 2.0.0 finalized"),
                        out.index("host2: hello 2.0.0 finalized"))
        say("finalize: exit 0 in %.1f s; backups %s" % (wall, backups))

        before = self.invocations()
        code, out, rc, wall = self.play("rolling_upgrade", upgraded_artifact=self.v2)
        self.assertEqual(code, 0, out)
        self.assertEqual({n: rc[n]["changed"] for n in self.hosts}, {n: 0 for n in self.hosts})
        self.assertEqual(self.invocations(), before, "the rerun restarted nothing")
        code, out, rc, wall_finalize = self.play("finalize", upgraded_app="hello")
        self.assertEqual(code, 0, out)
        self.assertEqual({n: rc[n]["changed"] for n in self.hosts}, {n: 0 for n in self.hosts})
        say("rerun of rolling_upgrade: changed=0 on every host, nothing restarted, %.1f s; "
            "finalize again: changed=0, %.1f s" % (wall, wall_finalize))

    def test_2_a_host_that_cannot_stage_stops_the_rollout_before_any_restart(self):
        before = self.invocations()
        self.on("host3", "mv", "/etc/upgraded/keys.d/release.pem", "/root/release.pem")
        try:
            code, out, rc, wall = self.play("rolling_upgrade", upgraded_artifact=self.v4)
        finally:
            self.on("host3", "mv", "/root/release.pem", "/etc/upgraded/keys.d/release.pem")
        self.assertNotEqual(code, 0, out)
        self.assertRegex(out, r"fatal: \[host3\]: FAILED!.*trusted keys")
        self.assertNotIn("PLAY [Activate it host by host]", out)
        self.assertEqual(self.invocations(), before, "nothing restarted anywhere")
        for name in self.hosts:
            self.assertEqual(self.current(name), "2.0.0")
        self.assertNotIn("4.0.0", self.on("host3", "ls", "/var/lib/upgraded/apps/hello/releases"))
        say("rolling_upgrade 2.0.0 -> 4.0.0 with host3 lacking the release key: stopped after "
            "staging (exit %d), nothing restarted anywhere" % code)

    def test_3_a_release_failing_on_one_host_halts_the_rollout(self):
        before = self.invocations()
        code, out, rc, wall = self.play("rolling_upgrade", upgraded_artifact=self.v3)
        self.assertNotEqual(code, 0, out)
        self.assertRegex(out, r"fatal: \[host2\]: FAILED!.*rolled back to 2\.0\.0")
        self.assertRegex(out, r'fatal: \[host2\]: FAILED! => .*"changed": true')
        self.assertRegex(out, r'fatal: \[host2\]: FAILED! => .*"result": "rolled-back"')
        self.assertIn("broken on " + self.hostnames["host2"], self.on(
            "host2", "journalctl", "-u", "hello", "--no-pager"))
        self.assertEqual((self.current("host1"), self.serving("host1")), ("3.0.0", "3.0.0"))
        self.assertEqual((self.current("host2"), self.serving("host2")), ("2.0.0", "2.0.0"))
        self.assertNotEqual(self.invocations()["host2"], before["host2"], "restarted on 2.0.0")
        self.assertEqual(self.current("host3"), "2.0.0")
        self.assertEqual(self.invocations()["host3"], before["host3"], "host3 never restarted")
        self.assertIn("3.0.0", self.on("host3", "ls", "/var/lib/upgraded/apps/hello/releases"),
                      "staged on every host before the first activation")
        self.assertEqual(rc["host3"]["changed"], 2, "host3: the artifact copied and staged only")
        say("rolling_upgrade 2.0.0 -> 3.0.0: exit %d; host1 on 3.0.0, host2 rolled back to "
            "2.0.0 by its daemon, host3 untouched (3.0.0 staged only)" % code)

        running = self.invocations()
        fin = {n: self.finalization(n)[0] for n in self.hosts}
        code, out, rc, wall = self.play("finalize", upgraded_app="hello")
        self.assertNotEqual(code, 0, out)
        self.assertIn("finalize refused, nothing changed", out)
        self.assertIn("host1: hello 3.0.0", out)
        self.assertIn("host3: hello 2.0.0", out)
        self.assertEqual({n: self.finalization(n)[0] for n in self.hosts}, fin)
        self.assertEqual(self.invocations(), running)
        say("finalize while the hosts disagree: refused (exit %d), nothing changed" % code)

        code, out, rc, wall = self.play("rollback", upgraded_app="hello",
                                        upgraded_from_version="3.0.0")
        self.assertEqual(code, 0, out)
        self.assertEqual((self.current("host1"), self.serving("host1")), ("2.0.0", "2.0.0"))
        after = self.invocations()
        self.assertNotEqual(after["host1"], running["host1"])
        self.assertEqual((after["host2"], after["host3"]), (running["host2"], running["host3"]))
        self.assertEqual([rc[n]["changed"] for n in ("host1", "host2", "host3")], [1, 0, 0])
        self.assertLess(out.index("host3: hello runs 2.0.0, not 3.0.0"),
                        out.index("host1: hello rolled back to 2.0.0"), "reverse order")
        say("rollback from 3.0.0: host1 back on 2.0.0; host2 and host3 left alone")

    def test_4_status_is_one_table(self):
        table = os.path.join(self.work, "status.json")
        code, out, rc, wall = self.play("status", upgraded_status_file=table)
        self.assertEqual(code, 0, out)
        with open(table) as f:
            rows = json.load(f)
        self.assertEqual(rows, [{"host": n, "app": "hello", "release": "2.0.0", "status": "good",
                                 "finalization": "finalized"} for n in ("host1", "host2",
                                                                         "host3")])
        self.assertRegex(out, r"host2\s+hello\s+2\.0\.0\s+good\s+finalized")
        say("status: %d rows, each hello 2.0.0 good finalized" % len(rows))


if __name__ == "__main__":
    result = unittest.main(argv=[sys.argv[0], "-v"], exit=False).result
    if result.wasSuccessful() and len(result.skipped) == result.testsRun and result.testsRun:
        sys.exit(77)
    sys.exit(0 if result.wasSuccessful() else 1)
