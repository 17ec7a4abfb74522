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

    def add_route(cidr, source=None):
        """
        Route the prefix C{cidr} through the device; with C{source} (one
        of its addresses), packets to it leave from that address (a node in
        several networks speaks to each from its address there).  Adding it
        again with another source replaces it.
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


class IBatchReader(Interface):
    """
    A descriptor that reads a batch per reactor wake-up (the TUN device, the
    node's UDP port).  The node's data path pairs the two: each holds the
    other side's write window open while it reads, so that what its batch
    produced leaves together when the batch ends.
    """

    read_batch_window = Attribute(
        "The BatchWindow (twistvpn.node.fastpath) held open while a batch is "
        "read, or None: set by the data path."
    )


class IWindowedTunDevice(ITunDevice, IBatchReader):
    """
    A TUN device that writes in batches (joined into GSO writes) and can
    look for the answer after sending a lone packet.
    """

    window = Attribute("The BatchWindow that decides when written packets are flushed.")
    answer_wait = Attribute(
        "Seconds to look for the answer after a lone packet was sent (0: never)."
    )
    after_lone_read = Attribute(
        "Called after a read that delivered a lone packet, or None: set by the data path."
    )
    counters = Attribute("A Counter of what the device did and dropped.")


class IReadinessPort(IBatchReader):
    """The node's UDP port as the answer wait uses it: asked, then read."""

    readiness = Attribute(
        "Its Readiness (twistvpn.node.fastpath): whether a datagram is queued, "
        "asked without reading; None once closed."
    )

    def doRead():
        """Read the datagrams that are queued (and dispatch them)."""


class IDataPlaneReactor(Interface):
    """
    A reactor that can dispatch the data plane's busiest descriptors with
    less work per event than its other ones.
    """

    def addDataPlaneReader(reader):
        """
        Like C{IReactorFDSet.addReader}, for a reader whose C{doRead} is
        called directly on a plain read event, without the logging context
        the reactor otherwise sets up; C{removeReader} removes it.
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

    def dispatch(data, addr):
        """
        Hand C{data} to the handler of its kind as if it had arrived on the
        socket from C{addr}: how datagrams that came another way (through a
        relay, on an extra socket) join the node's, so that WireGuard's
        roaming follows a peer onto that path.  Never raises.
        """

    def register_route(endpoint_type, send):
        """
        Send datagrams whose endpoint is an instance of C{endpoint_type}
        (not a (host, port) tuple: a relay's, an extra socket's) with
        C{send(data, endpoint)} instead of the socket.
        """

    def send_hop_limited(data, addr, hops):
        """
        Send C{data} to C{addr}, a (host, port) tuple, with an IP time to
        live (hop limit) of C{hops}: it passes our own NAT router, so the
        router maps it, and dies in the network before it reaches the
        peer's router.  Where the socket cannot limit hops the datagram
        goes out as usual, counted.  Never raises for a network error.
        """


class IHopLimitedWriter(Interface):
    """
    A UDP transport that can send one datagram with a short time to live,
    without changing what its other datagrams get.
    """

    def write_hop_limited(data, addr, hops):
        """
        Send C{data} to C{addr} ((host, port)) with a hop limit of C{hops}
        (1 to 255).  Raises C{OSError} as C{write} would.
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


class IPeerDemand(Interface):
    """
    Where a node's data plane turns when it meets a member it keeps no peer
    for (lazy peers in big networks, docs/node.md): a packet to the
    member's address, a handshake or a probe from its key.  The node makes
    the peer then, or says there is none.
    """

    def peer_for_address(destination):
        """
        A packet is going to C{destination} (4 or 16 bytes): make the peer
        of the member with that overlay address, if there is one.  True
        when a peer routes it now.
        """

    def peer_for_key(public_key):
        """
        C{public_key} proved itself (a handshake, a probe's MAC): make its
        peer if it is a member.  True when the peer exists now.
        """

    def key_for_probe_id(sender_id):
        """
        The public key of the member whose probes carry C{sender_id}
        (L{twistvpn.traversal.probe.peer_id}), or None.
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


class ITraversalContext(Interface):
    """
    Everything one traversal strategy may use to reach one peer, handed in
    explicitly so that a strategy can be tested alone.  Probes sent through
    it are authenticated; a probe that is answered verifies a path, which
    the context reports to the path manager (and lists in C{verified}).
    """

    strategy = Attribute("The name of the strategy this context serves (str).")
    local = Attribute("This node's candidates (twistvpn.traversal.Candidates).")
    peer = Attribute("The peer's candidates (twistvpn.traversal.Candidates).")
    peer_key = Attribute("The peer's static public key (32 bytes).")
    is_initiator = Attribute(
        "True on exactly one of the two sides (the lower public key), so "
        "that asymmetric strategies can pick roles without talking."
    )
    clock = Attribute("An IReactorTime; strategies never use real time.")
    random = Attribute("A random.Random; seeded in tests.")
    probes_sent = Attribute("Probes sent through this context (int).")
    verified = Attribute("Paths verified by this context's probes (list).")

    def send_probe(endpoint, hop_limit=None):
        """
        Send one authenticated probe to C{endpoint}: a (host, port) tuple,
        from the node's UDP socket, or an endpoint of a socket from
        L{open_socket}.  Its answer, if any, verifies the path.  With
        C{hop_limit} (an int) the probe is an opener: it makes this side's
        NAT map the path but dies before the peer's router (see
        L{twistvpn.traversal.strategies.OPEN_HOPS}); a probe that arrives
        all the same is answered as any other.
        """

    def open_socket():
        """
        Open an extra UDP socket (for strategies that need many NAT
        mappings) and return it; C{socket.endpoint(addr)} names C{addr} as
        reached from that socket.  Sockets close with the context unless a
        verified path uses them.
        """


class ITraversalStrategy(Interface):
    """
    A way of finding a direct path to a peer through NATs.  Found as a
    plugin (C{twisted.plugin.getPlugins(ITraversalStrategy,
    twistvpn.plugins)}), so the objects also provide C{IPlugin}.
    """

    name = Attribute("A short unique name (str), carried in probes.")

    def applicable(context):
        """
        Return True when this strategy can help with the peer described by
        C{context} (an L{ITraversalContext}); inapplicable strategies are
        not started.  Both peers see the same candidates, so both decide
        alike.
        """

    def start(context):
        """
        Start sending probes through C{context}; return a Deferred that
        fires (with None) when the strategy has nothing more to try.
        Cancelling the Deferred stops it at once.  Verified paths are
        reported by the context, not by the Deferred.
        """


class IRelayProvider(Interface):
    """
    The path of last resort: a relay that carries a peer's encrypted
    datagrams when no direct path exists.
    """

    def open_relay(peer_key):
        """
        Return a Deferred firing with an endpoint through which datagrams
        reach the peer with static public key C{peer_key} via a relay; the
        forwarder routes it (C{Forwarder.register_route}).  Fails when no
        relay is reachable.
        """

    def close_relay(peer_key):
        """
        Release the relay path to C{peer_key}; unknown keys are ignored.
        """


class IPathManager(Interface):
    """
    Chooses and keeps the best working path to one peer: runs traversal
    strategies, ranks verified paths (LAN, then direct, then relay; then by
    round-trip time), keeps the chosen one alive and falls back when it dies.
    """

    kind = Attribute("'lan', 'direct', 'relay' or 'none' (str).")
    endpoint = Attribute("The chosen path's endpoint, or None.")
    rtt = Attribute("The chosen path's smoothed round-trip time (s), or None.")
    history = Attribute("Past and current attempts, oldest first (list).")

    def start():
        """Begin finding a path (an attempt starts at once)."""

    def stop():
        """Stop every strategy, timer and socket; leave the peer's endpoint."""

    def update_candidates(local=None, peer=None):
        """
        New candidates from the rendezvous (C{None} keeps the old); an
        attempt starts at once when no direct path is in use.
        """

    def punch_now():
        """
        The rendezvous says both sides start now: begin an attempt at once,
        resetting the retry backoff.
        """

    def status():
        """
        A dict for the status CLI: kind, endpoint, rtt, strategy, and the
        attempts' history.
        """


