"""Data directories and their keys, as every service makes them (twistvpn.common.datadir)."""

from __future__ import annotations

import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from twistvpn.common.datadir import DataDirError, open_data_dir
from twistvpn.wireguard.keys import decode_key


class DataDirTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "data")

    def mode(self, path: str) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    def test_first_start_makes_directory_and_key(self) -> None:
        key = open_data_dir(self.path, "node.key")
        self.assertEqual(self.mode(self.path), 0o700)
        key_path = os.path.join(self.path, "node.key")
        self.assertEqual(self.mode(key_path), 0o600)
        with open(key_path) as f:
            self.assertEqual(decode_key(f.read()), key)
        self.assertEqual(open_data_dir(self.path, "node.key"), key)

    def test_loose_directory_tightened(self) -> None:
        os.makedirs(self.path, mode=0o755)
        os.chmod(self.path, 0o755)
        open_data_dir(self.path, "relay.key")
        self.assertEqual(self.mode(self.path), 0o700)

    def test_bad_key_is_one_line_naming_the_file(self) -> None:
        os.makedirs(self.path)
        key_path = os.path.join(self.path, "server.key")
        with open(key_path, "w") as f:
            f.write("not a key\n")
        os.chmod(key_path, 0o600)
        e = self.assertRaises(DataDirError, open_data_dir, self.path, "server.key")
        self.assertIn(key_path, str(e))
        self.assertNotIn("\n", str(e))
        with open(key_path) as f:
            self.assertEqual(f.read(), "not a key\n", "a bad key is never overwritten")

    def test_key_others_may_read_is_refused(self) -> None:
        """
        Audit item 6: a group- or world-readable server.key (or relay.key)
        was accepted and left so; now it is refused, naming file and mode,
        for every service, as the node refused its own.
        """
        open_data_dir(self.path, "server.key")
        key_path = os.path.join(self.path, "server.key")
        os.chmod(key_path, 0o644)
        e = self.assertRaises(DataDirError, open_data_dir, self.path, "server.key")
        self.assertIn(key_path, str(e))
        self.assertIn("0644", str(e))
        self.assertEqual(self.mode(key_path), 0o644, "refused, not silently changed")

    def test_directory_that_cannot_be_made(self) -> None:
        parent = os.path.dirname(self.path)
        os.makedirs(parent)
        with open(self.path, "w"):
            pass  # a file where the directory should be
        e = self.assertRaises(DataDirError, open_data_dir, self.path, "node.key")
        self.assertIn(self.path, str(e))
        self.assertIn("is a file, not a directory", str(e))

    def test_custom_reader(self) -> None:
        """The node refuses a key others may read: its reader is used for an existing key."""
        open_data_dir(self.path, "node.key")
        seen: list[str] = []

        def read(path: str) -> bytes:
            seen.append(path)
            return b"k" * 32

        self.assertEqual(open_data_dir(self.path, "node.key", read), b"k" * 32)
        self.assertEqual(seen, [os.path.join(self.path, "node.key")])
