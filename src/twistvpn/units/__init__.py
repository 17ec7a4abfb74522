"""
systemd units for the node, the rendezvous and the relay, shipped with the
package, and C{twistvpn service install|uninstall} that puts them in place.
"""