# --- the rendezvous (see twistvpn.rendezvous) -------------------------------


class IControlSession(Interface):
    """
    The rendezvous's side of one node's control connection, as the
    controller sees it: where it pushes that node's news.
    """

    public_key = Attribute("The registered node's static public key (32 bytes).")
    rtt = Attribute("The last measured round-trip time in seconds, or None.")

    def send_map(network_id, netmap):
        """
        Push C{netmap} (a L{twistvpn.rendezvous.netmap.NetworkMap}) of
        network C{network_id} (str), replacing any map sent before.
        """

    def send_map_delta(network_id, delta):
        """
        Push the change (a L{twistvpn.rendezvous.netmap.MapDelta}) from the
        last map sent on this session to the current one.
        """

    def send_punch(network_id, punch):
        """
        Tell the node to start traversal towards a peer now: C{punch} is a
        L{twistvpn.rendezvous.netmap.Punch}.
        """

    def send_revoked(network_id, reason):
        """
        Tell the node it is no longer an authorized member of
        C{network_id}: C{reason} is "deauthorized", "deleted" or
        "network deleted".  It must drop every peer of that network.
        """

    def close(reason):
        """
        End the connection (a newer one for the same node replaced it, or
        the service is stopping); C{reason} (str) is for the log.
        """


