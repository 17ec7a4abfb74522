"""
The web console's admin password: kept only as a memory-hard hash
(C{hashlib.scrypt}, a fresh salt per password) in the rendezvous's data
directory, set through the admin API (C{twistvpn admin web-password}).

Every change bumps L{WebPassword.generation}, and console sessions carry
the generation they were made under: a new password ends them all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Callable

from twistvpn.common.datadir import write_atomically

# scrypt's cost: 2**15 x 8 x 128 bytes = 32 MiB and ~60 ms per guess.
N, R, P = 2**15, 8, 1
SALT_BYTES = 16
HASH_BYTES = 32
MIN_LENGTH = 10
MAX_LENGTH = 1024
SCHEME = "scrypt"


class PasswordError(ValueError):
    """A password that cannot be used, or a stored hash that cannot be read."""


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=2 * 128 * n * r * p, dklen=HASH_BYTES)


def hash_password(password: str) -> str:
    """C{scrypt$N$r$p$SALT$HASH} (base64), for a new password."""
    check_password(password)
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(password, salt, N, R, P)
    b64 = base64.b64encode
    return f"{SCHEME}${N}${R}${P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether C{password} makes C{stored}; compared in constant time."""
    try:
        scheme, n, r, p, salt, digest = stored.strip().split("$")
        if scheme != SCHEME:
            raise ValueError(scheme)
        expected = base64.b64decode(digest, validate=True)
        computed = _scrypt(password[:MAX_LENGTH], base64.b64decode(salt, validate=True),
                           int(n), int(r), int(p))
    except ValueError:
        raise PasswordError("the stored web password is not a scrypt hash") from None
    return hmac.compare_digest(computed, expected)


def check_password(password: object) -> str:
    if not isinstance(password, str) or not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise PasswordError(f"a web password is {MIN_LENGTH} to {MAX_LENGTH} characters")
    if not password.isprintable():
        raise PasswordError("a web password is printable characters only")
    return password


class WebPassword:
    """The password file, and the generation that sessions are checked against."""

    def __init__(self, path: str, hasher: Callable[[str], str] = hash_password) -> None:
        self.path = path
        self._hash = hasher
        self.generation = 0
        self._stored: str | None = self._read()

    def _read(self) -> str | None:
        try:
            with open(self.path, encoding="ascii") as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    @property
    def is_set(self) -> bool:
        return self._stored is not None

    def set(self, password: str) -> None:
        """A new password (checked, hashed, written atomically); sessions end."""
        stored = self._hash(password)
        write_atomically(self.path, stored + "\n", mode=0o600)
        self._stored = stored
        self.generation += 1

    def verify(self, password: str) -> bool:
        if self._stored is None or not isinstance(password, str):
            return False
        return verify_password(password, self._stored)
