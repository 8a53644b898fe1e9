#!/usr/bin/python3
"""A load client for the daemon's bus API, shared by tests/integration/load_test.py and
bench/load: it sends N calls of one read-only method at once (asynchronously, all in flight
together) on its own bus connection, and prints one JSON line with each call's latency (from
send to reply, in seconds), the errors by name, and the wall time.

    load_client.py METHOD COUNT [ARG...]      e.g. load_client.py ListApps 250
"""

import json
import sys
import time

import dbus
from dbus.mainloop.glib import DBusGMainLoop
from gi.repository import GLib


def main():
    method, count, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    DBusGMainLoop(set_as_default=True)
    bus = dbus.SessionBus()
    manager = dbus.Interface(bus.get_object("org.upgraded1", "/org/upgraded1"),
                             "org.upgraded1.Manager")
    loop = GLib.MainLoop()
    latencies, errors = [], {}
    left = [count]

    def done():
        left[0] -= 1
        if left[0] == 0:
            loop.quit()

    start = time.monotonic()
    for _ in range(count):
        sent = time.monotonic()

        def ok(*_, sent=sent):
            latencies.append(time.monotonic() - sent)
            done()

        def failed(e):
            name = e.get_dbus_name() if isinstance(e, dbus.DBusException) else str(e)
            errors[name] = errors.get(name, 0) + 1
            done()

        getattr(manager, method)(*args, reply_handler=ok, error_handler=failed, timeout=120)
    if count:
        loop.run()
    print(json.dumps({"latencies": latencies, "errors": errors,
                      "wall": time.monotonic() - start}))


if __name__ == "__main__":
    main()