class INetworkController(Interface):
    """
    The network controller as its front ends (the AMP control protocol, UDP
    discovery, the admin API) use it.  Changes are persisted before a call
    returns; pushes to connected nodes follow shortly after.
    """

    def register_node(public_key, name, session):
        """
        Record a node that proved possession of C{public_key} and attach
        its L{IControlSession}, closing any older session of the same node.
        Returns the node ID (str) admins see.
        """

    def set_version(public_key, version):
        """The twistvpn version a registered node runs (for admins)."""

    def rename_node(public_key, name):
        """
        A registered node's new name (C{twistvpn set name}); its networks'
        maps carry it to the peers.
        """

    def detach(session):
        """
        The connection of C{session} is gone: the node is offline and its
        subscriptions end.  Unknown sessions are ignored.
        """

    def join(public_key, network_id, auth_key=None):
        """
        Make the registered node a member of C{network_id} (pending unless
        the network is public or C{auth_key} is a valid pre-auth key for it)
        and subscribe its session to the network's map.  Returns
        "authorized" or "pending".
        """

    def join_with_key(public_key, network_id, auth_key):
        """
        As L{join}; returns (status, why the key was refused or None), the
        reason for the node, which never sees the key again.
        """

    def create_key(network_id, reusable=False, expires_in=None, name_prefix=None):
        """
        Make a pre-auth key for C{network_id}; return its description with
        C{secret}, which is shown this once and stored only as a hash.
        """

    def list_keys(network_id=None):
        """Every pre-auth key's description (never its secret)."""

    def revoke_key(key_id):
        """Revoke a pre-auth key at once."""

    def leave(public_key, network_id):
        """
        Stop sending C{network_id}'s map to the node; membership stays.
        """

    def set_local_endpoints(public_key, endpoints):
        """
        Record the node's own (LAN) addresses, a sequence of "host:port".
        """

    def set_mapped_endpoints(public_key, endpoints):
        """
        Record the public addresses the node's gateway forwards to it (PCP,
        NAT-PMP), a sequence of "host:port"; peers' maps carry them.
        """

    def resend_map(public_key, network_id):
        """
        Send the node the full current map of C{network_id}: its copy could
        not take the last delta.
        """

    def is_registered(public_key):
        """Whether C{public_key} ever registered (discovery answers only those)."""

    def failover_spread():
        """
        Over how many seconds this instance's nodes should spread their
        moves to the others if it dies: its node count over what the
        survivors can register, so that they are not all met at once.
        """

    def status():
        """Counts and counters for the admin API (a dict)."""

    def record_endpoint(public_key, endpoint, which):
        """
        Record the address (a (host, port) tuple) at which discovery port
        C{which} (0 or 1) saw the node.  Returns False for unknown nodes.
        """

    def request_punch(public_key, network_id, peer_key):
        """
        Coordinate traversal between the node and C{peer_key}, both
        authorized members of C{network_id} and online.
        """

    def create_network(name, subnet=None, private=True, force=False):
        """
        Create a network and return its description (a dict with "id").
        Without C{subnet}, a free /24 of 100.64.0.0/10 is used.  A name
        another network has is refused unless C{force}.
        """

    def list_networks():
        """Every network's description (list of dicts)."""

    def get_network(network_id):
        """One network's description; unknown IDs raise NotFoundError."""

    def update_network(network_id, name=None, domain=None, private=None):
        """
        Rename a network, set its members' DNS domain ("": back to
        NAME.twistvpn.internal) and/or its access (private: members need
        authorization); its members get the new map.  Returns the network's
        description.
        """

    def delete_network(network_id):
        """Delete a network, telling its connected members."""

    def list_members(network_id):
        """Every member of a network (list of dicts)."""

    def get_member(network_id, node):
        """One member (C{node}: node ID or public key in text form)."""

    def authorize(network_id, node):
        """
        Authorize a member (C{node}: node ID or public key in text form),
        assigning the next free IP unless it has one.  Returns the member.
        """

    def deauthorize(network_id, node):
        """Revoke a member's authorization at once.  Returns the member."""

    def delete_member(network_id, node):
        """Remove a member and release its IP."""

    def update_member(network_id, node, authorized=None, ip=None, name=None):
        """
        Change what is given of a member (its authorization, its address,
        its name in the network: "" gives it back the node's own) in one
        step: looked up once, written in one transaction, so a refused
        change leaves the others unmade.  Returns the member.
        """

    def add_membership_observer(observer):
        """Tell C{observer} (an L{IMembershipObserver}) of every change from now on."""

    def remove_membership_observer(observer):
        """Stop telling C{observer}; unknown observers are ignored."""

    def authorized_members():
        """Every network's authorized members now: {network_id: frozenset of keys}."""

    def authorized_devices(network_id=None):
        """
        Every network's (or only C{network_id}'s) authorized stock WireGuard
        devices now (those of L{authorized_members} that are devices):
        {network_id: frozenset of keys}.
        """

    def add_device(network_id, name, public_key):
        """
        Add a stock WireGuard device (32-byte public key; its private key is
        never given) to a network: a member of kind "device", authorized at
        once, with a managed IP.  Returns the member's description.
        """

    def device_config(network_id, node):
        """
        What a device's wg-quick file needs (a dict): its addresses, the DNS
        server when members have names, and one peer per authorized node of
        the network (key, overlay addresses) with the relay it is reached
        through.
        """

    def set_ip(network_id, node, ip):
        """
        Give a member C{ip} (str), which must be a host address of the
        network's subnet that no other member has.  Returns the member.
        """


