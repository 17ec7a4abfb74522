"""
Console sessions, kept on the server: a random ID in a cookie
(C{HttpOnly; Secure; SameSite=Strict}), a CSRF token per session, an idle
and an absolute lifetime, and the password generation they were made
under (a new password ends them).  Sign-in attempts are rate-limited per
source address.  Time comes from a clock, so tests run on a C{Clock}.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IReactorTime

from twistvpn.common.ratelimit import TokenBuckets
from twistvpn.rendezvous.webpassword import WebPassword

IDLE = 12 * 3600.0
ABSOLUTE = 7 * 86400.0
MAX_SESSIONS = 10_000
# Sign-in: bursts of 5 attempts per source address, then one a minute.
SIGNIN_BURST = 5
SIGNIN_RATE = 1 / 60


@dataclass
class Session:
    id: str
    csrf: str
    created: float
    last_seen: float
    generation: int
    signed_in: bool = False
    # Messages for the next page: {"where": "message"} ("ip:NODE", "network"...)
    flash: dict[str, str] = field(default_factory=dict)

    def csrf_ok(self, token: Any) -> bool:
        return isinstance(token, str) and hmac.compare_digest(
            token.encode("utf-8", "replace"), self.csrf.encode("ascii"))


class Sessions:
    """Sessions by ID; expired ones are gone when next looked up (and pruned when full)."""

    def __init__(self, clock: IReactorTime, password: WebPassword, *, idle: float = IDLE,
                 absolute: float = ABSOLUTE, max_sessions: int = MAX_SESSIONS) -> None:
        self._clock = clock
        self.password = password
        self.idle = idle
        self.absolute = absolute
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self.signin_limits = TokenBuckets(clock, SIGNIN_RATE, SIGNIN_BURST)

    def __len__(self) -> int:
        return len(self._sessions)

    def new(self, signed_in: bool = False) -> Session:
        now = self._clock.seconds()
        if len(self._sessions) >= self.max_sessions:
            self._prune(now)
            if len(self._sessions) >= self.max_sessions:
                # Anonymous ones go first: a flood of page views must not end sign-ins.
                for sid in [s.id for s in self._sessions.values() if not s.signed_in]:
                    del self._sessions[sid]
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now,
                          self.password.generation, signed_in)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this ID (touched), or None."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock.seconds()
        if not self._alive(session, now):
            del self._sessions[session.id]
            return None
        session.last_seen = now
        return session

    def _alive(self, session: Session, now: float) -> bool:
        return (now - session.last_seen < self.idle and now - session.created < self.absolute
                and session.generation == self.password.generation)

    def _prune(self, now: float) -> None:
        for sid in [s.id for s in self._sessions.values() if not self._alive(s, now)]:
            del self._sessions[sid]

    def end(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def sign_in(self, session: Session | None) -> Session:
        """A fresh signed-in session replaces C{session} (no fixation)."""
        if session is not None:
            self.end(session)
        return self.new(signed_in=True)
