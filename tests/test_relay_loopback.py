"""
The relay as real processes on loopback: the rendezvous's relay side (a
real controller, the embedded relay and the relay link, set up by
C{attach_relays}), a C{twistd -n twistvpn-relay} that logs in to it, and two
peers that move a stream of datagrams through a relay, over UDP and over
TLS, checking the bytes of every datagram on arrival and the digest of the
whole stream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from twistvpn.testing.loopback import Lab, expected_digest

COUNT = 3000
SIZE = 1200


class LoopbackRelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.lab = Lab(tempfile.mkdtemp(prefix="twistvpn-relay-"))
        self.addCleanup(self.lab.close)
        self.lab.start_relay()

    def check(self, via: str, relay: str = "standalone") -> None:
        sent, received = self.lab.transfer(via, COUNT, SIZE, timeout=60, relay=relay)
        self.assertEqual(received["bad"], 0)
        self.assertEqual(received["bytes"], COUNT * SIZE)
        self.assertEqual(received["sha256"], expected_digest(COUNT, SIZE))
        self.assertEqual(sent["bytes"], COUNT * SIZE)

    def test_udp(self) -> None:
        self.check("udp")

    def test_tcp(self) -> None:
        self.check("tcp")

    def test_embedded(self) -> None:
        self.check("udp", relay="embedded")
        self.check("tcp", relay="embedded")

    def test_advertised(self) -> None:
        """The rendezvous lists its own relay and the one that logged in."""
        embedded, standalone = self.lab.relays()
        self.assertEqual(embedded["id"], "embedded")
        with open(os.path.join(self.lab.relay_dir, "relay.pub")) as f:
            self.assertEqual(standalone["public_key"], f.read().strip())
        for relay in (embedded, standalone):
            self.assertNotEqual(relay["port"], 0)  # the bound ports, not the requested 0
            self.assertNotEqual(relay["tcp_port"], 0)


class PluginTests(SynchronousTestCase):
    def test_twistd_lists_the_relay(self) -> None:
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        out = subprocess.run([twistd, "--help"], capture_output=True, timeout=60, check=True)
        self.assertIn(b"twistvpn-relay", out.stdout)

    def test_bad_option_is_one_line(self) -> None:
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        out = subprocess.run([twistd, "-n", "twistvpn-relay", "--rendezvous", "http://x"],
                             capture_output=True, timeout=60)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn(b"bad rendezvous address", out.stderr + out.stdout)
        self.assertNotIn(b"Traceback", out.stderr + out.stdout)


class PinTests(SynchronousTestCase):
    def test_wrong_certificate_refused(self) -> None:
        """A relay whose certificate is not the one the map pins is not used."""
        lab = Lab(tempfile.mkdtemp(prefix="twistvpn-relay-"))
        self.addCleanup(lab.close)
        lab.start_relay()
        with open(lab.path("relays-standalone.json")) as f:
            relays = json.load(f)
        relays[0]["fingerprint"] = "00" * 32
        with open(lab.path("pinned.json"), "w") as f:
            json.dump(relays, f)
        peer = lab.spawn([sys.executable, "-m", "twistvpn.testing.loopback", "peer", "receive",
                          "--via", "tcp", "--key-file", lab.path("receiver.key"),
                          "--peer", lab.node_keys["sender"], "--relays-file",
                          lab.path("pinned.json"), "--ready-file", lab.path("ready.json"),
                          "--result-file", lab.path("result.json")], "pinned")
        peer.wait(60)
        self.assertFalse(os.path.exists(lab.path("ready.json")))
        self.assertIn("no relay", lab.tail(peer))


class DeauthorizationTests(SynchronousTestCase):
    def test_deauthorization_stops_a_flow(self) -> None:
        """
        An admin deauthorizes the receiver in the middle of a transfer
        through the standalone relay: within seconds (the controller is
        polled every 2 s, the link pushes at once) nothing passes any more.
        """
        lab = Lab(tempfile.mkdtemp(prefix="twistvpn-relay-"))
        self.addCleanup(lab.close)
        lab.start_relay()
        tag, sender, receiver = lab.start_transfer("udp", 10**8, 1200, window=16)
        deadline = time.monotonic() + 30
        while lab.progress(tag) < 1000:
            self.assertLess(time.monotonic(), deadline, "the transfer did not start")
            time.sleep(0.1)
        lab.deauthorize_receiver()
        time.sleep(5)
        stopped_at = lab.progress(tag)
        time.sleep(2)
        self.assertEqual(lab.progress(tag), stopped_at)
        self.assertLess(stopped_at, 10**8)
        self.assertIsNone(sender.poll())  # still trying: the relay refuses
