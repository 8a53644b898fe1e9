#!/usr/bin/python3
"""bench/install's body, run inside the testbed: see bench/install."""
import os
import random
import statistics
import subprocess
import sys
import time

import dbus

from daemon_client import Daemon

UPGRADED, UPGRADECTL, RUNS = sys.argv[1], sys.argv[2], int(sys.argv[3])
# On disk, not in the testbed's directory: its files must land where releases would.
W = os.environ.get("BENCH_DIR", "/var/tmp/upgraded-bench-install.%d" % os.getpid())


def run(*cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def trees():
    random.seed(7)
    small = os.path.join(W, "small")
    for d in range(500):
        os.makedirs(os.path.join(small, "d%03d" % d))
        for f in range(100):
            with open(os.path.join(small, "d%03d" % d, "f%03d" % f), "wb") as out:
                out.write(random.randbytes(random.randint(50, 1500)))
    big = os.path.join(W, "big")
    os.makedirs(big)
    for f in range(200):
        with open(os.path.join(big, "f%03d" % f), "wb") as out:
            out.write(random.randbytes(1 << 20))
    return {"small (50,000 files)": small, "big (200 x 1 MiB)": big}


def main():
    root = os.path.join(W, "root")
    keys = os.path.join(root, "etc/upgraded/keys.d")
    os.makedirs(keys)
    key = os.path.join(W, "k.key")
    run(UPGRADECTL, "keygen", "--private", key, "--public", os.path.join(keys, "k.pem"))
    with open(os.path.join(root, "etc/upgraded/upgraded.conf"), "w") as f:
        f.write("[extract]\nfree_space_reserve = 0\n")
    artifacts = {}
    for name, src in trees().items():
        app = "small" if name.startswith("small") else "big"
        artifacts[name] = []
        for i in range(RUNS):
            out = os.path.join(W, "%s-%d.upd" % (app, i))
            run(UPGRADECTL, "pack", "--key", key, "--app", app, "--version", "1.%d" % i,
                "-o", out, src)
            artifacts[name].append(out)
    daemon = Daemon(UPGRADED, root)
    manager = daemon.manager
    keysdir = os.path.join(W, "keys")
    os.makedirs(keysdir)
    run("cp", os.path.join(keys, "k.pem"), keysdir)
    time.sleep(60)  # the trees were just written: let writeback settle before timing
    for name, arts in artifacts.items():
        unpack, install = [], []
        for i, a in enumerate(arts):
            # Alternate which goes first; each into a fresh directory; nothing deleted yet.
            def by_cli():
                t0 = time.monotonic()
                run(UPGRADECTL, "unpack", "--keys", keysdir, a, os.path.join(W, "u-%s-%d" %
                                                                          (name[:3], i)))
                unpack.append(time.monotonic() - t0)

            def by_daemon():
                fd = os.open(a, os.O_RDONLY)
                t0 = time.monotonic()
                outcome = daemon.wait(manager.Install(dbus.types.UnixFd(fd), {}))
                install.append(time.monotonic() - t0)
                os.close(fd)
                assert outcome[0] == "done", outcome

            for step in ((by_cli, by_daemon) if i % 2 == 0 else (by_daemon, by_cli)):
                step()
        mu, mi = statistics.median(unpack), statistics.median(install)
        # Each pair ran back to back: their ratios show how much the machine's state moved the
        # figure within this run (it moves more between runs: docs/architecture.md).
        pairs = sorted(b / a for a, b in zip(unpack, install))
        print("%-22s upgradectl unpack %7.3f s   daemon install %7.3f s   ratio %.2f"
              "   (pairs %.2f-%.2f)" % (name, mu, mi, mi / mu, pairs[0], pairs[-1]))
    daemon.stop()


try:
    main()
finally:
    if not os.environ.get("KEEP"):
        subprocess.run(["rm", "-rf", W])
