"""
The web console's member table with many members: how long the rendezvous
takes to render a network's page (and the rows the live table polls), as
the median of 5, against the admin API's JSON list of the same members in
the same run (the reference: the same look-ups, without the HTML).

    python bench/console.py [--members 1000] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from benchjson import save
from twisted.internet.task import Clock

from twistvpn.console.sessions import Sessions
from twistvpn.console.web import Console
from twistvpn.rendezvous.admin import AdminAPI
from twistvpn.rendezvous.controller import Controller
from twistvpn.rendezvous.store import open_store
from twistvpn.rendezvous.webpassword import WebPassword
from twistvpn.testing.webclient import WebClient
from twistvpn.wireguard.keys import generate_private_key, public_key

PASSWORD = "benchmark passphrase"


class NoSession:
    """A control session that drops what it is sent (the members are "online")."""

    def __init__(self, key: bytes) -> None:
        self.public_key = key
        self.rtt = None

    def send_map(self, *args: Any) -> None: ...
    def send_map_delta(self, *args: Any) -> None: ...
    def send_punch(self, *args: Any) -> None: ...
    def send_revoked(self, *args: Any) -> None: ...
    def close(self, reason: str) -> None: ...


def timed(call: Any, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    started = time.time()
    clock = Clock()
    clock.advance(time.time())
    directory = tempfile.mkdtemp(prefix="tvbench")
    controller = Controller(open_store(os.path.join(directory, "db.sqlite")), clock,
                            push_delay=3600)
    network = controller.create_network("big", "100.64.0.0/16")["id"]
    for i in range(args.members):
        key = public_key(generate_private_key())
        controller.register_node(key, f"node-{i:05d}", NoSession(key))
        controller.join(key, network)
        if i % 3:
            controller.update_member(network, _node_id(key), authorized=True)
    password = WebPassword(os.path.join(directory, "web-password"))
    api = AdminAPI(controller, None, web_password=password)
    api.call("POST", ["api", "v1", "web-password"], {"password": PASSWORD})
    console = Console(api, Sessions(clock, password), clock)
    browser = WebClient(console, clock)
    page = browser.get("/signin")
    csrf = page.body.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert browser.post("/signin", {"password": PASSWORD, "csrf": csrf}).code == 303

    def page_render() -> None:
        answer = browser.get(f"/networks/{network}")
        assert answer.code == 200 and answer.body.count("data-node-id=") == args.members

    def rows_render() -> None:
        answer = browser.get(f"/networks/{network}/members?sort=ip")
        assert answer.body.count("data-node-id=") == args.members

    version = browser.get(f"/networks/{network}/members?sort=ip").header("x-rows-version")

    def rows_unchanged() -> None:
        answer = browser.get(f"/networks/{network}/members?sort=ip&v={version}")
        assert answer.code == 204, answer.code

    json_api = WebClient(api, clock)

    def api_list() -> None:
        assert json_api.get(f"/api/v1/networks/{network}/members").code == 200

    results = {}
    for name, call in (("page", page_render), ("rows", rows_render),
                       ("unchanged", rows_unchanged), ("json", api_list)):
        call()  # warm
        results[name] = statistics.median(timed(call, args.runs))
    print(f"{args.members} members, median of {args.runs}:")
    print(f"  the network's page:      {results['page'] * 1000:8.1f} ms "
          f"({results['page'] / results['json']:.1f}x the JSON list)")
    print(f"  the live table's rows:   {results['rows'] * 1000:8.1f} ms "
          f"({results['rows'] / results['json']:.1f}x)")
    print(f"  a poll, nothing changed: {results['unchanged'] * 1000:8.1f} ms "
          f"({results['unchanged'] / results['json']:.1f}x)")
    print(f"  admin API JSON (reference): {results['json'] * 1000:5.1f} ms")
    save("console", started, {"members": args.members, "runs": args.runs,
                              "median_s": results,
                              "ratio_to_json": {k: results[k] / results["json"]
                                                for k in ("page", "rows", "unchanged")}})
    return 0


def _node_id(key: bytes) -> str:
    from twistvpn.rendezvous.registry import node_id_of

    return node_id_of(key)


if __name__ == "__main__":
    sys.exit(main())
