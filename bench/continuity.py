#!/usr/bin/python3
"""bench/continuity's body, run inside the testbed: see bench/continuity."""
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

from daemon_client import Daemon

UPGRADED, UPGRADECTL, ROUNDS = sys.argv[1], sys.argv[2], int(sys.argv[3])
T = os.environ["UPGRADED_TESTBED"]
ROOT = os.path.join(T, "root")
HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.join(HERE, "../examples/webapp/tree")
LUA = os.path.join(HERE, "continuity.lua")
GAP = 0.25       # seconds of load between two transitions
PER_STEP = 1.5   # seconds a transition may take, at most, for wrk's duration
THREADS = 4      # wrk threads, one connection each


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pack(key, app, version, units):
    src = os.path.join(T, "src", app, version)
    shutil.copytree(TREE, src)
    with open(os.path.join(src, "VERSION"), "w") as f:
        f.write(version)
    extra = os.path.join(T, "extra-%s.json" % app)
    with open(extra, "w") as f:
        json.dump({"units": units, "health": {"min_ready_s": 0, "deadline_s": 30}}, f)
    out = os.path.join(T, "%s-%s.upd" % (app, version))
    run(UPGRADECTL, "pack", "--key", key, "--app", app, "--version", version, "--manifest",
        extra, "-o", out, src)
    return out


def stamps(unit):
    """(ActiveExit, ActiveEnter) of the unit's last restart, CLOCK_MONOTONIC µs."""
    t = dict(line.split("=", 1) for line in run(
        "systemctl", "--user", "show", "-p", "ActiveExitTimestampMonotonic",
        "-p", "ActiveEnterTimestampMonotonic", unit).splitlines())
    return int(t["ActiveExitTimestampMonotonic"]), int(t["ActiveEnterTimestampMonotonic"])


def pct(xs, p):
    """Nearest-rank percentile; None for none."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(p / 100 * len(xs)) - 1))]


def measure(daemon, app, service, port):
    """wrk against `port` while `app` is upgraded and rolled back ROUNDS times: the windows of
    `service` and wrk's per-request log."""
    manager = daemon.manager

    def wait(path):
        result, message = daemon.wait(path)
        if result != "done":
            raise SystemExit("%s: job failed: %s" % (app, message))

    log = os.path.join(T, "wrk-%s.log" % app)
    duration = int(2 + 2 * ROUNDS * (GAP + PER_STEP))
    wrk = subprocess.Popen(["wrk", "-t%d" % THREADS, "-c%d" % THREADS, "-d%ds" % duration,
                            "-s", LUA, "http://127.0.0.1:%d/" % port, "--", log],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1)  # load before the first window
    windows = []
    for _ in range(ROUNDS):
        for call in (lambda: manager.Activate(app, "1.1.0", {}),
                     lambda: manager.Rollback(app, {})):
            if wrk.poll() is not None:
                raise SystemExit("wrk ended before the transitions did; raise PER_STEP")
            wait(str(call()))
            windows.append(stamps(service))
            time.sleep(GAP)
    if wrk.poll() is not None:
        raise SystemExit("wrk ended before the transitions did; raise PER_STEP")
    out = wrk.communicate()[0]
    if wrk.returncode != 0:
        raise SystemExit("wrk failed:\n" + out)
    requests, summary = [], {}
    with open(log) as f:
        for line in f:
            if line.startswith("#"):
                words = line.split()[1:]
                summary = {words[i]: int(words[i + 1]) for i in range(0, len(words), 2)}
                continue
            start, end, status = (int(x) for x in line.split())
            requests.append((start, end, status))
    return windows, requests, summary


