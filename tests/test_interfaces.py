"""
Every class that declares an interface provides it: each declaration in
the product, in C{twistvpn.testing} and in the tests (their fakes too) is
checked with C{verifyClass}, and the implementations no other test builds are
checked as objects with C{verifyObject}.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import tempfile

from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementedBy
from zope.interface.verify import verifyClass, verifyObject

import tests
import twistvpn
from tests.support.fakes import FakeWireGuardDevice
from tests.support.rendezvous import RecordingListener
from twistvpn.common.services import StreamListener
from twistvpn.common.tls import PinnedCertificateCreator
from twistvpn.interfaces import (
    IControlSession,
    IDatagramHandler,
    IRelayProvider,
    IRendezvousListener,
    IRendezvousRelays,
    IWireGuardDevice,
    IWireGuardPeer,
)
from twistvpn.relay.policy import ControllerMembership
from twistvpn.relay.server import RelayServer
from twistvpn.relay.service import RendezvousRelays
from twistvpn.relay.transport import RelayClientStreamProtocol, RelayStreamProtocol
from twistvpn.rendezvous.controller import Controller
from twistvpn.rendezvous.store import open_store
from twistvpn.testing.fakerelay import FakeRelay, FakeRelayProvider
from twistvpn.testing.loopback import _Session
from twistvpn.testing.pathsim import Inbox
from twistvpn.wireguard.keys import generate_private_key, public_key


def modules(package: object) -> list[object]:
    """Every module of a package, imported."""
    path = package.__path__  # type: ignore[attr-defined]
    prefix = package.__name__ + "."  # type: ignore[attr-defined]
    found = []
    for info in pkgutil.walk_packages(path, prefix):
        if info.name.endswith("__main__"):
            continue
        found.append(importlib.import_module(info.name))
    return found


def declarations() -> list[tuple[type, object]]:
    """(class, interface) for every interface a class of ours declares itself."""
    pairs = []
    for module in modules(twistvpn) + modules(tests):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:  # type: ignore[attr-defined]
                continue
            for interface in implementedBy(cls).declared:
                pairs.append((cls, interface))
    return pairs


class DeclarationTests(SynchronousTestCase):
    def test_every_declaration(self) -> None:
        found = declarations()
        self.assertGreater(len(found), 30)
        for cls, interface in found:
            with self.subTest(cls=cls.__qualname__, interface=interface.__name__):
                verifyClass(interface, cls)

    def test_finds_the_forwarder(self) -> None:
        """The sweep reaches the product's classes, not only ours."""
        names = {f"{cls.__module__}.{cls.__name__}" for cls, _ in declarations()}
        self.assertIn("twistvpn.node.forwarder.Forwarder", names)
        self.assertIn("twistvpn.testing.loopback._Session", names)


class ObjectTests(SynchronousTestCase):
    """The implementations that no other test builds."""

    def test_loopback_session(self) -> None:
        verifyObject(IControlSession, _Session(b"k" * 32))

    def test_discovery_responses(self) -> None:
        from twistvpn.node.joined import DiscoveryResponses

        verifyObject(IDatagramHandler, DiscoveryResponses())

    def test_path_simulation_inbox(self) -> None:
        verifyObject(IDatagramHandler, Inbox())

    def test_fake_relay_provider(self) -> None:
        verifyObject(IRelayProvider, FakeRelayProvider(FakeRelay(Clock()), b"k" * 32))

    def test_pinned_creator(self) -> None:
        verifyObject(IOpenSSLClientConnectionCreator,
                     PinnedCertificateCreator("rendezvous.example", b"p" * 32))

    def test_relay_stream_protocols(self) -> None:
        server = RelayServer(Clock(), generate_private_key(), b"k" * 32, policy=None)
        verifyObject(IPushProducer, RelayStreamProtocol(server))
        verifyObject(IHandshakeListener, RelayClientStreamProtocol(object(), tls=False))

    def test_rendezvous_relays(self) -> None:
        path = os.path.join(tempfile.mkdtemp(), "rendezvous.sqlite")
        controller = Controller(open_store(path), Clock())
        self.addCleanup(controller.close)
        membership = ControllerMembership(controller)
        relays = RendezvousRelays(membership, None, None, None)
        verifyObject(IRendezvousRelays, relays)
        self.assertEqual(relays.stats(), {"embedded": None, "standalone": []})

    def test_stream_listener_endpoint(self) -> None:
        reactor = MemoryReactorClock()
        listener = StreamListener(TCP4ServerEndpoint(reactor, 0), Factory())
        verifyObject(IStreamServerEndpoint, listener.endpoint)
        self.assertIsNone(listener.port)
        listener.startService()
        port = self.successResultOf(listener.listening)
        self.assertIs(listener.port, port)
        self.successResultOf(listener.stopService())
        self.assertIsNone(listener.port)

    def test_support_fakes(self) -> None:
        device = FakeWireGuardDevice(generate_private_key(), Clock(), None, None)
        verifyObject(IWireGuardDevice, device)
        verifyObject(IWireGuardPeer, device.add_peer(public_key(generate_private_key())))
        verifyObject(IRendezvousListener, RecordingListener())

