"""
Names as DNS wants them: a member's or network's name made a DNS label, a
network's domain checked.  Shared by the rendezvous (which keeps the
domain) and the node (which answers the names).
"""

from __future__ import annotations

import re

BASE_DOMAIN = "twistvpn.internal"
MAX_LABEL = 63
MAX_NAME = 253
_NOT_LABEL = re.compile(r"[^a-z0-9]+")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def dns_label(text: str) -> str:
    """
    C{text} as a DNS label: lower case, every run of other characters a
    hyphen, no hyphen at either end, at most 63 characters; "" when nothing
    is left ("Lab GPU #2" -> "lab-gpu-2").
    """
    label = _NOT_LABEL.sub("-", text.lower()).strip("-")
    return label[:MAX_LABEL].rstrip("-")


def default_domain(network_name: str, network_id: str) -> str:
    """A network's domain unless the admin sets one: NAME.twistvpn.internal."""
    return f"{dns_label(network_name) or network_id}.{BASE_DOMAIN}"


def check_domain(text: str) -> str:
    """A domain name (lower-cased, no trailing dot), or ValueError saying why not."""
    if not isinstance(text, str):
        raise ValueError("a domain is a string")
    domain = text.lower().rstrip(".")
    if not domain or len(domain) > MAX_NAME - MAX_LABEL - 1:
        raise ValueError(f"{text[:80]!r} is not a domain (1 to {MAX_NAME - MAX_LABEL - 1} "
                         "characters)")
    for label in domain.split("."):
        if not _LABEL.match(label):
            raise ValueError(f"{text[:80]!r} is not a domain: {label[:70]!r} is not a DNS label "
                             "(letters, digits and inner hyphens, 1 to 63)")
    if domain.endswith(("in-addr.arpa", "ip6.arpa")) or domain == "arpa":
        raise ValueError(f"{text[:80]!r} is a reverse-lookup domain")
    return domain