def report(name, windows, requests, summary):
    during, outside = [], []
    beyond = 0  # requests slower than the window they overlapped + 50 ms
    for start, end, status in requests:
        hit = [w1 - w0 for w0, w1 in windows if start <= w1 and end >= w0]
        (during if hit else outside).append((end - start) / 1000)
        if hit and end - start > max(hit) + 50000:
            beyond += 1
    non_2xx = sum(1 for r in requests if not 200 <= r[2] < 300)
    lengths = [(w1 - w0) / 1000 for w0, w1 in windows]
    # wrk connects without blocking: a refused connection mostly shows as a write error.
    print("%s: %d requests (%d overlapping a window, %d not); connect errors %d, write errors "
          "%d, read errors %d, timeouts %d, non-2xx %d" %
          (name, summary["requests"], len(during), len(outside), summary["connect"],
           summary["write"], summary["read"], summary["timeout"], non_2xx))
    print("  windows (service down, systemd's timestamps): %d, median %.1f ms, max %.1f ms" %
          (len(lengths), statistics.median(lengths), max(lengths)))
    for label, xs in (("during the windows", during), ("outside them", outside)):
        if xs:
            print("  latency %-18s p50 %7.1f ms  p99 %7.1f ms  max %7.1f ms" %
                  (label, pct(xs, 50), pct(xs, 99), max(xs)))
    print("  requests slower than the window they overlapped + 50 ms: %d" % beyond)
    return summary, non_2xx, during, lengths


def main():
    keys = os.path.join(ROOT, "etc/upgraded/keys.d")
    os.makedirs(keys)
    key = os.path.join(T, "k.key")
    run(UPGRADECTL, "keygen", "--private", key, "--public", os.path.join(keys, "k.pem"))
    held, plain = free_port(), free_port()
    units = {
        "webapp.socket": "[Socket]\nListenStream=127.0.0.1:%d\nBacklog=4096\n" % held,
        "webapp.service": "[Unit]\nAfter=webapp.socket\n[Service]\nType=notify\n"
                          "ExecStart=%s/var/lib/upgraded/apps/webapp/current/bin/webapp\n" % ROOT,
        "plain.service": "[Service]\nType=notify\nEnvironment=WEBAPP_LISTEN=127.0.0.1:%d\n"
                         "ExecStart=%s/var/lib/upgraded/apps/plain/current/bin/webapp\n"
                         % (plain, ROOT),
    }
    for name, text in units.items():
        with open(os.path.join(T, "systemd/user", name), "w") as f:
            f.write(text)
    run("systemctl", "--user", "daemon-reload")
    with open(os.path.join(ROOT, "etc/upgraded/upgraded.conf"), "w") as f:
        f.write("[store]\nkeep = 10\n")
    daemon = Daemon(UPGRADED, ROOT)

    def wait(path):
        result, message = daemon.wait(path)
        if result != "done":
            raise SystemExit("job failed: " + message)

    apps = {"webapp": ["webapp.socket", "webapp.service"], "plain": ["plain.service"]}
    for app, app_units in apps.items():
        for version in ("1.0.0", "1.1.0"):
            fd = os.open(pack(key, app, version, app_units), os.O_RDONLY)
            import dbus
            wait(str(daemon.manager.Install(dbus.types.UnixFd(fd),
                                            {"activate": version == "1.0.0"})))
            os.close(fd)
    time.sleep(0.5)
    print("examples/webapp under wrk -t%d -c%d (HTTP/1.0: a connection per request), %d upgrades "
          "and %d rollbacks per run, min_ready_s 0" % (THREADS, THREADS, ROUNDS, ROUNDS))
    socket_run = report("socket unit held (upgraded)",
                        *measure(daemon, "webapp", "webapp.service", held))
    plain_run = report("plain restart (baseline)",
                       *measure(daemon, "plain", "plain.service", plain))
    daemon.stop()
    summary, non_2xx, during, lengths = socket_run
    if not during:
        raise SystemExit("no request overlapped a window: nothing measured; raise THREADS")
    p99 = pct(during, 99)
    failed = summary["connect"] + summary["write"] + summary["read"]
    base = plain_run[0]
    print("targets: connect, write and read errors %d, non-2xx %d (both 0: %s); p99 during the "
          "windows %.1f ms <= median window + 50 ms = %.1f ms: %s; baseline: %d connect + %d "
          "write + %d read errors" %
          (failed, non_2xx, "met" if failed == 0 and non_2xx == 0 else "MISSED", p99,
           statistics.median(lengths) + 50,
           "met" if p99 <= statistics.median(lengths) + 50 else "MISSED",
           base["connect"], base["write"], base["read"]))
    for unit in ("webapp.service", "webapp.socket", "plain.service"):
        subprocess.run(["systemctl", "--user", "stop", unit], check=False)


if __name__ == "__main__":
    main()