class IChannelBinding(Interface):
    """
    A connection that can name itself: what a proof sent on it is bound to,
    so the proof is worthless on any other connection (RFC 5929's idea, with
    RFC 8446's exporter).
    """

    channel_binding = Attribute(
        "Bytes both ends agree on once the channel is keyed: the TLS exporter "
        "of this connection and the fingerprint of the server's certificate "
        "(the identity a node pins); empty before."
    )


class IRendezvousListener(Interface):
    """
    What a node does with the news its control connection brings (the
    node-side client calls these).
    """

    def connected(node_id):
        """
        Registration succeeded on a new connection (C{node_id} is this
        node's ID as admins see it).  Joins are sent next.
        """

    def disconnected(reason):
        """
        The control connection is gone (C{reason}: str); the client
        reconnects by itself.  Maps received so far stay valid.
        """

    def join_status(network_id, status):
        """
        The rendezvous answered a join: "authorized", "pending", or "not
        found" (it does not know the network: that network alone fails).
        """

    def map_received(network_id, netmap):
        """
        A new L{twistvpn.rendezvous.netmap.NetworkMap} of C{network_id}
        replaces the previous one.
        """

    def punch_requested(network_id, punch):
        """
        Start traversal towards C{punch.peer_key} after C{punch.delay}
        seconds (a L{twistvpn.rendezvous.netmap.Punch}).
        """

    def revoked(network_id, reason):
        """
        This node is no longer an authorized member of C{network_id}: drop
        its peers.  C{reason} as in L{IControlSession.send_revoked}.
        """



