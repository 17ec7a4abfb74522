"""Tests for twistvpn.node.config: wg-quick files."""

from __future__ import annotations

import os

from twisted.trial import unittest

from twistvpn.common.datadir import InsecurePermissionsError, check_private_file
from twistvpn.node.config import (
    ConfigError,
    load_config,
    parse_config,
    parse_endpoint,
)
from twistvpn.wireguard.keys import encode_key

PRIVATE = encode_key(bytes(range(32)))
PEER1 = encode_key(bytes([1] * 32))
PEER2 = encode_key(bytes([2] * 32))
PSK = encode_key(bytes([3] * 32))

GOOD = f"""\
# a comment
[Interface]
PrivateKey = {PRIVATE}
Address = 100.64.0.1/24, fd00::1/64
Address = 100.64.1.1/32
ListenPort = 51820
MTU = 1380

[Peer]
PublicKey = {PEER1}
PresharedKey = {PSK}
Endpoint = 203.0.113.2:51820
AllowedIPs = 100.64.0.2/32, 100.64.2.0/24
PersistentKeepalive = 25

[peer]   # sections and keys ignore case, as wg's
publickey = {PEER2}
endpoint = [2001:db8::1]:51821
allowedips = 100.64.0.3/32
"""


class ParseTests(unittest.TestCase):
    def test_good(self) -> None:
        config = parse_config(GOOD, "wg0.conf")
        self.assertEqual(config.private_key, bytes(range(32)))
        self.assertEqual(config.addresses, ("100.64.0.1/24", "fd00::1/64", "100.64.1.1/32"))
        self.assertEqual(config.listen_port, 51820)
        self.assertEqual(config.mtu, 1380)
        first, second = config.peers
        self.assertEqual(first.public_key, bytes([1] * 32))
        self.assertEqual(first.preshared_key, bytes([3] * 32))
        self.assertEqual(first.endpoint, ("203.0.113.2", 51820))
        self.assertEqual(first.allowed_ips, ("100.64.0.2/32", "100.64.2.0/24"))
        self.assertEqual(first.persistent_keepalive, 25)
        self.assertEqual(second.endpoint, ("2001:db8::1", 51821))
        self.assertIsNone(second.preshared_key)
        self.assertEqual(second.persistent_keepalive, 0)

    def test_minimal(self) -> None:
        config = parse_config(f"[Interface]\nPrivateKey={PRIVATE}\n")
        self.assertEqual(
            (config.addresses, config.listen_port, config.mtu, config.peers), ((), None, None, ())
        )

    def test_allowed_ips_normalised(self) -> None:
        """A host-bits-set prefix is taken as its network, as wg does."""
        config = parse_config(
            f"[Interface]\nPrivateKey={PRIVATE}\n[Peer]\nPublicKey={PEER1}\n"
            "AllowedIPs = 100.64.0.7/24\nPersistentKeepalive = off\n"
        )
        self.assertEqual(config.peers[0].allowed_ips, ("100.64.0.0/24",))

    def assertError(self, text: str, line: int | None, key: str | None, fragment: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config(text, "wg0.conf")
        error = caught.exception
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertEqual((error.path, error.line, error.key), ("wg0.conf", line, key))
        where = "wg0.conf" if line is None else f"wg0.conf:{line}"
        self.assertTrue(message.startswith(f"{where}: "), message)
        if key:
            self.assertIn(f": {key}: ", message)
        self.assertIn(fragment, message)

    def interface(self, extra: str) -> str:
        return f"[Interface]\nPrivateKey = {PRIVATE}\n{extra}\n"

    def test_unknown_key(self) -> None:
        self.assertError(self.interface("Adress = 100.64.0.1/24"), 3, "Adress", "unknown key")

    def test_unsupported_wg_quick_key(self) -> None:
        self.assertError(self.interface("PostUp = iptables -A"), 3, "PostUp", "does not support")

    def test_bad_private_key(self) -> None:
        self.assertError("[Interface]\nPrivateKey = nope\n", 2, "PrivateKey", "44 characters")

    def test_bad_address(self) -> None:
        self.assertError(self.interface("Address = 100.64.0.300/24"), 3, "Address", "100.64.0.300")

    def test_empty_list_item(self) -> None:
        self.assertError(self.interface("Address = 100.64.0.1/24,"), 3, "Address", "empty item")

    def test_bad_port(self) -> None:
        self.assertError(self.interface("ListenPort = 70000"), 3, "ListenPort", "0..65535")
        self.assertError(self.interface("ListenPort = x"), 3, "ListenPort", "not a port")

    def test_bad_mtu(self) -> None:
        self.assertError(self.interface("MTU = 100"), 3, "MTU", "576..65535")

    def test_duplicate_key(self) -> None:
        self.assertError(self.interface("ListenPort = 1\nListenPort = 2"), 4, "ListenPort", "twice")

    def test_empty_value(self) -> None:
        self.assertError(self.interface("MTU ="), 3, "MTU", "empty value")

    def test_not_key_value(self) -> None:
        self.assertError(self.interface("just words"), 3, None, "Key = Value")

    def test_key_outside_section(self) -> None:
        self.assertError(f"PrivateKey = {PRIVATE}\n", 1, "PrivateKey", "outside")

    def test_unknown_section(self) -> None:
        self.assertError("[Interface]\n[Peers]\n", 2, None, "unknown section")

    def test_second_interface(self) -> None:
        self.assertError(self.interface("[Interface]"), 3, None, "second [Interface]")

    def test_no_interface(self) -> None:
        self.assertError(f"[Peer]\nPublicKey = {PEER1}\n", None, None, "no [Interface]")

    def test_missing_private_key(self) -> None:
        self.assertError("\n[Interface]\nListenPort = 5\n", 2, "PrivateKey", "missing")

    def test_missing_public_key(self) -> None:
        self.assertError(
            self.interface("[Peer]\nAllowedIPs = 100.64.0.2/32"), 3, "PublicKey", "missing"
        )

    def test_duplicate_peer(self) -> None:
        peer = f"[Peer]\nPublicKey = {PEER1}\n"
        self.assertError(self.interface(peer + peer), 6, "PublicKey", "twice")

    def test_bad_endpoint(self) -> None:
        for endpoint, fragment in [
            ("203.0.113.2", "host:port"),
            ("203.0.113.2:99999", "0..65535"),
            ("2001:db8::1:51820", "[address]:port"),
            ("[2001:db8::1]51820", "[address]:port"),
            ("[not-v6]:51820", "IPv6"),
        ]:
            self.assertError(
                self.interface(f"[Peer]\nPublicKey = {PEER1}\nEndpoint = {endpoint}"),
                5,
                "Endpoint",
                fragment,
            )

    def test_bad_allowed_ips(self) -> None:
        self.assertError(
            self.interface(f"[Peer]\nPublicKey = {PEER1}\nAllowedIPs = 100.64/33"),
            5,
            "AllowedIPs",
            "100.64/33",
        )

    def test_bad_keepalive(self) -> None:
        self.assertError(
            self.interface(f"[Peer]\nPublicKey = {PEER1}\nPersistentKeepalive = -1"),
            5,
            "PersistentKeepalive",
            "whole number",
        )

    def test_endpoint_hostname(self) -> None:
        self.assertEqual(parse_endpoint("vpn.example:51820"), ("vpn.example", 51820))


class PermissionTests(unittest.TestCase):
    def write(self, mode: int, text: str = GOOD) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def test_private_file_accepted(self) -> None:
        path = self.write(0o600)
        check_private_file(path)
        self.assertEqual(load_config(path).listen_port, 51820)

    def test_group_readable_refused(self) -> None:
        path = self.write(0o640)
        with self.assertRaises(InsecurePermissionsError) as caught:
            load_config(path)
        message = str(caught.exception)
        self.assertIn(path, message)
        self.assertIn("0640", message)
        self.assertIn("chmod 600", message)
        self.assertNotIn("\n", message)

    def test_world_readable_refused(self) -> None:
        self.assertRaises(InsecurePermissionsError, load_config, self.write(0o604))

    def test_parse_error_names_file(self) -> None:
        path = self.write(0o600, "[Interface]\nFoo = 1\n")
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertTrue(str(caught.exception).startswith(f"{path}:2: Foo: "))
