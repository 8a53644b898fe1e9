#!/usr/bin/python3
"""bench/downtime's body, run inside the testbed: see bench/downtime."""
import json
import os
import statistics
import subprocess
import sys
import time

import dbus

from daemon_client import Daemon

UPGRADED, UPGRADECTL, ROUNDS = sys.argv[1], sys.argv[2], int(sys.argv[3])
T = os.environ["UPGRADED_TESTBED"]
UNIT = "bench.service"
ROOT = os.path.join(T, "root")
SETTLE = float(os.environ.get("BENCH_SETTLE", "0.2"))  # idle seconds before each measurement
# --hooks: releases with empty pre_upgrade, migrate, health and post_upgrade hooks (each a
# transient unit); the baseline is then a plain stop + start, which is what a migrate makes of
# an activation.
HOOKS = os.environ.get("BENCH_HOOKS") == "1"
# --one-by-one: a release of three units with strategy one-by-one; each unit's window against a
# plain restart of that unit, and whether two units were ever down at once.
ONE_BY_ONE = os.environ.get("BENCH_ONE_BY_ONE") == "1"
UNITS = ["bench-a.service", "bench-b.service", "bench-c.service"]
HOOK_PHASES = ["pre_upgrade", "migrate", "health", "post_upgrade"]


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def show(prop, unit=UNIT):
    return run("systemctl", "--user", "show", "-P", prop, unit).strip()


def stamps(unit):
    """(ActiveExit, ActiveEnter) of a unit's last restart, CLOCK_MONOTONIC µs."""
    t = dict(line.split("=", 1) for line in run(
        "systemctl", "--user", "show", "-p", "ActiveExitTimestampMonotonic",
        "-p", "ActiveEnterTimestampMonotonic", unit).splitlines())
    return int(t["ActiveExitTimestampMonotonic"]), int(t["ActiveEnterTimestampMonotonic"])


def window():
    """The last downtime window, from systemd's monotonic timestamps."""
    return (int(show("ActiveEnterTimestampMonotonic")) -
            int(show("ActiveExitTimestampMonotonic"))) / 1e6


def phases():
    """(stopping, stopped, starting) in ms: where a window went."""
    t = {k: int(show(k + "TimestampMonotonic")) for k in
         ("ActiveExit", "InactiveEnter", "InactiveExit", "ActiveEnter")}
    return (round((t["InactiveEnter"] - t["ActiveExit"]) / 1000, 2),
            round((t["InactiveExit"] - t["InactiveEnter"]) / 1000, 2),
            round((t["ActiveEnter"] - t["InactiveExit"]) / 1000, 2))


