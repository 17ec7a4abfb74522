"""
The console's listener: HTTPS with the rendezvous's own certificate (or
the CA-issued one it was given) on the C{--web} endpoint.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.server import Site

from twistvpn.common import tls
from twistvpn.common.services import StreamListener, quiet
from twistvpn.console.sessions import Sessions
from twistvpn.console.web import Console
from twistvpn.rendezvous.service import RendezvousService


def console_listener(reactor: Any, rendezvous: RendezvousService, endpoint: str) -> StreamListener:
    """A listener (not yet started) serving the console of C{rendezvous} on C{endpoint}."""
    sessions = Sessions(reactor, rendezvous.web_password)
    site = quiet(Site(Console(rendezvous.admin_api, sessions, reactor)))
    options = tls.server_options(rendezvous.data.cert_pem, rendezvous.data.key_pem)
    factory = quiet(TLSMemoryBIOFactory(options, False, site))
    return StreamListener(serverFromString(reactor, endpoint), factory)
