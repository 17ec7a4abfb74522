"""
The WireGuard protocol state of one interface, as a plain object.

Time comes from an injected clock, randomness from an injected source,
datagrams leave through C{send_datagram(data, endpoint)} and decrypted IP
packets through C{deliver_packet(packet)}; the forwarder and the TUN device
are thin adapters around it.  Timers follow the whitepaper's section 6 as
wireguard-go implements it (device/timers.go), so the two interoperate.

Transport keys live only inside the AEAD objects of a L{Keypair}; erasing a
session drops every reference to them (Python cannot scrub memory).
"""

from __future__ import annotations

import collections
import math
import os
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from twisted.logger import Logger
from zope.interface import classImplements

from twistvpn.interfaces import IWireGuardDevice, IWireGuardPeer
from twistvpn.wireguard import keys
from twistvpn.wireguard.allowedips import AllowedIPs
from twistvpn.wireguard.cookie import CookieChecker, CookieGenerator
from twistvpn.wireguard.messages import (
    CONSTRUCTION,
    COOKIE_REPLY,
    COOKIE_REPLY_SIZE,
    HANDSHAKE_INITIATION_RATE,
    IDENTIFIER,
    INITIATION,
    INITIATION_MAC1,
    INITIATION_SIZE,
    KEEPALIVE_TIMEOUT,
    MAX_STAGED_PACKETS,
    MAX_TIMER_HANDSHAKES,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
    RESPONSE_MAC1,
    RESPONSE_SIZE,
    TRANSPORT_HEADER,
    TRANSPORT_MIN_SIZE,
    UNDER_LOAD_AFTER_TIME,
    UNDER_LOAD_HANDSHAKES_PER_SECOND,
    message_type,
    tai64n,
)
from twistvpn.wireguard.noise import (
    NONCE,
    IKpsk2Handshake,
    NoiseError,
    dh,
    initial_state,
)
from twistvpn.wireguard.replay import ReplayWindow

Endpoint = Any

_INITIATION_HEAD: Final = struct.Struct("<II")
_RESPONSE_HEAD: Final = struct.Struct("<III")
_PADDING: Final = [bytes(n) for n in range(16)]
_NO_PSK: Final = bytes(32)
_INF: Final = math.inf
_log: Final = Logger(namespace=__name__)  # named: a compiled module has no frame to infer it from
# A session this old is about to be rejected: its initiator rekeys.
_LAST_MINUTE: Final = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT


class _Timer:
    """
    One restartable timer on the injected clock (wireguard-go's C{Timer}).

    Per-packet code moves and stops timers all the time (every packet sent
    arms one, every packet received stops it), so both only write
    C{deadline}: a reactor call, once made, stays and is moved only when it
    would fire too late.  When it fires before the deadline (the timer was
    moved later) it is made again for the rest; when the timer was stopped
    it does nothing.  L{cancel} removes the call itself.
    """

    __slots__ = ("_clock", "_function", "_call", "deadline")

    def __init__(self, clock: Any, function: Callable[[], None]) -> None:
        self._clock = clock
        self._function = function
        self._call: Any = None  # the reactor call (IDelayedCall), or None
        # When the timer fires (clock seconds), None when it is not
        # pending: per-packet code tests it directly.
        self.deadline: float | None = None

    @property
    def pending(self) -> bool:
        return self.deadline is not None

    def mod(self, delay: float) -> None:
        """Fire C{delay} seconds from now, whether or not already pending."""
        clock = self._clock
        deadline = clock.seconds() + delay
        self.deadline = deadline
        call = self._call
        if call is None:
            self._call = clock.callLater(delay, self._fire)
        elif call.getTime() > deadline:
            call.reset(delay)

    def stop(self) -> None:
        self.deadline = None

    def cancel(self) -> None:
        """Stop, and take the reactor call away too (the peer is going)."""
        self.deadline = None
        call = self._call
        if call is not None:
            self._call = None
            call.cancel()

    def _fire(self) -> None:
        self._call = None
        deadline = self.deadline
        if deadline is None:
            return
        remaining = deadline - self._clock.seconds()
        if remaining > 0:
            self._call = self._clock.callLater(remaining, self._fire)
            return
        self.deadline = None
        self._function()


