"""
Data directories and the X25519 keys in them, made in one place for the
node, the relay and the rendezvous: the directory is created 0700 on
first start (and tightened if it is not), a key is created 0600 with
C{O_EXCL} (two starts at once cannot write two keys), and every failure
is one line naming the file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from twistvpn.wireguard.keys import InvalidKey, decode_key, encode_key, generate_private_key


class DataDirError(Exception):
    """The data directory or a file in it is unusable (one-line message)."""


class InsecurePermissionsError(ValueError):
    """A file holding a private key can be read by other users."""


def check_private_file(path: str | os.PathLike[str]) -> None:
    """
    Refuse a file that group or others may access, as ssh refuses a private
    key: it holds a secret, and its permissions say others could have it.
    """
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InsecurePermissionsError(
            f"{path}: permissions {stat.S_IMODE(mode):04o} are too open: it holds a private "
            f"key and must not be accessible by group or others (chmod 600 {path})"
        )


def make_data_dir(path: str) -> str:
    """Create C{path} (0700) on first start; tighten it if others may read it."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataDirError(f"{path} is a file, not a directory: give a directory for the data")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o700)
    except OSError as e:
        raise DataDirError(f"cannot create {path}: {e.strerror or e}") from None
    return path


def read_key(path: str) -> bytes:
    """A private key in WireGuard's text form, from a file only its owner may read."""
    try:
        check_private_file(path)
        with open(path, "rb") as f:
            return decode_key(f.read().decode("ascii", "replace"))
    except InsecurePermissionsError as e:
        raise DataDirError(str(e)) from None
    except InvalidKey as e:
        raise DataDirError(f"{path}: {e}") from None
    except OSError as e:
        raise DataDirError(f"cannot read {path}: {e.strerror or e}") from None


def open_data_dir(path: str, key_file: str, read: Callable[[str], bytes] | None = None) -> bytes:
    """
    What every service does first: its data directory, made on first start,
    and its private key in C{key_file} there, made on first start too.
    """
    make_data_dir(path)
    return load_or_create_key(os.path.join(path, key_file), read or read_key)


def load_or_create_key(path: str, read: Callable[[str], bytes] = read_key) -> bytes:
    """The private key in C{path} (read with C{read}), created on first start."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read(path)
    except OSError as e:
        raise DataDirError(f"cannot create {path}: {e.strerror or e}") from None
    key = generate_private_key()
    with os.fdopen(fd, "w") as f:
        f.write(encode_key(key) + "\n")
    return key


def write_atomically(path: str, text: str | bytes, mode: int = 0o600) -> None:
    """
    Replace C{path} with C{text} (UTF-8 when a str): a temporary file in the
    same directory, flushed to disk, renamed over it, and the directory
    flushed too.
    """
    data = text.encode("utf-8") if isinstance(text, str) else text
    directory = os.path.dirname(path) or "."
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
