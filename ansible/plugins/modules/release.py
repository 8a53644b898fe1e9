#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: 2026 The upgraded developers. All rights reserved (the project has not chosen a
# licence yet; see LICENSE).
"""upgraded.fleet.release: one host's release of one app, through the local upgraded daemon."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: release
short_description: Stage, activate, finalize, roll back or query a release with upgraded
version_added: "1.0.0"
description:
  - Drives the C(upgraded) daemon of the target host over D-Bus (C(org.upgraded1)), as
    C(upgradectl) does. The module runs on the target and needs C(python3-dbus) there.
  - Every operation is the daemon's own job, with its checks, health gates and automatic
    rollback; the module waits for the job to end and reports how it ended.
  - Idempotent. C(state=staged) for an installed release, C(state=active) for the release
    already current and good, C(state=finalized) when nothing is pending, and C(rollback=true)
    with I(from_version) when the host does not run that version report C(changed=false)
    and touch nothing.
  - Check mode asks the daemon for its plan (C(Plan), C(PlanInstall)) and changes nothing;
    it fails where the real run would be refused, with the same message, as far as a plan
    tells (not for a rebuilt artifact of an installed version, which only the real run
    compares, nor for a finalize whose release declares no backup hook). Check mode and
    queries never start a stopped daemon (a starting daemon finishes interrupted
    activations). With C(--diff), the app's current and previous release, its finalization
    state and its installed releases before and after.
  - The artifact is opened once per task, and must be a regular file owned by root or the
    user the module runs as, writable by nobody else. Plans are open to every local user
    and the daemon computes a few at once; a C(Busy) plan is retried for I(wait_timeout).
  - The module takes no D-Bus signals. It polls C(GetJobResult) on the unique bus name that
    accepted the job, so a signal forged by another local user cannot end its wait, and a
    daemon restarted meanwhile is noticed rather than mistaken for the old one. That name
    must belong to root (or, with I(scope=user), to the user the module runs as).
author:
  - upgraded authors
requirements:
  - python3-dbus on the target
  - the upgraded daemon on the target (the system service, or C(upgraded --user) for I(scope=user))
options:
  app:
    description:
      - The app. Required unless I(artifact) names it, or I(state=query) (then every app).
    type: str
  artifact:
    description:
      - A signed release (C(.upd)) on the target. Its signatures are checked by the daemon
        before anything else of it is read; the app and version come from its signed manifest.
      - With I(state=staged) it is installed; with I(state=active) installed (unless that
        version is installed already) and activated.
    type: path
  version:
    description:
      - The release. With I(artifact), the version the artifact must carry (a mismatch fails).
        Without, the installed release to activate (I(state=active)), or the release the host
        must run to be finalized (I(state=finalized)).
    type: str
  state:
    description:
      - C(staged) installs the artifact without activating it.
      - C(active) makes the release the running one (strategy, hooks and health gate from its
        manifest; on a failed gate the daemon rolls back by itself and the task fails).
      - C(finalized) finalizes the app's data format (backup hook, then finalize hook).
      - C(query) changes nothing and returns the app's state (or every app's) and its
        finalization status.
    type: str
    choices: [staged, active, finalized, query]
    default: active
  rollback:
    description:
      - Activate the app's rollback target (its previous release) instead. Only with
        I(state=active).
    type: bool
    default: false
  from_version:
    description:
      - With I(rollback=true), roll back only a host that runs this version; any other host,
        one without the app included, is left alone (C(changed=false)). Makes a rollback safe
        to repeat.
    type: str
  no_backup:
    description:
      - With I(state=finalized), finalize a release that declares no backup hook. The daemon
        requires the polkit action C(org.upgraded1.finalize-without-backup) for it.
    type: bool
    default: false
  wait_timeout:
    description:
      - Seconds to wait for the daemon's job. When they run out the task fails; the job
        goes on (the message names it).
    type: int
    default: 900
  scope:
    description:
      - C(system) talks to the system service on the system bus; C(user) to the per-user
        instance of the connecting user on its session bus (as C(upgradectl --user)).
    type: str
    choices: [system, user]
    default: system
notes:
  - Needs root on the target, or a user polkit authorizes for the C(org.upgraded1.*) actions.
  - Supports check mode and diff mode.
seealso:
  - name: The D-Bus API of upgraded
    description: docs/dbus-api.md in the upgraded sources.
    link: https://github.com/upgraded/upgraded/blob/main/docs/dbus-api.md
"""

