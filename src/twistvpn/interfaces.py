"""
The seams between twistvpn's pieces.

Every implementation is declared with C{@implementer} and checked with
C{verifyObject} in a test, so that a fake and the real thing stay
interchangeable.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

# An endpoint is whatever a transport can send to: a (host, port) tuple for
# UDP, or an object naming another path (a relay) that the forwarder knows
# how to reach.  The WireGuard state never looks inside it.


# --- the data plane ---------------------------------------------------------


class ITunDevice(Interface):
    """
    A layer-3 virtual network device: IP packets in, IP packets out.
    """

    name = Attribute("The kernel interface name (str).")
    mtu = Attribute("The device MTU in bytes (int).")

    def start_reading(receiver):
        """
        Deliver every IP packet the kernel sends into the device to
        C{receiver(packet: bytes)}, from now until L{stop_reading}.
        """

    def stop_reading():
        """
        Stop delivering packets; the device stays up.
        """

    def write(packet):
        """
        Hand one IP packet (bytes) to the kernel as if it arrived on the device.
        """

    def set_addresses(addresses):
        """
        Make C{addresses} (interface addresses in CIDR form, "100.64.0.1/24")
        the device's addresses, replacing any set before, and bring it up.
        """

    def add_route(cidr):
        """
        Route the prefix C{cidr} through the device.
        """

    def remove_route(cidr):
        """
        Remove a route added with L{add_route}; removing an absent route is
        not an error.
        """

    def close():
        """
        Remove the routes that were added and the device itself.
        """


class IDatagramHandler(Interface):
    """
    Something that consumes one kind of message arriving on the node's UDP
    socket.  The forwarder dispatches on the first byte of each datagram.
    """

    def datagram_received(data, addr):
        """
        Consume C{data} (bytes) that arrived from C{addr}.  Must not raise:
        malformed input is dropped and counted.
        """


class IDatagramSender(Interface):
    """
    The one UDP socket of a node, as seen by the pieces that share it.
    """

    def send_datagram(data, addr):
        """
        Send C{data} (bytes) to C{addr}, a (host, port) tuple or another
        endpoint the sender knows how to reach.  Never raises for a
        transient network error; such losses are counted.
        """

    def register_handler(message_type, handler):
        """
        Dispatch datagrams whose first byte is C{message_type} (int) to
        C{handler} (an L{IDatagramHandler}).  Types 1 to 4 belong to
        WireGuard and cannot be taken.
        """


class IWireGuardDevice(Interface):
    """
    The WireGuard protocol state of one interface: its static key, its
    peers, handshakes, sessions, timers and cryptokey routing.  A plain
    object: time comes from an injected clock, datagrams leave through an
    injected sender, decrypted packets through an injected callable.
    """

    public_key = Attribute("This interface's static public key (32 bytes).")
    counters = Attribute(
        "A collections.Counter of events, drops by reason among them "
        "(e.g. 'drop_malformed', 'drop_replay', 'drop_allowed_ips')."
    )

    def add_peer(public_key, preshared_key=None, endpoint=None, allowed_ips=(),
                 persistent_keepalive=0):
        """
        Add a peer (or update an existing one) and return its L{IWireGuardPeer}.
        C{allowed_ips} is a sequence of CIDR strings.
        """

    def remove_peer(public_key):
        """
        Forget a peer, its sessions and timers; absent peers are ignored.
        """

    def get_peer(public_key):
        """
        Return the L{IWireGuardPeer} for C{public_key}, or None.
        """

    def peers():
        """
        Return a list of every L{IWireGuardPeer}.
        """

    def datagram_received(data, addr):
        """
        Consume one WireGuard message (types 1 to 4) that arrived from
        C{addr}.  Never raises; bad messages are dropped and counted.
        """

    def send_packet(packet):
        """
        Send one IP packet read from the TUN device to the peer whose
        AllowedIPs contain its destination (longest prefix), handshaking
        first when no session exists.  Packets no peer routes are dropped
        and counted.
        """

    def close():
        """
        Cancel every timer and erase session keys.
        """


class IWireGuardPeer(Interface):
    """
    One peer of an L{IWireGuardDevice}, as other pieces see it.
    """

    public_key = Attribute("The peer's static public key (32 bytes).")
    endpoint = Attribute(
        "Where datagrams for this peer go now (None before it is known). "
        "Assignable: the path manager moves a peer between paths this way; "
        "an authenticated packet from a new address also moves it (roaming)."
    )
    allowed_ips = Attribute("The peer's AllowedIPs, a tuple of CIDR strings.")
    last_handshake = Attribute(
        "Clock time of the last completed handshake, or None."
    )
    rx_bytes = Attribute("Bytes received from this peer (int).")
    tx_bytes = Attribute("Bytes sent to this peer (int).")

    def set_allowed_ips(cidrs):
        """
        Replace the peer's AllowedIPs with C{cidrs} (sequence of CIDR strings).
        """


# --- NAT traversal (see twistvpn.traversal) ---------------------------------


# --- the rendezvous (see twistvpn.rendezvous) -------------------------------


# --- the relay (see twistvpn.relay) -----------------------------------------


class IRelayPolicy(Interface):
    """
    Who may use a relay and who may reach whom through it: a node may relay
    only to nodes it shares an authorized network with.  The rendezvous's
    controller is the source of truth (in process when the relay is
    embedded, over the relay link when it is standalone).  Answers may be
    plain values or Deferreds; the relay caches them per pair and drops a
    cached answer as soon as it is told of a revocation.
    """

    def may_register(node_key):
        """
        Return (or return a Deferred firing with) True when C{node_key}
        (32-byte public key) is an authorized member of some network and
        may hold a session on the relay.
        """

    def may_relay(src_key, dst_key):
        """
        Return (or return a Deferred firing with) True when the nodes
        C{src_key} and C{dst_key} share an authorized network.
        """

    def add_revocation_observer(observer):
        """
        Call C{observer(keys)} (keys: a frozenset of node public keys)
        whenever authorizations involving those nodes may have shrunk
        (deauthorized, removed, a network deleted), so that flows stop
        within seconds.
        """

    def remove_revocation_observer(observer):
        """
        Stop calling C{observer}; unknown observers are ignored.
        """
