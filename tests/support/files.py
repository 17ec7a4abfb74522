"""Files a test writes for the code under test (configurations, keys)."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase


def write_file(test: SynchronousTestCase, text: str, mode: int = 0o600) -> str:
    """A new file in the test's temporary space holding C{text}, with C{mode}."""
    path = test.mktemp()
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path
