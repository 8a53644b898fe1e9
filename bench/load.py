#!/usr/bin/python3
"""bench/load's body, run inside the testbed: see bench/load."""
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import dbus
from dbus.mainloop.glib import DBusGMainLoop
from gi.repository import GLib

UPGRADED, UPGRADECTL, ROUNDS = sys.argv[1], sys.argv[2], int(sys.argv[3])
T = os.environ["UPGRADED_TESTBED"]
HERE = os.path.dirname(os.path.abspath(__file__))
LOAD_CLIENT = os.path.join(HERE, "../tests/support/load_client.py")
UNIT = "upgraded-bench.service"
ROOT = os.path.join(T, "root")
CLIENTS, IN_FLIGHT = 4, 250  # 1,000 ListApps calls in flight at once
APPS = 20                    # installs and activations during a loaded round

DBusGMainLoop(set_as_default=True)


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def status(pid):
    fields = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            fields[k] = v.strip()
    return len(os.listdir("/proc/%d/fd" % pid)), int(fields["VmRSS"].split()[0])


def pack(key, app, version):
    src = os.path.join(T, "src", app, version)
    os.makedirs(src)
    for i in range(50):
        with open(os.path.join(src, "f%d" % i), "w") as f:
            f.write("%s %s %d\n" % (app, version, i) * 20)
    out = os.path.join(T, "%s-%s.upd" % (app, version))
    run(UPGRADECTL, "pack", "--key", key, "--app", app, "--version", version, "-o", out, src)
    return out


def readers():
    """CLIENTS processes with IN_FLIGHT ListApps calls each, all at once: (latencies, wall)."""
    procs = [subprocess.Popen(["/usr/bin/python3", LOAD_CLIENT, "ListApps", str(IN_FLIGHT)],
                              stdout=subprocess.PIPE, text=True) for _ in range(CLIENTS)]
    latencies, wall = [], 0.0
    for p in procs:
        r = json.loads(p.communicate()[0])
        assert not r["errors"], r["errors"]
        latencies += r["latencies"]
        wall = max(wall, r["wall"])
    return latencies, wall


def p99(values):
    values = sorted(values)
    return values[int(round(0.99 * (len(values) - 1)))]


def main():
    keys = os.path.join(ROOT, "etc/upgraded/keys.d")
    os.makedirs(keys)
    key = os.path.join(T, "k.key")
    run(UPGRADECTL, "keygen", "--private", key, "--public", os.path.join(keys, "k.pem"))
    versions = ["%d.0.0" % r for r in range(1, 2 * ROUNDS + 2)]
    print("packing %d artifacts..." % (APPS * len(versions)), file=sys.stderr)
    artifacts = {(a, v): pack(key, "app%02d" % a, v) for a in range(APPS) for v in versions}
    run("systemd-run", "--user", "--quiet", "--unit", UNIT, "-p", "Type=notify",
        "-p", "WatchdogSec=5", "-p", "NotifyAccess=main",
        "-E", "DBUS_SESSION_BUS_ADDRESS=" + os.environ["DBUS_SESSION_BUS_ADDRESS"],
        UPGRADED, "--user", "--root", ROOT)
    pid = int(run("systemctl", "--user", "show", "-P", "MainPID", UNIT))
    bus = dbus.SessionBus()
    removed = {}
    bus.add_signal_receiver(lambda i, p, r, m: removed.__setitem__(str(p), str(r)),
                            "JobRemoved", "org.upgraded1.Manager")

    def install_all(version):
        """APPS installs with activation at once; returns when every job has ended."""
        loop = GLib.MainLoop()
        jobs, errors = [], []

        def got(p):
            jobs.append(str(p))
            if len(jobs) + len(errors) == APPS:
                loop.quit()

        def failed(e):
            errors.append(str(e))
            if len(jobs) + len(errors) == APPS:
                loop.quit()
        # Eight calls per connection: the most one connection may have waiting for
        # authorization (docs/configuration.md); many clients would look like this.
        connections = [dbus.SessionBus(private=True) for _ in range(0, APPS, 8)]
        managers = [dbus.Interface(c.get_object("org.upgraded1", "/org/upgraded1"),
                                   "org.upgraded1.Manager") for c in connections]
        for a in range(APPS):
            fd = os.open(artifacts[(a, version)], os.O_RDONLY)
            managers[a // 8].Install(dbus.types.UnixFd(fd), {"activate": dbus.Boolean(True)},
                                     reply_handler=got, error_handler=failed, timeout=300)
            os.close(fd)
        loop.run()
        if errors:
            sys.exit("bench/load: %d of %d Install calls failed: %s" %
                     (len(errors), APPS, "; ".join(sorted(set(errors)))))
        for c in connections:
            c.set_exit_on_disconnect(False)  # libdbus would _exit(1) on its own close
            c.close()
        ctx = GLib.MainContext.default()
        while not all(j in removed for j in jobs):
            ctx.iteration(True)
        assert all(removed[j] == "done" for j in jobs), [removed[j] for j in jobs]

    install_all(versions[0])  # the apps exist; ListApps lists APPS apps from here on
    time.sleep(1)
    fds0, rss0 = status(pid)
    idle, loaded = {"rate": [], "p50": [], "p99": []}, {"rate": [], "p50": [], "p99": []}
    v = 1
    for r in range(ROUNDS):
        # Alternate which goes first, so that neither always follows a quiet second.
        for mode in (("idle", "loaded") if r % 2 == 0 else ("loaded", "idle")):
            time.sleep(0.5)
            if mode == "idle":
                lat, wall = readers()
                target = idle
            else:
                t = threading.Thread(target=install_all, args=(versions[v],))
                v += 1
                t.start()
                lat, wall = readers()
                t.join()
                target = loaded
            target["rate"].append(len(lat) / wall)
            target["p50"].append(statistics.median(lat) * 1000)
            target["p99"].append(p99(lat) * 1000)
    time.sleep(1.5)
    fds1, rss1 = status(pid)
    restarts = run("systemctl", "--user", "show", "-P", "NRestarts", UNIT)
    run("systemctl", "--user", "stop", UNIT)

    med = {k: {m: statistics.median(d[m]) for m in d} for k, d in (("idle", idle),
                                                                     ("loaded", loaded))}
    print("ListApps, %d calls in flight at once from %d clients, %d apps; medians of %d rounds"
          % (CLIENTS * IN_FLIGHT, CLIENTS, APPS, ROUNDS))
    print("  idle:                      %6.0f calls/s, p50 %7.1f ms, p99 %7.1f ms" %
          (med["idle"]["rate"], med["idle"]["p50"], med["idle"]["p99"]))
    print("  during %d installs+activations: %6.0f calls/s, p50 %7.1f ms, p99 %7.1f ms" %
          (APPS, med["loaded"]["rate"], med["loaded"]["p50"], med["loaded"]["p99"]))
    print("  loaded/idle: calls/s %.2f, p99 %.2f" %
          (med["loaded"]["rate"] / med["idle"]["rate"], med["loaded"]["p99"] / med["idle"]["p99"]))
    print("daemon: %d fds and %.1f MiB RSS before, %d fds and %.1f MiB after; NRestarts %s" %
          (fds0, rss0 / 1024, fds1, rss1 / 1024, restarts))


if __name__ == "__main__":
    main()