class IMapReader(Interface):
    """
    How a node's rendezvous client turns pushed bytes into network maps.
    Maps are immutable, so a reader may hand the same map to many clients
    (the benchmark's thousands of simulated nodes in one process).
    """

    def read_map(data):
        """
        The L{twistvpn.rendezvous.netmap.NetworkMap} in C{data} (JSON);
        raises L{twistvpn.rendezvous.netmap.MapError} if it is malformed.
        """

    def apply_delta(base, data):
        """
        The map C{base} becomes with the delta in C{data} (JSON); raises
        L{twistvpn.rendezvous.netmap.MapError} if C{data} is malformed or
        is not based on C{base}'s revision.
        """


class IMembershipObserver(Interface):
    """
    Told of every change of networks and their members as it is made (the
    map publisher, the relays' policy), so nothing needs to poll.
    """

    def members_changed(network_id, authorized, devices):
        """
        What the members of C{network_id} see may have changed (an
        authorization, an address, a member gone); C{authorized} is the
        frozenset of the network's authorized members' public keys now
        (empty when the network was deleted), C{devices} the frozenset of
        those that are stock WireGuard devices.
        """

    def member_revoked(network_id, public_key, reason):
        """
        The node C{public_key} lost C{network_id}: C{reason} is
        "deauthorized", "deleted" or "network deleted".
        """

    def network_deleted(network_id):
        """The network is gone, with its members."""


class IRendezvousCluster(Interface):
    """
    This rendezvous instance's part in a rendezvous of several sharing one
    database: what only this instance knows (who is connected here, and
    where discovery sees them) goes to the others through it.
    """

    alive = Attribute("How many instances the database has sessions of (this one too).")

    def node_changed(node):
        """
        The facts of C{node} (a registry Node whose session is here, or
        that just left) that members' maps show changed: tell the others.
        """

    def punch(owner, network_id, public_key, punch):
        """
        Ask the instance C{owner} (as the node's Node.elsewhere names it)
        to send C{punch} to the node C{public_key} connected there.
        """

    def announce_relays(relays):
        """
        This instance's relays (a tuple of the dicts maps list) are these
        now: the other instances list them too.
        """

    def relays_elsewhere():
        """The relays the other live instances announced (a tuple of dicts)."""

    def on_relays_elsewhere(callback):
        """Call C{callback()} whenever L{relays_elsewhere} changes."""