class Keypair:
    """
    One session: the two transport AEADs derived by a handshake, the send
    counter, the receive replay window and the two indices naming it.
    """

    __slots__ = (
        "peer",
        "send",
        "receive",
        "encrypt",
        "decrypt",
        "send_counter",
        "replay",
        "local_index",
        "remote_index",
        "created",
        "is_initiator",
        "rekey_at",
        "reject_at",
    )

    def __init__(
        self,
        peer: Peer,
        send_key: bytes,
        receive_key: bytes,
        local_index: int,
        remote_index: int,
        created: float,
        is_initiator: bool,
    ) -> None:
        self.peer = peer
        self.send = ChaCha20Poly1305(send_key)
        self.receive = ChaCha20Poly1305(receive_key)
        # Bound once: per packet, a call without a method look-up.
        self.encrypt: Callable[[bytes, bytes, bytes | None], bytes] = self.send.encrypt
        self.decrypt: Callable[[bytes, Any, bytes | None], bytes] = self.receive.decrypt
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.local_index = local_index
        self.remote_index = remote_index
        self.created = created
        self.is_initiator = is_initiator
        # Only the initiator rekeys by time, so the two sides do not both start.
        self.rekey_at = created + REKEY_AFTER_TIME if is_initiator else _INF
        self.reject_at = created + REJECT_AFTER_TIME


