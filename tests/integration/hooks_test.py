#!/usr/bin/python3
"""Hooks, data formats and finalize, end to end on the real-systemd testbed: the daemon runs
each hook as a transient unit of the testbed's systemd; upgradectl drives it.

    tests/testbed/with-systemd-user tests/integration/hooks_test.py UPGRADED UPGRADECTL

One release script serves every hook: it appends a line to the app's data directory's log and
does what files in that directory ask (fail-<phase>, hang-<phase>), so each test steers the
hooks of releases it packed once.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../support"))
from sample_service import TIME_FACTOR, DaemonRunner, Instance, wait_for_content  # noqa: E402,E501

UPGRADED, UPGRADECTL = sys.argv[1], sys.argv[2]
TESTBED = os.environ["UPGRADED_TESTBED"]
UNITS_DIR = os.environ["UPGRADED_TESTBED_UNITS"]
ALL_HOOKS = ["pre_upgrade", "migrate", "health", "post_upgrade", "backup", "finalize"]

HOOK = r"""#!/bin/sh
data=%(data)s
[ -e "$data/whoami" ] && echo "$UPGRADED_PHASE $(id -un):$(id -gn)" >>"$data/whoami"
echo "$UPGRADED_PHASE from=$UPGRADED_FROM to=$UPGRADED_TO df=$UPGRADED_DATA_FORMAT rel=$(basename "$UPGRADED_RELEASE_DIR") cwd=$(basename "$(pwd)") job=${UPGRADED_JOB:+set}${UPGRADED_UNIT:+ unit=$UPGRADED_UNIT}" >>"$data/log"
if [ -e "$data/fail-$UPGRADED_PHASE" ] || [ -e "$data/fail-$UPGRADED_PHASE-$UPGRADED_TO" ] ||
   { [ -n "$UPGRADED_UNIT" ] && [ -e "$data/fail-$UPGRADED_PHASE-$UPGRADED_UNIT" ]; }; then
  echo "checking the schema"
  echo "error: table users is locked" >&2
  exit 3
fi
if [ -e "$data/hang-$UPGRADED_PHASE" ]; then
  touch "$data/running-$UPGRADED_PHASE"
  exec sleep 300
fi
if [ -e "$data/escape-$UPGRADED_PHASE" ]; then
  echo x >"$(cat "$data/escape-$UPGRADED_PHASE")" || exit 4
fi
if [ -e "$data/connect-$UPGRADED_PHASE" ]; then
  /usr/bin/python3 -c "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])" \
    "$(cat "$data/connect-$UPGRADED_PHASE")" 2>/dev/null && exit 0
  exit 6
fi
if [ "$UPGRADED_PHASE" = backup ]; then
  echo "dumping the database"
  echo "snap-00$UPGRADED_DATA_FORMAT"
