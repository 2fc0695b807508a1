"""The web chat of ``--demo on`` in a real browser: headless Chromium (Debian's
``chromium`` and ``chromium-driver``) driven by Selenium, two users on the page the
server serves on its WebSocket port (zim/demo, on the JavaScript client clients/js).

Alice and Bob log in, chat by DM and in a channel; Bob leaves the page, Alice writes
meanwhile, Bob comes back (the page logs in again with its saved token) and catches up
from history: what was sent while he was away appears, in order, with unread marks.
A screenshot is saved in the test's directory, and to ``ZIM_DEMO_SCREENSHOT`` if set
(``ZIM_DEMO_SCREENSHOT=docs/demo.png pytest tests/demo`` renews the README's).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import MISSING_SERVICE
from tests.support.client import unique

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_S = 15


@pytest.fixture(scope="module")
def webdriver():
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip(f"selenium {MISSING_SERVICE} (pip install -e '.[test]')")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{package} {MISSING_SERVICE}")
    return webdriver


@pytest.fixture
def browsers(webdriver, tmp_path):
    """browser(): a new headless Chromium with a profile of its own (its own localStorage)."""
    from selenium.webdriver.chrome.service import Service
    opened = []

    def browser():
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1100,760", f"--user-data-dir={tmp_path / f'profile{len(opened)}'}"):
            options.add_argument(argument)
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(WAIT_S)
        opened.append(driver)
        return driver

    yield browser
    for driver in opened:
        driver.quit()


class Page:
    """One user's chat page."""

    def __init__(self, driver, url: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
        self.driver, self.url, self.by = driver, url, By
        self.wait = WebDriverWait(driver, WAIT_S)
        driver.get(url)

    def find(self, css: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def until(self, condition, what: str):
        try:
            return self.wait.until(lambda _: condition())
        except Exception:
            logs = "\n".join(str(entry) for entry in self.driver.get_log("browser"))
            shown = (self.find("#error").text or self.find("#login-error").text,
                     self.find("#text").get_attribute("value"), self.messages())
            raise AssertionError(f"{what}: not within {WAIT_S}s; the page says {shown!r}; its console:\n{logs}") from None

    def type(self, css: str, text: str) -> None:
        field = self.find(css)
        field.clear()
        field.send_keys(text)
        field.submit()

    def log_in(self, name: str) -> str:
        self.until(lambda: self.find("#login-form").is_displayed(), "the login form")
        self.type("#login-name", name)
        self.until(lambda: self.find("#status").text == "online", f"{name} online")
        return self.find("#me-id").text

    # reads go through the page's own DOM in one script: the page re-renders its lists,
    # so an element found a moment ago may be gone (stale) by the time it is read
    def messages(self) -> list[str]:
        return self.driver.execute_script(
            "return [...document.querySelectorAll('#messages li .text')].map(item => item.textContent)")

    def seqs(self) -> list[int]:
        return self.driver.execute_script(
            "return [...document.querySelectorAll('#messages li')].map(item => Number(item.dataset.seq))")

    def wait_messages(self, expected: list[str]) -> None:
        self.until(lambda: self.messages() == expected, f"messages {expected}")

    def unread(self, title: str) -> int | None:
        """The unread mark of a conversation: a count (0: none), None if it is not listed."""
        return self.driver.execute_script("""
            for (const item of document.querySelectorAll('.conversations li')) {
              if (item.firstChild.textContent !== arguments[0]) continue;
              const badge = item.querySelector('.badge');
              return badge ? Number(badge.textContent) : 0;
            }
            return null;""", title)

    def open(self, title: str) -> None:
        self.until(lambda: self.unread(title) is not None, f"a conversation {title!r}")
        self.driver.execute_script("""
            for (const item of document.querySelectorAll('.conversations li'))
              if (item.firstChild.textContent === arguments[0]) item.click();""", title)
        self.until(lambda: self.find("#title").text.startswith(title), f"{title!r} open")

    def send(self, text: str) -> None:
        self.type("#text", text)
        self.until(lambda: text in self.messages(), f"{text!r} shown after sending")


def test_two_users_chat_and_one_catches_up_after_a_reload(start_server, browsers, tmp_path):
    srv = start_server(flags=("--workers", "1"))
    url = f"http://{srv.host}:{srv.ws_port}/"
    alice, bob = Page(browsers(), url), Page(browsers(), url)
    alice_id = alice.log_in("alice")
    bob_id = bob.log_in("bob")
    assert alice_id.isdigit() and bob_id.isdigit() and alice_id != bob_id

    # a direct message: bob sees a new conversation with an unread mark, then reads and answers
    alice.type("#dm-user", bob_id)
    alice.send("hi bob")
    bob.until(lambda: bob.unread("alice") == 1, "bob's unread mark for alice")
    bob.open("alice")
    bob.wait_messages(["hi bob"])
    assert bob.unread("alice") == 0
    bob.send("hi alice")
    alice.wait_messages(["hi bob", "hi alice"])

    # a channel
    room = unique("lobby")
    for page in (alice, bob):
        page.type("#join-name", room)
        page.until(lambda page=page: page.find("#title").text == f"# {room}", "the channel open")
    alice.send("welcome to the room")
    bob.wait_messages(["welcome to the room"])
    bob.send("glad to be here")
    alice.wait_messages(["welcome to the room", "glad to be here"])

    # bob, reading alice's DMs, leaves the page; alice writes to both meanwhile; bob comes back
    # (the page logs in with its saved token) and catches up, in order: the open conversation
    # from history, the channel by the client's gap filling from the seqs it had seen (unread)
    bob.open("alice")
    bob.driver.get("about:blank")
    away = [f"while you were away {i}" for i in range(1, 6)]
    for text in away:
        alice.send(text)
    alice.open("bob")
    alice.send("are you there?")
    alice.send("ping")
    bob.driver.get(url)
    bob.until(lambda: bob.find("#status").text == "online", "bob online again with his saved token")
    assert bob.find("#me-id").text == bob_id
    bob.wait_messages(["hi bob", "hi alice", "are you there?", "ping"])
    bob.until(lambda: bob.unread(f"# {room}") == len(away), "bob's unread mark for the channel")
    bob.open(f"# {room}")
    bob.wait_messages(["welcome to the room", "glad to be here", *away])
    assert bob.seqs() == list(range(1, 8))
    bob.send("back now")
    alice.open(f"# {room}")
    alice.wait_messages(["welcome to the room", "glad to be here", *away, "back now"])

    alice.open("bob")
    alice.send("see you in the room")
    bob.until(lambda: bob.unread("alice") == 1, "bob's unread mark for alice")
    for path in filter(None, (tmp_path / "demo.png", os.environ.get("ZIM_DEMO_SCREENSHOT"))):
        assert bob.driver.save_screenshot(str(Path(path).resolve())), path

    # scrolling back: a page shows a channel's newest 30 messages, then older ones on demand
    with srv.tcp_client() as carol:
        carol.login("carol")
        carol.ok(3, {"name": room})
        burst = [f"burst {i}" for i in range(1, 36)]
        for text in burst:
            carol.ok(4, {"channel": room, "content": text})
    everything = ["welcome to the room", "glad to be here", *away, "back now", *burst]
    bob.wait_messages(everything)                       # pushed to the open channel
    alice.open(f"# {room}")
    alice.driver.get(url)                               # a reload: the open channel from history
    alice.wait_messages(everything[-30:])
    alice.until(lambda: alice.find("#older").is_displayed(), "the button for older messages")
    alice.driver.execute_script("document.getElementById('older').click()")
    alice.wait_messages(everything)
    assert alice.seqs() == list(range(1, len(everything) + 1))
