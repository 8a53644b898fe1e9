"""The booted-system testbed (design.md §11): a Debian 12 root file system made with mmdebstrap,
booted with systemd-nspawn (PID 1 systemd, the system bus, journald, polkitd), the freshly built
.deb installed into it with apt.

The root file system is cached in /var/cache/upgraded-booted/rootfs-<hash of the package list
and the hooks> (a directory only root may write, checked before use: a cache someone else
prepared would be booted as root) and copied for each boot; a boot lives in a run directory and
cgroups of its own, removed with everything in them when the container has powered off. Nothing
is left mounted or running. Files are written into the container from inside it, never through
its tree from the host, where a symlink made inside would lead anywhere on the host."""
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
import unittest

CACHE = "/var/cache/upgraded-booted"
# What the system needs to boot and what the package depends on, so that `apt install ./x.deb`
# inside needs no network; sshd and Python for Ansible (fleet.py).
PACKAGES = ["systemd", "systemd-sysv", "dbus", "polkitd", "libsdbus-c++1", "libarchive13",
            "libssl3", "libzstd1", "libtomlplusplus3", "libseccomp2", "init-system-helpers",
            "passwd", "procps", "openssh-server", "python3", "python3-dbus"]
# sshd does not start at boot: a container without a network namespace of its own would listen
# on the host's port 22 (fleet.py starts it where the network is the test's). mmdebstrap copies
# this machine's /etc/hostname; without it a container's hostname is its --machine= name.
HOOKS = ['chroot "$1" systemctl disable ssh.service', 'rm "$1/etc/hostname"']
# examples/hello's unit on a booted system (booted_test.py, fleet_test.py).
HELLO_UNIT = """[Unit]
Description=The example service, run from the upgraded store

[Service]
ExecStart=/var/lib/upgraded/apps/hello/current/bin/hello
Environment=HELLO_STATE=/run/hello.state
"""
# systemd-nspawn's default filter answers these with EPERM; listing them lets Landlock through.
LANDLOCK_CALLS = "landlock_create_ruleset landlock_add_rule landlock_restrict_self"
# Puts itself into the cgroups whose cgroup.procs files come before "--", then becomes the
# command after it (the container starts in its cgroups: nothing of it is made elsewhere).
ENTER_CGROUPS = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 1; shift; done; shift; exec "$@"'


def skip_or_fail(message):
    """A test class that cannot run here: skipped, except under CI=true, where it fails."""
    if os.environ.get("CI") == "true":
        raise AssertionError(message)
    raise unittest.SkipTest(message)


def build_hello(upgradectl, work, key, version, manifest="manifest.json", broken=False,
                broken_on=()):
    """examples/hello at `version`, packed into WORK/hello-VERSION.upd with examples/hello's
    `manifest`. `broken`: its health gate fails; `broken_on`: it does on those hosts only."""
    examples = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../examples")
    tree = os.path.join(work, "tree-" + version)
    shutil.copytree(os.path.join(examples, "hello/tree"), tree)
    with open(os.path.join(tree, "VERSION"), "w") as f:
        f.write(version + "\n")
    if broken:
        open(os.path.join(tree, "broken"), "w").close()
    if broken_on:
        with open(os.path.join(tree, "broken-on"), "w") as f:
            f.write("".join(h + "\n" for h in broken_on))
    out = os.path.join(work, "hello-%s.upd" % version)
    subprocess.run([upgradectl, "pack", "--key", key, "--app", "hello", "--version", version,
                    "--manifest", os.path.join(examples, "hello", manifest), "--output", out,
                    tree], check=True, stdout=subprocess.DEVNULL)
    return out


class Unavailable(Exception):
    """This machine cannot boot a container (a reason for skipping, or failing under CI)."""


def mirror():
    """The Debian mirror of the host's apt sources (deb822 or one-line), else deb.debian.org."""
    candidates = ["/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"]
    if os.path.isdir("/etc/apt/sources.list.d"):
        candidates += [os.path.join("/etc/apt/sources.list.d", f)
                       for f in sorted(os.listdir("/etc/apt/sources.list.d"))]
    for path in candidates:
        try:
            text = open(path).read()
        except OSError:
            continue
        m = re.search(r"^URIs:\s*(\S+)", text, re.M) or \
            re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M)
        if m and "security" not in m.group(1):
            return m.group(1)
    return "http://deb.debian.org/debian"


