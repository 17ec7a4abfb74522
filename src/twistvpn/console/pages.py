"""
The console's HTML, built with C{twisted.web.template} tags (every value
escaped by the flattener): plain HTML and CSS, one small script for the
live member table and the "Auth?" checkbox, no inline script or style
(the Content-Security-Policy forbids them).

The contract automated tests rely on (docs/console.md): each member row is
C{<tr data-node-id="NODE_ID">}; in it the authorization checkbox is
C{<input type="checkbox" name="authorized">} and the IP field has
C{name="ip"}; the sign-in form has C{<input type="password" name="password">}.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from twisted.web.template import Tag, flattenString, tags

from twistvpn.console.sessions import Session
from twistvpn.rendezvous import wgquick

# Sortable member columns: query value -> (header, key of a member dict)
COLUMNS: dict[str, tuple[str, Any]] = {
    "node": ("Node ID", lambda m: m["node_id"]),
    "name": ("Name", lambda m: (m["name"] or "").lower()),
    "ip": ("Managed IP", lambda m: tuple(int(p) for p in (m["ip"] or "0.0.0.0").split("."))),
    "seen": ("Online / last seen", lambda m: (not m["online"], -(m["last_seen"] or 0))),
    "version": ("Version", lambda m: m.get("version") or ""),
}
DEFAULT_SORT = "ip"


def render(tag: Tag) -> bytes:
    """Flatten synchronously (nothing here waits)."""
    out: list[bytes] = []
    flattenString(None, tag).addCallback(out.append)
    assert out, "a page that waits on something"
    return b"<!DOCTYPE html>\n" + out[0] if tag.tagName == "html" else out[0]


def _csrf(session: Session) -> Tag:
    return tags.input(type="hidden", name="csrf", value=session.csrf)


def post_form(action: str, session: Session, *children: Any, **attributes: str) -> Tag:
    return tags.form(_csrf(session), *children, method="post", action=action, **attributes)


def page(title: str, session: Session | None, *body: Any) -> Tag:
    nav: list[Any] = []
    if session is not None and session.signed_in:
        nav = [tags.a("Networks", href="/networks"),
               post_form("/signout", session, tags.button("Sign out", type="submit"),
                         **{"class": "signout"})]
    return tags.html(
        tags.head(
            tags.meta(charset="utf-8"),
            tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
            tags.title(f"{title} · twistvpn"),
            tags.link(rel="stylesheet", href="/static/console.css"),
            tags.script(src="/static/console.js", defer="defer"),
        ),
        tags.body(
            tags.header(tags.a("twistvpn", href="/", **{"class": "brand"}), *nav),
            Tag("main")(tags.h1(title), *body),  # not in tags' list of HTML 4 names
        ),
        lang="en",
    )


def error(message: str | None) -> Any:
    return tags.p(message, **{"class": "error", "role": "alert"}) if message else ""


def ago(when: float | None, now: float) -> str:
    if when is None:
        return "never"
    seconds = max(0, int(now - when))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 172800:
        return f"{seconds // 3600} h ago"
    return time.strftime("%Y-%m-%d", time.gmtime(when))


# -- sign-in -----------------------------------------------------------------------------


def no_password() -> Tag:
    return page("Set an admin password first", None, tags.p(
        "The console has no admin password yet. On the rendezvous's machine, run ",
        tags.code("twistvpn admin web-password"),
        " (it asks twice), then reload this page."))


def signin(session: Session, message: str | None = None) -> Tag:
    return page("Sign in", session, error(message), post_form(
        "/signin", session,
        tags.label("Admin password ", tags.input(type="password", name="password",
                                                  autocomplete="current-password",
                                                  required="required", autofocus="autofocus")),
        tags.button("Sign in", type="submit")))


# -- networks ----------------------------------------------------------------------------


def networks(session: Session, found: list[dict[str, Any]], message: str | None) -> Tag:
    rows = [tags.tr(
        tags.td(tags.a(n["id"], href=f"/networks/{n['id']}"), **{"class": "mono"}),
        tags.td(n["name"]), tags.td(n["subnet"]),
        tags.td("private" if n["private"] else "public"),
        tags.td(str(n["members"])), tags.td(str(n["authorized"])),
        **{"data-network-id": n["id"]}) for n in found]
    return page(
        "Networks", session,
        tags.table(
            tags.thead(tags.tr(*[tags.th(h) for h in (
                "ID", "Name", "Subnet", "Access", "Members", "Authorized")])),
            tags.tbody(*rows) if rows else tags.tbody(tags.tr(tags.td(
                "No networks yet.", colspan="6"))),
        ),
        tags.h2("Create a network"), error(message),
        post_form(
            "/networks", session,
            tags.label("Name ", tags.input(name="name", required="required", maxlength="64")),
            tags.label("Subnet ", tags.input(name="subnet", placeholder="optional")),
            tags.label("Access ", tags.select(
                tags.option("private (members need authorization)", value="private"),
                tags.option("public", value="public"), name="access")),
            tags.button("Create", type="submit"), **{"class": "inline"}),
    )


def network(session: Session, net: dict[str, Any], members: list[dict[str, Any]],
            sort: str, descending: bool, now: float) -> Tag:
    pending = sum(1 for m in members if not m["authorized"])
    settings = post_form(
        f"/networks/{net['id']}", session,
        tags.label("Name ", tags.input(name="name", value=net["name"], maxlength="64")),
        tags.label("DNS domain ", tags.input(name="domain", value=net["domain"])),
        tags.label("Access ", tags.select(
            _option("private (members need authorization)", "private", net["private"]),
            _option("public", "public", not net["private"]), name="access")),
        tags.button("Save", type="submit"), **{"class": "inline"})
    headers = [tags.th("Auth?")]
    for key, (label, _) in COLUMNS.items():
        if key in ("version", "seen"):
            continue
        headers.append(_sort_header(net["id"], key, label, sort, descending))
    headers += [_sort_header(net["id"], "seen", COLUMNS["seen"][0], sort, descending),
                tags.th("Physical endpoints"), tags.th("NAT mapping"),
                _sort_header(net["id"], "version", COLUMNS["version"][0], sort, descending),
                tags.th("")]
    query = f"sort={sort}" + ("&desc=1" if descending else "")
    return page(
        f"{net['name']}", session,
        tags.p(tags.span(net["id"], **{"class": "mono"}), f" · {net['subnet']} · ",
               "private" if net["private"] else "public", f" · *.{net['domain']} · ",
               tags.a("Pre-auth keys", href=f"/networks/{net['id']}/keys"), " · ",
               tags.a("Devices", href=f"/networks/{net['id']}/devices"), " · ",
               tags.a("Delete network", href=f"/networks/{net['id']}/delete")),
        error(session.flash.get("network")),
        settings,
        tags.h2("Members ", tags.span(f"{pending} pending" if pending else "",
                                       **{"class": "badge"} if pending else {})),
        tags.table(
            tags.thead(tags.tr(*headers)),
            tags.tbody(*member_rows(session, net, members, sort, descending, now),
                       id="members", **{"data-src": f"/networks/{net['id']}/members?{query}"}),
            **{"class": "members"}),
    )


def _option(label: str, value: str, selected: bool) -> Tag:
    return tags.option(label, value=value, **({"selected": "selected"} if selected else {}))


def _sort_header(network_id: str, key: str, label: str, sort: str, descending: bool) -> Tag:
    flip = key == sort and not descending
    arrow = (" ▼" if descending else " ▲") if key == sort else ""
    href = f"/networks/{network_id}?sort={key}" + ("&desc=1" if flip else "")
    return tags.th(tags.a(label + arrow, href=href))


def sort_members(members: list[dict[str, Any]], sort: str,
                 descending: bool) -> list[dict[str, Any]]:
    """Pending members first (they are what an admin looks for), then by the column."""
    key = COLUMNS.get(sort, COLUMNS[DEFAULT_SORT])[1]
    ordered = sorted(members, key=key, reverse=descending)
    return [m for m in ordered if not m["authorized"]] + [m for m in ordered if m["authorized"]]


def rows_version(session: Session, net: dict[str, Any], members: list[dict[str, Any]],
                 sort: str, descending: bool, now: float) -> str:
    """What the rows show, hashed: equal versions render the same rows."""
    shown = [net["id"], sort, descending, sorted(session.flash.items()), members,
             [ago(m["last_seen"], now) for m in members if not m["online"]]]
    return hashlib.sha256(json.dumps(shown, sort_keys=True).encode()).hexdigest()[:20]


def member_rows(session: Session, net: dict[str, Any], members: list[dict[str, Any]],
                sort: str, descending: bool, now: float) -> Iterable[Tag]:
    if not members:
        yield tags.tr(tags.td("No members yet: a node joins with ",
                              tags.code(f"twistvpn join {net['id']}"), colspan="10"))
        return
    for m in sort_members(members, sort, descending):
        node = m["node_id"]
        form_id = f"m-{node}"
        action = f"/networks/{net['id']}/members/{node}"
        checkbox = tags.input(type="checkbox", name="authorized", form=form_id,
                              title="authorized", **{"class": "auto-submit"},
                              **({"checked": "checked"} if m["authorized"] else {}))
        seen = "online" if m["online"] else ago(m["last_seen"], now)
        nat = ("unknown" if m["nat_varies"] is None else
               "endpoint-dependent (hard)" if m["nat_varies"] else "endpoint-independent")
        yield tags.tr(
            tags.td(post_form(action, session,
                              tags.input(type="hidden", name="name_was", value=m["name"] or ""),
                              tags.input(type="hidden", name="ip_was", value=m["ip"] or ""),
                              tags.input(type="hidden", name="sort", value=sort),
                              id=form_id), checkbox),
            tags.td(node, **{"class": "mono"}),
            tags.td(tags.input(name="name", value=m["name"] or "", form=form_id,
                               maxlength="64", size="14"),
                    error(session.flash.get(f"name:{node}"))),
            tags.td(tags.input(name="ip", value=m["ip"] or "", form=form_id, size="13",
                               placeholder="set on Auth?", **{"class": "mono"}),
                    error(session.flash.get(f"ip:{node}"))),
            tags.td(seen, **{"class": "online" if m["online"] else ""}),
            tags.td(*_endpoints(m["endpoints"]), **{"class": "mono"}),
            tags.td(nat),
            tags.td(m.get("version") or "-"),
            tags.td(tags.button("Save", type="submit", form=form_id),
                    " ", tags.a("Delete", href=f"{action}/delete")),
            **{"data-node-id": node}, **({"class": "pending"} if not m["authorized"] else {}),
        )


def _endpoints(endpoints: list[str]) -> list[Any]:
    # Both discovery ports see the same mapping behind an easy NAT: once is enough.
    return [tags.div(e) for e in dict.fromkeys(endpoints)] or ["-"]


def confirm(session: Session, title: str, question: str, action: str, back: str,
            button: str) -> Tag:
    return page(title, session, tags.p(question), post_form(
        action, session, tags.button(button, type="submit", **{"class": "danger"}),
        " ", tags.a("Cancel", href=back)))


# -- pre-auth keys -----------------------------------------------------------------------


def keys(session: Session, net: dict[str, Any], found: list[dict[str, Any]],
         secret: str | None, message: str | None, now: float) -> Tag:
    rows = []
    for k in found:
        expires = "never" if k["expires"] is None else time.strftime(
            "%Y-%m-%d %H:%M UTC", time.gmtime(k["expires"]))
        revoke = post_form(f"/networks/{net['id']}/keys/{k['id']}/revoke", session,
                           tags.button("Revoke", type="submit")) if not k["revoked"] else ""
        rows.append(tags.tr(
            tags.td(k["id"], **{"class": "mono"}), tags.td("yes" if k["reusable"] else "no"),
            tags.td(str(k["uses"])), tags.td(expires), tags.td(k["name_prefix"] or "-"),
            tags.td("revoked" if k["revoked"] else "valid" if k["valid"] else "spent or expired"),
            tags.td(revoke), **{"data-key-id": k["id"]}))
    shown: Any = ""
    if secret is not None:
        shown = tags.div(tags.p("The new key — shown this once; it is stored only as a hash:"),
                         tags.pre(secret, **{"class": "secret"}),
                         tags.p("On the machine: ", tags.code(
                             f"twistvpn join {net['id']} --auth-key-file FILE")),
                         **{"class": "notice"})
    return page(
        f"Pre-auth keys · {net['name']}", session, shown, error(message),
        tags.p(tags.a(f"← {net['name']}", href=f"/networks/{net['id']}")),
        tags.table(
            tags.thead(tags.tr(*[tags.th(h) for h in (
                "Key", "Reusable", "Uses", "Expires", "Name prefix", "State", "")])),
            tags.tbody(*rows) if rows else tags.tbody(tags.tr(tags.td("No keys.",
                                                                      colspan="7")))),
        tags.h2("Create a key"),
        post_form(
            f"/networks/{net['id']}/keys", session,
            tags.label(tags.input(type="checkbox", name="reusable"), " reusable"),
            tags.label("Expires in ", tags.select(
                *[tags.option(label, value=value) for value, label in (
                    ("3600", "1 hour"), ("86400", "1 day"), ("604800", "7 days"),
                    ("7776000", "90 days"), ("", "never"))], name="expires_in")),
            tags.label("Name prefix ", tags.input(name="name_prefix", maxlength="64")),
            tags.button("Create", type="submit"), **{"class": "inline"}),
    )


def devices(session: Session, net: dict[str, Any], found: list[dict[str, Any]],
            message: str | None, config: dict[str, Any] | None = None) -> Tag:
    """
    The network's stock WireGuard devices (docs/devices.md), a form to add
    one, and (after adding, or asked for) a device's wg-quick file.  A key
    pair for a new device is made in the browser (console.js): its private
    key goes into the shown file there and never reaches the server.
    """
    rows = [tags.tr(
        tags.td(d["name"] or "-"), tags.td(d["node_id"], **{"class": "mono"}),
        tags.td(d["ip"] or "-"), tags.td("yes" if d["authorized"] else "no"),
        tags.td(tags.a("wg-quick file",
                       href=f"/networks/{net['id']}/devices/{d['node_id']}/config")
                if d["authorized"] else ""),
        **{"data-node-id": d["node_id"]}) for d in found]
    shown: Any = ""
    if config is not None:
        shown = tags.div(
            tags.p(f"{config['name']}'s wg-quick file: import it in the WireGuard app "
                   "(or scan it as a QR code: ", tags.code(
                       f"twistvpn admin device config {net['id']} {config['name']} --qr"), ")."),
            tags.pre(wgquick.render(config), id="device-config",
                     **{"class": "secret", "data-public-key": config["public_key"],
                        "data-placeholder": wgquick.PRIVATE_KEY_PLACEHOLDER}),
            tags.p("A key pair made in this browser fills in PrivateKey here, this once; "
                   "otherwise put in the private key the device made.", id="device-key-note"),
            **{"class": "notice"})
    return page(
        f"Devices · {net['name']}", session, shown, error(message),
        tags.p(tags.a(f"← {net['name']}", href=f"/networks/{net['id']}")),
        tags.p("Macs, Windows laptops and phones with the official WireGuard app join "
               "through the relay, still end-to-end encrypted."),
        tags.table(
            tags.thead(tags.tr(*[tags.th(h) for h in (
                "Name", "Node", "IP", "Authorized", "")])),
            tags.tbody(*rows) if rows else tags.tbody(tags.tr(tags.td("No devices.",
                                                                      colspan="5")))),
        tags.h2("Add a device"),
        post_form(
            f"/networks/{net['id']}/devices", session,
            tags.label("Name ", tags.input(name="name", maxlength="64", required="required")),
            tags.label("Public key ", tags.input(
                name="public_key", size="46",
                placeholder="empty: a key pair is made in this browser")),
            tags.button("Add", type="submit"), id="add-device", **{"class": "inline"}),
    )


def not_found(session: Session | None, message: str) -> Tag:
    return page("Not found", session, tags.p(message),
                tags.p(tags.a("Networks", href="/networks")))


def quoted(text: str) -> str:
    return quote(text, safe="")