def pack(key, version):
    src = os.path.join(T, "src", version)
    os.makedirs(os.path.join(src, "bin"))
    with open(os.path.join(src, "bin/service"), "w") as f:
        f.write("#!/bin/sh\nexec sleep 100000\n")
    os.chmod(os.path.join(src, "bin/service"), 0o755)
    manifest = {"units": UNITS if ONE_BY_ONE else [UNIT],
                "health": {"min_ready_s": 0, "deadline_s": 30}}
    if ONE_BY_ONE:
        manifest["strategy"] = "one-by-one"
    if HOOKS:
        os.makedirs(os.path.join(src, "hooks"))
        with open(os.path.join(src, "hooks/empty"), "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        os.chmod(os.path.join(src, "hooks/empty"), 0o755)
        manifest["hooks"] = {p: {"path": "hooks/empty", "timeout_s": 60} for p in HOOK_PHASES}
    extra = os.path.join(T, "extra.json")
    with open(extra, "w") as f:
        json.dump(manifest, f)
    out = os.path.join(T, version + ".upd")
    run(UPGRADECTL, "pack", "--key", key, "--app", "bench", "--version", version, "--manifest",
        extra, "-o", out, src)
    return out


def rss(pid):
    """VmRSS, and how much of it is private memory (RssAnon) and shared library pages (RssFile)."""
    fields = dict(l.split(":", 1) for l in open("/proc/%d/status" % pid))
    return "%s (anon %s, file %s)" % tuple(" ".join(fields[k].split()) for k in
                                            ("VmRSS", "RssAnon", "RssFile"))


def one_by_one(daemon, versions, wait):
    """Each unit's window in a one-by-one upgrade (from the history, checked against systemd's
    timestamps) against a plain restart of the same unit, interleaved; and overlaps: a unit
    that left "active" before the one before it was active again."""
    manager = daemon.manager
    plain = {u: [] for u in UNITS}
    upgrade = {u: [] for u in UNITS}
    overlaps = 0
    for i in range(ROUNDS):
        def plain_restarts():
            for u in UNITS:
                time.sleep(SETTLE)
                run("systemctl", "--user", "restart", u)
                exit_usec, enter_usec = stamps(u)
                plain[u].append((enter_usec - exit_usec) / 1e6)

        def upgrade_one_by_one():
            nonlocal overlaps
            time.sleep(SETTLE)
            wait(str(manager.Activate("bench", versions[i + 1], {})))
            history = manager.GetHistory("bench", {"limit": dbus.UInt32(1)})
            windows = []
            for u in UNITS:
                exit_usec, enter_usec = stamps(u)
                recorded = int(history[0][6][u])
                assert recorded == enter_usec - exit_usec, (u, recorded, enter_usec - exit_usec)
                upgrade[u].append(recorded / 1e6)
                windows.append((exit_usec, enter_usec))
            overlaps += sum(1 for k in range(len(windows) - 1)
                            if windows[k + 1][0] < windows[k][1])

        for step in ((plain_restarts, upgrade_one_by_one) if i % 2 == 0
                     else (upgrade_one_by_one, plain_restarts)):
            step()
    daemon.stop()

    def ms(xs):
        return statistics.median(xs) * 1000

    print("rounds: %d (medians; windows from systemd's ActiveExit/ActiveEnter timestamps)" % ROUNDS)
    print("one-by-one over %d units, min_ready_s 0" % len(UNITS))
    for u in UNITS:
        print("%-16s plain restart window %7.2f ms   one-by-one window %7.2f ms   ratio %.2f "
              "(target <= 1.10)" % (u, ms(plain[u]), ms(upgrade[u]), ms(upgrade[u]) / ms(plain[u])))
    every_plain = [x for u in UNITS for x in plain[u]]
    every_upgrade = [x for u in UNITS for x in upgrade[u]]
    print("all units        plain restart window %7.2f ms   one-by-one window %7.2f ms   ratio %.2f"
          % (ms(every_plain), ms(every_upgrade), ms(every_upgrade) / ms(every_plain)))
    print("moments with two units down at once: %d over %d upgrades (target 0)" %
          (overlaps, ROUNDS))


def main():
    keys = os.path.join(ROOT, "etc/upgraded/keys.d")
    os.makedirs(keys)
    key = os.path.join(T, "k.key")
    run(UPGRADECTL, "keygen", "--private", key, "--public", os.path.join(keys, "k.pem"))
    for unit in UNITS if ONE_BY_ONE else [UNIT]:
        with open(os.path.join(T, "systemd/user", unit), "w") as f:
            f.write("[Service]\nExecStart=%s/var/lib/upgraded/apps/bench/current/bin/service\n"
                    % ROOT)
    if HOOKS:
        # A stopped unit nobody references is unloaded at once, and with it the timestamps a
        # window is measured from: a started target that wants it keeps it loaded (for the
        # plain stop + start and for the upgrade alike).
        with open(os.path.join(T, "systemd/user/bench-hold.target"), "w") as f:
            f.write("[Unit]\nWants=%s\n" % UNIT)
    run("systemctl", "--user", "daemon-reload")
    if HOOKS:
        run("systemctl", "--user", "start", "bench-hold.target")
    with open(os.path.join(ROOT, "etc/upgraded/upgraded.conf"), "w") as f:
        f.write("[store]\nkeep = 1000\n")  # no garbage collection inside the measurements
    daemon = Daemon(UPGRADED, ROOT)
    manager = daemon.manager

    def wait(path):
        result, message = daemon.wait(path)
        if result != "done":
            raise SystemExit("job failed: " + message)

    versions = ["1.%d.0" % i for i in range((1 if ONE_BY_ONE else 2) * ROUNDS + 1)]
    artifacts = [pack(key, v) for v in versions]
    for a in artifacts:  # staged up front: extraction is never part of a window
        fd = os.open(a, os.O_RDONLY)
        wait(str(manager.Install(dbus.types.UnixFd(fd), {"activate": False})))
        os.close(fd)
    wait(str(manager.Activate("bench", versions[0], {})))
    if ONE_BY_ONE:
        one_by_one(daemon, versions, wait)
        return
    rss_idle = rss(daemon.proc.pid)

    def stop_began_after(t0):
        """From t0 until systemd began stopping the unit: the requester's own latency."""
        return int(show("ActiveExitTimestampMonotonic")) / 1e6 - t0

    def active_since(t0):
        """From t0 (CLOCK_MONOTONIC, like systemd's timestamps) until the unit became active."""
        return int(show("ActiveEnterTimestampMonotonic")) / 1e6 - t0

    plain_window, plain_wall, upgrade_window, rollback_wall = [], [], [], []
    plain_active, rollback_active = [], []
    plain_phases, upgrade_phases = [], []
    plain_pre, rollback_pre, rollback_window = [], [], []
    prediction_error = []
    for i in range(ROUNDS):
        # The three measurements interleaved, so that drift of the machine hits all alike, and
        # each from the same idle start: on this VM a window is several times longer when the
        # CPUs were idle before it than when they were busy (waking an idle vCPU is slow), and
        # what ran just before must not decide the comparison.
        def plain():
            time.sleep(SETTLE)
            t0 = time.monotonic()
            if HOOKS:
                run("systemctl", "--user", "stop", UNIT)
                run("systemctl", "--user", "start", UNIT)
            else:
                run("systemctl", "--user", "restart", UNIT)
            plain_wall.append(time.monotonic() - t0)
            plain_window.append(window())
            plain_phases.append(phases())
            plain_active.append(active_since(t0))
            plain_pre.append(stop_began_after(t0))

        def upgrade():
            # What plan predicts for this upgrade, from the windows of the ones before it.
            plan = json.loads(str(manager.Plan("bench", versions[2 * i + 1], {})))
            time.sleep(SETTLE)
            wait(str(manager.Activate("bench", versions[2 * i + 1], {})))
            upgrade_window.append(window())
            if plan["predicted_total_usec"] is not None:
                predicted = plan["predicted_total_usec"] / 1e6
                prediction_error.append(abs(predicted - upgrade_window[-1]) / upgrade_window[-1])
            upgrade_phases.append(phases())
            history = manager.GetHistory("bench", {"limit": dbus.UInt32(1)})
            recorded = int(history[0][6][UNIT]) / 1e6
            assert abs(recorded - upgrade_window[-1]) < 1e-6, (recorded, upgrade_window[-1])

        # Alternate which goes first, so that neither always follows the other.
        for step in ((plain, upgrade) if i % 2 == 0 else (upgrade, plain)):
            step()

        time.sleep(SETTLE)
        t0 = time.monotonic()
        wait(str(manager.Rollback("bench", {})))
        rollback_wall.append(time.monotonic() - t0)
        rollback_active.append(active_since(t0))
        rollback_pre.append(stop_began_after(t0))
        rollback_window.append(window())
        wait(str(manager.Activate("bench", versions[2 * i + 2], {})))

    if os.environ.get("BENCH_PHASES"):
        print("plain phases (stopping, stopped, starting) ms", plain_phases)
        print("upgrade phases (stopping, stopped, starting) ms", upgrade_phases)
    print("samples plain window", [round(x*1000,2) for x in plain_window])
    print("samples upgrade window", [round(x*1000,2) for x in upgrade_window])
    time.sleep(0.5)
    rss_after = rss(daemon.proc.pid)
    if os.environ.get("BENCH_SMAPS"):  # where the resident pages are, largest first
        rss_by, name = {}, "[anon]"
        for line in open("/proc/%d/smaps" % daemon.proc.pid):
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5:
                name = parts[5] if len(parts) > 5 else "[anon]"
            elif parts[0] == "Rss:":
                rss_by[name] = rss_by.get(name, 0) + int(parts[1])
        for n, kb in sorted(rss_by.items(), key=lambda x: -x[1])[:15]:
            print("  %6d kB  %s" % (kb, n))
    daemon.stop()

    def ms(xs):
        return statistics.median(xs) * 1000

    print("rounds: %d (medians; windows from systemd's ActiveExit/ActiveEnter timestamps)" % ROUNDS)
    if HOOKS:
        starts = {}
        with open(os.path.join(ROOT, "var/lib/upgraded/apps/bench/history.jsonl")) as f:
            for line in f:
                for phase, usec in json.loads(line).get("hook_start_usec", {}).items():
                    starts.setdefault(phase, []).append(usec / 1000)
        every = [x for xs in starts.values() for x in xs]
        print("hooks mode: releases with empty pre_upgrade, migrate, health and post_upgrade "
              "hooks; baseline: systemctl stop + start")
        print("hook start latency (StartTransientUnit to the hook's process running): median "
              "%.2f ms over %d hook runs (%s)" %
              (statistics.median(every), len(every),
               ", ".join("%s %.2f" % (p, statistics.median(starts[p])) for p in HOOK_PHASES
                         if p in starts)))
        print("plain stop+start: window %7.2f ms   wall %7.2f ms" %
              (ms(plain_window), ms(plain_wall)))
        print("upgrade:         window %7.2f ms   ratio to plain window %.2f (target <= 1.30)" %
              (ms(upgrade_window), ms(upgrade_window) / ms(plain_window)))
    else:
        print("plain restart:   window %7.2f ms   wall %7.2f ms" %
              (ms(plain_window), ms(plain_wall)))
        print("upgrade:         window %7.2f ms   ratio to plain window %.2f (target <= 1.10)" %
              (ms(upgrade_window), ms(upgrade_window) / ms(plain_window)))
    print("plain restart:   request until active %7.2f ms" % ms(plain_active))
    print("rollback:        request until active %7.2f ms   ratio %.2f (%s)" %
          (ms(rollback_active), ms(rollback_active) / ms(plain_active),
           "the target's pre_upgrade hook runs first: no target" if HOOKS
           else "target <= 1.20"))
    print("                 of which: request until the stop began: plain %.2f ms, rollback %.2f ms;"
          " window: plain %.2f ms, rollback %.2f ms" %
          (ms(plain_pre), ms(rollback_pre), ms(plain_window), ms(rollback_window)))
    print("rollback:        request until JobRemoved %7.2f ms (bookkeeping after the unit is"
          " active included)   ratio to plain wall %.2f" %
          (ms(rollback_wall), ms(rollback_wall) / ms(plain_wall)))
    if prediction_error:
        print("plan's prediction (median of the unit's last 20 windows) against the window "
              "measured: median |predicted - measured| / measured %.2f over %d upgrades" %
              (statistics.median(prediction_error), len(prediction_error)))
    print("idle RSS after the first activation: %s" % rss_idle)
    print("idle RSS after all the runs:         %s   (target <= 8 MiB)" % rss_after)


main()