EXAMPLES = r"""
- name: Stage a release (verified, unpacked, nothing restarted)
  upgraded.fleet.release:
    artifact: /var/cache/upgraded/hello-2.0.0.upd
    state: staged

- name: Activate it; the daemon rolls back by itself if the health gate fails
  upgraded.fleet.release:
    app: hello
    version: 2.0.0
    state: active
  register: up

- name: Finalize once every host runs it
  upgraded.fleet.release:
    app: hello
    version: 2.0.0
    state: finalized

- name: Roll back a host that moved to 3.0.0 (others are left alone)
  upgraded.fleet.release:
    app: hello
    rollback: true
    from_version: 3.0.0

- name: What would happen (the daemon's plan, nothing changed)
  upgraded.fleet.release:
    app: hello
    version: 2.0.0
  check_mode: true
  register: plan

- name: The finalization status, to gate a play on
  upgraded.fleet.release:
    app: hello
    state: query
  register: q
"""

RETURN = r"""
app:
  description: The app.
  returned: always, except for a query of every app
  type: str
  sample: hello
from:
  description: The app's current release before the task (empty when none).
  returned: when changed, or in check mode
  type: str
  sample: 1.0.0
to:
  description: The release the task brings (or would bring) in.
  returned: when changed, or in check mode
  type: str
  sample: 2.0.0
result:
  description:
    - C(unchanged), C(staged), C(activated), C(rolled-back) (a rollback done, or the daemon's
      automatic rollback after a failed activation), C(finalized), C(failed), or in check
      mode C(would-change).
  returned: always
  type: str
  sample: activated
downtime_ms:
  description:
    - The units' downtime in milliseconds, measured by the daemon from systemd's timestamps
      (the sum over the units the job restarted). In check mode, the daemon's prediction
      (null when it has no history for every unit).
  returned: when an activation or rollback ran, and in check mode (also for C(state=staged),
    the predicted downtime of activating it)
  type: float
  sample: 14.2
message:
  description: What happened, in words; on failure the daemon's own message.
  returned: always
  type: str
job:
  description: The daemon's job number.
  returned: when a job ran
  type: int
backup:
  description: The name the backup hook gave the backup taken before finalizing.
  returned: when I(state=finalized) finalized
  type: str
plan:
  description: The daemon's plan (docs/plan.md, format 1).
  returned: in check mode, except for queries and finalize
  type: dict
state:
  description:
    - The app after the task, C(current), C(previous), C(last_known_good), C(floor),
      C(finalization) (C(none), C(pre-finalized), C(finalized)), C(current_status)
      (C(good), C(active), C(bad), C(staged)), C(pending_activation), C(releases)
      (installed versions, oldest first). Null for an app the daemon does not know.
  returned: always, except for a query of every app
  type: dict
finalization:
  description: The daemon's FinalizationStatus of the app (docs/dbus-api.md).
  returned: with I(state=query) and I(state=finalized)
  type: dict
apps:
  description: With I(state=query) and no I(app), the state of every app, by app name.
  returned: with I(state=query) and no I(app)
  type: dict
"""

import json
import os
import re
import stat
import time
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    import dbus
    HAS_DBUS = True
    DBUS_IMPORT_ERROR = None
except ImportError:
    HAS_DBUS = False
    DBUS_IMPORT_ERROR = traceback.format_exc()

SERVICE = "org.upgraded1"
MANAGER = "org.upgraded1.Manager"
ERROR_PREFIX = "org.upgraded1.Error."
POLL_S = 0.1
JOB_PATH = re.compile(r"^/org/upgraded1/job/([0-9]+)$")
# The peer is gone (or the bus): the daemon that accepted a job cannot be asked about it.
GONE = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner",
        "org.freedesktop.DBus.Error.Disconnected")


class Refused(Exception):
    """The daemon said no (a D-Bus error, or a plan's refusal), or the module cannot go on."""

    def __init__(self, error, message):
        super(Refused, self).__init__(message)
        self.error = error[len(ERROR_PREFIX):] if error.startswith(ERROR_PREFIX) else error
        self.message = message