class Peer:
    """
    One peer: its configuration, sessions, handshake in progress and timers.
    What C{wg show} prints is here: L{last_handshake_wall},
    L{rx_bytes}/L{tx_bytes}, L{persistent_keepalive}, L{endpoint}; see L{show}.
    """

    def __init__(
        self,
        device: WireGuardDevice,
        public_key: bytes,
        preshared_key: bytes | None,
        endpoint: Endpoint,
        persistent_keepalive: int,
    ) -> None:
        self._device = device
        self.public_key = public_key
        self.preshared_key = preshared_key or _NO_PSK
        self._endpoint = endpoint
        self.configured_endpoint = endpoint
        self.allowed_ips: tuple[str, ...] = ()
        self.last_handshake: float | None = None
        self.last_handshake_wall: float | None = None
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.persistent_keepalive = persistent_keepalive
        self.cookies = CookieGenerator(public_key, device.clock)
        # Hash and chaining key once the peer's static key is mixed in: the
        # start of every handshake we initiate to it.
        self._initial_state = initial_state(CONSTRUCTION, IDENTIFIER, public_key)
        # The static-static DH, the same in every handshake with this peer.
        self.static_shared = dh(device.private_key, public_key)
        self.previous: Keypair | None = None
        self.current: Keypair | None = None
        self.next: Keypair | None = None
        self.handshake: IKpsk2Handshake | None = None
        self.handshake_index: int | None = None
        self.last_timestamp = b""
        self.last_initiation_consumed = -_INF
        self.last_initiation_sent = -_INF
        # Where the last initiation went (None: nowhere, no endpoint yet).
        self.last_initiation_endpoint: Endpoint = None
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False
        self.need_another_keepalive = False
        # Clock time of the last authenticated packet sent or received; the
        # persistent keepalive timer reads it when it fires instead of being
        # pushed back by every packet.
        self.last_traversal = -_INF
        self.staged: collections.deque[bytes] = collections.deque()
        clock = device.clock
        self.timer_retransmit_handshake = _Timer(clock, self._retransmit_handshake_expired)
        self.timer_send_keepalive = _Timer(clock, self._send_keepalive_expired)
        self.timer_new_handshake = _Timer(clock, self._new_handshake_expired)
        self.timer_zero_key_material = _Timer(clock, self._zero_key_material_expired)
        self.timer_persistent_keepalive = _Timer(clock, self._persistent_keepalive_expired)

    def __repr__(self) -> str:
        return f"<Peer {keys.encode_key(self.public_key)} at {self.endpoint!r}>"

    # -- IWireGuardPeer ---------------------------------------------------------

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoint

    @endpoint.setter
    def endpoint(self, endpoint: Endpoint) -> None:
        """
        Move the peer (the path manager, C{wg set}).  An initiation of ours
        still unanswered that went elsewhere (or nowhere: no endpoint yet) is
        sent again here at once instead of after REKEY_TIMEOUT: the new
        endpoint is usually a path just verified, and the old one usually
        the reason no response came.
        """
        self._endpoint = endpoint
        if (
            endpoint is not None
            and self.handshake is not None
            and self.timer_retransmit_handshake.deadline is not None
            and endpoint != self.last_initiation_endpoint
        ):
            self.send_initiation(True, new_endpoint=True)

    def set_allowed_ips(self, cidrs: Iterable[str]) -> None:
        self._device._set_allowed_ips(self, cidrs)

    def reset_endpoint(self) -> None:
        """
        Forget where roaming took the peer: go back to the configured
        endpoint (None if it had none, as for a peer that connects to us).
        """
        self.endpoint = self.configured_endpoint

    def show(self) -> dict[str, Any]:
        """The peer as C{wg show} reports it."""
        return {
            "public_key": keys.encode_key(self.public_key),
            "preshared_key": self.preshared_key != _NO_PSK,
            "endpoint": self.endpoint,
            "allowed_ips": self.allowed_ips,
            "latest_handshake": self.last_handshake_wall,
            "transfer_rx": self.rx_bytes,
            "transfer_tx": self.tx_bytes,
            "persistent_keepalive": self.persistent_keepalive,
        }

    # -- sending ----------------------------------------------------------------

    def _usable(self, keypair: Keypair | None, now: float) -> bool:
        return (
            keypair is not None
            and keypair.send_counter < REJECT_AFTER_MESSAGES
            and now < keypair.reject_at
        )

    def stage(self, packet: bytes) -> None:
        """Queue C{packet} until a session exists, dropping the oldest past the limit."""
        staged = self.staged
        if len(staged) >= self._device.max_staged_packets:
            staged.popleft()
            self._device.counters["drop_staged_overflow"] += 1
        staged.append(packet)

    def send_staged(self) -> None:
        """Send what is staged, or start a handshake when no session can."""
        if not self.staged:
            return
        now = self._device._seconds()
        keypair = self.current
        if keypair is None or not self._usable(keypair, now):
            self.send_initiation(False)
            return
        staged = self.staged
        while staged:
            self.encrypt_and_send(keypair, staged.popleft(), now)

    def send_keepalive(self) -> None:
        """An empty transport message, unless data is already waiting to go."""
        if not self.staged:
            self.staged.append(b"")
        self.send_staged()

    def encrypt_and_send(self, keypair: Keypair, packet: bytes, now: float) -> None:
        """Encrypt one (possibly empty) packet under C{keypair} and send it."""
        device = self._device
        counter = keypair.send_counter
        keypair.send_counter = counter + 1
        length = len(packet)
        padding = -length & 15
        if padding:
            mtu = device.mtu
            if mtu is not None and length + padding > mtu:
                padding = max(0, mtu - length)
            packet += _PADDING[padding]
        message = TRANSPORT_HEADER.pack(
            MESSAGE_TRANSPORT, keypair.remote_index, counter
        ) + keypair.encrypt(NONCE.pack(counter), packet, None)
        self.transmit(message, now)
        if length and self.timer_new_handshake.deadline is None:
            # Data sent: expect to hear back within KEEPALIVE + REKEY_TIMEOUT.
            self.timer_new_handshake.mod(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + device._jitter())
        # keep the key fresh
        if counter >= REKEY_AFTER_MESSAGES or now >= keypair.rekey_at:
            self.send_initiation(False)

    def transmit(self, message: bytes, now: float) -> None:
        """
        Send an authenticated message (any type) to the current endpoint,
        and run the timers every authenticated packet sent runs.
        """
        endpoint = self._endpoint
        if endpoint is None:
            self._device.counters["drop_no_endpoint"] += 1
        else:
            self._device._send_datagram(message, endpoint)
            self.tx_bytes += len(message)
        self.traversed(now)
        if self.timer_send_keepalive.deadline is not None:
            self.timer_send_keepalive.stop()  # this packet does its job

    def traversed(self, now: float) -> None:
        """An authenticated packet went either way: persistent keepalive restarts."""
        self.last_traversal = now
        if self.persistent_keepalive and self.timer_persistent_keepalive.deadline is None:
            self.timer_persistent_keepalive.mod(self.persistent_keepalive)

    def authenticated_received(self, addr: Endpoint, size: int, now: float) -> None:
        """An authenticated message arrived from C{addr}: roam there, count, run timers."""
        self._endpoint = addr  # the peer is talking to us: nothing to resend
        self.rx_bytes += size
        self.traversed(now)
        if self.timer_new_handshake.deadline is not None:
            self.timer_new_handshake.stop()  # we heard back

    def send_initiation(self, is_retry: bool, new_endpoint: bool = False) -> None:
        """
        Start a handshake (at most one per REKEY_TIMEOUT, retries apart),
        replacing any still in progress.  C{new_endpoint}: the peer moved to
        an endpoint the last initiation did not go to, which lifts the limit
        for this one (the limit is against repeating ourselves to one place).
        """
        device = self._device
        if device.closed:
            return
        if not is_retry:
            self.handshake_attempts = 0
        now = device._seconds()
        if new_endpoint:
            # Counted as a retry: moving the peer around does not stretch
            # REKEY_ATTEMPT_TIME for what is staged.
            self.handshake_attempts += 1
        elif now - self.last_initiation_sent < REKEY_TIMEOUT:
            return
        self.last_initiation_sent = now
        self.last_initiation_endpoint = self._endpoint
        self._forget_handshake()
        index = device._new_index()
        handshake = IKpsk2Handshake(
            True,
            device.private_key,
            device._random(32),
            remote_static=self.public_key,
            psk=self.preshared_key,
            state=self._initial_state,
            static_public=device.public_key,
            static_shared=device._static_shared,
        )
        try:
            body = handshake.write_message_1(tai64n(device._wall_clock()))
        except NoiseError:
            device.counters["handshake_error"] += 1
            return
        self.handshake = handshake
        self.handshake_index = index
        device._handshakes[index] = self
        message = self.cookies.add_macs(_INITIATION_HEAD.pack(MESSAGE_INITIATION, index) + body)
        device.counters["handshake_initiation_sent"] += 1
        self.transmit(message, now)
        self.timer_retransmit_handshake.mod(REKEY_TIMEOUT + device._jitter())

    # -- sessions -----------------------------------------------------------------

    def _forget_handshake(self) -> None:
        if self.handshake_index is not None:
            self._device._handshakes.pop(self.handshake_index, None)
        self.handshake = None
        self.handshake_index = None

    def begin_session(self, keypair: Keypair) -> None:
        """
        Install a new session.  An initiator's becomes current at once (it
        knows the responder has it); a responder's waits as C{next} until
        the initiator proves it has it too by sending on it.
        """
        device = self._device
        device._keypairs[keypair.local_index] = keypair
        previous, current, nxt = self.previous, self.current, self.next
        if keypair.is_initiator:
            if nxt is not None:
                self.next = None
                self.previous = nxt
                device._delete_keypair(current)
            else:
                self.previous = current
            device._delete_keypair(previous)
            self.current = keypair
        else:
            self.next = keypair
            device._delete_keypair(nxt)
            self.previous = None
            device._delete_keypair(previous)
        self.timer_zero_key_material.mod(REJECT_AFTER_TIME * 3)

    def received_with_next(self) -> None:
        """The initiator used the next session: it becomes current."""
        old = self.previous
        self.previous = self.current
        self.current = self.next
        self.next = None
        self._device._delete_keypair(old)

    def handshake_complete(self) -> None:
        device = self._device
        self.timer_retransmit_handshake.stop()
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False
        self.last_handshake = device._seconds()
        self.last_handshake_wall = device._wall_clock()
        device.counters["handshake_complete"] += 1

    def erase_sessions(self) -> None:
        """Drop every session and handshake in progress."""
        device = self._device
        for keypair in (self.previous, self.current, self.next):
            device._delete_keypair(keypair)
        self.previous = self.current = self.next = None
        self._forget_handshake()

    def stop_timers(self) -> None:
        for timer in (
            self.timer_retransmit_handshake,
            self.timer_send_keepalive,
            self.timer_new_handshake,
            self.timer_zero_key_material,
            self.timer_persistent_keepalive,
        ):
            timer.cancel()

    # -- timer expiry (wireguard-go device/timers.go) ------------------------------

    def _retransmit_handshake_expired(self) -> None:
        if self.handshake_attempts > MAX_TIMER_HANDSHAKES:
            # Gave up after REKEY_ATTEMPT_TIME: drop what waited for it.
            self.timer_send_keepalive.stop()
            self._device.counters["drop_handshake_timeout"] += len(self.staged)
            self.staged.clear()
            if not self.timer_zero_key_material.pending:
                self.timer_zero_key_material.mod(REJECT_AFTER_TIME * 3)
            return
        self.handshake_attempts += 1
        self._device.counters["handshake_retransmit"] += 1
        self.send_initiation(True)

    def _send_keepalive_expired(self) -> None:
        self.send_keepalive()
        if self.need_another_keepalive:
            self.need_another_keepalive = False
            self.timer_send_keepalive.mod(KEEPALIVE_TIMEOUT)

    def _new_handshake_expired(self) -> None:
        # We sent data KEEPALIVE_TIMEOUT + REKEY_TIMEOUT ago and heard nothing.
        self.send_initiation(False)

    def _zero_key_material_expired(self) -> None:
        self.erase_sessions()

    def _persistent_keepalive_expired(self) -> None:
        interval = self.persistent_keepalive
        if not interval:
            return
        remaining = self.last_traversal + interval - self._device._seconds()
        if remaining > 1e-6:
            # Traffic since the timer was set: wait for the rest of the interval.
            self.timer_persistent_keepalive.mod(remaining)
        else:
            self.send_keepalive()