def check_machine():
    if os.geteuid() != 0:
        raise Unavailable("needs root (systemd-nspawn, mmdebstrap)")
    for tool in ("systemd-nspawn", "mmdebstrap", "nsenter"):
        if not shutil.which(tool):
            raise Unavailable("%s is missing (scripts/install-deps installs it)" % tool)


def owned_by_root_only(path):
    """A real directory (not a symlink) that root owns and nobody else may write."""
    st = os.lstat(path)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022


def cgroup_parents():
    """This process's cgroups in the hierarchies systemd inside a container writes to: the
    unified one (cgroup2) and, on a hybrid host, the v1 one named systemd. nspawn --keep-unit
    makes the cgroup it runs in the container's root: containers started from one cgroup would
    share theirs (one's user@0.service stopped by another's systemd, shutdowns that hang)."""
    mounts = {}
    with open("/proc/self/mountinfo") as f:
        mountinfo = f.read().splitlines()
    with open("/proc/self/cgroup") as f:
        cgroups = f.read().splitlines()
    for line in mountinfo:
        fields = line.split()
        fstype, options = fields[fields.index("-") + 1], fields[-1].split(",")
        if fstype == "cgroup2":
            mounts[""] = fields[4]
        elif fstype == "cgroup" and "name=systemd" in options:
            mounts["name=systemd"] = fields[4]
    parents = []
    for line in cgroups:
        _, controllers, path = line.split(":", 2)
        if controllers in mounts:
            parents.append(mounts[controllers] + path.rstrip("/"))
    return parents


def remove_cgroup(path):
    """Removes a cgroup and every one under it; False if one is left (a process is in it)."""
    for top, _, _ in os.walk(path, topdown=False):
        try:
            os.rmdir(top)
        except OSError:
            pass
    return not os.path.exists(path)