def dbus_error(exc):
    return Refused(exc.get_dbus_name() or "Failed", exc.get_dbus_message() or str(exc))


def options(**values):
    return dbus.Dictionary(values, signature="sv")


class Daemon(object):
    """The daemon at the unique bus name that owns org.upgraded1 when the task starts. Every call
    goes to that name: a daemon that restarts in between is another peer, and calls to the old
    one fail instead of being answered by the new one (whose job numbers start again at 1).
    The name's owner must be root (the system bus policy lets only root own it), or on the
    session bus root or the user the module runs as."""

    def __init__(self, scope, start, patience_s):
        self.patience_s = patience_s
        user = scope == "user"
        address = os.environ.get("DBUS_SESSION_BUS_ADDRESS") or \
            "unix:path=/run/user/%d/bus" % os.getuid()
        where = "the session bus (%s)" % address if user else "the system bus"
        try:
            self.bus = dbus.bus.BusConnection(address) if user else dbus.SystemBus()
        except dbus.exceptions.DBusException as e:
            raise Refused("NotRunning", "cannot connect to %s: %s" % (where, e.get_dbus_message()))
        try:
            # Started when it is D-Bus activatable and not running, as upgradectl does; never
            # in check mode or for a query (a starting daemon may finish an interrupted
            # activation, restarting units).
            self.owner = self.bus.activate_name_owner(SERVICE) if start else \
                self.bus.get_name_owner(SERVICE)
            owner_uid = int(self.bus.call_blocking(
                "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                "GetConnectionUnixUser", "s", (self.owner,)))
        except dbus.exceptions.DBusException as e:
            raise Refused("NotRunning", "upgraded is not running on %s%s (%s): install the "
                          "upgraded package, or start it with 'systemctl %sstart upgraded'" %
                          (where, "" if start else " (check mode and queries do not start it)",
                           e.get_dbus_message(), "--user " if user else ""))
        if owner_uid != 0 and not (user and owner_uid == os.getuid()):
            raise Refused("Failed", "%s on %s belongs to uid %d, not to root%s: not upgraded's "
                          "daemon, nothing was asked of it" %
                          (SERVICE, where, owner_uid, " or this user" if user else ""))
        self.manager = dbus.Interface(self.bus.get_object(self.owner, "/org/upgraded1",
                                                          introspect=False), MANAGER)

    def call(self, method, *args, **kw):
        try:
            return getattr(self.manager, method)(*args, timeout=kw.get("timeout", 60))
        except dbus.exceptions.DBusException as e:
            raise dbus_error(e)

    def plan_call(self, method, *args):
        """A Plan* call. Those are open to everyone, with a few slots for all callers: Busy
        (slots taken, or the app has a job) is retried with a backoff, for patience_s."""
        deadline = time.monotonic() + self.patience_s
        delay = 0.2
        while True:
            try:
                return json.loads(str(self.call(method, *args)))
            except Refused as r:
                if r.error != "Busy" or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 5)

    # --- reading -----------------------------------------------------------------------------

    def app_state(self, app):
        """The app's state, or None when the daemon does not know the app."""
        try:
            state = self.call("GetApp", app)
        except Refused as r:
            if r.error == "NotFound":
                return None
            raise
        releases = self.call("ListReleases", app)
        status = dict((str(r[0]), str(r[1])) for r in releases)
        current = str(state.get("current", ""))
        return {
            "current": current,
            "previous": str(state.get("previous", "")),
            "last_known_good": str(state.get("last_known_good", "")),
            "floor": str(state.get("floor", "")),
            "finalization": str(state.get("finalization", "none")),
            "pending_activation": str(state.get("pending_activation", "")),
            "current_status": status.get(current, ""),
            "releases": [str(r[0]) for r in releases],
        }

    def finalization(self, app):
        status = self.call("FinalizationStatus", app)
        return dict((str(name), plain(values)) for name, values in status.items())

    def every_app(self):
        fin = self.finalization("")
        rows = self.call("ListAllReleases")
        apps = {}
        for app, current, previous, good in self.call("ListApps"):
            app = str(app)
            apps[app] = {"current": str(current), "previous": str(previous),
                         "last_known_good": str(good),
                         "finalization": fin.get(app, {}).get("state", "none"),
                         "current_status": "", "releases": []}
        for row in rows:
            entry = apps.get(str(row[0]))
            if entry is None:
                continue
            entry["releases"].append(str(row[1]))
            if str(row[3]) == "current":
                entry["current_status"] = str(row[2])
        return apps

    def newest_history(self, app):
        """The app's newest history entry as a dict, or None."""
        try:
            entries = self.call("GetHistory", app, options(limit=dbus.UInt32(1)))
        except Refused as r:
            if r.error == "NotFound":
                return None
            raise
        if not entries:
            return None
        e = entries[-1]
        return {"time": str(e[0]), "op": str(e[1]), "from": str(e[2]), "to": str(e[3]),
                "result": str(e[4]), "message": str(e[5]),
                "downtime_ms": round(sum(int(v) for v in e[6].values()) / 1000.0, 1),
                "transaction": str(e[7])}

    # --- plans -------------------------------------------------------------------------------

    def plan(self, app, version, rollback=False):
        opts = options(rollback=dbus.Boolean(True)) if rollback else options()
        return self.plan_call("Plan", app, "" if rollback else version, opts)

    def plan_install(self, artifact):
        return self.plan_call("PlanInstall", dbus.Array([artifact.fd()], signature="h"),
                              options())

    # --- jobs --------------------------------------------------------------------------------

    def wait(self, path, timeout):
        """Polls GetJobResult until the job ends: (id, result, message, error)."""
        m = JOB_PATH.match(str(path))
        if not m:
            raise Refused("Failed", "the daemon answered with a job path of another form: %s"
                          % path)
        job = int(m.group(1))
        deadline = time.monotonic() + timeout
        while True:
            try:
                result, message, error = self.call("GetJobResult", dbus.UInt32(job))
            except Refused as r:
                # A daemon killed while it handled the call answers NoReply ("disconnected
                # without replying"): gone too, if its unique name has left the bus.
                if r.error in GONE or r.error == "org.freedesktop.DBus.Error.NoReply" and \
                        not self.bus.name_has_owner(self.owner):
                    raise Refused("Failed", "the daemon that runs job %d went away before it "
                                  "ended (%s); its next start finishes or undoes an "
                                  "interrupted activation: see 'upgradectl status'"
                                  % (job, r.message))
                raise
            if str(result) != "running":
                return job, str(result), str(message), str(error)
            if time.monotonic() > deadline:
                raise Refused("Timeout", "job %d still runs after %d s (wait_timeout); it goes "
                              "on: see 'upgradectl jobs'" % (job, timeout))
            time.sleep(POLL_S)


class Artifact(object):
    """The artifact, opened once for the whole task: every call gets the same file (the daemon
    reads it through the descriptor, never by path), whatever happens to the path meanwhile.
    Only a regular file that no other user can write is taken."""

    def __init__(self, path):
        self.path = path
        try:
            # O_NONBLOCK: a FIFO put at the path opens at once (and is refused below).
            self.handle = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW |
                                  os.O_NONBLOCK)
        except OSError as e:
            raise Refused("InvalidArgument", "cannot open the artifact %s: %s"
                          % (path, e.strerror))
        st = os.fstat(self.handle)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "not a regular file"
        elif st.st_uid not in (0, os.getuid()):
            problem = "owned by uid %d, who could replace its content" % st.st_uid
        elif st.st_mode & 0o022:
            problem = "writable by others (mode %o)" % stat.S_IMODE(st.st_mode)
        if problem:
            os.close(self.handle)
            raise Refused("InvalidArgument", "the artifact %s is %s: not used" % (path, problem))

    def fd(self):
        return dbus.types.UnixFd(self.handle)  # a duplicate, for one message

    def close(self):
        os.close(self.handle)


