"""
Issue 18, on real kernels (root): a stock WireGuard (wireguard-go, set up
with C{wg setconf} from the exact file C{twistvpn admin device add}
printed) behind a NAT on site A reaches a twistvpn node behind a hard NAT
on site B through the rendezvous's embedded relay: ping, and 8 MiB over
TCP checked by hash; the relay never holds a private key; deauthorizing
the device stops its traffic within 5 s.
"""

from __future__ import annotations

import base64
import os
import re

from twisted.trial import unittest

from tests.support.requirements import joined_mode_missing
from tests.support.steps import run_step
from twistvpn.testing import netns
from twistvpn.testing.lab import RELAY_IP, RENDEZVOUS_IP, JoinedLab

TRANSFER_BYTES = 8 * 1024 * 1024


def process_memory_contains(pid: int, needles: list[bytes]) -> list[bytes]:
    """Which of C{needles} occur in the readable memory of process C{pid}."""
    found: set[bytes] = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1]:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if end - start > 1 << 30:
                continue
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            found.update(n for n in needles if n in chunk)
    return sorted(found)


class Devices(unittest.SynchronousTestCase):
    skip = joined_mode_missing() or netns.missing_requirements("wireguard-go", "wg")

    def step(self, name: str, check: object) -> None:
        run_step(self, self.lab.network, name, check)  # type: ignore[arg-type]

    def test_stock_wireguard_through_the_embedded_relay(self) -> None:
        self.check(standalone=False)

    def test_stock_wireguard_through_a_standalone_relay(self) -> None:
        self.check(standalone=True)

    def check(self, standalone: bool) -> None:
        network = netns.Network(prefix="tvd")
        self.addCleanup(network.close)
        self.lab = lab = JoinedLab(network, "easy", "hard", hosts_a=3,
                                   device_hosts=("a2", "a3"), standalone_relay=standalone)
        relay_ip = RELAY_IP if standalone else RENDEZVOUS_IP
        self.step("starting the lab (nodes a1 and b1)", lab.start)
        text = lab.admin("device", "add", lab.network_id, "phone")

        def the_file() -> None:
            self.assertIn("[Interface]", text)
            self.assertEqual(text.count("[Peer]"), 2)  # a1 and b1
            self.assertIn(f"Endpoint = {relay_ip}:443", text)
            self.assertIn("PersistentKeepalive = 25", text)

        self.step("device add prints a complete wg-quick file", the_file)
        # The real wg setconf takes the file as wg-quick strips it (or fails the test).
        lab.start_device("a2", text)
        ips = lab.overlay_ips()
        phone_ip = ips["phone"]
        a2 = next(h for h in lab.hosts if h.name == "a2")

        def pings() -> None:
            netns.wait_for_ping(network, a2.namespace, ips["b1"], 30)
            completed = netns.ping(network, a2.namespace, ips["b1"], count=10, interval=0.1)
            loss, _ = netns.ping_stats(completed.stdout.decode(errors="replace"))
            self.assertEqual(loss, 0.0)
            netns.wait_for_ping(network, lab.nodes["b1"].host.namespace, phone_ip, 10)

        self.step("the device pings b1 (hard NAT) through the relay, and back", pings)

        def through_the_relay() -> None:
            assert lab.rendezvous is not None
            relay = lab.relay_stats()
            counters = relay["counters"]
            self.assertGreaterEqual(counters.get("device_initiations", 0), 1, counters)
            self.assertGreaterEqual(relay["device_flows"], 1, relay)

        self.step("the relay routed the device's handshake (mac1) and session", through_the_relay)

        def transfer() -> None:
            moved = netns.start_transfer(network, lab.nodes["b1"].host.namespace, a2.namespace,
                                         ips["b1"], TRANSFER_BYTES, port=7101)
            sent, done = moved.wait(90)
            self.assertEqual(sent.split()[1:], done.split()[1:])
            self.assertEqual(int(done.split()[1]), TRANSFER_BYTES)

        self.step("8 MiB device -> b1 over TCP, hashes equal", transfer)

        def relay_counters() -> dict[str, int]:
            counters: dict[str, int] = lab.relay_stats()["counters"]
            return counters

        def other_network() -> None:
            # A device of another network, whose file is doctored to name b1:
            # its initiations reach b1 (mac1 is b1's), whose WireGuard drops them.
            other = lab.admin("network", "create", "other").strip()
            text2 = lab.admin("device", "add", other, "tablet")
            interface = text2.split("\n\n")[0]
            b1_key = lab.members()["b1"]["public_key"]
            endpoint = re.search(r"Endpoint = (\S+)", text)
            assert endpoint is not None
            doctored = (f"{interface}\n\n[Peer]\nPublicKey = {b1_key}\n"
                        f"AllowedIPs = {ips['b1']}/32\nEndpoint = {endpoint.group(1)}\n")
            before = relay_counters()
            lab.start_device("a3", doctored)
            a3 = next(h for h in lab.hosts if h.name == "a3")
            completed = netns.ping(network, a3.namespace, ips["b1"], count=10, interval=0.3)
            loss, _ = netns.ping_stats(completed.stdout.decode(errors="replace"))
            self.assertEqual(loss, 100.0)
            after = relay_counters()
            # Its initiations did reach b1 (the relay found b1 by mac1): b1 refused them.
            self.assertGreater(after.get("device_initiations", 0),
                               before.get("device_initiations", 0))
            self.assertEqual(after.get("device_drop_no_node", 0),
                             before.get("device_drop_no_node", 0))

        self.step("a device of another network cannot reach this network's nodes",
                  other_network)

        def no_private_key() -> None:
            private = re.search(r"PrivateKey = (\S+)", text)
            assert private is not None
            device_key = base64.b64decode(private.group(1))
            node_key_file = os.path.join(lab.nodes["b1"].data_dir, "node.key")
            needles = [device_key, private.group(1).encode()]
            if os.path.exists(node_key_file):
                node_text = open(node_key_file, "rb").read().strip()
                needles += [node_text, base64.b64decode(node_text)]
            assert lab.rendezvous is not None and lab.rendezvous.process is not None
            relay = lab.relay_process if standalone else lab.rendezvous.process
            assert relay is not None
            self.assertEqual(process_memory_contains(relay.pid, needles), [])
            # The scan does read its memory: a node's public key is there.
            public = base64.b64decode(lab.members()["b1"]["public_key"])
            self.assertEqual(process_memory_contains(relay.pid, [public]), [public])

        self.step("the relay's process holds no private key", no_private_key)

        def deauthorized() -> None:
            lab.admin("member", "deauth", lab.network_id, "phone")
            netns.wait_for(
                lambda: netns.ping(network, a2.namespace, ips["b1"], count=1,
                                   interval=0.2).returncode != 0, 5, "the device cut off")
            completed = netns.ping(network, a2.namespace, ips["b1"], count=10, interval=0.2)
            loss, _ = netns.ping_stats(completed.stdout.decode(errors="replace"))
            self.assertEqual(loss, 100.0)

        self.step("deauthorized: no packet gets through within 5 s", deauthorized)
