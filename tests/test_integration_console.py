"""
The web console in a real browser (root, Chromium, ChromeDriver, Selenium):
a real C{twistd twistvpn-rendezvous} and real nodes in namespaces as the
lab builds them, and headless Chromium in a namespace of its own
(L{tests.support.browser}).  A person's flow: sign in, create a network,
watch a node's row appear without a reload, tick Auth?, edit the IP (a used
one is refused, a free one moves the node), untick.  Then what must be
refused: no cookie, a forged CSRF token, twenty wrong passwords.

With TWISTVPN_SCREENSHOTS=DIR the screenshots of docs/console.md are
written there (else into the test's temporary directory).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from tests.support.browser import Browser, browser_missing
from tests.support.requirements import joined_mode_missing
from tests.support.steps import run_step
from twistvpn.testing import netns
from twistvpn.testing.lab import JoinedLab

PASSWORD = "a console passphrase"


class ConsoleInABrowser(unittest.SynchronousTestCase):
    skip = joined_mode_missing() or browser_missing()

    def setUp(self) -> None:
        network = self.network = netns.Network(prefix="tvw")
        self.addCleanup(network.close)
        self.lab = JoinedLab(network, "easy", "easy", hosts_a=2)
        self.step("building the lab", self.lab.build)
        self.step("starting the rendezvous", self.lab.start_rendezvous)
        assert self.lab.rendezvous is not None
        network.command(self.lab.rendezvous.admin_argv("web-password"),
                        input=(PASSWORD + "\n").encode())
        self.browser = Browser(network, self.lab.rendezvous_namespace)
        self.addCleanup(self.browser.close)
        self.shots = Path(os.environ.get("TWISTVPN_SCREENSHOTS") or network.tmpdir)

    def step(self, name: str, check: Callable[[], object]) -> None:
        # Selenium's errors too: the browser's failures name their step.
        run_step(self, self.network, name, check, catch=(Exception,))

    # -- the browser -------------------------------------------------------------------------

    def by(self) -> Any:
        from selenium.webdriver.common.by import By

        return By

    def wait(self, condition: Callable[[], object], what: str, timeout: float = 15) -> Any:
        return netns.wait_for(lambda: _quietly(condition), timeout, what, interval=0.05)

    def text(self) -> str:
        return str(self.browser.driver.find_element(self.by().TAG_NAME, "body").text)

    def sign_in(self) -> None:
        self.browser.open("/signin")
        field = self.browser.driver.find_element(self.by().NAME, "password")
        field.send_keys(PASSWORD + "\n")
        self.wait(lambda: self.browser.driver.current_url.endswith("/networks"), "signed in")

    def row(self, node_id: str) -> Any:
        return self.browser.driver.find_element(self.by().CSS_SELECTOR,
                                                f'tr[data-node-id="{node_id}"]')

    def set_ip(self, node_id: str, ip: str) -> None:
        field = self.row(node_id).find_element(self.by().NAME, "ip")
        field.clear()
        field.send_keys(ip + "\n")

    def screenshot(self, name: str) -> None:
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / name
        self.assertTrue(self.browser.driver.save_screenshot(str(path)))
        self.assertGreater(path.stat().st_size, 5000)

    # -- the nodes ---------------------------------------------------------------------------

    def node_network(self, name: str) -> dict[str, Any]:
        status = netns.node_status(self.network, self.lab.nodes[name]) or {}
        return dict(status.get("networks", {}).get(self.lab.network_id, {}))

    def start_node(self, name: str) -> str:
        host = next(h for h in self.lab.hosts if h.name == name)
        assert self.lab.rendezvous is not None
        node = netns.configure_node(self.network, host, self.lab.rendezvous, self.lab.network_id)
        self.lab.nodes[name] = node
        netns.start_node(self.network, node)
        members = self.wait(lambda: self.lab.members().get(name), f"{name} to join", 20)
        return str(members["node_id"])

    # -- the tests ----------------------------------------------------------------------------

    def test_member_table(self) -> None:
        driver, by = self.browser.driver, self.by()
        self.browser.open("/signin")
        self.screenshot("console-signin.png")
        self.step("sign in", self.sign_in)

        def create() -> None:
            form = driver.find_element(by.CSS_SELECTOR, 'form[action="/networks"]')
            form.find_element(by.NAME, "name").send_keys("lab")
            form.find_element(by.TAG_NAME, "button").click()
            self.wait(lambda: "/networks/" in driver.current_url, "the network's page")
            self.lab.network_id = driver.current_url.rsplit("/", 1)[1]

        self.step("create a network", create)
        ids: dict[str, str] = {}

        def joins_without_reload() -> None:
            driver.execute_script("window.notReloaded = true;")
            started = time.monotonic()
            ids["a1"] = self.start_node("a1")
            joined = time.monotonic()
            self.wait(lambda: self.row(ids["a1"]), "a1's row", timeout=10)
            shown = time.monotonic()
            self.assertTrue(driver.execute_script("return window.notReloaded === true;"))
            self.assertIn("pending", self.row(ids["a1"]).get_attribute("class"))
            print(f"a joining node's row appears {shown - joined:.2f} s after the rendezvous "
                  f"lists it ({shown - started:.2f} s after the node starts)")

        self.step("a node joins: its row appears without a reload", joins_without_reload)

        def authorize(name: str) -> None:
            self.row(ids[name]).find_element(by.NAME, "authorized").click()
            self.wait(lambda: self.node_network(name).get("ip"), f"{name}'s managed IP", 20)

        self.step("tick Auth?: a1 gets its managed IP", lambda: authorize("a1"))
        ids["b1"] = self.start_node("b1")
        self.wait(lambda: self.row(ids["b1"]), "b1's row")
        self.step("tick Auth? for b1", lambda: authorize("b1"))
        ids["a2"] = self.start_node("a2")
        self.wait(lambda: self.row(ids["a2"]), "a2's row")
        self.browser.open(f"/networks/{self.lab.network_id}")
        self.screenshot("console-members.png")

        def used_ip() -> None:
            b1_ip = self.node_network("b1")["ip"]
            a1_ip = self.node_network("a1")["ip"]
            self.set_ip(ids["a1"], b1_ip)
            self.wait(lambda: "is already used by node" in self.row(ids["a1"]).text,
                      "the error next to the field")
            self.assertIn(f"{b1_ip} is already used by node {ids['b1']}",
                          self.row(ids["a1"]).text)
            time.sleep(1.5)
            self.assertEqual(self.node_network("a1")["ip"], a1_ip)

        self.step("a used IP is refused, next to the field", used_ip)

        def free_ip() -> None:
            subnet = self.node_network("a1")["subnet"]
            free = subnet.rsplit(".", 1)[0] + ".200"
            self.set_ip(ids["a1"], free)
            self.wait(lambda: self.node_network("a1").get("ip") == free, "a1 to move", 20)

        self.step("a free IP moves the node", free_ip)

        def untick() -> None:
            self.row(ids["a1"]).find_element(by.NAME, "authorized").click()
            self.wait(lambda: self.node_network("a1").get("status") == "deauthorized",
                      "a1 to be deauthorized", 20)

        self.step("untick Auth?: deauthorized", untick)
        self.browser.open("/networks")
        self.screenshot("console-networks.png")
        self.assertIn("lab", self.text())

    def test_add_a_device(self) -> None:
        """
        Issue 18: add a device in the console; its key pair is made in the
        browser, so the private key is in the page's file only, never sent.
        """
        import base64
        import re

        from twistvpn.wireguard.keys import encode_key, public_key

        driver, by = self.browser.driver, self.by()
        self.step("sign in", self.sign_in)
        self.lab.create_network()
        self.browser.open(f"/networks/{self.lab.network_id}/devices")
        found: dict[str, str] = {}

        def add() -> None:
            form = driver.find_element(by.ID, "add-device")
            form.find_element(by.NAME, "name").send_keys("phone")
            form.find_element(by.TAG_NAME, "button").click()
            text = self.wait(lambda: "PrivateKey = " in (driver.find_element(
                by.ID, "device-config").text or "") and driver.find_element(
                by.ID, "device-config").text, "the device's file")
            found["file"] = text
            match = re.search(r"PrivateKey = (\S+)", text)
            assert match is not None
            found["private"] = match.group(1)

        self.step("add a device: the browser makes its key pair", add)

        def private_key_is_the_devices() -> None:
            private = base64.b64decode(found["private"])
            self.assertEqual(len(private), 32)
            phone = self.lab.members()["phone"]
            self.assertEqual(encode_key(public_key(private)), phone["public_key"])
            self.assertEqual(phone["kind"], "device")
            self.assertIn("Address = 100.64.0.1/32", found["file"])
            self.assertNotIn("[Peer]", found["file"])  # no node in this network yet

        self.step("the file's private key belongs to the device's public key",
                  private_key_is_the_devices)

        def never_sent() -> None:
            assert self.lab.rendezvous is not None
            for path in self.lab.rendezvous.data_dir.rglob("*"):
                if path.is_file():
                    self.assertNotIn(found["private"].encode(), path.read_bytes(), str(path))
            self.browser.open(f"/networks/{self.lab.network_id}")
            self.browser.open(f"/networks/{self.lab.network_id}/devices")
            link = driver.find_element(by.LINK_TEXT, "wg-quick file")
            link.click()
            again = self.wait(lambda: driver.find_element(by.ID, "device-config").text,
                              "the file again")
            self.assertNotIn(found["private"], again)
            self.assertIn("REPLACE_WITH_THIS_DEVICES_PRIVATE_KEY", again)

        self.step("the rendezvous never had it; shown again, it is a placeholder", never_sent)

    def test_refusals(self) -> None:
        driver, by = self.browser.driver, self.by()
        assert self.lab.rendezvous is not None
        self.step("sign in", self.sign_in)

        def networks() -> list[Any]:
            assert self.lab.rendezvous is not None
            return list(netns.admin_json(self.lab.rendezvous, "networks"))

        def forged() -> None:
            form = driver.find_element(by.CSS_SELECTOR, 'form[action="/networks"]')
            form.find_element(by.NAME, "name").send_keys("forged")
            driver.execute_script(
                "document.querySelector('form[action=\"/networks\"] input[name=csrf]')"
                ".value = 'forged-token';")
            form.find_element(by.TAG_NAME, "button").click()
            self.wait(lambda: "CSRF token is missing or wrong" in self.text(), "the refusal")
            self.assertEqual(networks(), [])

        self.step("a forged CSRF token is refused", forged)

        def no_cookie() -> None:
            self.browser.open("/networks")
            driver.delete_all_cookies()
            form = driver.find_element(by.CSS_SELECTOR, 'form[action="/networks"]')
            form.find_element(by.NAME, "name").send_keys("cookieless")
            form.find_element(by.TAG_NAME, "button").click()
            self.wait(lambda: "sign in again" in self.text(), "the refusal")
            self.assertEqual(networks(), [])
            self.browser.open("/networks")
            self.wait(lambda: driver.current_url.endswith("/signin"), "back at sign-in")

        self.step("no cookie is refused", no_cookie)

        def wrong_passwords() -> None:
            answers = []
            for attempt in range(20):
                self.browser.open("/signin")
                driver.find_element(by.NAME, "password").send_keys(f"wrong {attempt}\n")
                self.wait(lambda: "wrong password" in self.text()
                          or "too many sign-in attempts" in self.text(), "an answer")
                answers.append("wrong" if "wrong password" in self.text() else "limited")
            # Five attempts a burst per address; the sign-in above was the first.
            self.assertEqual(answers, ["wrong"] * 4 + ["limited"] * 16)
            self.browser.open("/signin")
            driver.find_element(by.NAME, "password").send_keys(PASSWORD + "\n")
            self.wait(lambda: "too many sign-in attempts" in self.text(), "still limited")
            log = self.lab.rendezvous.process.log()  # type: ignore[union-attr]
            self.assertGreaterEqual(log.count("console sign-in from"), 20)

        self.step("twenty wrong passwords", wrong_passwords)


def _quietly(condition: Callable[[], object]) -> object:
    """A condition that may raise while the page changes under it (stale elements)."""
    try:
        return condition()
    except Exception as e:
        if type(e).__module__.startswith("selenium"):
            return None
        raise