def plain(value):
    """A D-Bus value as plain Python (for Ansible's results)."""
    if isinstance(value, dbus.Boolean):
        return bool(value)
    if isinstance(value, (dbus.String, dbus.ObjectPath, dbus.Signature)):
        return str(value)
    if isinstance(value, (dbus.Byte, dbus.Int16, dbus.Int32, dbus.Int64, dbus.UInt16,
                          dbus.UInt32, dbus.UInt64)):
        return int(value)
    if isinstance(value, dbus.Double):
        return float(value)
    if isinstance(value, dict):
        return dict((str(k), plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def refuse_plan(doc):
    refusal = doc.get("refusal")
    if refusal:
        raise Refused(refusal.get("error", "Failed"), refusal.get("message", ""))


def predicted_ms(doc):
    total = doc.get("predicted_total_usec")
    return None if total is None else round(total / 1000.0, 1)


def view(state, add_release=None):
    """What --diff shows of an app (with `add_release` among its releases: predicted)."""
    if state is None:
        shown = {"current": "", "previous": "", "finalization": "none", "releases": []}
    else:
        shown = {"current": state["current"], "previous": state["previous"],
                 "finalization": state["finalization"], "releases": list(state["releases"])}
    if add_release and add_release not in shown["releases"]:
        shown["releases"].append(add_release)
    return shown


class Task(object):
    def __init__(self, module, daemon):
        self.module = module
        self.p = module.params
        self.d = daemon
        self.app = self.p["app"]
        self.artifact = None
        self.out = {"changed": False}

    def finish(self, before, result, message, predicted_view=None):
        self.out["result"] = result
        self.out["message"] = message
        if self.app:
            self.out["app"] = self.app
            after = self.d.app_state(self.app) if not self.module.check_mode else before
            self.out["state"] = after
            if self.module._diff:
                self.out["diff"] = {"before": view(before),
                                    "after": predicted_view or view(after)}
        return self.out

    def run_job(self, before, method, args, done_result, done_message, to=None):
        """Starts a job, waits, and reports it. A job that ends in failure fails the task with
        the daemon's message (an automatic rollback has happened then); it counts as a change
        when the app's history has a new entry (units were restarted, or the release marked
        bad), or when how it ended is not known."""
        history = self.d.newest_history(self.app)
        path = self.d.call(method, *args)
        try:
            job, result, message, error = self.d.wait(path, self.p["wait_timeout"])
        except Refused:
            self.out["changed"] = True  # it may have switched: nobody can say
            raise
        self.out["job"] = job
        newest = self.d.newest_history(self.app)
        if result == "done":
            self.out["changed"] = True
            if to is not None and self.d.app_state(self.app)["current"] != to:
                raise Refused("Failed", "job %d ended, but %s does not run %s" %
                              (job, self.app, to))
            if method in ("Activate", "Rollback") and newest:
                self.out["downtime_ms"] = newest["downtime_ms"]
            return self.finish(before, done_result, done_message)
        after = self.d.app_state(self.app)
        moved = newest is not None and newest != history
        self.out.update({"state": after, "app": self.app,
                         "error": Refused(error or "Failed", "").error,
                         "changed": moved or before != after,
                         "result": "rolled-back" if moved and newest["result"] == "rolled-back"
                         else "failed"})
        if moved and newest["downtime_ms"]:
            self.out["downtime_ms"] = newest["downtime_ms"]
        self.module.fail_json(msg="%s: %s" % (self.app, message or "job %s" % result),
                              **self.out)

    # --- staged ------------------------------------------------------------------------------

    def identify(self):
        """(app, version, plan) of the artifact, from the daemon's verified plan."""
        self.artifact = Artifact(self.p["artifact"])
        doc = self.d.plan_install(self.artifact)
        app, version = doc.get("app", ""), doc.get("to", "")
        if self.app and self.app != app:
            raise Refused("InvalidArgument", "the artifact %s is a release of %s, not of %s"
                          % (self.p["artifact"], app, self.app))
        if self.p["version"] and self.p["version"] != version:
            raise Refused("InvalidArgument", "the artifact %s is %s %s, not %s"
                          % (self.p["artifact"], app, version, self.p["version"]))
        self.app = app
        return version, doc

    def staged(self):
        if not self.p["artifact"]:
            raise Refused("InvalidArgument", "state=staged needs an artifact")
        version, doc = self.identify()
        before = self.d.app_state(self.app)
        self.out.update({"from": before["current"] if before else "", "to": version})
        if before and version in before["releases"]:
            if not self.module.check_mode:
                # The same release from this very artifact stages nothing; another artifact
                # of the same version is refused (Exists), as upgradectl install says.
                path = self.d.call("InstallSet", dbus.Array([self.artifact.fd()],
                                                            signature="h"), options())
                job, result, message, error = self.d.wait(path, self.p["wait_timeout"])
                if result != "done":
                    raise Refused(error or "Failed", message)
            return self.finish(before, "unchanged", "%s %s is staged already" %
                               (self.app, version))
        if self.module.check_mode:
            # The plan is of an install with activation: of its refusals, staging alone hits
            # no room for the payload and the version floor, and Exists for a version equal
            # by version order (1.00 for an installed 1.0).
            refusal = doc.get("refusal") or {}
            if refusal.get("error") in ("NoSpace", "Exists") or \
                    "version floor" in refusal.get("message", ""):
                refuse_plan(doc)
            if refusal:
                self.module.warn("%s %s can be staged; activating it would be refused: %s"
                                 % (self.app, version, refusal.get("message")))
            # Its predicted downtime is the activation's, for a rollout that goes on to it.
            self.out["changed"] = True
            self.out["plan"] = doc
            self.out["downtime_ms"] = predicted_ms(doc)
            return self.finish(before, "would-change", "%s %s would be staged (space: %s)" %
                               (self.app, version, doc.get("install", {}).get("space")),
                               predicted_view=view(before, version))
        return self.run_job(before, "Install", (self.artifact.fd(), options()), "staged",
                            "%s %s staged" % (self.app, version))

    # --- active ------------------------------------------------------------------------------

    def active(self):
        install_doc = None
        if self.p["artifact"]:
            version, install_doc = self.identify()
        else:
            version = self.p["version"]
            if not self.app or not version:
                raise Refused("InvalidArgument", "state=active needs app and version, or an "
                              "artifact")
        before = self.d.app_state(self.app)
        installed = bool(before and version in before["releases"])
        if installed:
            doc = self.d.plan(self.app, version)
        elif install_doc is not None:
            doc = install_doc
        else:
            raise Refused("NotFound", "%s %s is not installed on this host (give the artifact)"
                          % (self.app, version))
        self.out.update({"from": before["current"] if before else "", "to": version})
        refuse_plan(doc)
        if not doc.get("changes", True) and before and before["current"] == version:
            return self.finish(before, "unchanged", "%s %s is current already (%s)" %
                               (self.app, version, before["current_status"] or "no status"))
        if self.module.check_mode:
            return self.would(before, doc, version, "%s %s would be activated" %
                              (self.app, version))
        if installed:
            return self.run_job(before, "Activate", (self.app, version, options()),
                                "activated", "%s %s activated" % (self.app, version), to=version)
        return self.run_job(before, "Install",
                            (self.artifact.fd(), options(activate=dbus.Boolean(True))),
                            "activated", "%s %s installed and activated" % (self.app, version),
                            to=version)

    def would(self, before, doc, version, message):
        self.out["changed"] = True
        self.out["plan"] = doc
        self.out["downtime_ms"] = predicted_ms(doc)
        after = view(before, version)
        after.update({"current": version,
                      "previous": before["current"] if before else ""})
        if doc.get("pre_finalized_format") is not None:
            after["finalization"] = "pre-finalized"
        return self.finish(before, "would-change", message, predicted_view=after)

    def rollback(self):
        if not self.app:
            raise Refused("InvalidArgument", "rollback needs app")
        before = self.d.app_state(self.app)
        guard = self.p["from_version"]
        if guard and (before is None or before["current"] != guard):
            return self.finish(before, "unchanged", "%s runs %s, not %s: nothing to roll back"
                               % (self.app, before["current"] or "nothing" if before
                                  else "nothing (not installed)", guard))
        if before is None:
            raise Refused("NotFound", "%s is not installed on this host" % self.app)
        doc = self.d.plan(self.app, "", rollback=True)
        self.out.update({"from": before["current"], "to": doc.get("to", "")})
        refuse_plan(doc)
        if self.module.check_mode:
            return self.would(before, doc, doc.get("to", ""), "%s would roll back to %s" %
                              (self.app, doc.get("to", "")))
        return self.run_job(before, "Rollback", (self.app, options()), "rolled-back",
                            "%s rolled back to %s" % (self.app, doc.get("to", "")),
                            to=doc.get("to") or None)

    # --- finalized ---------------------------------------------------------------------------

    def finalized(self):
        if not self.app:
            raise Refused("InvalidArgument", "state=finalized needs app")
        before = self.d.app_state(self.app)
        if before is None:
            raise Refused("NotFound", "%s is not installed on this host" % self.app)
        want = self.p["version"]
        if want and before["current"] != want:
            raise Refused("PolicyRefused", "%s runs %s, not %s: activate %s before finalizing"
                          % (self.app, before["current"] or "nothing", want, want))
        fin = self.d.finalization(self.app).get(self.app, {})
        self.out["finalization"] = fin
        if fin.get("state") != "pre-finalized":
            return self.finish(before, "unchanged", "%s %s: nothing to finalize (%s)" %
                               (self.app, before["current"], fin.get("state", "none")))
        if self.module.check_mode:
            # Finalize's own refusals that the state shows (whether the release declares a
            # backup hook, only the real run tells).
            if before["pending_activation"]:
                raise Refused("PolicyRefused", "an activation of %s %s is not finished" %
                              (self.app, before["pending_activation"]))
            if before["current_status"] != "good":
                raise Refused("PolicyRefused", "%s %s is not marked good (%s)" %
                              (self.app, before["current"], before["current_status"]))
            self.out["changed"] = True
            after = dict(view(before), finalization="finalized")
            return self.finish(before, "would-change", "%s %s would be finalized (data format "
                               "%s)" % (self.app, before["current"], fin.get("current_writes")),
                               predicted_view=after)
        opts = options(no_backup=dbus.Boolean(True)) if self.p["no_backup"] else options()
        out = self.run_job(before, "Finalize", (self.app, opts), "finalized",
                           "%s %s finalized" % (self.app, before["current"]))
        fin = self.d.finalization(self.app).get(self.app, {})
        out["finalization"] = fin
        out["backup"] = fin.get("last_backup", "")
        if out["backup"]:
            out["message"] += ", backup %s" % out["backup"]
        return out

    # --- query -------------------------------------------------------------------------------

    def query(self):
        if not self.app:
            self.out["apps"] = self.d.every_app()
            self.out["result"] = "unchanged"
            self.out["message"] = "%d apps" % len(self.out["apps"])
            return self.out
        state = self.d.app_state(self.app)
        fin = self.d.finalization(self.app).get(self.app, {}) if state else {}
        self.out.update({"app": self.app, "state": state, "finalization": fin,
                         "result": "unchanged",
                         "message": "%s is not installed" % self.app if state is None else
                         "%s %s (%s)" % (self.app, state["current"] or "none",
                                         state["finalization"])})
        return self.out

    def run(self):
        p = self.p
        if p["rollback"]:
            if p["state"] != "active" or p["artifact"] or p["version"]:
                raise Refused("InvalidArgument", "rollback takes app (and from_version) only, "
                              "with state=active")
            return self.rollback()
        if p["from_version"]:
            raise Refused("InvalidArgument", "from_version goes with rollback=true")
        if p["state"] == "query":
            return self.query()
        if p["state"] == "staged":
            return self.staged()
        if p["state"] == "finalized":
            return self.finalized()
        return self.active()


def main():
    module = AnsibleModule(
        argument_spec=dict(
            app=dict(type="str"),
            artifact=dict(type="path"),
            version=dict(type="str"),
            state=dict(type="str", default="active",
                       choices=["staged", "active", "finalized", "query"]),
            rollback=dict(type="bool", default=False),
            from_version=dict(type="str"),
            no_backup=dict(type="bool", default=False),
            wait_timeout=dict(type="int", default=900),
            scope=dict(type="str", default="system", choices=["system", "user"]),
        ),
        supports_check_mode=True,
    )
    if not HAS_DBUS:
        module.fail_json(msg=missing_required_lib("dbus (python3-dbus)"),
                         exception=DBUS_IMPORT_ERROR)
    p = module.params
    if p["wait_timeout"] < 1:
        module.fail_json(msg="wait_timeout must be at least 1")
    task = None
    try:
        start = not module.check_mode and p["state"] != "query"
        task = Task(module, Daemon(p["scope"], start, p["wait_timeout"]))
        module.exit_json(**task.run())
    except Refused as r:
        out = dict(task.out) if task else {"changed": False}
        out.update({"error": r.error, "result": out.get("result", "failed")})
        if task and task.app:
            out["app"] = task.app
        module.fail_json(msg=r.message, **out)
    finally:
        if task and task.artifact:
            task.artifact.close()


if __name__ == "__main__":
    main()
