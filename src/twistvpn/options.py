"""
Checks shared by the twistd plugins' C{usage.Options}: each error is one
line that names the option, as C{twistd} prints it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.python import usage


def log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise ValueError(f"--log-format: {text!r} is not text or json")
    return text


def json_observer() -> Any:
    """A log observer writing each event as a JSON object on a line of its own to stdout."""
    import sys

    from twisted.logger import jsonFileLogObserver

    return jsonFileLogObserver(sys.stdout, recordSeparator="")


class OneLineOptions(usage.Options):
    """
    A twistd plugin's options whose errors are one line on stderr: twistd
    prints the whole usage (dozens of lines) to stdout with the error last,
    which a person starting a service cannot act on.  Parsed on their own
    (tests, tools) they raise C{UsageError} as any options do; under twistd
    (which sets C{parent}) the error becomes C{SystemExit}, which twistd
    lets through: Python prints the line to stderr and exits with 1.
    Usage is still shown on C{--help}.
    """

    command = "twistvpn"  # the plugin's name, for the message
    optParameters: list[Any] = [
        ["log-format", None, "text",
         "text (twistd's lines) or json (one JSON object a line, for log shippers).",
         log_format],
    ]

    def parseOptions(self, options: list[str] | None = None) -> None:  # noqa: N802
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise
            raise SystemExit(f"twistd {self.command}: {e}") from None
        parent = getattr(self, "parent", None)
        if self["log-format"] == "json" and parent is not None:
            # twistd's own hook: its logger option names the observer factory.
            parent["logger"] = f"{__name__}.json_observer"


def is_decimal(text: str) -> bool:
    """
    Whether C{text} is ASCII digits only.  C{str.isdigit} also takes other
    scripts' digits and superscripts ("¹²"), which C{int} then refuses.
    """
    return text.isascii() and text.isdigit()


def integer(option: str, value: object, low: int, high: int) -> int:
    """C{value} as an integer from C{low} to C{high}, or a one-line error naming C{option}."""
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise usage.UsageError(f"--{option}: {value!r} is not a number") from None
    if not low <= number <= high:
        raise usage.UsageError(f"--{option}: {number} is out of range ({low} to {high})")
    return number


def port(option: str) -> Callable[[str], int]:
    """
    A coercer for C{optParameters}: a port number for C{option}, 0 to 65535
    (0: the kernel picks a free one).
    """

    def coerce(value: str) -> int:
        return integer(option, value, 0, 65535)

    coerce.coerceDoc = "A port, 0 to 65535 (0: any free one)."  # type: ignore[attr-defined]
    return coerce
