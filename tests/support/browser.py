"""
A real browser for the console's tests: headless Chromium driven by
Selenium through ChromeDriver, both inside a namespace of their own that
has only a loopback (so nothing they do leaves it), reaching the
rendezvous's console through two bridges (UNIX sockets cross namespaces),
and reached by Selenium through two more.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from twistvpn.testing import netns

CHROMEDRIVER_PORT = 9515
CONSOLE_PORT = 8445


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for binary, package in (("chromium", "chromium"), ("chromedriver", "chromium-driver")):
        if shutil.which(binary) is None:
            return f"needs {binary} (Debian package {package}; scripts/bootstrap.sh installs it)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (pip install .[test])"
    return None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Browser:
    """Chromium in its own namespace, looking at the console of C{rendezvous_namespace}."""

    def __init__(self, network: netns.Network, rendezvous_namespace: str) -> None:
        self.network = network
        self.namespace = network.add_namespace("web")
        console = network.tmpdir / "console.sock"
        driver = network.tmpdir / "chromedriver.sock"
        # The console: browser's 127.0.0.1:8445 -> UNIX socket -> the rendezvous's.
        netns.start_bridge(network, rendezvous_namespace, f"unix:{console}",
                           f"tcp:127.0.0.1:{CONSOLE_PORT}")
        netns.start_bridge(network, self.namespace,
                           f"tcp:{CONSOLE_PORT}:interface=127.0.0.1", f"unix:{console}")
        # ChromeDriver: Selenium's 127.0.0.1:PORT (root namespace) -> UNIX -> the browser's.
        self.driver_process = network.spawn(
            self.namespace, ["chromedriver", f"--port={CHROMEDRIVER_PORT}"],
            log_name="chromedriver")
        netns.wait_for(lambda: "started successfully" in self.driver_process.log(), 20,
                       "chromedriver to start", interval=0.1)
        netns.start_bridge(network, self.namespace, f"unix:{driver}",
                           f"tcp:127.0.0.1:{CHROMEDRIVER_PORT}")
        port = free_port()
        netns.start_bridge(network, "", f"tcp:{port}:interface=127.0.0.1", f"unix:{driver}")
        self.driver = self._connect(f"http://127.0.0.1:{port}")
        self.base = f"https://127.0.0.1:{CONSOLE_PORT}"

    def _connect(self, url: str) -> Any:
        from selenium import webdriver

        options = webdriver.ChromeOptions()
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,900",
                         "--ignore-certificate-errors", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--disable-default-apps"):
            options.add_argument(argument)
        options.accept_insecure_certs = True  # the rendezvous's self-signed certificate
        options.binary_location = shutil.which("chromium") or "chromium"
        deadline = time.monotonic() + 20
        while True:
            try:
                return webdriver.Remote(command_executor=url, options=options)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def close(self) -> None:
        try:
            self.driver.quit()
        except Exception:
            pass