class WireGuardDevice:
    """
    One WireGuard interface.  C{datagram_received} takes messages of types
    1 to 4 from the socket, C{send_packet} IP packets from the TUN device.

    Under load (more than C{handshakes_under_load} handshake messages in a
    second, or whatever the C{under_load} predicate says) handshake messages
    without a valid mac2 are answered with a cookie reply.
    """

    def __init__(
        self,
        private_key: bytes,
        clock: Any,  # IReactorTime (Any: mypy cannot check zope interfaces)
        send_datagram: Callable[[bytes, Endpoint], None],
        deliver_packet: Callable[[bytes], None],
        *,
        random: Callable[[int], bytes] = os.urandom,
        wall_clock: Callable[[], float] = time.time,
        under_load: Callable[[], bool] | None = None,
        handshakes_under_load: int = UNDER_LOAD_HANDSHAKES_PER_SECOND,
        max_staged_packets: int = MAX_STAGED_PACKETS,
        mtu: int | None = None,
    ) -> None:
        if len(private_key) != keys.KEY_LENGTH:
            raise ValueError("a private key is 32 bytes")
        self.private_key = private_key
        self.public_key = keys.public_key(private_key)
        self.clock = clock
        self._seconds = clock.seconds
        self._send_datagram = send_datagram
        self._deliver = deliver_packet
        self._random = random
        self._wall_clock = wall_clock
        self._under_load_predicate = under_load
        self.max_staged_packets = max_staged_packets
        self.mtu = mtu
        self.counters: collections.Counter[str] = collections.Counter()
        self.closed = False
        self._peers: dict[bytes, Peer] = {}
        # Asked to make a peer for a packet no peer routes, or a handshake
        # from a key no peer has (IPeerDemand; None: such packets are dropped).
        self.demand: Any = None
        self._keypairs: dict[int, Keypair] = {}
        self._handshakes: dict[int, Peer] = {}
        self._routes = AllowedIPs()
        self._cookie_checker = CookieChecker(self.public_key, clock, random)
        self._responder_state = initial_state(CONSTRUCTION, IDENTIFIER, self.public_key)
        self._handshake_times: collections.deque[float] = collections.deque(
            maxlen=handshakes_under_load + 1
        )
        self._under_load_until = -_INF

    # -- peers ------------------------------------------------------------------

    def add_peer(
        self,
        public_key: bytes,
        preshared_key: bytes | None = None,
        endpoint: Endpoint = None,
        allowed_ips: Iterable[str] = (),
        persistent_keepalive: int = 0,
    ) -> Peer:
        """
        Add a peer, or update one: a given preshared key, endpoint or
        non-empty AllowedIPs replace the old, persistent keepalive is set.
        """
        if len(public_key) != keys.KEY_LENGTH:
            raise ValueError("a public key is 32 bytes")
        if public_key == self.public_key:
            raise ValueError("a peer cannot have the interface's own public key")
        if preshared_key is not None and len(preshared_key) != keys.KEY_LENGTH:
            raise ValueError("a preshared key is 32 bytes")
        if not 0 <= persistent_keepalive <= 65535:
            raise ValueError("persistent keepalive is 0 to 65535 seconds")
        try:
            dh(self.private_key, public_key)
        except NoiseError:
            raise ValueError("the public key is a low-order point") from None
        allowed_ips = tuple(allowed_ips)
        peer = self._peers.get(public_key)
        if peer is None:
            peer = Peer(self, public_key, preshared_key, endpoint, persistent_keepalive)
            self._peers[public_key] = peer
        else:
            if preshared_key is not None:
                peer.preshared_key = preshared_key
            if endpoint is not None:
                peer.endpoint = peer.configured_endpoint = endpoint
            peer.persistent_keepalive = persistent_keepalive
        if allowed_ips:
            self._set_allowed_ips(peer, allowed_ips)
        if persistent_keepalive and peer.endpoint is not None:
            # As wg(8): turning persistent keepalive on sends one now.
            peer.send_keepalive()
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        peer = self._peers.pop(public_key, None)
        if peer is None:
            return
        peer.stop_timers()
        peer.erase_sessions()
        peer.staged.clear()
        for cidr in peer.allowed_ips:
            self._routes.remove(cidr, peer)
        peer.allowed_ips = ()

    def get_peer(self, public_key: bytes) -> Peer | None:
        return self._peers.get(public_key)

    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    def _set_allowed_ips(self, peer: Peer, cidrs: Iterable[str]) -> None:
        cidrs = list(cidrs)
        for cidr in cidrs:
            if not isinstance(cidr, str):
                raise ValueError(f"not a CIDR string: {cidr!r}")
        for cidr in peer.allowed_ips:
            self._routes.remove(cidr, peer)
        canonical: list[str] = []
        for cidr in cidrs:
            text, previous = self._routes.insert(cidr, peer)
            if previous is not None:
                # A prefix belongs to one peer: the newest configuration wins.
                previous.allowed_ips = tuple(c for c in previous.allowed_ips if c != text)
            if text not in canonical:
                canonical.append(text)
        peer.allowed_ips = tuple(canonical)

    def close(self) -> None:
        self.closed = True
        for peer in self._peers.values():
            peer.stop_timers()
            peer.erase_sessions()
            peer.staged.clear()

    # -- helpers ------------------------------------------------------------------

    def _new_index(self) -> int:
        """A random 32-bit index naming no live session or handshake here."""
        while True:
            index = int.from_bytes(self._random(4), "little")
            if index not in self._keypairs and index not in self._handshakes:
                return index

    def _static_shared(self, remote_static: bytes) -> bytes:
        """DH(our static, theirs): precomputed for known peers."""
        peer = self._peers.get(remote_static)
        if peer is not None:
            return peer.static_shared
        return dh(self.private_key, remote_static)

    def _jitter(self) -> float:
        """0 to 333 ms, so that peers' retries drift apart."""
        return (int.from_bytes(self._random(2), "little") % 334) / 1000.0

    def _delete_keypair(self, keypair: Keypair | None) -> None:
        if keypair is not None and self._keypairs.get(keypair.local_index) is keypair:
            del self._keypairs[keypair.local_index]

    def under_load(self) -> bool:
        """
        Whether to demand mac2: more than C{handshakes_under_load} handshake
        messages in the last second, and for a second after.
        """
        if self._under_load_predicate is not None:
            return self._under_load_predicate()
        return self._seconds() < self._under_load_until

    def _count_handshake_message(self) -> None:
        now = self._seconds()
        times = self._handshake_times
        times.append(now)
        if len(times) == times.maxlen and now - times[0] < 1.0:
            self._under_load_until = now + UNDER_LOAD_AFTER_TIME

    # -- sending --------------------------------------------------------------------

    def send_packet(self, packet: bytes) -> None:
        try:
            if len(packet) >= 20 and packet[0] >> 4 == 4:
                destination = packet[16:20]
            elif len(packet) >= 40 and packet[0] >> 4 == 6:
                destination = packet[24:40]
            else:
                self.counters["drop_malformed_outbound"] += 1
                return
            routes = self._routes
            peer: Peer | None = routes.cache.get(destination) or routes.lookup(destination)
            if peer is None:
                demand = self.demand
                if demand is not None and demand.peer_for_address(destination):
                    peer = routes.lookup(destination)
                if peer is None:
                    self.counters["drop_no_route"] += 1
                    return
            keypair = peer.current
            now = self._seconds()
            if (
                keypair is None
                or peer.staged
                or now >= keypair.reject_at
                or keypair.send_counter >= REJECT_AFTER_MESSAGES
            ):
                if self.closed:
                    self.counters["drop_closed"] += 1
                    return
                peer.stage(packet)
                peer.send_staged()
                return
            peer.encrypt_and_send(keypair, packet, now)
        except Exception:
            self.counters["drop_error"] += 1
            _log.failure("sending a packet failed")

    # -- receiving --------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Endpoint) -> None:
        # Transport data is handled inline, not in a method of its own: after
        # an idle spell every Python call on the per-packet path costs
        # microseconds of an idle round trip.
        try:
            if len(data) >= TRANSPORT_MIN_SIZE:
                word, index, counter = TRANSPORT_HEADER.unpack_from(data)
                if word == MESSAGE_TRANSPORT:
                    keypair = self._keypairs.get(index)
                    if keypair is None:
                        self.counters["drop_no_session"] += 1
                        return
                    now = self._seconds()
                    if now >= keypair.reject_at:
                        self.counters["drop_expired"] += 1
                        return
                    try:
                        plaintext = keypair.decrypt(
                            NONCE.pack(counter), memoryview(data)[16:], None
                        )
                    except InvalidTag:
                        self.counters["drop_decrypt"] += 1
                        return
                    if not keypair.replay.accept(counter):
                        self.counters["drop_replay"] += 1
                        return
                    peer = keypair.peer
                    peer.authenticated_received(addr, len(data), now)
                    if keypair is peer.next:
                        peer.received_with_next()
                        # The peer's handshake won: ours (if any) is no longer needed.
                        peer._forget_handshake()
                        peer.handshake_complete()
                        peer.send_staged()
                    current = peer.current
                    if (
                        current is not None
                        and current.is_initiator
                        and not peer.sent_last_minute_handshake
                        and now - current.created >= _LAST_MINUTE
                    ):
                        # The session is about to die and we rekey.
                        peer.sent_last_minute_handshake = True
                        peer.send_initiation(False)
                    if not plaintext:
                        self.counters["keepalive_received"] += 1
                        return
                    if peer.timer_send_keepalive.deadline is not None:
                        peer.need_another_keepalive = True
                    else:
                        peer.timer_send_keepalive.mod(KEEPALIVE_TIMEOUT)
                    version = plaintext[0] >> 4
                    size = len(plaintext)
                    if version == 4 and size >= 20:
                        length = (plaintext[2] << 8) | plaintext[3]
                        source = plaintext[12:16]
                    elif version == 6 and size >= 40:
                        length = 40 + ((plaintext[4] << 8) | plaintext[5])
                        source = plaintext[8:24]
                    else:
                        self.counters["drop_malformed_inner"] += 1
                        return
                    if length > size:
                        self.counters["drop_malformed_inner"] += 1
                        return
                    routes = self._routes
                    if (routes.cache.get(source) or routes.lookup(source)) is not peer:
                        self.counters["drop_allowed_ips"] += 1
                        return
                    if length < size:
                        plaintext = plaintext[:length]  # strip the padding
                    self._deliver(plaintext)
                    return
            kind = message_type(data)
            if kind == MESSAGE_INITIATION and len(data) == INITIATION_SIZE:
                self._receive_initiation(data, addr)
            elif kind == MESSAGE_RESPONSE and len(data) == RESPONSE_SIZE:
                self._receive_response(data, addr)
            elif kind == MESSAGE_COOKIE_REPLY and len(data) == COOKIE_REPLY_SIZE:
                self._receive_cookie_reply(data)
            else:
                self.counters["drop_malformed"] += 1
        except Exception:
            self.counters["drop_error"] += 1
            _log.failure("handling a datagram from {addr!r} failed", addr=addr)

    def _check_macs(self, data: bytes, mac1_offset: int, sender_index: int, addr: Endpoint) -> bool:
        """mac1 always; mac2 under load, answering a cookie when it is missing."""
        self._count_handshake_message()
        checker = self._cookie_checker
        if not checker.check_mac1(data, mac1_offset):
            self.counters["drop_mac1"] += 1
            return False
        if self.under_load() and not checker.check_mac2(data, mac1_offset, addr):
            self._send_datagram(checker.make_reply(data, mac1_offset, sender_index, addr), addr)
            self.counters["cookie_sent"] += 1
            return False
        return True

    def _receive_initiation(self, data: bytes, addr: Endpoint) -> None:
        sender = INITIATION.unpack_from(data)[1]
        if not self._check_macs(data, INITIATION_MAC1, sender, addr):
            return
        handshake = IKpsk2Handshake(
            False,
            self.private_key,
            self._random(32),
            state=self._responder_state,
            static_public=self.public_key,
            static_shared=self._static_shared,
        )
        try:
            timestamp = handshake.read_message_1(data[8:INITIATION_MAC1])
        except NoiseError:
            self.counters["drop_handshake_decrypt"] += 1
            return
        remote: bytes = handshake.remote_static  # type: ignore[assignment]
        peer = self._peers.get(remote)
        if peer is None:
            demand = self.demand
            if demand is not None and demand.peer_for_key(remote):
                peer = self._peers.get(remote)
            if peer is None:
                self.counters["drop_no_peer"] += 1
                return
        now = self._seconds()
        if timestamp <= peer.last_timestamp:
            # A replayed (or reordered, older) initiation.
            self.counters["drop_handshake_replay"] += 1
            return
        if now - peer.last_initiation_consumed <= HANDSHAKE_INITIATION_RATE:
            self.counters["drop_handshake_flood"] += 1
            return
        if self.closed:
            return
        peer.last_timestamp = timestamp
        peer.last_initiation_consumed = now
        peer.authenticated_received(addr, len(data), now)
        # Unlike wireguard-go, an initiation of ours still unanswered is kept:
        # when both sides initiate at once (both had packets waiting for the
        # same new path), the response to ours still completes it, instead
        # of both answers being dropped and both sides waiting REKEY_TIMEOUT.
        handshake.psk = peer.preshared_key
        index = self._new_index()
        try:
            body = handshake.write_message_2(b"")
        except NoiseError:
            self.counters["handshake_error"] += 1
            return
        send_key, receive_key = handshake.split()
        peer.begin_session(Keypair(peer, send_key, receive_key, index, sender, now, False))
        message = peer.cookies.add_macs(_RESPONSE_HEAD.pack(MESSAGE_RESPONSE, index, sender) + body)
        self.counters["handshake_response_sent"] += 1
        peer.transmit(message, now)

    def _receive_response(self, data: bytes, addr: Endpoint) -> None:
        _, sender, receiver = _RESPONSE_HEAD.unpack_from(data)
        if not self._check_macs(data, RESPONSE_MAC1, sender, addr):
            return
        peer = self._handshakes.get(receiver)
        if peer is None or peer.handshake is None:
            self.counters["drop_no_session"] += 1
            return
        handshake = peer.handshake
        try:
            handshake.read_message_2(data[12:RESPONSE_MAC1])
        except NoiseError:
            self.counters["drop_handshake_decrypt"] += 1
            return
        if self.closed:
            return
        now = self._seconds()
        peer._forget_handshake()
        peer.authenticated_received(addr, len(data), now)
        send_key, receive_key = handshake.split()
        peer.begin_session(Keypair(peer, send_key, receive_key, receiver, sender, now, True))
        peer.handshake_complete()
        # Confirm the session to the responder at once: staged data, or a keepalive.
        peer.send_keepalive()

    def _receive_cookie_reply(self, data: bytes) -> None:
        _, receiver, nonce, encrypted = COOKIE_REPLY.unpack(data)
        peer = self._handshakes.get(receiver)
        if peer is None:
            keypair = self._keypairs.get(receiver)
            peer = keypair.peer if keypair is not None else None
        if peer is None:
            self.counters["drop_no_session"] += 1
            return
        if peer.cookies.consume_reply(nonce, encrypted):
            self.counters["cookie_received"] += 1
        else:
            self.counters["drop_cookie"] += 1


# Declared here rather than with @implementer: a class decorator would make
# the compiled build (docs/performance.md) compile these as plain Python
# classes, and they are the per-packet objects.
classImplements(Peer, IWireGuardPeer)
classImplements(WireGuardDevice, IWireGuardDevice)