fi
exit 0
"""


class Hooks(DaemonRunner, unittest.TestCase):
    upgraded, upgradectl = UPGRADED, UPGRADECTL
    app = "hello"

    def setUp(self):
        inst = Instance(UPGRADECTL, TESTBED, UNITS_DIR, self.app)
        self.dir, self.root, self.key = inst.dir, inst.root, inst.key
        self.out, self.unit = inst.out, inst.unit
        self.data = os.path.join(self.root, "var/lib/hello-data")
        os.makedirs(self.data)
        self.conf(data_dirs='["/var/lib/hello-data"]')
        self.daemon = None

    def tearDown(self):
        self.stop_daemon()
        subprocess.run(["systemctl", "--user", "stop", self.unit], check=False)
        subprocess.run(["systemctl", "--user", "reset-failed", self.unit], check=False,
                       stderr=subprocess.DEVNULL)
        os.unlink(os.path.join(UNITS_DIR, self.unit))
        shutil.rmtree(self.dir, ignore_errors=True)

    def conf(self, **keys):
        with open(os.path.join(self.root, "etc/upgraded/upgraded.conf"), "w") as f:
            f.write("[apps.%s]\n" % self.app)
            for k, v in keys.items():
                f.write("%s = %s\n" % (k, v))

    def kill_daemon(self):
        self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait(timeout=30)
        self.log.close()
        self.daemon = None

    def activate_until_killed(self, version):
        """Activates `version` with a daemon started to kill itself at a crash point; returns
        once it has died of its SIGKILL."""
        self.ctl("activate", self.app, version, check=None)
        self.daemon.wait(timeout=60)
        self.assertEqual(self.daemon.returncode, -signal.SIGKILL)
        self.log.close()
        self.daemon = None

    def pack(self, version, writes=1, reads_min=1, hooks=ALL_HOOKS, timeouts=None,
             upgrade_from=None, units=None, strategy=None):
        src = os.path.join(self.dir, "src-" + version)
        os.makedirs(os.path.join(src, "bin"))
        os.makedirs(os.path.join(src, "hooks"))
        with open(os.path.join(src, "VERSION"), "w") as f:
            f.write(version)
        with open(os.path.join(src, "bin/hello"), "w") as f:
            f.write('#!/bin/sh\nhere=$(dirname "$(readlink -f "$0")")\n'
                    'cat "$here/../VERSION" > "$OUT"\nexec sleep 1000\n')
        with open(os.path.join(src, "hooks/run"), "w") as f:
            f.write(HOOK % {"data": self.data})
        os.chmod(os.path.join(src, "bin/hello"), 0o755)
        os.chmod(os.path.join(src, "hooks/run"), 0o755)
        manifest = {"units": units or [self.unit], "health": {"min_ready_s": 0, "deadline_s": 30},
                    "data_format": {"writes": writes, "reads_min": reads_min},
                    "hooks": {h: {"path": "hooks/run", "timeout_s": (timeouts or {}).get(h, 60)}
                              for h in hooks}}
        if upgrade_from:
            manifest["upgrade_from"] = upgrade_from
        if strategy:
            manifest["strategy"] = strategy
        extra = os.path.join(self.dir, "manifest-%s.json" % version)
        with open(extra, "w") as f:
            json.dump(manifest, f)
        out = os.path.join(self.dir, version + ".upd")
        subprocess.run([UPGRADECTL, "pack", "--key", self.key, "--app", self.app, "--version",
                        version, "--manifest", extra, "-o", out, src], check=True,
                       stdout=subprocess.DEVNULL)
        return out

    def hook_log(self):
        try:
            with open(os.path.join(self.data, "log")) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            lines = []
        os.unlink(os.path.join(self.data, "log")) if lines else None
        return lines

    def current(self):
        return os.readlink(os.path.join(self.root, "var/lib/upgraded/apps", self.app, "current"))

    def state(self):
        with open(os.path.join(self.root, "var/lib/upgraded/apps", self.app, "state.json")) as f:
            return json.load(f)

    def invocation(self):
        return subprocess.run(["systemctl", "--user", "show", "-P", "InvocationID", self.unit],
                              capture_output=True, text=True, check=True).stdout.strip()

    def serving(self, expect):
        return wait_for_content(self.out, expect)

    def finalization(self):
        return json.loads(self.ctl("finalization-status", self.app, "--json").stdout)[0]

    def history(self):
        return json.loads(self.ctl("history", self.app, "--json").stdout)

    def wait_for(self, path, seconds=30):
        end = time.monotonic() + seconds * TIME_FACTOR
        while not os.path.exists(path):
            self.assertLess(time.monotonic(), end, "%s did not appear" % path)
            time.sleep(0.02)

    def hook_units(self):
        r = subprocess.run(["systemctl", "--user", "list-units", "--all", "--plain",
                            "--no-legend", "upgraded-hook-*"], capture_output=True, text=True)
        return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]

    def three_units(self):
        """The sample service's unit and two more (hello-b, hello-c) running the same release,
        each writing the release it runs to a file of its own: (unit names, {unit: file})."""
        names = [self.unit, "hello-b.service", "hello-c.service"]
        outs = {self.unit: self.out}
        for name in names[1:]:
            outs[name] = os.path.join(self.dir, name + ".out")
            with open(os.path.join(UNITS_DIR, name), "w") as f:
                f.write("[Service]\nExecStart=%s/var/lib/upgraded/apps/hello/current/bin/hello\n"
                        "Environment=OUT=%s\n" % (self.root, outs[name]))
            self.addCleanup(os.unlink, os.path.join(UNITS_DIR, name))
            self.addCleanup(subprocess.run, ["systemctl", "--user", "stop", name], check=False)
        subprocess.run(["systemctl", "--user", "daemon-reload"], check=True)
        return names, outs

    def assert_serving(self, outs, version):
        """Every unit active and running `version`."""
        for unit, out in outs.items():
            self.assertEqual(wait_for_content(out, version), version, unit)
            self.assertEqual(subprocess.run(["systemctl", "--user", "is-active", unit],
                                            capture_output=True, text=True).stdout.strip(),
                             "active", unit)

    # --- order, environment, data formats, finalize -------------------------------------------

    def test_order_environment_rollback_and_finalize(self):
        self.start_daemon()
        self.ctl("install", "-q", self.pack("1.0.0"))
        self.assertEqual(self.serving("1.0.0"), "1.0.0")
        self.assertEqual(self.hook_log(), [
            "pre_upgrade from= to=1.0.0 df= rel=1.0.0 cwd=1.0.0 job=set",
            "migrate from= to=1.0.0 df=1 rel=1.0.0 cwd=1.0.0 job=set",
            "health from= to=1.0.0 df=1 rel=1.0.0 cwd=1.0.0 job=set",
            "post_upgrade from= to=1.0.0 df=1 rel=1.0.0 cwd=1.0.0 job=set"])
        # The first release creates the data: its format is the finalized one.
        self.assertEqual(self.finalization()["state"], "finalized")
        with open(os.path.join(self.root, "var/lib/upgraded/apps/hello/data-format")) as f:
            self.assertEqual(f.read(), "1\n")

        self.ctl("install", "-q", self.pack("2.0.0", writes=2, reads_min=1))
        self.assertEqual(self.serving("2.0.0"), "2.0.0")
        self.assertEqual(self.hook_log(), [
            "pre_upgrade from=1.0.0 to=2.0.0 df=1 rel=2.0.0 cwd=2.0.0 job=set",
            "migrate from=1.0.0 to=2.0.0 df=1 rel=2.0.0 cwd=2.0.0 job=set",
            "health from=1.0.0 to=2.0.0 df=1 rel=2.0.0 cwd=2.0.0 job=set",
            "post_upgrade from=1.0.0 to=2.0.0 df=1 rel=2.0.0 cwd=2.0.0 job=set"])
        f = self.finalization()
        self.assertEqual((f["state"], f["finalized_data_format"], f["current_writes"]),
                         ("pre-finalized", 1, 2))
        self.assertRegex(f["pending_since"], r"^\d{4}-\d\d-\d\dT")
        self.assertEqual(f["rollback_targets"], ["1.0.0"])
        self.assertIn("pre-finalized", self.ctl("status").stdout)
        self.assertIn("current (pre-finalized)", self.ctl("list").stdout)

        # Pre-finalized: rollback is free. The target's pre/post_upgrade run, FROM/TO swapped,
        # never a migrate.
        self.ctl("rollback", "-q", self.app)
        self.assertEqual(self.serving("1.0.0"), "1.0.0")
        self.assertEqual(self.hook_log(), [
            "pre_upgrade from=2.0.0 to=1.0.0 df=1 rel=1.0.0 cwd=1.0.0 job=set",
            "health from=2.0.0 to=1.0.0 df=1 rel=1.0.0 cwd=1.0.0 job=set",
            "post_upgrade from=2.0.0 to=1.0.0 df=1 rel=1.0.0 cwd=1.0.0 job=set"])
        self.assertEqual(self.finalization()["state"], "finalized")

        # Nothing pending on 1.0.0: finalize is refused, and changes nothing.
        r = self.ctl("finalize", "--yes", self.app, check=3)
        self.assertIn("nothing to finalize", r.stderr)

        self.ctl("activate", "-q", self.app, "2.0.0")
        self.hook_log()
        self.ctl("finalize", "--yes", "-q", self.app)
        self.assertEqual(self.hook_log(), [
            "backup from= to=2.0.0 df=1 rel=2.0.0 cwd=2.0.0 job=set",
            "finalize from= to=2.0.0 df=1 rel=2.0.0 cwd=2.0.0 job=set"])
        f = self.finalization()
        self.assertEqual((f["state"], f["finalized_data_format"], f["last_backup"]),
                         ("finalized", 2, "snap-001"))
        self.assertEqual(f["rollback_targets"], [])
        with open(os.path.join(self.root, "var/lib/upgraded/apps/hello/data-format")) as fh:
            self.assertEqual(fh.read(), "2\n")
        last = self.history()[-1]
        self.assertEqual((last["op"], last["result"]), ("finalize", "done"))
        self.assertIn("backup 'snap-001'", last["message"])

        # Finalized: going back is refused in words, naming the backup, and nothing changes.
        before, state, inv = self.current(), self.state(), self.invocation()
        r = self.ctl("rollback", self.app, check=3)
        self.assertRegex(r.stderr, r"1\.0\.0 reads data formats 1\u20131; format 2 was finalized "
                                   r"on \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ; restore backup "
                                   r"'snap-001' to go back")
        r = self.ctl("activate", self.app, "1.0.0", check=3)
        self.assertIn("restore backup 'snap-001'", r.stderr)
        self.assertEqual((self.current(), self.state(), self.invocation()), (before, state, inv))
        self.assertEqual(self.hook_log(), [])

    def test_hooks_run_as_the_configured_user(self):
        self.conf(data_dirs='["/var/lib/hello-data"]', user='"nobody"', group='"nogroup"')
        subprocess.run(["chown", "-R", "nobody:nogroup", self.data], check=True)
        open(os.path.join(self.data, "whoami"), "w").close()
        os.chmod(os.path.join(self.data, "whoami"), 0o666)
        self.start_daemon()
        self.ctl("install", "-q", self.pack("1.0.0"))
        with open(os.path.join(self.data, "whoami")) as f:
            self.assertEqual(f.read().split("\n")[:4],
                             ["%s nobody:nogroup" % p for p in
                              ["pre_upgrade", "migrate", "health", "post_upgrade"]])
        # As nobody, its own data only: the store is not writable for it even where the sandbox
        # would allow it.
        st = os.stat(os.path.join(self.data, "log"))
        self.assertEqual(st.st_uid, 65534)

    def test_finalize_asks_on_a_terminal(self):
        import pty
        self.start_daemon()
        self.ctl("install", "-q", self.pack("1.0.0"))
        self.ctl("install", "-q", self.pack("2.0.0", writes=2))
        state = self.state()

        def finalize(answer):
            pid, fd = pty.fork()
            if pid == 0:
                os.execv(UPGRADECTL, [UPGRADECTL, "finalize", self.app, "--user", "-q"])
            out = b""
            while b"[y/N]" not in out:
                out += os.read(fd, 1024)
            os.write(fd, answer + b"\n")
            while True:
                try:
                    chunk = os.read(fd, 1024)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            _, status = os.waitpid(pid, 0)
            os.close(fd)
            return os.waitstatus_to_exitcode(status), out.decode(errors="replace")

        code, out = finalize(b"n")
        self.assertEqual(code, 1, out)
        self.assertIn("Finalize data format 2 of hello 2.0.0? Downgrading to releases older "
                      "than 2.0.0 will no longer be possible", out)
        self.assertIn("not finalized", out)
        self.assertEqual(self.state(), state)
        code, out = finalize(b"y")
        self.assertEqual(code, 0, out)
        self.assertEqual(self.finalization()["finalized_data_format"], 2)

    def test_finalize_without_a_backup_hook_needs_no_backup(self):
        self.start_daemon()
        hooks = ["pre_upgrade", "finalize"]
        self.ctl("install", "-q", self.pack("1.0.0", hooks=hooks))
        self.ctl("install", "-q", self.pack("2.0.0", writes=2, hooks=hooks))
        state = self.state()
        r = self.ctl("finalize", "--yes", self.app, check=3)
        self.assertIn("declares no backup hook", r.stderr)
        self.assertIn("--no-backup", r.stderr)
        self.assertEqual(self.state(), state)
        self.ctl("finalize", "--yes", "--no-backup", "-q", self.app)
        self.assertEqual(self.finalization()["finalized_data_format"], 2)
        self.assertIn("without a backup", self.history()[-1]["message"])

    def test_a_failed_backup_or_finalize_leaves_the_app_pre_finalized(self):
        self.start_daemon()
        self.ctl("install", "-q", self.pack("1.0.0"))
        self.ctl("install", "-q", self.pack("2.0.0", writes=2))
        for phase in ["backup", "finalize"]:
            open(os.path.join(self.data, "fail-" + phase), "w").close()
            r = self.ctl("finalize", "--yes", self.app, check=1)
            self.assertIn("the %s hook (hooks/run) exited with status 3" % phase, r.stderr)
            self.assertIn("error: table users is locked", r.stderr)
            self.assertIn("stays pre-finalized", r.stderr)
            f = self.finalization()
            self.assertEqual((f["state"], f["finalized_data_format"]), ("pre-finalized", 1))
            os.unlink(os.path.join(self.data, "fail-" + phase))
            self.assertEqual(self.history()[-1]["result"], "failed")
        self.ctl("rollback", "-q", self.app)  # still free
        self.assertEqual(self.serving("1.0.0"), "1.0.0")

    # --- failures -------------------------------------------------------------------------------

    def test_each_hook_failing(self):
        self.start_daemon()
        self.ctl("install", "-q", self.pack("1.0.0"))
        self.assertEqual(self.serving("1.0.0"), "1.0.0")
        for n, phase in enumerate(["pre_upgrade", "migrate", "health", "post_upgrade"]):
            version = "2.0.%d" % n
            self.ctl("install", "--stage-only", "-q", self.pack(version))
            marker = os.path.join(self.data, "fail-" + phase)
            open(marker, "w").close()
            inv, state = self.invocation(), self.state()
            self.hook_log()
            r = self.ctl("activate", self.app, version, check=1)
            os.unlink(marker)
            self.assertIn("the %s hook (hooks/run) exited with status 3 after" % phase, r.stderr)
            self.assertIn("checking the schema", r.stderr)
            self.assertIn("error: table users is locked", r.stderr)
            self.assertEqual(self.current(), "releases/1.0.0")
            self.assertEqual(self.serving("1.0.0"), "1.0.0")
            if phase == "pre_upgrade":
                # Nothing changed: the old release kept serving, its process untouched.
                self.assertIn("nothing was changed, 1.0.0 kept serving", r.stderr)
                self.assertEqual(self.invocation(), inv)
                self.assertEqual(self.state(), state)
                self.assertEqual(self.hook_log(), ["pre_upgrade from=1.0.0 to=%s df=1 rel=%s "
                                                   "cwd=%s job=set" % ((version,) * 3)])
            else:
                self.assertIn("rolled back to 1.0.0", r.stderr)
                self.assertEqual(self.state()["releases"][version]["status"], "bad")
                self.assertEqual(self.state()["previous"], state["previous"])
            self.assertEqual(self.history()[-1]["result"],
                             "failed" if phase == "pre_upgrade" else "rolled-back")
        self.assertEqual(self.hook_units(), [])

    def test_a_hook_timing_out_or_being_killed(self):
        self.start_daemon()
        self.ctl("install", "-q", self.pack("1.0.0"))
        self.ctl("install", "--stage-only", "-q", self.pack("2.0.0", timeouts={"migrate": 1}))
        open(os.path.join(self.data, "hang-migrate"), "w").close()
        r = self.ctl("activate", self.app, "2.0.0", check=1)
        os.unlink(os.path.join(self.data, "hang-migrate"))
        self.assertIn("the migrate hook (hooks/run) timed out after 1 s", r.stderr)
        self.assertIn("rolled back to 1.0.0", r.stderr)
        self.assertEqual(self.serving("1.0.0"), "1.0.0")

        self.ctl("install", "--stage-only", "-q", self.pack("3.0.0"))
        open(os.path.join(self.data, "hang-post_upgrade"), "w").close()
        job = self.ctl("activate", self.app, "3.0.0", "--no-block").stdout.strip()
        self.wait_for(os.path.join(self.data, "running-post_upgrade"))
        units = self.hook_units()
        self.assertEqual(len(units), 1)
        self.assertRegex(units[0], r"^upgraded-hook-hello-post_upgrade-\d+\.service$")
        os.unlink(os.path.join(self.data, "hang-post_upgrade"))
        # Past the point of no return: no cancel; a killed hook fails like any other.
        r = self.ctl("cancel", job.rsplit("/", 1)[1], check=None)
        self.assertNotEqual(r.returncode, 0)
        subprocess.run(["systemctl", "--user", "kill", "-s", "KILL", units[0]], check=True)
        for _ in range(300):
            if self.current() == "releases/1.0.0" and not self.hook_units():
                break
            time.sleep(0.05)
        self.assertEqual(self.serving("1.0.0"), "1.0.0")
        last = self.history()[-1]
        self.assertEqual(last["result"], "rolled-back")
        self.assertIn("the post_upgrade hook (hooks/run) was killed by signal 9", last["message"])

    def test_cancel_while_pre_upgrade_runs_changes_nothing(self):
        self.start_daemon()
        self.ctl("install", "-q", self.pack("1.0.0"))
        self.ctl("install", "--stage-only", "-q", self.pack("2.0.0"))
        self.hook_log()
        open(os.path.join(self.data, "hang-pre_upgrade"), "w").close()
        inv, state, history = self.invocation(), self.state(), self.history()
        job = self.ctl("activate", self.app, "2.0.0", "--no-block").stdout.strip()
        self.wait_for(os.path.join(self.data, "running-pre_upgrade"))
        self.ctl("cancel", job.rsplit("/", 1)[1])
        self.settled()
        self.assertEqual(self.hook_units(), [])
        self.assertEqual((self.current(), self.state(), self.invocation(), self.history()),
                         ("releases/1.0.0", state, inv, history))
        self.assertFalse(os.path.exists(os.path.join(
            self.root, "var/lib/upgraded/apps/hello/activation.json")))

    def test_a_hook_cannot_write_outside_its_data_directories(self):
        self.start_daemon()
        self.ctl("install", "-q", self.pack("1.0.0"))
        self.ctl("install", "--stage-only", "-q", self.pack("2.0.0"))
        target = os.path.join(self.dir, "outside")
        for where in [target, os.path.join(self.root, "var/lib/upgraded/apps/hello/x"),
                      os.path.join(self.root, "etc/upgraded/keys.d/evil.pem")]:
            with open(os.path.join(self.data, "escape-pre_upgrade"), "w") as f:
                f.write(where)
            r = self.ctl("activate", self.app, "2.0.0", check=1)
            self.assertIn("the pre_upgrade hook (hooks/run) exited with status 4", r.stderr)
            self.assertFalse(os.path.exists(where), where)
        os.unlink(os.path.join(self.data, "escape-pre_upgrade"))
        # Nor reach the bus (as root it would be root for the daemon and for systemd): the
        # session bus socket is out of its sight.
        with open(os.path.join(self.data, "connect-pre_upgrade"), "w") as f:
            f.write(os.path.join(TESTBED, "bus"))
        r = self.ctl("activate", self.app, "2.0.0", check=1)
        self.assertIn("the pre_upgrade hook (hooks/run) exited with status 6", r.stderr)
        os.unlink(os.path.join(self.data, "connect-pre_upgrade"))
        self.assertEqual(self.current(), "releases/1.0.0")

    def test_a_hook_that_reports_progress(self):
        self.start_daemon()
        self.ctl("install", "-q", self.pack("1.0.0"))
        src = os.path.join(self.dir, "src-progress")
        self.pack("2.0.0")
        os.rename(os.path.join(self.dir, "src-2.0.0"), src)
        # A migrate that says where it is: the job's Step shows it.
        with open(os.path.join(src, "hooks/run"), "w") as f:
            f.write("#!/bin/sh\n[ \"$UPGRADED_PHASE\" = migrate ] || exit 0\n"
                    "systemd-notify --status='copying table 3 of 7'\nsleep %d\n" % (2 * TIME_FACTOR))
        out = os.path.join(self.dir, "progress.upd")
        subprocess.run([UPGRADECTL, "pack", "--key", self.key, "--app", self.app, "--version",
                        "2.0.0", "--manifest", os.path.join(self.dir, "manifest-2.0.0.json"),
                        "-o", out, src], check=True, stdout=subprocess.DEVNULL)
        job = self.ctl("install", "--no-block", out).stdout.strip()
        seen = ""
        end = time.monotonic() + 30 * TIME_FACTOR
        while time.monotonic() < end and "copying" not in seen:
            r = subprocess.run(["busctl", "--user", "get-property", "org.upgraded1", job,
                                "org.upgraded1.Job", "Step"], capture_output=True, text=True)
            seen = r.stdout
            time.sleep(0.05)
        self.assertIn("migrate hook: copying table 3 of 7", seen)

    # --- upgrade paths --------------------------------------------------------------------------

    def test_upgrade_paths_name_and_walk_the_staged_chain(self):
        self.start_daemon()
        self.ctl("install", "-q", self.pack("1.0.0", hooks=[]))
        for v, frm in [("2.0.0", ["1.*"]), ("2.1.0", ["1.*", "2.0.*"]), ("3.0.0", ["2.*"])]:
            self.ctl("install", "--stage-only", "-q", self.pack(v, hooks=[], upgrade_from=frm))
        state, inv = self.state(), self.invocation()
        r = self.ctl("activate", self.app, "3.0.0", check=3)
        self.assertIn("3.0.0 cannot be activated from 1.0.0 (upgrade_from: 2.*); staged path: "
                      "1.0.0 \u2192 2.1.0 \u2192 3.0.0", r.stderr)
        self.assertEqual((self.state(), self.invocation()), (state, inv))

        self.ctl("activate", "--through", "-q", self.app, "3.0.0")
        self.assertEqual(self.serving("3.0.0"), "3.0.0")
        steps = [(h["op"], h["from"], h["to"], h["result"]) for h in self.history()[-2:]]
        self.assertEqual(steps, [("activate", "1.0.0", "2.1.0", "done"),
                                 ("activate", "2.1.0", "3.0.0", "done")])

    def test_a_walk_stops_at_the_first_failed_step(self):
        self.start_daemon()
        self.ctl("install", "-q", self.pack("1.0.0"))
        self.ctl("install", "--stage-only", "-q", self.pack("2.0.0", upgrade_from=["1.*"]))
        self.ctl("install", "--stage-only", "-q", self.pack("3.0.0", upgrade_from=["2.*"]))
        open(os.path.join(self.data, "fail-health-3.0.0"), "w").close()
        r = self.ctl("activate", "--through", self.app, "3.0.0", check=1)
        self.assertIn("step 2 of 2 (2.0.0 \u2192 3.0.0): health gate: the health hook", r.stderr)
        self.assertIn("rolled back to 2.0.0", r.stderr)
        self.assertEqual(self.serving("2.0.0"), "2.0.0")
        st = self.state()
        self.assertEqual((st["current"], st["releases"]["2.0.0"]["status"],
                          st["releases"]["3.0.0"]["status"]), ("2.0.0", "good", "bad"))

    # --- crash safety ---------------------------------------------------------------------------

    def test_daemon_killed_in_each_hook_phase(self):
        self.start_daemon()
        self.ctl("install", "-q", self.pack("1.0.0"))
        self.hook_log()
        history = self.history()
        for n, phase in enumerate(["pre_upgrade", "migrate", "post_upgrade", "health"]):
            version = "2.0.%d" % n
            self.ctl("install", "--stage-only", "-q", self.pack(version))
            hang = os.path.join(self.data, "hang-" + phase)
            open(hang, "w").close()
            self.ctl("activate", self.app, version, "--no-block")
            self.wait_for(os.path.join(self.data, "running-" + phase))
            self.kill_daemon()
            os.unlink(hang)
            os.unlink(os.path.join(self.data, "running-" + phase))
            self.assertEqual(len(self.hook_units()), 1, "the hook outlives the daemon")
            self.start_daemon()
            for _ in range(600):
                if not json.loads(self.ctl("jobs", "--json").stdout) and not self.hook_units():
                    break
                time.sleep(0.05)
            self.assertEqual(self.hook_units(), [])
            self.assertFalse(os.path.exists(os.path.join(
                self.root, "var/lib/upgraded/apps/hello/activation.json")))
            log = [line.split()[0] for line in self.hook_log()]
            st = self.state()
            if phase == "health":
                # Migrated, units started: the activation goes on. The health hook is a check
                # and runs again; nothing else does.
                self.assertEqual(self.current(), "releases/" + version)
                self.assertEqual(self.serving(version), version)
                self.assertEqual(st["releases"][version]["status"], "good")
                self.assertEqual(log, ["pre_upgrade", "migrate", "health", "health",
                                       "post_upgrade"])
                last = self.history()[-1]
                self.assertEqual((last["op"], last["result"]), ("recover", "done"))
                continue
            # Never rerun: the interrupted hook counts as failed, the old release serves, the
            # new one is not marked bad (it did not fail; activate it again to retry).
            self.assertEqual(self.current(), "releases/1.0.0")
            self.assertEqual(self.serving("1.0.0"), "1.0.0")
            self.assertNotEqual(st["releases"][version]["status"], "bad")
            self.assertEqual(log.count(phase), 1, log)
            self.assertNotIn("migrate", log[log.index(phase) + 1:])
            if phase == "pre_upgrade":
                # Nothing had changed: nothing to recover.
                self.assertEqual(self.history(), history)
            else:
                last = self.history()[-1]
                self.assertEqual((last["op"], last["result"]), ("recover", "rolled-back"))
                self.assertIn("is not run again", last["message"])

    def test_daemon_killed_during_an_automatic_rollback(self):
        self.start_daemon(env={"UPGRADED_CRASH_AT": "activation.rolling_back"})
        self.ctl("install", "-q", self.pack("1.0.0"))
        self.ctl("install", "--stage-only", "-q", self.pack("2.0.0"))
        open(os.path.join(self.data, "fail-post_upgrade-2.0.0"), "w").close()
        self.hook_log()
        self.activate_until_killed("2.0.0")
        self.assertEqual(self.current(), "releases/2.0.0")
        self.start_daemon()
        self.settled()
        # Finished as an automatic rollback: no hook of either release ran again.
        self.assertEqual(self.current(), "releases/1.0.0")
        self.assertEqual(self.serving("1.0.0"), "1.0.0")
        self.assertEqual(self.state()["releases"]["2.0.0"]["status"], "bad")
        self.assertEqual([line.split()[0] for line in self.hook_log()],
                         ["pre_upgrade", "migrate", "health", "post_upgrade"])
        last = self.history()[-1]
        self.assertEqual((last["op"], last["result"]), ("recover", "rolled-back"))
        self.assertIn("interrupted while rolling back to 1.0.0", last["message"])

    def test_one_by_one_gates_each_unit_with_the_health_hook_and_resumes_after_a_kill(self):
        names, outs = self.three_units()

        def pack(version):
            return self.pack(version, hooks=["pre_upgrade", "health", "post_upgrade"],
                             units=names, strategy="one-by-one")

        def invocations():
            return [subprocess.run(["systemctl", "--user", "show", "-P", "InvocationID", u],
                                   capture_output=True, text=True, check=True).stdout.strip()
                    for u in names]

        self.start_daemon()
        self.ctl("install", "-q", pack("1.0.0"))
        self.ctl("install", "-q", pack("2.0.0"))
        def phases(log):
            return [line.split()[0] + ("@" + line.partition(" unit=")[2] if " unit=" in line
                                       else "") for line in log]

        self.assertEqual(phases(self.hook_log())[-5:],
                         ["pre_upgrade", "health@hello.service", "health@hello-b.service",
                          "health@hello-c.service", "post_upgrade"])
        for u in names:
            self.assertEqual(wait_for_content(outs[u], "2.0.0"), "2.0.0", u)
        # history: each unit's own window.
        self.assertRegex(self.ctl("history", self.app).stdout,
                         r"hello-b\.service \d+\.\d ms, hello-c\.service \d+\.\d ms, "
                         r"hello\.service \d+\.\d ms")

        # The health hook fails for the second unit: the first two go back, the third was never
        # restarted.
        before = invocations()
        open(os.path.join(self.data, "fail-health-hello-b.service"), "w").close()
        r = self.ctl("install", pack("3.0.0"), check=None)
        os.unlink(os.path.join(self.data, "fail-health-hello-b.service"))
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("health gate of hello-b.service", r.stderr)
        self.assertIn("never restarted: hello-c.service", r.stderr)
        after = invocations()
        self.assertNotEqual(after[0], before[0])
        self.assertNotEqual(after[1], before[1])
        self.assertEqual(after[2], before[2], "hello-c.service was restarted")
        self.assertEqual(self.current(), "releases/2.0.0")
        for u in names:
            self.assertEqual(wait_for_content(outs[u], "2.0.0"), "2.0.0", u)
        self.assertEqual(phases(self.hook_log()),
                         ["pre_upgrade", "health@hello.service", "health@hello-b.service"])

        # Killed before the third unit is touched: the restarted daemon goes on from there, and
        # the units that passed their gates are not restarted again.
        self.stop_daemon()
        self.start_daemon(env={"UPGRADED_CRASH_AT": "activation.before_unit#3"})
        self.ctl("install", "--stage-only", "-q", pack("4.0.0"))
        self.activate_until_killed("4.0.0")
        moved = invocations()
        self.assertEqual(moved[2], after[2])
        self.start_daemon()
        self.settled()
        self.assertEqual(invocations()[:2], moved[:2], "the units already moved were restarted")
        self.assertNotEqual(invocations()[2], moved[2])
        self.assertEqual(self.current(), "releases/4.0.0")
        self.assertEqual(self.state()["releases"]["4.0.0"]["status"], "good")
        for u in names:
            self.assertEqual(wait_for_content(outs[u], "4.0.0"), "4.0.0", u)
        # Before the kill: pre_upgrade and the gates of the first two units; after it, the
        # third unit's gate and post_upgrade.
        self.assertEqual(phases(self.hook_log()),
                         ["pre_upgrade", "health@hello.service", "health@hello-b.service",
                          "health@hello-c.service", "post_upgrade"])
        last = self.history()[-1]
        self.assertEqual((last["op"], last["result"]), ("recover", "done"))

        # Killed again between units, and meanwhile a unit that had passed its gate died: the
        # resumed gate checks it, fails, and restores every unit moved.
        self.stop_daemon()
        self.start_daemon(env={"UPGRADED_CRASH_AT": "activation.before_unit#3"})
        self.ctl("install", "--stage-only", "-q", pack("5.0.0"))
        self.activate_until_killed("5.0.0")
        subprocess.run(["systemctl", "--user", "stop", self.unit], check=True)
        self.start_daemon()
        self.settled()
        self.assertEqual(self.current(), "releases/4.0.0")
        self.assert_serving(outs, "4.0.0")
        last = self.history()[-1]
        self.assertEqual((last["op"], last["result"]), ("recover", "rolled-back"))
        self.assertIn("health gate: hello.service is inactive", last["message"])

    def test_one_by_one_after_a_migrate_a_resumed_failure_restores_every_unit(self):
        # A migrate stops every unit: one by one after it, a failure (even one resumed after a
        # crash) must start them all again on the old release, not only those it reached.
        names, outs = self.three_units()

        def pack(version):
            return self.pack(version, hooks=["pre_upgrade", "migrate", "health", "post_upgrade"],
                             units=names, strategy="one-by-one")

        self.start_daemon()
        self.ctl("install", "-q", pack("1.0.0"))
        self.ctl("install", "--stage-only", "-q", pack("2.0.0"))
        self.stop_daemon()
        # Killed before the first unit's health hook: hello-b and hello-c are still stopped.
        self.start_daemon(env={"UPGRADED_CRASH_AT": "hook.health.before"})
        self.activate_until_killed("2.0.0")
        open(os.path.join(self.data, "fail-health-hello-b.service"), "w").close()
        self.hook_log()
        self.start_daemon()
        self.settled()
        self.assertEqual(self.current(), "releases/1.0.0")
        self.assert_serving(outs, "1.0.0")
        last = self.history()[-1]
        self.assertEqual((last["op"], last["result"]), ("recover", "rolled-back"))
        self.assertNotIn("never restarted", last["message"])

    def test_auto_finalize_after_the_soak_across_a_restart(self):
        self.conf(data_dirs='["/var/lib/hello-data"]', auto_finalize_after_s=3 * TIME_FACTOR)
        self.start_daemon()
        self.ctl("install", "-q", self.pack("1.0.0"))
        self.ctl("install", "-q", self.pack("2.0.0", writes=2))
        self.assertEqual(self.finalization()["state"], "pre-finalized")
        self.stop_daemon()
        time.sleep(1)
        self.start_daemon()
        end = time.monotonic() + 30 * TIME_FACTOR
        while self.finalization()["state"] != "finalized":
            self.assertLess(time.monotonic(), end, "not finalized automatically")
            time.sleep(0.2)
        f = self.finalization()
        self.assertEqual((f["finalized_data_format"], f["last_backup"]), (2, "snap-001"))
        self.assertEqual(self.history()[-1]["op"], "finalize")

    def test_offline_install_queues_the_activation_for_the_daemon(self):
        self.start_daemon()
        self.ctl("install", "-q", self.pack("1.0.0"))
        self.stop_daemon()
        self.hook_log()
        artifact = self.pack("2.0.0")
        r = subprocess.run([UPGRADECTL, "install", "--offline", "--root", self.root, artifact],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("queued for upgraded's next start", r.stdout)
        self.assertEqual(self.current(), "releases/1.0.0")
        self.assertEqual(self.hook_log(), [])
        self.start_daemon()
        self.assertEqual(self.serving("2.0.0"), "2.0.0")
        self.settled()
        self.assertEqual([line.split()[0] for line in self.hook_log()],
                         ["pre_upgrade", "migrate", "health", "post_upgrade"])
        self.assertEqual(self.state()["releases"]["2.0.0"]["status"], "good")


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