def rootfs():
    """The cached root file system, made once per package list and hooks (about 40 s, 300 MB)."""
    key = hashlib.sha256("\n".join([" ".join(PACKAGES)] + HOOKS).encode()).hexdigest()[:16]
    path = os.path.join(CACHE, "rootfs-" + key)
    os.makedirs(CACHE, mode=0o700, exist_ok=True)
    if not owned_by_root_only(CACHE):
        raise AssertionError("%s is not a directory only root may write: not used" % CACHE)
    if os.path.lexists(path):
        if not owned_by_root_only(path):
            raise AssertionError("%s is not a directory only root may write: not booted" % path)
        return path
    partial = tempfile.mkdtemp(dir=CACHE, prefix="partial-")
    target = os.path.join(partial, "root")
    hooks = ["--customize-hook=" + hook for hook in HOOKS]
    r = subprocess.run(["mmdebstrap", "--variant=apt", "--include=" + ",".join(PACKAGES)] +
                       hooks + ["bookworm", target, mirror()], capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise Unavailable("mmdebstrap failed:\n" + r.stderr[-3000:])
    os.rename(target, path)
    shutil.rmtree(partial, ignore_errors=True)
    return path


class Container:
    """One booted container. run() enters it with nsenter: such a process is not under the
    container's system call filter, which everything systemd starts inside (the daemon, its
    helpers, hooks, systemd-run) is."""

    def __init__(self, name, syscall_filter=None, binds=(), network_namespace=None):
        """`network_namespace`: the path of a network namespace to boot in (/run/netns/NAME),
        else the host's network."""
        self.name = name
        self.filter = syscall_filter
        self.binds = binds
        self.netns = network_namespace
        self.dir = None
        self.root = None
        self.cgroups = []
        self.nspawn = None
        self.pid1 = None
        self.log = None

    def boot(self):
        """Boots, or raises with nothing left behind (a half-booted container is powered off)."""
        try:
            return self._boot()
        except BaseException:
            self.poweroff_quietly()
            raise

    def poweroff_quietly(self):
        try:
            self.poweroff()
        except Exception:
            pass

    def _boot(self):
        check_machine()
        base = rootfs()
        self.dir = tempfile.mkdtemp(dir=CACHE, prefix="run-%s-" % self.name)
        self.root = os.path.join(self.dir, "root")
        subprocess.run(["cp", "-a", "--reflink=auto", base, self.root], check=True)
        args = ["systemd-nspawn", "-q", "-D", self.root, "--boot", "--register=no",
                "--keep-unit", "--console=pipe", "--machine=" + self.name]
        if self.filter:
            args.append("--system-call-filter=" + self.filter)
        for host, inside in self.binds:
            args.append("--bind-ro=%s:%s" % (host, inside))
        if self.netns:
            args.append("--network-namespace-path=" + self.netns)
        self.cgroups = [os.path.join(parent, os.path.basename(self.dir))
                        for parent in cgroup_parents()]
        for cgroup in self.cgroups:
            os.mkdir(cgroup)
        enter = ["sh", "-c", ENTER_CGROUPS, "sh"] + \
            [os.path.join(cgroup, "cgroup.procs") for cgroup in self.cgroups] + ["--"]
        self.log = open(os.path.join(self.dir, "console.log"), "wb")
        self.nspawn = subprocess.Popen(enter + args, stdin=subprocess.DEVNULL, stdout=self.log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise Unavailable("systemd-nspawn exited with %d:\n%s" %
                                  (self.nspawn.returncode, self.console()))
            kids = subprocess.run(["pgrep", "-P", str(self.nspawn.pid), "-x", "systemd"],
                                  capture_output=True, text=True).stdout.split()
            if kids:
                self.pid1 = int(kids[0])
                if subprocess.run(["nsenter", "-t", str(self.pid1), "-m", "test", "-S",
                                   "/run/systemd/private"]).returncode == 0:
                    break
            time.sleep(0.1)
        else:
            raise Unavailable("the container did not come up:\n" + self.console())
        state = self.run(["systemctl", "is-system-running", "--wait"], check=False).stdout
        if state.strip() not in ("running", "degraded"):
            raise AssertionError("system state %r:\n%s" % (state, self.console()))
        return self

    def console(self):
        try:
            with open(os.path.join(self.dir, "console.log"), errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def run(self, cmd, user=None, check=True, input=None, timeout=300):
        """A command inside, as root (or as `user`, through runuser), with a login-like
        environment. Returns the CompletedProcess (text)."""
        inner = list(cmd)
        if user:
            inner = ["runuser", "-u", user, "--"] + inner
        full = ["nsenter", "-t", str(self.pid1), "-a", "--", "/usr/bin/env", "-i",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8", "HOME=/root"] + inner
        r = subprocess.run(full, capture_output=True, text=True, input=input, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError("%s exited with %d\nstdout: %s\nstderr: %s" %
                                 (" ".join(cmd), r.returncode, r.stdout, r.stderr))
        return r

    def write(self, path, text, mode=0o644):
        """A file inside, written by a process inside (install -D)."""
        self.run(["install", "-D", "-m", "%o" % mode, "/dev/stdin", path], input=text)

    def poweroff(self):
        """Clean shutdown, then the run directory and the cgroups go. Raises if anything is left
        behind."""
        if self.nspawn is None:
            if self.dir:
                shutil.rmtree(self.dir, ignore_errors=True)
            cgroups = self.remove_cgroups()
            if cgroups:
                raise AssertionError("cgroups left: %s" % cgroups)
            return
        try:
            if self.nspawn.poll() is None:
                self.run(["systemctl", "poweroff"], check=False, timeout=60)
                try:
                    self.nspawn.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    if self.pid1:  # it would outlive nspawn, reparented to this machine's init
                        os.kill(self.pid1, 9)
                    os.killpg(self.nspawn.pid, 9)
                    self.nspawn.wait(timeout=30)
                    raise AssertionError("the container did not power off within 90 s")
        finally:
            if self.log:
                self.log.close()
                self.log = None
            mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True,
                                    text=True).stdout.split()
            left = [m for m in mounts if m.startswith(self.dir)]
            for m in sorted(left, reverse=True):
                subprocess.run(["umount", "-l", m], check=False)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.nspawn = None
            cgroups = self.remove_cgroups()
            if left or cgroups:
                raise AssertionError("left after poweroff: mounts %s, cgroups %s" %
                                     (left, cgroups))

    def remove_cgroups(self):
        """The container's cgroups (made empty by its poweroff): those that are left."""
        left = [cgroup for cgroup in self.cgroups if not remove_cgroup(cgroup)]
        self.cgroups = []
        return left
