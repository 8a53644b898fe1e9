"""A fleet of booted hosts reachable over SSH, for running Ansible against (design.md §11: "For
several hosts, boot several containers ... in network namespaces the test creates
(--network-namespace-path= or --network-veth), with addresses only there").

The network lives entirely in network namespaces this run creates; the host's own namespace
gets no address, route or interface. A "LAN" namespace holds a bridge with the controller's
address (SUBNET.1); each host has a namespace of its own with lo and an eth0 (SUBNET.11, .12,
...) whose veth peer is a port of that bridge. Each host is a booted.Container started in its
namespace (systemd-nspawn --network-namespace-path=), its hostname the container's name
(<run tag>-host1, ...). The run's ed25519 key is root's authorized key on every host and sshd
runs there; the controller (ansible, ssh) runs on this machine entered into the LAN namespace
(Fleet.controller), with an inventory and an ansible.cfg of the run's, whose Ansible home
(tmp, control sockets, collections) is inside the run directory: ~/.ansible is left alone, so
a collection under test is named with ANSIBLE_COLLECTIONS_PATH.

    with fleet.Fleet() as f:
        f.controller(["ansible", "fleet", "-m", "ping"], check=True)

Closing powers every container off and deletes every namespace and the run directory, and
raises if anything is left. Where no container can boot, booted.Unavailable is raised."""
import concurrent.futures
import functools
import glob
import itertools
import os
import shutil
import subprocess
import tempfile
import time

import booted

SUBNET = "10.231.0"  # only ever addressed inside the run's namespaces
CONTROLLER_IP = SUBNET + ".1"
# The hosts are new on every run (and share the image's host keys): nothing to remember.
SSH_OPTIONS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "LogLevel=ERROR"]
_runs = itertools.count()  # two fleets of one process get names of their own


def netns_path(name):
    return "/run/netns/" + name


