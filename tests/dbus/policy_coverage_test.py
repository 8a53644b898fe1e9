#!/usr/bin/python3
"""The bus policy and the polkit actions cover exactly the API's methods (dbus/*.xml), and the
daemon asks polkit for exactly those actions.

    tests/dbus/policy_coverage_test.py SOURCE_DIR
"""
import glob
import os
import re
import sys
import unittest
import xml.etree.ElementTree as ET

SRC = sys.argv.pop(1)
DBUS = os.path.join(SRC, "dbus")
STANDARD = {("org.freedesktop.DBus.Properties", "Get"),
            ("org.freedesktop.DBus.Properties", "GetAll"),
            ("org.freedesktop.DBus.Introspectable", "Introspect"),
            ("org.freedesktop.DBus.Peer", "Ping")}


def api_methods():
    """(interface, method, returns a job) for every method of dbus/org.upgraded1.*.xml."""
    return [(i, m, job) for i, m, job, _ in api_methods_with_actions()]


def api_methods_with_actions():
    """As api_methods, with the polkit action of each method that returns a job: the one its
    org.upgraded1.PolkitAction annotation names, else org.upgraded1.<method in lower case>."""
    out = []
    for path in sorted(glob.glob(os.path.join(DBUS, "org.upgraded1.*.xml"))):
        for iface in ET.parse(path).getroot().iter("interface"):
            for m in iface.iter("method"):
                outs = [a.get("type") for a in m.iter("arg") if a.get("direction") == "out"]
                action = "org.upgraded1." + m.get("name").lower()
                for a in m.iter("annotation"):
                    if a.get("name") == "org.upgraded1.PolkitAction":
                        action = a.get("value")
                out.append((iface.get("name"), m.get("name"), outs == ["o"], action))
    return out


def option_actions():
    """The actions that options of mutating methods need besides the method's own
    (org.upgraded1.PolkitOptionAction annotations, "option=action")."""
    out = set()
    for path in sorted(glob.glob(os.path.join(DBUS, "org.upgraded1.*.xml"))):
        for a in ET.parse(path).getroot().iter("annotation"):
            if a.get("name") == "org.upgraded1.PolkitOptionAction":
                out.add(a.get("value").split("=", 1)[1])
    return out


class PolicyCoverage(unittest.TestCase):
    def test_bus_policy_allows_exactly_the_api(self):
        root = ET.parse(os.path.join(DBUS, "org.upgraded1.conf")).getroot()
        allowed = []
        for policy in root.iter("policy"):
            if policy.get("context") != "default":
                continue
            for allow in policy.iter("allow"):
                self.assertEqual(allow.get("send_destination"), "org.upgraded1")
                allowed.append((allow.get("send_interface"), allow.get("send_member")))
        want = {(i, m) for i, m, _ in api_methods()} | STANDARD
        self.assertEqual(len(allowed), len(set(allowed)), "duplicate rules")
        self.assertEqual(set(allowed), want)
        owners = [p.get("user") for p in root.iter("policy") if p.find("allow[@own]") is not None]
        self.assertEqual(owners, ["root"])

    def test_polkit_actions_are_the_mutating_methods(self):
        root = ET.parse(os.path.join(DBUS, "org.upgraded1.policy")).getroot()
        actions = {a.get("id") for a in root.iter("action")}
        mutating = {action for i, m, job, action in api_methods_with_actions() if job}
        self.assertEqual(actions, mutating | option_actions())

    def test_the_daemon_asks_for_those_actions(self):
        with open(os.path.join(SRC, "daemon/manager.cpp")) as f:
            used = set(re.findall(r'"(org\.upgraded1\.[a-z-]+)"', f.read()))
        root = ET.parse(os.path.join(DBUS, "org.upgraded1.policy")).getroot()
        self.assertEqual(used, {a.get("id") for a in root.iter("action")})


if __name__ == "__main__":
    unittest.main()
