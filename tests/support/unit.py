"""
Run the unit tests with Trial: every test module but the integration ones
(C{test_integration_*}, which build namespaces and start processes).  Used
by tox's C{tests-pure} environment; extra arguments go to Trial.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.scripts.trial import run

TESTS = Path(__file__).resolve().parent.parent


def unit_test_modules(tests: Path = TESTS) -> list[str]:
    return sorted(
        f"tests.{path.stem}"
        for path in tests.glob("test_*.py")
        if not path.stem.startswith("test_integration_")
    )


def main() -> None:
    sys.argv[1:] = [*sys.argv[1:], *unit_test_modules()]
    run()


if __name__ == "__main__":
    main()
