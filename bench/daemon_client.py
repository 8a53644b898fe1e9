"""What bench/downtime.py and bench/install.py share: an `upgraded --user --root ROOT` started
on the testbed's bus, its Manager, and waiting for a job's end."""

import subprocess
import time

import dbus
from dbus.mainloop.glib import DBusGMainLoop
from gi.repository import GLib

DBusGMainLoop(set_as_default=True)


class Daemon:
    def __init__(self, upgraded, root):
        self.proc = subprocess.Popen([upgraded, "--user", "--root", root],
                                     stderr=subprocess.DEVNULL)
        self.bus = dbus.SessionBus()
        driver = dbus.Interface(self.bus.get_object("org.freedesktop.DBus", "/org/freedesktop/DBus"),
                                "org.freedesktop.DBus")
        while not driver.NameHasOwner("org.upgraded1"):
            time.sleep(0.02)
        self.manager = dbus.Interface(self.bus.get_object("org.upgraded1", "/org/upgraded1"),
                                      "org.upgraded1.Manager")
        self.removed = {}
        self.bus.add_signal_receiver(
            lambda i, p, r, m: self.removed.__setitem__(str(p), (str(r), str(m))),
            "JobRemoved", "org.upgraded1.Manager")

    def wait(self, path):
        """Waits for job `path` to end; returns (result, message)."""
        ctx = GLib.MainContext.default()
        while str(path) not in self.removed:
            ctx.iteration(True)
        return self.removed[str(path)]

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
