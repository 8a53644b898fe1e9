#!/usr/bin/python3
"""Socket units and the file descriptor store, end to end on the real-systemd testbed
(docs/hooks.md, "Socket units"): a release's socket unit is held while its service restarts,
and a service that keeps its clients' connections in systemd's file descriptor store keeps
them across an upgrade and a rollback (a restart keeps the store; a stop empties it).

    tests/testbed/with-systemd-user tests/integration/sockets_test.py UPGRADED UPGRADECTL
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../support"))
from sample_service import DaemonRunner, instance_dir  # noqa: E402

UPGRADED, UPGRADECTL = sys.argv[1], sys.argv[2]
TESTBED = os.environ["UPGRADED_TESTBED"]
UNITS_DIR = os.environ["UPGRADED_TESTBED_UNITS"]
SERVICE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "../support/held_connection_service")
UNITS = ["held.socket", "held.service"]


class HeldConnections(DaemonRunner, unittest.TestCase):
    upgraded, upgradectl = UPGRADED, UPGRADECTL

    def setUp(self):
        self.dir, self.root, self.key = instance_dir(UPGRADECTL, TESTBED)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        units = {
            "held.socket": "[Socket]\nListenStream=127.0.0.1:%d\n" % self.port,
            "held.service": "[Service]\nType=notify\nNotifyAccess=main\n"
                            "FileDescriptorStoreMax=16\n"
                            "ExecStart=%s/var/lib/upgraded/apps/held/current/bin/service\n"
                            % self.root,
        }
        for name, text in units.items():
            with open(os.path.join(UNITS_DIR, name), "w") as f:
                f.write(text)
        subprocess.run(["systemctl", "--user", "daemon-reload"], check=True)
        self.start_daemon()

    def tearDown(self):
        self.stop_daemon()
        for unit in reversed(UNITS):
            subprocess.run(["systemctl", "--user", "stop", unit], check=False)
            subprocess.run(["systemctl", "--user", "reset-failed", unit], check=False,
                           stderr=subprocess.DEVNULL)
            os.unlink(os.path.join(UNITS_DIR, unit))
        shutil.rmtree(self.dir, ignore_errors=True)

    def pack(self, version, migrate=False):
        src = os.path.join(self.dir, "src-" + version)
        os.makedirs(os.path.join(src, "bin"))
        shutil.copy(SERVICE, os.path.join(src, "bin/service"))
        with open(os.path.join(src, "VERSION"), "w") as f:
            f.write(version)
        manifest = {"units": UNITS, "health": {"min_ready_s": 1, "deadline_s": 30}}
        if migrate:
            os.makedirs(os.path.join(src, "hooks"))
            with open(os.path.join(src, "hooks/migrate"), "w") as f:
                f.write("#!/bin/sh\nexit 0\n")
            os.chmod(os.path.join(src, "hooks/migrate"), 0o755)
            manifest["hooks"] = {"migrate": {"path": "hooks/migrate", "timeout_s": 30}}
            manifest["data_format"] = {"writes": 1, "reads_min": 0}
        extra = os.path.join(self.dir, "manifest-%s.json" % version)
        with open(extra, "w") as f:
            json.dump(manifest, f)
        out = os.path.join(self.dir, version + ".upd")
        subprocess.run([UPGRADECTL, "pack", "--key", self.key, "--app", "held", "--version",
                        version, "--manifest", extra, "-o", out, src], check=True,
                       stdout=subprocess.DEVNULL)
        return out

    def show(self, unit, prop):
        return subprocess.run(["systemctl", "--user", "show", "-P", prop, unit],
                              capture_output=True, text=True, check=True).stdout.strip()

    def test_a_connection_kept_in_the_file_descriptor_store_outlives_upgrades(self):
        self.ctl("install", "-q", self.pack("1.0.0"))
        self.ctl("install", "--stage-only", "-q", self.pack("1.1.0"))
        self.ctl("install", "--stage-only", "-q", self.pack("2.0.0", migrate=True))
        client = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        lines = client.makefile("rb")

        def ask():
            client.sendall(b"?\n")
            return lines.readline().decode().strip()

        self.assertEqual(ask(), "1.0.0")
        invocation = self.show("held.service", "InvocationID")
        # Restarted by the upgrade and by the rollback: the same connection, answered by each
        # release in turn.
        self.ctl("activate", "-q", "held", "1.1.0")
        self.assertNotEqual(self.show("held.service", "InvocationID"), invocation)
        self.assertEqual(self.show("held.service", "NFileDescriptorStore"), "1")
        self.assertEqual(ask(), "1.1.0")
        self.ctl("rollback", "-q", "held")
        self.assertEqual(ask(), "1.0.0")
        # A migrate stops the service (and its socket, first): the store is emptied, and the
        # plan says so before.
        plan = json.loads(self.ctl("plan", "held=2.0.0", "--json").stdout)
        stops = [s for s in plan["steps"] if s["kind"] == "stop"]
        self.assertEqual([s["target"] for s in stops], ["held.socket", "held.service"])
        self.assertIn("file descriptor store", stops[1]["note"])
        self.ctl("activate", "-q", "held", "2.0.0")
        self.assertEqual(self.show("held.service", "NFileDescriptorStore"), "0")
        try:
            client.sendall(b"?\n")
            self.assertEqual(lines.readline(), b"")  # closed with the process
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed with the process, noticed on the way out
        client.close()
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as again:
            again.sendall(b"?\n")
            self.assertEqual(again.makefile("rb").readline().decode().strip(), "2.0.0")


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
