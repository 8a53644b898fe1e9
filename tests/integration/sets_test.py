#!/usr/bin/python3
"""Sets: several apps activated in order as one job (D-Bus ActivateSet, `upgradectl activate
APP=VERSION...`), end to end on the real-systemd testbed: a failing member rolls back the ones
before it, last first; a daemon killed at any step finishes or undoes the whole set when it
starts again.

    tests/testbed/with-systemd-user tests/integration/sets_test.py UPGRADED UPGRADECTL
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../support"))
from sample_service import DaemonRunner, instance_dir, pack_sample, wait_for_content  # noqa: E402,E501

UPGRADED, UPGRADECTL = sys.argv[1], sys.argv[2]
TESTBED = os.environ["UPGRADED_TESTBED"]
UNITS_DIR = os.environ["UPGRADED_TESTBED_UNITS"]
APPS = ["web", "api", "db"]  # the order of every set here


class Sets(DaemonRunner, unittest.TestCase):
    upgraded, upgradectl = UPGRADED, UPGRADECTL

    def setUp(self):
        self.dir, self.root, self.key = instance_dir(UPGRADECTL, TESTBED)
        self.daemon = None
        for app in APPS:
            os.makedirs(os.path.join(self.dir, app))
            with open(os.path.join(UNITS_DIR, app + ".service"), "w") as f:
                f.write("[Service]\nExecStart=%s/var/lib/upgraded/apps/%s/current/bin/hello\n"
                        "Environment=OUT=%s\n" % (self.root, app, self.out(app)))
        subprocess.run(["systemctl", "--user", "daemon-reload"], check=True)
        self.start_daemon()
        # Every app on 1.0.0; 2.0.0 staged (db's 2.0.1 fails its health gate).
        for app in APPS:
            self.ctl("install", "-q", self.pack(app, "1.0.0"))
            self.ctl("install", "--stage-only", "-q", self.pack(app, "2.0.0"))
        self.ctl("install", "--stage-only", "-q", self.pack("db", "2.0.1", fail=True))
        self.assert_on("1.0.0")

    def tearDown(self):
        self.stop_daemon()
        for app in APPS:
            subprocess.run(["systemctl", "--user", "stop", app + ".service"], check=False)
            subprocess.run(["systemctl", "--user", "reset-failed", app + ".service"],
                           check=False, stderr=subprocess.DEVNULL)
            os.unlink(os.path.join(UNITS_DIR, app + ".service"))
        shutil.rmtree(self.dir, ignore_errors=True)

    def out(self, app):
        return os.path.join(self.dir, app, "serving")

    def pack(self, app, version, fail=False):
        return pack_sample(UPGRADECTL, self.key, os.path.join(self.dir, app), app,
                           app + ".service", version, fail=fail, min_ready_s=1 if fail else 0)

    def current(self, app):
        return os.readlink(os.path.join(self.root, "var/lib/upgraded/apps", app,
                                        "current")).split("/")[-1]

    def show(self, app, prop):
        return subprocess.run(["systemctl", "--user", "show", "-P", prop, app + ".service"],
                              capture_output=True, text=True, check=True).stdout.strip()

    def history(self, app):
        return json.loads(self.ctl("history", app, "--json").stdout)

    def assert_on(self, version, apps=APPS):
        for app in apps:
            self.assertEqual(self.current(app), version, app)
            self.assertEqual(wait_for_content(self.out(app), version), version, app)
            self.assertEqual(self.show(app, "ActiveState"), "active", app)

    def store_files(self):
        """Every state, record and history file of the store, with its contents."""
        out = {}
        for path in glob.glob(os.path.join(self.root, "var/lib/upgraded/**"), recursive=True):
            if os.path.isfile(path) and "/releases/" not in path:
                with open(path, "rb") as f:
                    out[path] = f.read()
        return out

    def test_a_failing_member_rolls_back_the_ones_before_it_last_first(self):
        # The plan first: every member's steps in order, and nothing changed.
        before = self.store_files()
        plan = json.loads(self.ctl("plan", "web=2.0.0", "api=2.0.0", "db=2.0.1",
                                   "--json").stdout)
        self.assertEqual([(m["app"], m["from"], m["to"]) for m in plan["members"]],
                         [(app, "1.0.0", "2.0.0" if app != "db" else "2.0.1") for app in APPS])
        self.assertEqual([[s["kind"] for s in m["steps"]] for m in plan["members"]],
                         [["switch", "restart", "gate", "mark-good"]] * 3)
        self.assertTrue(plan["changes"])
        self.assertIsNone(plan["refusal"])
        self.assertIn("last first", plan["on_failure"])
        text = self.ctl("plan", "web=2.0.0", "api=2.0.0", "db=2.0.1").stdout
        self.assertIn("3/3: Plan: activate db 1.0.0 \u2192 2.0.1", text)
        self.assertIn("Set of 3 apps, in this order.", text)
        self.assertEqual(self.store_files(), before)

        r = self.ctl("activate", "web=2.0.0", "api=2.0.0", "db=2.0.1", check=1)
        self.assertIn("db 2.0.1: health gate: db.service", r.stderr)
        self.assertIn("undone, api back on 1.0.0, web back on 1.0.0", r.stderr)
        self.assert_on("1.0.0")
        # Back on 1.0.0 in reverse order: db (its own rollback), then api, then web.
        entered = [int(self.show(app, "ActiveEnterTimestampMonotonic")) for app in APPS]
        self.assertLess(entered[2], entered[1])
        self.assertLess(entered[1], entered[0])
        # One transaction in every member's history.
        web, api, db = (self.history(app) for app in APPS)
        tx = db[-1]["transaction"]
        self.assertRegex(tx, r"^set-\d+-\d+$")
        self.assertEqual([(h["op"], h["to"], h["result"], h["transaction"]) for h in web[-2:]],
                         [("activate", "2.0.0", "done", tx), ("rollback", "1.0.0", "done", tx)])
        self.assertEqual([(h["op"], h["to"], h["result"], h["transaction"]) for h in api[-2:]],
                         [("activate", "2.0.0", "done", tx), ("rollback", "1.0.0", "done", tx)])
        self.assertEqual((db[-1]["op"], db[-1]["result"]), ("activate", "rolled-back"))
        self.assertEqual(glob.glob(os.path.join(self.root, "var/lib/upgraded/sets/*")), [])

        # A member that would be refused: nothing in the set changes.
        before = [self.show(app, "InvocationID") for app in APPS]
        self.assertEqual(self.ctl("plan", "web=2.0.0", "db=2.0.1", check=3).returncode, 3)
        r = self.ctl("activate", "web=2.0.0", "db=2.0.1", check=3)
        self.assertIn("db 2.0.1: ", r.stderr)
        self.assertIn("marked bad", r.stderr)
        self.assertIn("nothing in the set was changed", r.stderr)
        self.ctl("activate", "web=2.0.0", "api=9.9.9", check=8)  # not installed
        self.assertEqual([self.show(app, "InvocationID") for app in APPS], before)
        self.assert_on("1.0.0")
        self.assertEqual(self.ctl("activate", "web=2.0.0", "web=2.0.0", check=2).returncode, 2)
        self.ctl("activate", "web=2.0.0", "api", check=2)

        # A set that passes: every member on its release, one transaction.
        self.ctl("activate", "-q", "db=2.0.0", "api=2.0.0", "web=2.0.0")
        self.assert_on("2.0.0")
        tx = self.history("db")[-1]["transaction"]
        self.assertEqual([self.history(app)[-1]["transaction"] for app in APPS], [tx] * 3)

    def killed_at(self, point, spec, verb="activate"):
        """Runs `upgradectl VERB SPEC...` (activates the set) with a daemon that kills itself at
        `point`, then starts a daemon again and waits for its recovery."""
        self.stop_daemon()
        self.start_daemon(env={"UPGRADED_CRASH_AT": point})
        self.ctl(verb, *spec, check=None)
        self.daemon.wait(timeout=60)
        self.assertEqual(self.daemon.returncode, -signal.SIGKILL, point)
        self.log.close()
        self.daemon = None
        self.start_daemon()
        self.settled()
        self.assertEqual(glob.glob(os.path.join(self.root, "var/lib/upgraded/sets/*")), [],
                         point)

    def test_a_daemon_killed_at_any_step_of_a_set_undoes_or_finishes_all_of_it(self):
        spec = ["web=2.0.0", "api=2.0.0", "db=2.0.0"]
        # Between two members (web done), inside the second member's activation (switched),
        # and while undoing after the third failed: every member back on 1.0.0.
        for point, last in [("set.before_app#2", spec[2]), ("activation.after_switch#2", spec[2]),
                            ("set.undoing", "db=2.0.1")]:
            api = self.show("api", "InvocationID")
            self.killed_at(point, spec[:2] + [last])
            self.assert_on("1.0.0")
            if point == "set.before_app#2":
                self.assertEqual(self.show("api", "InvocationID"), api, "api was touched")
            self.assertEqual((self.history("web")[-1]["op"], self.history("web")[-1]["result"]),
                             ("rollback", "done"), point)
        # Killed once the last member had completed, before the record went: finished.
        self.killed_at("set.after_app#3", spec)
        self.assert_on("2.0.0")
        # A record left behind is not a licence to undo what was done since: web, activated
        # again on its own after it, stays.
        self.ctl("rollback", "-q", "web")
        self.ctl("activate", "-q", "web", "2.0.0")
        self.stop_daemon()
        os.makedirs(os.path.join(self.root, "var/lib/upgraded/sets"), exist_ok=True)
        with open(os.path.join(self.root, "var/lib/upgraded/sets/set-1-1.json"), "w") as f:
            json.dump({"id": "set-1-1", "members": [{"app": "web", "from": "1.0.0",
                                                     "to": "2.0.0"}],
                       "completed": 0, "undoing": False, "started": "2026-11-29T00:00:00Z"}, f)
        self.start_daemon()
        self.settled()
        self.assert_on("2.0.0", ["web"])
        self.assertEqual(glob.glob(os.path.join(self.root, "var/lib/upgraded/sets/*")), [])

    def releases(self, version):
        """The apps that have `version` installed."""
        rows = json.loads(self.ctl("list", "--json").stdout)
        return sorted(r["app"] for r in rows if r["version"] == version)

    def test_install_of_several_artifacts_stages_every_one_before_activating_them_as_a_set(self):
        files = [self.pack(app, "3.0.0") for app in APPS]
        # A db artifact whose signed head is intact but whose payload was altered: its
        # signatures pass, its staging fails.
        bad = os.path.join(self.dir, "db-3.0.0-altered.upd")
        with open(files[2], "rb") as f:
            data = bytearray(f.read())
        data[-40] ^= 0xFF
        with open(bad, "wb") as f:
            f.write(data)
        before = self.store_files()
        running = [self.show(app, "InvocationID") for app in APPS]

        # The plan: each member staged, then activated; nothing changes.
        plan = json.loads(self.ctl("plan", *files, "--json").stdout)
        self.assertEqual(plan["op"], "install-set")
        self.assertEqual([(m["app"], m["op"], m["from"], m["to"]) for m in plan["members"]],
                         [(app, "install", "1.0.0", "3.0.0") for app in APPS])
        self.assertEqual([[s["kind"] for s in m["steps"]] for m in plan["members"]],
                         [["stage", "switch", "restart", "gate", "mark-good"]] * 3)
        for m in plan["members"]:
            self.assertGreater(m["install"]["payload_bytes"], 0)
            self.assertGreater(m["install"]["free_bytes"], m["install"]["payload_bytes"])
            self.assertEqual(m["install"]["space"], "enough")
        self.assertTrue(plan["changes"])
        self.assertIn("staged before it", plan["on_failure"])
        text = self.ctl("plan", *files).stdout
        self.assertIn("3/3: Plan: install db 1.0.0 \u2192 3.0.0", text)
        self.assertIn("every artifact is staged before anything running is touched", text)
        self.assertIn("stage 3.0.0 (verify and extract the payload)", text)
        one = json.loads(self.ctl("plan", files[0], "--json").stdout)
        self.assertEqual((one["app"], one["op"], one["steps"][0]["kind"]),
                         ("web", "install", "stage"))
        # What installing would refuse: a release installed from another artifact, a forged
        # artifact, files mixed with installed releases.
        os.makedirs(os.path.join(self.dir, "rebuilt"))
        rebuilt = pack_sample(UPGRADECTL, self.key, os.path.join(self.dir, "rebuilt"), "api",
                              "api.service", "2.0.0")
        r = self.ctl("plan", files[0], rebuilt, check=9)
        self.assertIn("api 2.0.0 is already installed", r.stderr)
        forged = os.path.join(self.dir, "forged.upd")
        with open(files[0], "rb") as f:
            data = bytearray(f.read())
        data[20] ^= 0x01  # inside the signed manifest
        with open(forged, "wb") as f:
            f.write(data)
        self.assertIn("artifact 2 of 2", self.ctl("plan", files[0], forged, check=4).stderr)
        self.ctl("plan", files[0], "web=2.0.0", check=2)
        self.assertEqual(self.store_files(), before)

        # The altered payload: web and api were staged, then taken back; nothing running was
        # touched.
        r = self.ctl("install", files[0], files[1], bad, check=4)
        self.assertIn("db 3.0.0: ", r.stderr)
        self.assertIn("nothing in the set was changed", r.stderr)
        self.assertEqual(self.releases("3.0.0"), [])
        self.assertEqual(glob.glob(os.path.join(self.root, "var/lib/upgraded/apps/*/releases/3*")),
                         [])
        self.assertEqual([self.show(app, "InvocationID") for app in APPS], running)
        # A release installed from another artifact: refused before anything starts.
        r = self.ctl("install", files[0], rebuilt, check=9)
        self.assertIn("api 2.0.0 is already installed from another artifact", r.stderr)
        self.ctl("install", files[0], files[0], check=2)  # an app twice
        self.assertEqual(self.releases("3.0.0"), [])
        self.assert_on("1.0.0")

        # All three: staged, then activated in order, one transaction.
        self.ctl("install", "-q", *files)
        self.assert_on("3.0.0")
        entered = [int(self.show(app, "ActiveEnterTimestampMonotonic")) for app in APPS]
        self.assertLess(entered[0], entered[1])
        self.assertLess(entered[1], entered[2])
        tx = self.history("db")[-1]["transaction"]
        self.assertRegex(tx, r"^set-\d+-\d+$")
        self.assertEqual([(self.history(app)[-1]["to"], self.history(app)[-1]["transaction"])
                          for app in APPS], [("3.0.0", tx)] * 3)
        # Again: every release is there from the same artifact and current: nothing restarts.
        running = [self.show(app, "InvocationID") for app in APPS]
        self.ctl("install", "-q", *files)
        self.assertEqual([self.show(app, "InvocationID") for app in APPS], running)

    def test_install_of_several_artifacts_killed_while_staging_touches_nothing_running(self):
        files = [self.pack(app, "3.0.0") for app in APPS]
        running = [self.show(app, "InvocationID") for app in APPS]
        # Killed once api's release was staged: web and api staged, db not, nothing switched.
        self.killed_at("stage.after_state#2", files, verb="install")
        self.assertEqual(self.releases("3.0.0"), ["api", "web"])
        self.assert_on("1.0.0")
        self.assertEqual([self.show(app, "InvocationID") for app in APPS], running)
        # The same command again completes it: the staged ones are taken as they are.
        self.ctl("install", "-q", *files)
        self.assert_on("3.0.0")
        # Stage only: all or nothing, and nothing restarted.
        files = [self.pack(app, "4.0.0") for app in APPS]
        running = [self.show(app, "InvocationID") for app in APPS]
        self.ctl("install", "--stage-only", "-q", *files)
        self.assertEqual(self.releases("4.0.0"), sorted(APPS))
        self.assertEqual([self.show(app, "InvocationID") for app in APPS], running)
        self.ctl("install", "--offline", *files, check=2)

    def test_artifacts_that_cannot_fit_are_refused_before_anything_is_extracted(self):
        files = [self.pack(app, "3.0.0") for app in APPS]
        # A reserve larger than any disk: not even a payload fits.
        self.stop_daemon()
        with open(os.path.join(self.root, "etc/upgraded/upgraded.conf"), "w") as f:
            f.write("[extract]\nfree_space_reserve = %d\n" % (1 << 60))
        self.start_daemon()
        before = self.store_files()
        running = [self.show(app, "InvocationID") for app in APPS]
        plan = json.loads(self.ctl("plan", *files, "--json", check=1).stdout)
        self.assertEqual(plan["refusal"]["error"], "NoSpace")
        self.assertEqual([m["install"]["space"] for m in plan["members"]], ["insufficient"] * 3)
        self.assertIn("not enough free space for web 3.0.0",
                      self.ctl("plan", files[0], check=1).stderr)
        self.assertIn("not enough free space", self.ctl("install", files[0], check=1).stderr)
        r = self.ctl("install", *files, check=1)
        self.assertIn("web 3.0.0: not enough free space", r.stderr)
        self.assertIn("nothing in the set was changed", r.stderr)
        self.assertEqual(self.releases("3.0.0"), [])
        self.assertEqual(self.store_files(), before)
        self.assertEqual([self.show(app, "InvocationID") for app in APPS], running)
        # More artifacts than a message can carry, files mixed with releases, a bare app name:
        # usage errors, said before anything is sent.
        self.assertIn("at most 16 artifacts", self.ctl("install", *([files[0]] * 17),
                                                       check=2).stderr)
        self.ctl("plan", *([files[0]] * 17), check=2)
        self.ctl("plan", files[0], "web=2.0.0", check=2)
        self.assertIn("plan takes FILE..., APP=VERSION...", self.ctl("plan", "web", check=2).stderr)


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
