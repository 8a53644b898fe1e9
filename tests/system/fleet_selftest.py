#!/usr/bin/python3
"""The fleet testbed (fleet.py) tried on its own: three hosts boot, Ansible reaches each of them
over SSH from the LAN namespace (ping, and each answers its own hostname), none of them can be
reached from this machine's own network namespace, and tearing down leaves nothing of the run
(namespaces, mounts, directories), after a boot that fails halfway too. Prints how long each
step took.

usage: fleet_selftest.py
Skips (exit 77) where no container can boot or Ansible is missing, but fails under CI=true."""
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import booted  # noqa: E402
import fleet  # noqa: E402


def expect(condition, message):
    if not condition:
        raise AssertionError(message)


def ansible(f, *args):
    """`ansible fleet -o ARGS` through the controller: {host: its one-line answer}, seconds."""
    started = time.monotonic()
    r = f.controller(["ansible", "fleet", "-o"] + list(args), timeout=300)
    elapsed = time.monotonic() - started
    expect(r.returncode == 0, "ansible %s: %d\n%s%s" % (args, r.returncode, r.stdout, r.stderr))
    answers = dict(line.split(" | ", 1) for line in r.stdout.splitlines() if " | " in line)
    expect(sorted(answers) == f.names, "answers from %s:\n%s" % (sorted(answers), r.stdout))
    return answers, elapsed


def check_ping(f):
    answers, elapsed = ansible(f, "-m", "ping")
    for name, answer in answers.items():
        status, _, result = answer.partition(" => ")
        expect(status == "SUCCESS" and json.loads(result).get("ping") == "pong",
               "%s: %s" % (name, answer))
    return elapsed


def check_hostnames(f):
    answers, elapsed = ansible(f, "-m", "command", "-a", "hostname")
    for name, container in zip(f.names, f.hosts):
        expect(answers[name] == "CHANGED | rc=0 | (stdout) " + container.name,
               "%s is not %s: %s" % (name, container.name, answers[name]))
        expect(container.name.endswith("-" + name), container.name)
    return elapsed


def logs_in(f, address, from_lan):
    """Whether `ssh root@address true` works from the LAN namespace or from this machine's own.
    (Not a bare TCP connect: this machine's network may accept any connection, a proxy.)"""
    cmd = f.ssh_command(address, "true")
    try:
        if from_lan:
            return f.controller(cmd, timeout=10).returncode == 0
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def check_unreachable_from_here(f):
    """This machine's own namespace has no address or route into the fleet's subnet, and an SSH
    login that works from the LAN fails from it."""
    subnet = fleet.SUBNET + ".0/24"
    addresses = subprocess.run(["ip", "-o", "addr", "show", "to", subnet], check=True,
                               capture_output=True, text=True).stdout
    expect(addresses == "", "addresses in this machine's namespace: " + addresses)
    routes = subprocess.run(["ip", "route", "show", "table", "all", "root", subnet], check=True,
                            capture_output=True, text=True).stdout
    expect(routes == "", "routes in this machine's namespace: " + routes)
    for address in f.ips:
        expect(logs_in(f, address, from_lan=True), "no login to %s from the LAN" % address)
        expect(not logs_in(f, address, from_lan=False),
               "%s logs in from this machine's namespace" % address)


def check_nothing_left(f):
    """Nothing of this process's fleets: no namespace, mount, directory or cgroup."""
    prefix = "upgf-%d-" % os.getpid()
    namespaces = [n for n in os.listdir("/run/netns") if n.startswith(prefix)] \
        if os.path.isdir("/run/netns") else []
    expect(not namespaces, "namespaces left: %s" % namespaces)
    mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], check=True, capture_output=True,
                            text=True).stdout.split()
    left = [m for m in mounts if m.startswith(os.path.join(booted.CACHE, "run-" + prefix))
            or m.startswith("/run/netns/" + prefix)]
    expect(not left, "mounts left: %s" % left)
    expect(not f.leftovers(), "left: %s" % f.leftovers())


class FailsOnHost2(fleet.Fleet):
    """A fleet whose second host fails after it booted, while the others are up."""

    def _start_sshd(self, container, address, public_key):
        if container is self.hosts[1]:
            raise RuntimeError("injected failure")
        super()._start_sshd(container, address, public_key)


def check_failed_boot_leaves_nothing():
    f = FailsOnHost2()
    try:
        f.boot()
    except RuntimeError as e:
        expect(str(e) == "injected failure", "failed with %r" % e)
    else:
        f.close()
        raise AssertionError("the injected failure did not fail the boot")
    check_nothing_left(f)


# The settings by which Ansible on the controller writes files of its own.
CONTROLLER_PATHS = {"ANSIBLE_HOME", "DEFAULT_LOCAL_TMP", "PERSISTENT_CONTROL_PATH_DIR",
                    "GALAXY_CACHE_DIR", "GALAXY_TOKEN_PATH", "control_path_dir"}


def check_ansible_writes_only_the_run_dir(f):
    """Ansible on the controller keeps what it writes in the run directory, not in ~/.ansible
    (its settings, rather than a look at ~/.ansible: other tests may run Ansible meanwhile)."""
    dump = f.controller(["ansible-config", "dump", "-t", "all"], check=True).stdout
    settings = [line.split(" = ", 1) for line in dump.splitlines() if " = " in line]
    paths = [(key, value) for key, value in settings if key.split("(")[0] in CONTROLLER_PATHS]
    expect(len(paths) >= len(CONTROLLER_PATHS), "settings missing from:\n" + dump)
    outside = [(key, value) for key, value in paths if not value.startswith(f.dir + "/")]
    expect(not outside, "outside the run directory: %s" % outside)


def main():
    if not shutil.which("ansible"):
        raise booted.Unavailable("ansible is missing (scripts/install-deps installs it)")
    started = time.monotonic()
    f = fleet.Fleet()
    with f:
        print("fleet %s up in %.1f s: rootfs %.1f s, boot of %d %.1f s, ssh ready %.1f s" %
              (f.tag, time.monotonic() - started, f.timings["rootfs"], len(f.hosts),
               f.timings["boot"], f.timings["ssh"]))
        print("ansible -m ping: %.1f s" % check_ping(f))
        print("ansible -m command -a hostname: %.1f s" % check_hostnames(f))
        checking = time.monotonic()
        check_unreachable_from_here(f)
        print("unreachable from this machine's namespace: %.1f s" %
              (time.monotonic() - checking))
        check_ansible_writes_only_the_run_dir(f)
        stopping = time.monotonic()
    print("teardown: %.1f s" % (time.monotonic() - stopping))
    check_nothing_left(f)
    started = time.monotonic()
    check_failed_boot_leaves_nothing()
    print("a boot failing halfway left nothing (%.1f s)" % (time.monotonic() - started))
    print("ok")


if __name__ == "__main__":
    try:
        main()
    except booted.Unavailable as e:
        if os.environ.get("CI") == "true":
            raise
        print("skipped: %s" % e)
        sys.exit(77)
