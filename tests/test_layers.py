"""
The packages depend one way: wireguard, then common, then traversal and
rendezvous, then relay, then node, each importing only those to its left
(docs/architecture.md).  The taps are where services are composed, so a
C{*_tap} module may import any product package; test and lab tooling
(C{twistvpn.testing}) and the command line sit above everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import twistvpn

SOURCE = Path(twistvpn.__file__).parent

# Each package's rank; a module may import packages of a lower rank, or its own.
RANKS = {
    "interfaces": 0, "build": 0, "wire": 0, "options": 0, "table": 0, "__init__": 0,
    "wireguard": 1,
    "common": 2,
    "traversal": 3, "plugins": 3, "rendezvous": 3,
    "relay": 4, "console": 4,
    "node": 5,
    "testing": 6, "cli": 6, "__main__": 6, "units": 6,
}
COMPOSITION = 5  # what a *_tap module may import up to


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every twistvpn import in a file, lazy ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names[:1] if n.startswith("twistvpn")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("twistvpn")]
    return found


def upward_imports(source: Path = SOURCE) -> list[str]:
    """Every import that runs against the order, as 'file:line: a -> b'."""
    wrong = []
    for path in sorted(source.rglob("*.py")):
        relative = path.relative_to(source.parent)
        module = ".".join(relative.with_suffix("").parts)
        own = package_of(module) if len(relative.parts) > 2 else relative.stem
        limit = COMPOSITION if path.stem.endswith("_tap") else RANKS[own]
        for line, target in imports(path):
            other = package_of(target)
            if other != own and RANKS[other] > limit:
                wrong.append(f"{relative}:{line}: {own} -> {other}")
    return wrong


class LayerTests(SynchronousTestCase):
    def test_every_package_has_a_rank(self) -> None:
        packages = {p.stem if p.is_file() else p.name for p in SOURCE.iterdir()
                    if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
        self.assertEqual(sorted(packages - set(RANKS)), [])

    def test_imports_run_one_way(self) -> None:
        self.assertEqual(upward_imports(), [])

    def test_rendezvous_and_traversal_are_apart(self) -> None:
        """Peers of one rank do not import each other either."""
        crossing = []
        for package, other in (("rendezvous", "traversal"), ("traversal", "rendezvous"),
                               ("rendezvous", "plugins")):
            for path in sorted((SOURCE / package).rglob("*.py")):
                crossing += [f"{path.name}:{line}" for line, target in imports(path)
                             if package_of(target) == other]
        self.assertEqual(crossing, [])

    def test_an_upward_import_is_found(self) -> None:
        """The check itself: a relay module importing the node is reported."""
        source = Path(self.mktemp()) / "twistvpn"
        (source / "relay").mkdir(parents=True)
        (source / "relay" / "probe.py").write_text(
            "from twistvpn.wireguard import keys\n"
            "def later():\n    from twistvpn.node import tun\n"
        )
        (source / "relay" / "relay_tap.py").write_text("from twistvpn.node import tun\n")
        self.assertEqual(upward_imports(source), ["twistvpn/relay/probe.py:3: relay -> node"])