def ip(*args):
    """An iproute2 command; raises with its message if it fails."""
    r = subprocess.run(["ip"] + list(args), capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError("ip %s: %s" % (" ".join(args), r.stderr.strip()))
    return r.stdout


def check_machine():
    booted.check_machine()
    for tool in ("ip", "ssh", "ssh-keygen"):
        if not shutil.which(tool):
            raise booted.Unavailable("%s is missing (scripts/install-deps installs it)" % tool)


def in_parallel(calls):
    """Runs the calls in threads and returns their errors once all have ended (a boot that
    fails powers its own container off; the others go on)."""
    if not calls:
        return []
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
    return [f.exception() for f in futures if f.exception()]


class Fleet:
    """`n` booted hosts, host1..hostN, at SUBNET.11... on a LAN of their own.

    After boot(): `hosts` (the booted.Container of each), `names` (their inventory names),
    `ips`, `dir` (the run directory), `key` (the private key), `inventory`, `config`
    (ansible.cfg) and `timings` (seconds: rootfs, boot, ssh)."""

    def __init__(self, n=3, syscall_filter=None, binds=()):
        """`syscall_filter` and `binds` are passed to every booted.Container."""
        self.tag = "upgf-%d-%d" % (os.getpid(), next(_runs))
        self.lan = self.tag + "-lan"
        self.names = ["host%d" % (i + 1) for i in range(n)]
        self.ips = ["%s.%d" % (SUBNET, 11 + i) for i in range(n)]
        self.filter = syscall_filter
        self.binds = binds
        self.hosts = []
        self.namespaces = []  # created, to delete
        self.dir = self.key = self.inventory = self.config = None
        self.timings = {}

    def __enter__(self):
        return self.boot()

    def __exit__(self, *exc):
        self.close()

    # --- setting up ---------------------------------------------------------------------------

    def boot(self):
        """The network, the hosts, SSH and the Ansible files; or raises with nothing left."""
        try:
            check_machine()
            self.dir = tempfile.mkdtemp(prefix="upgraded-fleet.")
            started = time.monotonic()
            booted.rootfs()  # made once here: the boots in parallel only copy it
            self.timings["rootfs"] = time.monotonic() - started
            self._network()
            self._boot_hosts()
            self._ssh()
            self._ansible_files()
            return self
        except BaseException:
            self.close()  # what it raises (something left) says more than the failed boot
            raise

    def _netns_add(self, name):
        try:
            ip("netns", "add", name)
        except AssertionError as e:
            raise booted.Unavailable(str(e))
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def _network(self):
        self._netns_add(self.lan)
        ip("-n", self.lan, "link", "add", "br0", "type", "bridge")
        ip("-n", self.lan, "addr", "add", CONTROLLER_IP + "/24", "dev", "br0")
        ip("-n", self.lan, "link", "set", "br0", "up")
        for i, address in enumerate(self.ips):
            ns = "%s-h%d" % (self.tag, i + 1)
            self._netns_add(ns)
            port = "vh%d" % (i + 1)
            # Made inside the LAN namespace with its peer put straight into the host's: no end
            # of it ever exists in the namespace of this machine.
            ip("-n", self.lan, "link", "add", port, "type", "veth", "peer", "name", "eth0",
               "netns", ns)
            ip("-n", self.lan, "link", "set", port, "master", "br0", "up")
            ip("-n", ns, "addr", "add", address + "/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    def _boot_hosts(self):
        self.hosts = [booted.Container("%s-%s" % (self.tag, name), self.filter, self.binds,
                                       network_namespace=netns_path("%s-h%d" % (self.tag, i + 1)))
                      for i, name in enumerate(self.names)]
        started = time.monotonic()
        errors = in_parallel([c.boot for c in self.hosts])
        if errors:
            raise errors[0]
        self.timings["boot"] = time.monotonic() - started

    def _ssh(self):
        self.key = os.path.join(self.dir, "id_ed25519")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.tag,
                        "-f", self.key], check=True)
        with open(self.key + ".pub") as f:
            public = f.read()
        started = time.monotonic()
        errors = in_parallel([functools.partial(self._start_sshd, c, address, public)
                              for c, address in zip(self.hosts, self.ips)])
        if errors:
            raise errors[0]
        self.timings["ssh"] = time.monotonic() - started

    def _start_sshd(self, container, address, public_key):
        """Root's authorized key, sshd running, and a login from the LAN that works."""
        container.run(["install", "-d", "-m", "700", "/root/.ssh"])
        container.write("/root/.ssh/authorized_keys", public_key, mode=0o600)
        container.run(["systemctl", "enable", "--now", "ssh.service"])
        deadline = time.monotonic() + 30
        while True:
            r = self.controller(self.ssh_command(address, "true"), timeout=30)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError("no SSH login to %s (%s): %s" %
                                     (container.name, address, r.stderr.strip()))
            time.sleep(0.2)

    def _ansible_files(self):
        self.inventory = os.path.join(self.dir, "inventory.ini")
        hosts = "".join("%s ansible_host=%s\n" % (name, address)
                        for name, address in zip(self.names, self.ips))
        with open(self.inventory, "w") as f:
            f.write("[fleet]\n%s\n[fleet:vars]\nansible_user=root\n"
                    "ansible_ssh_private_key_file=%s\nansible_python_interpreter=/usr/bin/python3\n"
                    "ansible_ssh_common_args='%s'\n" % (hosts, self.key, " ".join(SSH_OPTIONS)))
        self.config = os.path.join(self.dir, "ansible.cfg")
        home = os.path.join(self.dir, "ansible")
        with open(self.config, "w") as f:
            f.write("[defaults]\ninventory = %s\nhome = %s\nhost_key_checking = False\n"
                    "interpreter_python = /usr/bin/python3\nretry_files_enabled = False\n"
                    "forks = %d\n\n[ssh_connection]\ncontrol_path_dir = %s\npipelining = True\n"
                    % (self.inventory, home, max(5, len(self.hosts)), os.path.join(home, "cp")))

    # --- using ------------------------------------------------------------------------------------

    def ssh_command(self, address, *cmd):
        """The ssh command line that runs `cmd` as root at `address` (run it through
        controller(): only the LAN namespace has a route to the hosts)."""
        return ["ssh"] + SSH_OPTIONS + ["-o", "BatchMode=yes", "-o", "ConnectTimeout=2",
                                        "-i", self.key, "root@" + address] + list(cmd)

    def controller(self, cmd, env=None, **kw):
        """`cmd` on this machine inside the LAN namespace, with ANSIBLE_CONFIG and
        ANSIBLE_INVENTORY of the run added to the caller's environment (and `env`, if given).
        Other keywords go to subprocess.run; returns the CompletedProcess (text, captured)."""
        full_env = dict(os.environ)
        if self.config:
            full_env.update(ANSIBLE_CONFIG=self.config, ANSIBLE_INVENTORY=self.inventory)
        full_env.update(env or {})
        # Never the caller's stdin: ssh sets O_NONBLOCK on the stdin it inherits, and a
        # description shared with tests running alongside makes their ansible-playbook refuse
        # to start ("Ansible requires blocking IO"; seen in CI).
        options = dict(capture_output=True, text=True)
        if "input" not in kw:
            options["stdin"] = subprocess.DEVNULL
        options.update(kw)
        return subprocess.run(["nsenter", "--net=" + netns_path(self.lan), "--"] + list(cmd),
                              env=full_env, **options)

    # --- tearing down -----------------------------------------------------------------------

    def close(self):
        """Powers every host off, deletes every namespace and the run directory; raises if any
        of it failed or anything of the run is left (leftovers())."""
        errors = in_parallel([c.poweroff for c in self.hosts])
        for ns in reversed(self.namespaces):
            try:
                ip("netns", "delete", ns)
            except AssertionError as e:
                errors.append(e)
        self.namespaces = []
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        errors += self.leftovers()
        if errors:
            raise AssertionError("fleet %s: %s" % (self.tag, "; ".join(map(str, errors))))

    def leftovers(self):
        """What of this run still exists: namespaces, mounts, directories, cgroups."""
        prefix = self.tag + "-"
        found = ["namespace " + line.split()[0] for line in ip("netns", "list").splitlines()
                 if line.startswith(prefix)]
        mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True,
                                text=True).stdout.split()
        found += ["mount " + m for m in mounts
                  if m.startswith(netns_path(prefix)) or
                  m.startswith(os.path.join(booted.CACHE, "run-" + prefix))]
        found += ["directory " + d for d in [self.dir] + [c.dir for c in self.hosts]
                  if d and os.path.lexists(d)]
        found += ["cgroup " + g for parent in booted.cgroup_parents()
                  for g in glob.glob(os.path.join(parent, "run-" + glob.escape(prefix) + "*"))]
        return found
