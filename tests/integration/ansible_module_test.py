#!/usr/bin/python3
"""The Ansible module upgraded.fleet.release (ansible/plugins/modules/release.py) against a real
daemon on the real-systemd testbed: ansible-core runs it on localhost (connection local) with
scope=user, so it talks to `upgraded --user` on the testbed's bus as it talks to the system
service on a fleet host (tests/system/fleet_test.py does that, over SSH).

    tests/testbed/with-systemd-user tests/integration/ansible_module_test.py UPGRADED UPGRADECTL

Each step asserts what the module returned and what is true afterwards: the store's releases,
the unit's InvocationID (restarted or not), the finalization state."""

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
from sample_service import DaemonRunner, Instance, wait_for_content  # noqa: E402

UPGRADED, UPGRADECTL = sys.argv[1], sys.argv[2]
TESTBED = os.environ["UPGRADED_TESTBED"]
UNITS_DIR = os.environ["UPGRADED_TESTBED_UNITS"]
COLLECTION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../ansible")

HELLO = '#!/bin/sh\nhere=$(dirname "$(readlink -f "$0")")\ncat "$here/../VERSION" > "$OUT"\n'
BACKUP = '#!/bin/sh\necho "copying the data"\necho "backup-$UPGRADED_TO-format-$UPGRADED_DATA_FORMAT"\n'


def collections_path(work):
    """A collections path holding the source tree's ansible/ as upgraded.fleet."""
    path = os.path.join(work, "collections")
    os.makedirs(os.path.join(path, "ansible_collections/upgraded"))
    os.symlink(os.path.abspath(COLLECTION),
               os.path.join(path, "ansible_collections/upgraded/fleet"))
    return path


