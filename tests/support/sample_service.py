"""The sample service of the integration tests, shared by tests/integration/daemon_test.py and
tests/cli/online_verbs_test.py: a release whose bin/hello writes the release's VERSION to $OUT
and stays up (or, with fail, exits 3 after 0.3 s: a release that fails its health gate)."""

import json
import os
import signal
import subprocess
import tempfile
import time

# How much longer than usual things take: tests scale a duration they depend on by it.
# tests/sanitizer/ctest_environment.cmake.in sets it to 3 for sanitizer builds.
TIME_FACTOR = int(os.environ.get("UPGRADED_TEST_TIME_FACTOR", "1"))


def pack_sample(upgradectl, key, workdir, app, unit, version, fail=False, min_ready_s=1):
    """Builds and signs the sample release `version`; returns the artifact's path."""
    src = os.path.join(workdir, "src-" + version)
    os.makedirs(os.path.join(src, "bin"))
    with open(os.path.join(src, "VERSION"), "w") as f:
        f.write(version)
    with open(os.path.join(src, "bin/hello"), "w") as f:
        f.write('#!/bin/sh\nhere=$(dirname "$(readlink -f "$0")")\n'
                'cat "$here/../VERSION" > "$OUT"\n' +
                ("sleep 0.3; exit 3\n" if fail else "exec sleep 1000\n"))
    os.chmod(os.path.join(src, "bin/hello"), 0o755)
    extra = os.path.join(workdir, "manifest-%s.json" % version)
    with open(extra, "w") as f:
        json.dump({"units": [unit], "health": {"min_ready_s": min_ready_s, "deadline_s": 30}}, f)
    out = os.path.join(workdir, version + ".upd")
    subprocess.run([upgradectl, "pack", "--key", key, "--app", app, "--version", version,
                    "--manifest", extra, "-o", out, src], check=True, stdout=subprocess.DEVNULL)
    os.chmod(out, 0o644)
    return out


def instance_dir(upgradectl, testbed):
    """A fresh directory of the testbed for a daemon instance: (dir, root: the instance's "/",
    key: a private signing key whose public half root/etc/upgraded/keys.d trusts)."""
    directory = tempfile.mkdtemp(dir=testbed)
    os.chmod(directory, 0o755)
    root = os.path.join(directory, "root")
    keys = os.path.join(root, "etc/upgraded/keys.d")
    os.makedirs(keys)
    key = os.path.join(directory, "release.key")
    subprocess.run([upgradectl, "keygen", "--private", key, "--public",
                    os.path.join(keys, "release.pem")], check=True, stdout=subprocess.DEVNULL)
    return directory, root, key


def wait_job_removed(removed, path, timeout):
    """Runs the default GLib main context until `removed` (filled by a JobRemoved handler)
    holds the job `path`; what it holds for it."""
    from gi.repository import GLib
    ctx = GLib.MainContext.default()
    end = time.monotonic() + timeout
    while path not in removed:
        if time.monotonic() > end:
            raise AssertionError("job %s did not end" % path)
        ctx.iteration(False) or time.sleep(0.005)
    return removed[path]


def wait_for_content(path, expect, tries=200, delay=0.02):
    """What the file holds once it holds `expect`, or after `tries` looks (a Type=simple start
    is "done" once systemd has forked the service, before it wrote anything)."""
    text = None
    for _ in range(tries):
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            text = None
        if text == expect:
            break
        time.sleep(delay)
    return text


class Instance:
    """A daemon instance's files and the sample service's unit, in a fresh directory of the
    testbed: dir, root (the instance's "/"), key (the private signing key; its public half is
    trusted), out (where the service writes the release it runs), unit."""

    def __init__(self, upgradectl, testbed, units_dir, app):
        self.dir, self.root, self.key = instance_dir(upgradectl, testbed)
        self.out = os.path.join(self.dir, "serving")
        self.unit = app + ".service"
        with open(os.path.join(units_dir, self.unit), "w") as f:
            f.write("[Service]\nExecStart=%s/var/lib/upgraded/apps/%s/current/bin/hello\n"
                    "Environment=OUT=%s\n" % (self.root, app, self.out))
        subprocess.run(["systemctl", "--user", "daemon-reload"], check=True)


class DaemonRunner:
    """For a unittest.TestCase that runs its own daemon, `upgraded --user --root self.root`,
    logging to self.dir/daemon.log; the test module sets `upgraded` and `upgradectl` (paths)."""
    upgraded = upgradectl = None
    daemon = None

    def start_daemon(self, env=None):
        """Starts the daemon (with `env` added to the environment) and waits until it answers."""
        self.log = open(os.path.join(self.dir, "daemon.log"), "ab")
        self.daemon = subprocess.Popen([self.upgraded, "--user", "--root", self.root],
                                       env=dict(os.environ, **(env or {})),
                                       stdout=self.log, stderr=self.log)
        for _ in range(200):
            if self.ctl("jobs", check=None).returncode == 0:
                return
            time.sleep(0.05)
        self.fail("upgraded did not come up")

    def stop_daemon(self):
        """SIGTERM, and the daemon must exit 0."""
        if self.daemon and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            self.assertEqual(self.daemon.wait(timeout=60), 0)
        if self.daemon:
            self.log.close()
        self.daemon = None

    def ctl(self, *args, check=0):
        """upgradectl ARGS --user; its exit code must be `check` (None: anything)."""
        r = subprocess.run([self.upgradectl, *args, "--user"], capture_output=True, text=True)
        if check is not None:
            self.assertEqual(r.returncode, check, "%s\nstdout: %s\nstderr: %s" %
                             (" ".join(args), r.stdout, r.stderr))
        return r

    def settled(self):
        """Waits (bounded) until the daemon has no job left."""
        for _ in range(600):
            if not json.loads(self.ctl("jobs", "--json").stdout):
                return
            time.sleep(0.05)
        self.fail("the daemon's jobs did not end")
