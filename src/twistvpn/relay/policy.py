"""
Who may talk to whom through a relay.

L{MembershipPolicy} is an in-memory table of each network's authorized
members.  The rendezvous feeds it: in process when the relay is embedded
(L{ControllerMembership} is told of every change by the controller), over
the relay link when the relay is standalone (L{twistvpn.relay.link}).
Answers are local dictionary look-ups, so the relay never waits on the
rendezvous per packet, and shrinking a network tells the relay at once which nodes lost whom.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from twistvpn.interfaces import IMembershipObserver, IRelayPolicy

Observer = Callable[[frozenset[bytes]], None]
ChangeObserver = Callable[[str, frozenset[bytes]], None]


@implementer(IRelayPolicy)
class MembershipPolicy:
    """
    Nodes may relay to each other when they are authorized members of a
    common network.
    """

    log = Logger()

    def __init__(self) -> None:
        self._members: dict[str, frozenset[bytes]] = {}
        self._devices: dict[str, frozenset[bytes]] = {}  # network -> its devices' keys
        self._device_reachable: frozenset[bytes] = frozenset()
        self._networks: dict[bytes, set[str]] = {}
        self._observers: list[Observer] = []
        self._change_observers: list[ChangeObserver] = []

    # -- IRelayPolicy -------------------------------------------------------------

    def may_register(self, node_key: bytes) -> bool:
        return bool(self._networks.get(node_key))

    def may_relay(self, src_key: bytes, dst_key: bytes) -> bool:
        src = self._networks.get(src_key)
        dst = self._networks.get(dst_key)
        return bool(src and dst and not src.isdisjoint(dst))

    def device_reachable(self) -> frozenset[bytes]:
        return self._device_reachable

    def add_revocation_observer(self, observer: Observer) -> None:
        self._observers.append(observer)

    def remove_revocation_observer(self, observer: Observer) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    # -- fed by the rendezvous ----------------------------------------------------

    def add_change_observer(self, observer: ChangeObserver) -> None:
        """Call C{observer(network_id, members)} after every change of a network."""
        self._change_observers.append(observer)

    def networks(self) -> dict[str, frozenset[bytes]]:
        """Every network's authorized members, as last set."""
        return dict(self._members)

    def set_members(self, network_id: str, keys: Iterable[bytes]) -> None:
        """
        Make C{keys} the authorized members of C{network_id}.  Everyone in
        the network loses whoever left it, so all of them are revoked when
        anyone leaves.
        """
        new = frozenset(keys)
        old = self._members.get(network_id, frozenset())
        if new == old:
            return
        if new:
            self._members[network_id] = new
        else:
            self._members.pop(network_id, None)
        for key in old - new:
            networks = self._networks.get(key)
            if networks is not None:
                networks.discard(network_id)
                if not networks:
                    del self._networks[key]
        for key in new - old:
            self._networks.setdefault(key, set()).add(network_id)
        if network_id in self._devices:
            kept = self._devices[network_id] & new
            if kept:
                self._devices[network_id] = kept
            else:
                del self._devices[network_id]
            self._update_device_reachable()
        if old - new:
            self._notify(old)
        self._tell_changed(network_id, new)

    def set_devices(self, network_id: str, keys: Iterable[bytes]) -> None:
        """
        Which of C{network_id}'s authorized members are stock WireGuard
        devices; a change is told to the change observers (the relay link
        pushes it to standalone relays).
        """
        devices = frozenset(keys)
        if devices == self._devices.get(network_id, frozenset()):
            return
        if devices:
            self._devices[network_id] = devices
        else:
            self._devices.pop(network_id, None)
        self._update_device_reachable()
        self._tell_changed(network_id, self._members.get(network_id, frozenset()))

    def _tell_changed(self, network_id: str, members: frozenset[bytes]) -> None:
        for change_observer in list(self._change_observers):
            try:
                change_observer(network_id, members)
            except Exception:
                self.log.failure("relay membership observer raised")

    def devices(self) -> dict[str, frozenset[bytes]]:
        """Every network's devices, as last set."""
        return dict(self._devices)

    def _update_device_reachable(self) -> None:
        reachable: set[bytes] = set()
        for network_id, devices in self._devices.items():
            reachable |= self._members.get(network_id, frozenset()) - devices
        self._device_reachable = frozenset(reachable)

    def forget_network(self, network_id: str) -> None:
        """The network was deleted."""
        self._devices.pop(network_id, None)
        self.set_members(network_id, ())

    def replace_all(self, memberships: Mapping[str, Iterable[bytes]],
                    devices: Mapping[str, Iterable[bytes]] | None = None) -> None:
        """Make C{memberships} (and C{devices}) the whole table (a fresh snapshot)."""
        for network_id in list(self._members):
            if network_id not in memberships:
                self.forget_network(network_id)
        for network_id, keys in memberships.items():
            self.set_members(network_id, keys)
        if devices is not None:
            for network_id in list(self._devices):
                if network_id not in devices:
                    self.set_devices(network_id, ())
            for network_id, keys in devices.items():
                self.set_devices(network_id, keys)

    def _notify(self, keys: frozenset[bytes]) -> None:
        for observer in list(self._observers):
            try:
                observer(keys)
            except Exception:
                self.log.failure("relay revocation observer raised")


@implementer(IMembershipObserver)
class ControllerMembership:
    """
    Keeps a L{MembershipPolicy} in step with the rendezvous's controller
    (L{twistvpn.interfaces.INetworkController}) in the same process: a
    snapshot of every network's authorized members when started, then every
    change as the controller makes it (it tells its membership observers),
    so a deauthorization reaches the relay before the admin's request returns.
    """

    log = Logger()

    def __init__(self, controller: Any, policy: MembershipPolicy | None = None) -> None:
        self.controller = controller
        self.policy = policy if policy is not None else MembershipPolicy()
        self.running = False

    def start(self) -> None:
        self.controller.add_membership_observer(self)
        self.running = True
        self.policy.replace_all(self.controller.authorized_members(),
                                self.controller.authorized_devices())

    def stop(self) -> None:
        self.controller.remove_membership_observer(self)
        self.running = False

    # -- IMembershipObserver ----------------------------------------------------------

    def members_changed(self, network_id: str, authorized: frozenset[bytes],
                        devices: frozenset[bytes]) -> None:
        self.policy.set_members(network_id, authorized)
        self.policy.set_devices(network_id, devices)

    def member_revoked(self, network_id: str, public_key: bytes, reason: str) -> None:
        """The change itself follows as L{members_changed}."""

    def network_deleted(self, network_id: str) -> None:
        self.policy.forget_network(network_id)