class ReleaseModule(DaemonRunner, unittest.TestCase):
    upgraded, upgradectl = UPGRADED, UPGRADECTL
    app = "hello"

    @classmethod
    def setUpClass(cls):
        if not shutil.which("ansible"):
            msg = "ansible-core is not installed (scripts/install-deps installs it)"
            if os.environ.get("CI") == "true":
                raise AssertionError(msg)
            raise unittest.SkipTest(msg)

    def setUp(self):
        inst = Instance(UPGRADECTL, TESTBED, UNITS_DIR, self.app)
        self.dir, self.root, self.key = inst.dir, inst.root, inst.key
        self.out, self.unit = inst.out, inst.unit
        self.ansible_dir = tempfile.mkdtemp(dir=self.dir)
        self.collections = collections_path(self.ansible_dir)
        self.daemon = None

    def tearDown(self):
        self.stop_daemon()
        subprocess.run(["systemctl", "--user", "stop", self.unit], check=False)
        os.unlink(os.path.join(UNITS_DIR, self.unit))
        shutil.rmtree(self.dir, ignore_errors=True)

    def pack(self, version, writes=1, reads_min=1, fail=False, name=None, min_ready_s=1):
        src = os.path.join(self.dir, "src-%s-%s" % (version, name or ""))
        os.makedirs(os.path.join(src, "bin"))
        os.makedirs(os.path.join(src, "hooks"))
        with open(os.path.join(src, "VERSION"), "w") as f:
            f.write(version)
        with open(os.path.join(src, "bin/hello"), "w") as f:
            f.write(HELLO + ("sleep 0.3; exit 3\n" if fail else "exec sleep 1000\n"))
        with open(os.path.join(src, "hooks/backup"), "w") as f:
            f.write(BACKUP)
        os.chmod(os.path.join(src, "bin/hello"), 0o755)
        os.chmod(os.path.join(src, "hooks/backup"), 0o755)
        manifest = {"units": [self.unit], "health": {"min_ready_s": min_ready_s, "deadline_s": 30},
                    "data_format": {"writes": writes, "reads_min": reads_min},
                    "hooks": {"backup": {"path": "hooks/backup", "timeout_s": 60}}}
        extra = os.path.join(self.dir, "manifest-%s.json" % version)
        with open(extra, "w") as f:
            json.dump(manifest, f)
        out = os.path.join(self.dir, "%s%s.upd" % (version, "-" + name if name else ""))
        subprocess.run([UPGRADECTL, "pack", "--key", self.key, "--app", self.app, "--version",
                        version, "--manifest", extra, "-o", out, src], check=True,
                       stdout=subprocess.DEVNULL)
        return out

    def module(self, check=False, diff=False, interpreter="/usr/bin/python3", meanwhile=None,
               **args):
        """Runs the module once through ansible-playbook; (ok, result) of the task. The result
        is the registered one (with its diff), written out by a task that runs in check mode
        too. `meanwhile()` runs while ansible-playbook does."""
        args.setdefault("scope", "user")
        work = tempfile.mkdtemp(dir=self.ansible_dir)
        result_file = os.path.join(work, "result.json")
        play = [{"hosts": "localhost", "connection": "local", "gather_facts": False,
                 "vars": {"ansible_python_interpreter": interpreter},
                 "tasks": [{"upgraded.fleet.release": args, "register": "r",
                            "ignore_errors": True},
                           {"ansible.builtin.copy": {"content": "{{ r | to_json }}",
                                                     "dest": result_file},
                            "check_mode": False}]}]
        with open(os.path.join(work, "play.yml"), "w") as f:
            json.dump(play, f)  # JSON is YAML
        cmd = ["ansible-playbook", "-i", "localhost,", os.path.join(work, "play.yml")]
        cmd += ["--check"] if check else []
        cmd += ["--diff"] if diff else []
        env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=self.collections,
                   ANSIBLE_LOCAL_TEMP=os.path.join(self.ansible_dir, "tmp"),
                   ANSIBLE_REMOTE_TEMP=os.path.join(self.ansible_dir, "remote-tmp"),
                   ANSIBLE_HOME=os.path.join(self.ansible_dir, "home"), ANSIBLE_NOCOLOR="1")
        # stdin is /dev/null, not ctest's: a description shared with other tests may have
        # been made non-blocking (ssh does that), and ansible-playbook refuses to start then.
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
        if meanwhile:
            meanwhile()
        stdout, stderr = p.communicate(timeout=300)
        r = subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)
        try:
            with open(result_file) as f:
                result = json.load(f)
        except (OSError, ValueError):
            self.fail("ansible-playbook wrote no result (exit %d):\n%s\n%s" %
                      (r.returncode, r.stdout, r.stderr))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        return not result.get("failed", False), result

    def ok(self, **args):
        ok, result = self.module(**args)
        self.assertTrue(ok, result)
        return result

    def failed(self, **args):
        ok, result = self.module(**args)
        self.assertFalse(ok, result)
        return result

    def releases(self):
        return sorted(os.listdir(os.path.join(self.root, "var/lib/upgraded/apps/hello/releases")))

    def current(self):
        return os.readlink(os.path.join(self.root, "var/lib/upgraded/apps/hello/current"))

    def invocation(self):
        return subprocess.run(["systemctl", "--user", "show", "-P", "InvocationID", self.unit],
                              capture_output=True, text=True, check=True).stdout.strip()

    # --- the tests ------------------------------------------------------------------------------

    def test_no_daemon_is_a_clear_error(self):
        result = self.failed(app="hello", state="query")
        self.assertIn("upgraded is not running on the session bus", result["msg"])

    def test_no_python3_dbus_is_a_clear_error(self):
        self.start_daemon()
        python = os.path.join(self.dir, "python-without-site-packages")
        with open(python, "w") as f:
            f.write('#!/bin/sh\nexec /usr/bin/python3 -S "$@"\n')  # -S: no dist-packages
        os.chmod(python, 0o755)
        result = self.failed(app="hello", state="query", interpreter=python)
        self.assertIn("Failed to import the required Python library (dbus (python3-dbus))",
                      result["msg"])

    def test_a_release_through_its_life(self):
        self.start_daemon()
        v1, v2, v3 = self.pack("1.0.0"), self.pack("2.0.0", writes=2), \
            self.pack("3.0.0", writes=2, reads_min=2, fail=True)

        # staged: installed, nothing started; a second time changes nothing
        r = self.ok(artifact=v1, state="staged")
        self.assertEqual((r["changed"], r["result"], r["app"], r["to"]),
                         (True, "staged", "hello", "1.0.0"))
        self.assertEqual(self.releases(), ["1.0.0"])
        self.assertEqual(self.invocation(), "", "staging starts nothing")
        r = self.ok(artifact=v1, state="staged")
        self.assertEqual((r["changed"], r["result"]), (False, "unchanged"))

        # a wrong expected version: refused before anything is staged
        r = self.failed(artifact=v2, version="2.1.0", state="staged")
        self.assertIn("is hello 2.0.0, not 2.1.0", r["msg"])
        self.assertEqual(self.releases(), ["1.0.0"])

        # active by version: check mode plans, then the real run; again: nothing restarted
        r = self.ok(app="hello", version="1.0.0", check=True, diff=True)
        self.assertEqual((r["changed"], r["result"]), (True, "would-change"))
        self.assertEqual([s["kind"] for s in r["plan"]["steps"]],
                         ["switch", "restart", "gate", "mark-good"])
        self.assertEqual(r["diff"]["before"]["current"], "")
        self.assertEqual(r["diff"]["after"]["current"], "1.0.0")
        self.assertEqual(self.invocation(), "", "check mode starts nothing")
        r = self.ok(app="hello", version="1.0.0")
        self.assertEqual((r["changed"], r["result"], r["from"], r["to"]),
                         (True, "activated", "", "1.0.0"))
        self.assertEqual(wait_for_content(self.out, "1.0.0"), "1.0.0")
        self.assertIsInstance(r["downtime_ms"], float)
        first = self.invocation()
        r = self.ok(app="hello", version="1.0.0")
        self.assertEqual((r["changed"], r["result"]), (False, "unchanged"))
        self.assertEqual(self.invocation(), first, "an idempotent run restarts nothing")

        # active from an artifact: check mode stages nothing; then installed and activated,
        # pre-finalized (2.0.0 writes data format 2)
        r = self.ok(artifact=v2, state="active", check=True, diff=True)
        self.assertEqual(r["plan"]["steps"][0]["kind"], "stage")
        self.assertEqual(r["plan"]["install"]["space"], "enough")
        self.assertEqual(r["diff"]["before"], {"current": "1.0.0", "previous": "",
                                               "finalization": "finalized",
                                               "releases": ["1.0.0"]})
        self.assertEqual(r["diff"]["after"], {"current": "2.0.0", "previous": "1.0.0",
                                              "finalization": "pre-finalized",
                                              "releases": ["1.0.0", "2.0.0"]})
        self.assertEqual(self.releases(), ["1.0.0"])
        self.assertEqual(self.invocation(), first)
        r = self.ok(artifact=v2, state="active")
        self.assertEqual((r["changed"], r["result"], r["from"], r["to"]),
                         (True, "activated", "1.0.0", "2.0.0"))
        self.assertEqual(r["state"]["finalization"], "pre-finalized")
        self.assertEqual(wait_for_content(self.out, "2.0.0"), "2.0.0")
        second = self.invocation()
        self.assertNotEqual(second, first)
        r = self.ok(artifact=v2, state="active")
        self.assertEqual(r["changed"], False)
        self.assertEqual(self.invocation(), second)

        # query: the finalization status, for plays to gate on
        r = self.ok(app="hello", state="query")
        self.assertEqual(r["finalization"]["state"], "pre-finalized")
        self.assertEqual(r["state"]["current_status"], "good")
        r = self.ok(state="query")
        self.assertEqual(r["apps"]["hello"]["current"], "2.0.0")
        self.assertEqual(r["apps"]["hello"]["finalization"], "pre-finalized")

        # finalized: a version the host does not run is refused; check mode changes nothing;
        # then the backup hook's name is returned; again: unchanged
        r = self.failed(app="hello", version="1.0.0", state="finalized")
        self.assertIn("runs 2.0.0, not 1.0.0", r["msg"])
        r = self.ok(app="hello", version="2.0.0", state="finalized", check=True, diff=True)
        self.assertEqual((r["changed"], r["diff"]["after"]["finalization"]),
                         (True, "finalized"))
        self.assertEqual(self.ok(app="hello", state="query")["finalization"]["state"],
                         "pre-finalized")
        r = self.ok(app="hello", version="2.0.0", state="finalized")
        self.assertEqual((r["changed"], r["result"], r["backup"]),
                         (True, "finalized", "backup-2.0.0-format-1"))
        self.assertEqual(r["state"]["finalization"], "finalized")
        r = self.ok(app="hello", version="2.0.0", state="finalized")
        self.assertEqual((r["changed"], r["result"]), (False, "unchanged"))
        self.assertEqual(self.invocation(), second, "finalize restarts nothing")

        # a release that fails its health gate: the daemon rolls back, the task fails with
        # the daemon's message, and it was a change (restarted twice, 3.0.0 marked bad);
        # from an artifact (Install) and, staged, by version (Activate, as a rollout does)
        r = self.failed(artifact=v3, state="active")
        self.assertIn("rolled back to 2.0.0", r["msg"])
        self.assertEqual((r["result"], r["changed"], r["from"], r["to"]),
                         ("rolled-back", True, "2.0.0", "3.0.0"))
        self.assertEqual(self.current(), "releases/2.0.0")
        self.assertEqual(wait_for_content(self.out, "2.0.0"), "2.0.0")
        self.assertNotEqual(self.invocation(), second)
        v3b = self.pack("3.0.1", writes=2, reads_min=2, fail=True)
        self.ok(artifact=v3b, state="staged")
        restarted = self.invocation()
        r = self.failed(app="hello", version="3.0.1")
        self.assertIn("rolled back to 2.0.0", r["msg"])
        self.assertEqual((r["result"], r["changed"], r["error"]), ("rolled-back", True, "Failed"))
        self.assertNotEqual(self.invocation(), restarted)
        self.assertEqual(self.current(), "releases/2.0.0")
        third = self.invocation()

        # rollback guarded by from_version: a host not on it, or without the app, is left
        # alone
        r = self.ok(app="hello", rollback=True, from_version="3.0.0")
        self.assertEqual((r["changed"], r["result"]), (False, "unchanged"))
        r = self.ok(app="other", rollback=True, from_version="3.0.0")
        self.assertEqual((r["changed"], r["result"]), (False, "unchanged"))
        # 1.0.0 cannot read the finalized format 2: refused in check mode and for real, as
        # the daemon refuses it, and nothing restarted
        r = self.failed(app="hello", rollback=True, from_version="2.0.0", check=True)
        self.assertIn("format 2 was finalized", r["msg"])
        r = self.failed(app="hello", rollback=True, from_version="2.0.0")
        self.assertIn("format 2 was finalized", r["msg"])
        self.assertEqual(self.current(), "releases/2.0.0")
        self.assertEqual(self.invocation(), third)

    def test_a_daemon_that_dies_during_the_job_is_reported_not_mistaken(self):
        self.start_daemon()
        self.ok(artifact=self.pack("1.0.0"), state="active")
        slow = self.pack("2.0.0", min_ready_s=20)  # its gate soaks for 20 s

        def kill_during_the_gate():
            for _ in range(600):
                if json.loads(self.ctl("jobs", "--json").stdout):
                    break
                time.sleep(0.05)
            time.sleep(1)
            self.daemon.send_signal(signal.SIGKILL)
            self.daemon.wait(timeout=30)
            self.log.close()
            self.daemon = None

        ok, r = self.module(artifact=slow, state="active", meanwhile=kill_during_the_gate)
        self.assertFalse(ok, r)
        self.assertIn("went away before it ended", r["msg"])
        self.assertTrue(r["changed"], "it may have switched: a change")
        self.start_daemon()  # its recovery finishes the activation
        self.settled()
        r = self.ok(app="hello", state="query")
        self.assertEqual(r["state"]["pending_activation"], "")

    def test_bad_input_changes_nothing(self):
        self.start_daemon()
        v1 = self.pack("1.0.0")
        self.ok(artifact=v1, state="active")
        running = self.invocation()
        before = self.releases()
        # another artifact of an installed version: Exists, nothing staged
        other = self.pack("1.0.0", name="rebuilt")
        r = self.failed(artifact=other, state="staged")
        self.assertEqual(r["error"], "Exists", r)
        # signed by a key the daemon does not trust: refused by its signature check before
        # anything else of it is read
        stranger = os.path.join(self.dir, "stranger.key")
        subprocess.run([UPGRADECTL, "keygen", "--private", stranger, "--public",
                        stranger + ".pub"], check=True, stdout=subprocess.DEVNULL)
        trusted, self.key = self.key, stranger
        foreign = self.pack("2.0.0", name="foreign")
        self.key = trusted
        r = self.failed(artifact=foreign, state="active")
        self.assertEqual(r["error"], "VerificationFailed", r)
        # an artifact others may write: not used
        os.chmod(other, 0o666)
        r = self.failed(artifact=other, state="active")
        self.assertIn("writable by others", r["msg"])
        # a payload changed after signing: the signatures hold, the install job's chunk check
        # (or the container's end) refuses it
        forged = os.path.join(self.dir, "forged.upd")
        with open(self.pack("2.0.0"), "rb") as f:
            data = bytearray(f.read())
        data[-1] ^= 1
        with open(forged, "wb") as f:
            f.write(data)
        os.unlink(os.path.join(self.dir, "2.0.0.upd"))
        r = self.failed(artifact=forged, state="active")
        self.assertEqual(r["error"], "VerificationFailed", r)
        r = self.failed(artifact=os.path.join(self.dir, "missing.upd"), state="active")
        self.assertIn("cannot open the artifact", r["msg"])
        # an uninstalled version without an artifact; options that do not go together
        r = self.failed(app="hello", version="9.0.0")
        self.assertIn("not installed on this host", r["msg"])
        r = self.failed(app="hello", version="1.0.0", from_version="0.9.0")
        self.assertIn("from_version goes with rollback", r["msg"])
        r = self.failed(app="hello", rollback=True, version="1.0.0")
        self.assertIn("rollback takes app", r["msg"])
        self.assertEqual(self.releases(), before)
        self.assertEqual(self.invocation(), running)


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"])