class IRendezvousStore(Interface):
    """
    The rendezvous's persistent state: nodes, networks, members.  Every
    write is one transaction (all of it or none); reads return plain
    records (L{twistvpn.rendezvous.store}).  The controller's parts hold no
    SQL: a store for another database implements this.
    """

    def load_nodes():
        """Every node ever registered (a list of NodeRecord)."""

    def get_node(public_key):
        """The NodeRecord of C{public_key}, or None."""

    def get_node_by_id(node_id):
        """The NodeRecord whose node ID is C{node_id} (10 hex digits), or None."""

    def add_node(public_key, node_id, name, now):
        """Record a new node; returns its NodeRecord."""

    def add_device(public_key, node_id, name, network_id, ip, now):
        """
        Record a stock WireGuard device and its authorized membership of
        C{network_id} with C{ip}, in one transaction; returns (NodeRecord,
        MemberRecord).
        """

    def update_node(public_key, last_seen, name=None):
        """Record when a node was last seen (and its new name, if given)."""

    def set_endpoint(public_key, which, endpoint, last_seen):
        """Record the "host:port" discovery port C{which} (0 or 1) saw."""

    def set_local_endpoints(public_key, endpoints):
        """Record a node's own (LAN) addresses, a tuple of "host:port"."""

    def get_network(network_id):
        """The NetworkRecord of C{network_id}, or None."""

    def list_networks():
        """Every NetworkRecord, oldest first."""

    def count_networks():
        """How many networks there are."""

    def count_members(network_id):
        """(members, authorized members) of a network."""

    def subnets():
        """Every network's subnet (CIDR text): what a new network must avoid."""

    def add_network(network_id, name, subnet, private, now):
        """Create a network; returns its NetworkRecord, or None if the ID is taken."""

    def delete_network(network_id):
        """Delete a network and its members; returns the members' keys."""

    def update_network(network_id, name, domain, private):
        """
        Rename a network, set its DNS domain (None: the default) and its
        access, in one transaction; returns the new NetworkRecord, or None
        if it is gone.
        """

    def revisions():
        """Every network's last published map revision, {network_id: int}."""

    def set_revision(network_id, revision):
        """Record the revision of the map just published for C{network_id}."""

    def get_member(network_id, public_key):
        """The MemberRecord of a node in a network, or None."""

    def list_members(network_id, authorized_only=False):
        """A network's MemberRecords, oldest first."""

    def member_networks(public_key):
        """The IDs of the networks C{public_key} is an authorized member of."""

    def authorized_members():
        """Every network's authorized members: {network_id: frozenset of keys}."""

    def authorized_devices(network_id=None):
        """
        Every network's (or C{network_id}'s) authorized devices:
        {network_id: frozenset of keys}.
        """

    def used_ips(network_id):
        """The set of addresses (text) members of a network hold."""

    def ip_holder(network_id, ip):
        """The key of the member holding C{ip} in the network, or None."""

    def add_member(network_id, public_key, now, authorized, ip):
        """Make a node a member (authorized or pending, with C{ip} or None)."""

    def update_member(network_id, public_key, authorized, ip, name=None):
        """Set a member's authorization, address and name (None: the node's) together."""

    def delete_member(network_id, public_key):
        """Remove a member (its address is free again)."""

    def add_key(key, secret_hash):
        """Record a pre-auth key (a KeyRecord) by its secret's hash; never the secret."""

    def key_by_hash(secret_hash):
        """The KeyRecord whose secret hashes to C{secret_hash}, or None."""

    def list_keys(network_id=None):
        """Every KeyRecord, or a network's, oldest first."""

    def revoke_key(key_id):
        """Revoke a key; False if there is no such key."""

    def join_with_key(key_id, network_id, public_key, now, ip, single_use, name=None):
        """
        In one transaction: spend a use of the key (a single-use key only if
        unused) and make the node an authorized member with C{ip} and
        C{name} (unless it has them).  Returns its MemberRecord, or None if
        the key was spent.
        """

    def close():
        """Release the database."""


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

    def device_reachable():
        """
        Return the keys (a frozenset) of the nodes that stock WireGuard
        devices may reach through the relay: the authorized nodes of the
        networks that have devices.  A plain value, asked often: the relay
        tries their mac1 keys on every device's handshake initiation.
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


class IRendezvousRelays(Interface):
    """
    The relays a rendezvous hosts (its embedded one, the link standalone
    ones log in to), as the rendezvous service sees them: the relay
    package builds them and the rendezvous's tap attaches them, so the
    rendezvous package never imports the relay.
    """

    def stats():
        """
        Return a dict for the admin API: C{embedded}, the embedded relay's
        counters (None when there is none), and C{standalone}, a list of
        the linked relays.
        """

    def metrics():
        """
        Return the embedded relay's Prometheus families
        (L{twistvpn.common.metrics.Family}); none without one.
        """


class INodeControl(Interface):
    """
    What the local API changes on a running joined node: applied at once
    and persisted in the node's settings for the next start.
    """

    def join(network_id, auth_key=None):
        """
        Join C{network_id} now and at every start; C{auth_key}, a pre-auth
        key, is kept until the network authorizes the node.  Fires with
        the rendezvous's answer ("authorized", "pending", "not found"), or
        None while it is unreachable (the join is sent once it answers).
        """

    def leave(network_id):
        """
        Leave C{network_id}: its address, routes and peers go at once, the
        rendezvous is told, and the next start does not join it.
        """

    def networks_status():
        """Each joined network: C{id}, C{name}, C{status}, C{ip}, C{subnet}, C{domain}."""

    def set_setting(key, value):
        """
        Change setting C{key} (one of L{twistvpn.node.settings.SETTABLE}).
        Returns True when the running node applied it, False when it
        applies at the next start.
        """


class INameService(Interface):
    """The node's name server: answers its networks' names from the maps."""

    def update(table, addresses):
        """
        Answer from C{table} (a L{twistvpn.node.names.NameTable}) from now
        on, listening on exactly C{addresses} (the node's overlay
        addresses, CIDR or bare).
        """

    def stop():
        """Stop listening and undo what the system was told; a Deferred."""
