"""
Strategies as plugins: the built-in ones, a user's own dropped into a
plugin directory, and verifyObject on every implementation.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

from twisted.plugin import IPlugin
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twistvpn.interfaces import (
    IPathManager,
    IRelayProvider,
    ITraversalContext,
    ITraversalStrategy,
)
from twistvpn.testing.fakerelay import FakeRelay
from twistvpn.testing.natsim import Internet
from twistvpn.testing.pathsim import Pair, SimNode, SimPeer
from twistvpn.traversal import load_strategies
from twistvpn.traversal.candidates import Candidates
from twistvpn.traversal.context import TraversalContext
from twistvpn.traversal.manager import PathManager
from twistvpn.traversal.strategies import (
    BirthdayStrategy,
    LanStrategy,
    PunchStrategy,
    SequentialStrategy,
)

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "writing-a-strategy.md"
BUILTIN = {"lan", "punch", "birthday", "sequential"}


def example_source() -> str:
    """The example plugin, exactly as the documentation shows it."""
    text = GUIDE.read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


class BuiltinTests(SynchronousTestCase):
    def test_found_as_plugins(self) -> None:
        names = {s.name for s in load_strategies()}
        self.assertTrue(BUILTIN <= names, names)

    def test_verify_every_strategy(self) -> None:
        strategies = list(load_strategies()) + [
            LanStrategy(), PunchStrategy(), SequentialStrategy(window=4),
            BirthdayStrategy(ports=16, probes=64, rate=10.0)]
        for strategy in strategies:
            verifyObject(ITraversalStrategy, strategy)
            verifyObject(IPlugin, strategy)

    def test_bad_settings_refused(self) -> None:
        self.assertRaises(ValueError, BirthdayStrategy, ports=0)
        self.assertRaises(ValueError, BirthdayStrategy, probes=70000)
        self.assertRaises(ValueError, BirthdayStrategy, rate=0)
        self.assertRaises(ValueError, SequentialStrategy, window=0)

    def test_verify_context_manager_relay(self) -> None:
        net = Internet()
        rng = random.Random(0)
        a, b = SimNode(net.add_public_host(), rng), SimNode(net.add_public_host(), rng)
        context = TraversalContext(a.probes, "punch", b.public_key, Candidates(),
                                   Candidates(), a.reactor, rng)
        verifyObject(ITraversalContext, context)
        relay = FakeRelay(net.clock).provider(a.public_key, a.forwarder)
        verifyObject(IRelayProvider, relay)
        manager = PathManager(SimPeer(b.public_key), a.probes, a.reactor,
                              local=Candidates(), remote=Candidates(), relay=relay)
        verifyObject(IPathManager, manager)


class CustomPluginTests(SynchronousTestCase):
    def _plugin_dir(self) -> Path:
        base = Path(self.mktemp())
        plugins = base / "twistvpn" / "plugins"
        plugins.mkdir(parents=True)
        (plugins / "forwarded_port.py").write_text(example_source())
        return base

    def test_example_provides_interfaces(self) -> None:
        path = self._plugin_dir() / "twistvpn" / "plugins" / "forwarded_port.py"
        spec = importlib.util.spec_from_file_location("forwarded_port_example", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        verifyObject(ITraversalStrategy, module.forwarded)
        verifyObject(IPlugin, module.forwarded)

    def test_discovered_and_used(self) -> None:
        """
        A fresh interpreter with the plugin directory on sys.path finds the
        example and, between two hard NATs (which otherwise need the relay),
        reaches the peer directly through its router's forwarded port.
        """
        base = self._plugin_dir()
        script = (
            "import json\n"
            "from twistvpn.traversal import load_strategies\n"
            "from twistvpn.testing.pathsim import Pair\n"
            "names = [s.name for s in load_strategies()]\n"
            "pair = Pair('hard', 'hard', seed=3)\n"
            "pair.nats[1].forward_port(51820, (pair.b.host.ip, 41641))\n"
            "pair.start()\n"
            "r = pair.run(20.0)\n"
            "print(json.dumps({'names': names, 'kinds': r.kinds, 'strategy': r.strategy,\n"
            "                  'port': pair.a.manager.endpoint[1]}))\n"
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(base.resolve()), str(ROOT / "src")])
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, timeout=120, cwd=str(base))
        self.assertEqual(out.returncode, 0, out.stderr)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        self.assertIn("forwarded", result["names"])
        self.assertTrue(BUILTIN <= set(result["names"]))
        self.assertEqual(result["kinds"], ["direct", "direct"])
        self.assertEqual(result["strategy"], "forwarded")
        self.assertEqual(result["port"], 51820)

    def test_without_plugin_the_pair_needs_the_relay(self) -> None:
        pair = Pair("hard", "hard", seed=3)
        pair.nats[1].forward_port(51820, (pair.b.host.ip, 41641))
        pair.start()
        self.assertEqual(pair.run(20.0).kinds, ("relay", "relay"))
