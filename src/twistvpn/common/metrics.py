"""
Prometheus metrics, in its text format (prometheus-client), for the
rendezvous, the relay and the node.

Nothing is counted twice: each service already keeps counters for its own
reasons (the admin API's status, C{twistvpn status}); at each scrape a
L{Snapshot} reads them and prometheus-client writes them out.  No
per-packet path pays for metrics.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web import resource

CONTENT_TYPE = CONTENT_TYPE_LATEST.encode("ascii")


@dataclass
class Family:
    """One metric: its name (without _total), kind, help, and samples by labels."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    labels: tuple[str, ...] = ()
    samples: list[tuple[tuple[str, ...], float]] = field(default_factory=list)
    # A histogram's: (cumulative buckets [(bound, count)], sum of observations)
    histogram: tuple[list[tuple[str, float]], float] | None = None

    def add(self, value: float, *labels: str) -> Family:
        self.samples.append((tuple(labels), float(value)))
        return self


def counters(name: str, help_text: str, label: str, values: Mapping[str, Any]) -> Family:
    """A counter family from a service's C{Counter}: one sample per key."""
    family = Family(name, "counter", help_text, (label,))
    for key, value in sorted(values.items()):
        if isinstance(value, int | float) and not isinstance(value, bool):
            family.add(value, str(key))
    return family


Snapshot = Callable[[], Iterable[Family]]


class _Collector:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        for family in self.snapshot():
            if family.histogram is not None:
                buckets, total = family.histogram
                yield HistogramMetricFamily(family.name, family.help, buckets=buckets,
                                            sum_value=total)
                continue
            kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
            metric = kind(family.name, family.help, labels=list(family.labels))
            for labels, value in family.samples:
                metric.add_metric(list(labels), value)
            yield metric


def render(snapshot: Snapshot) -> bytes:
    """The text exposition of what C{snapshot} returns now."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snapshot))  # type: ignore[arg-type]
    return generate_latest(registry)


def bearer_ok(request: Any, token: str | None) -> bool:
    """
    Whether C{request} carries C{token} as its bearer token (always, with no
    token to check); if not, the request is told how to authenticate.
    """
    if token is None:
        return True
    header = (request.getHeader(b"authorization") or b"").decode("latin-1")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode("utf-8"), token.encode("utf-8")):
        return True
    request.setHeader(b"www-authenticate", b'Bearer realm="twistvpn"')
    return False


def is_loopback_endpoint(description: str) -> bool:
    """Whether a server endpoint string listens on loopback only (its interface=)."""
    # Fields are split on colons that are not escaped (IPv6: interface=\:\:1).
    for part in re.split(r"(?<!\\):", description):
        if part.startswith("interface="):
            try:
                address = part[len("interface="):].replace("\\:", ":")
                return ipaddress.ip_address(address).is_loopback
            except ValueError:
                return False
    return description.startswith("unix:")


class MetricsResource(resource.Resource):
    """GET /metrics; with a token, only for a bearer of it (off loopback)."""

    isLeaf = True

    def __init__(self, snapshot: Snapshot, token: str | None = None) -> None:
        super().__init__()
        self.snapshot = snapshot
        self.token = token

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 (twisted.web's name)
        if not bearer_ok(request, self.token):
            request.setResponseCode(401)
            return b"a valid bearer token is required\n"
        request.setHeader(b"content-type", CONTENT_TYPE)
        return render(self.snapshot)


def metrics_site(snapshot: Snapshot, token: str | None = None) -> Any:
    """A twisted.web Site serving C{/metrics} alone."""
    from twisted.web import server

    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(snapshot, token))
    return server.Site(root)


class WithMetrics(resource.Resource):
    """
    C{/metrics} beside a leaf resource that serves every other path whole
    (the admin API, which routes on the full path itself).
    """

    def __init__(self, metrics: MetricsResource, rest: resource.Resource) -> None:
        super().__init__()
        self.metrics = metrics
        self.rest = rest

    def getChild(self, path: bytes, request: Any) -> resource.Resource:  # noqa: N802
        if path == b"metrics" and not request.postpath:
            return self.metrics
        request.postpath.insert(0, request.prepath.pop())
        return self.rest

    def render(self, request: Any) -> bytes:
        return self.rest.render(request)
