"""A small headless-Chromium driver over the DevTools protocol (``--remote-debugging-pipe``).

Used by the browser tests (tests/test_browser.py) and the explorer bench
(bench/explorer/bench_explorer.py).  No dependency: Chromium is Debian's
package (``apt-get install chromium``; ``make test`` installs it), messages are
JSON separated by NUL bytes on file descriptors 3 (to the browser) and 4 (from it).

    with Browser() as b:
        page = b.open("file:///tmp/explorer.html")
        page.eval("document.title")
        page.console_errors, page.requests   # what went wrong, what was fetched
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> Optional[str]:
    """The Chromium executable ($FASTNIG_CHROMIUM, else the first of CANDIDATES on PATH), or None."""
    explicit = os.environ.get("FASTNIG_CHROMIUM")
    if explicit:
        return explicit
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium process; :meth:`open` gives a :class:`Page` per URL."""

    def __init__(self, executable: Optional[str] = None, width: int = 1400, height: int = 900):
        self.executable = executable or find_chromium()
        if not self.executable:
            raise BrowserError("no Chromium found: apt-get install -y chromium (or set FASTNIG_CHROMIUM)")
        self.width, self.height = width, height
        self._profile = tempfile.mkdtemp(prefix="fastnig-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [self.executable, "--headless=new", "--remote-debugging-pipe", "--no-sandbox",
                "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={self._profile}", f"--window-size={width},{height}", "about:blank"]

        def child_fds():  # fd 3 = commands to the browser, fd 4 = its replies
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)
        self.proc = subprocess.Popen(args, pass_fds=(3, 4), preexec_fn=child_fds, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: List[Dict] = []

    # -- the protocol
    def send(self, method: str, params: Optional[Dict] = None, session: Optional[str] = None,
             timeout: float = 60) -> Dict:
        """Send one command and wait for its reply (events meanwhile go to :attr:`events`)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def _read(self, deadline: float) -> Dict:
        import select
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise BrowserError("Chromium closed its pipe (it crashed or could not start)")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                         "deviceScaleFactor": 1, "mobile": False}, session=session)
        page.navigate(url)
        return page

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    """One tab: navigate, evaluate JavaScript, screenshot; console errors and requests it saw."""

    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session

    def send(self, method: str, params: Optional[Dict] = None, timeout: float = 60) -> Dict:
        return self.browser.send(method, params, session=self.session, timeout=timeout)

    def navigate(self, url: str, timeout: float = 60) -> None:
        self.send("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'", timeout)

    def eval(self, expression: str, timeout: float = 60):
        """The value of a JavaScript expression (promises awaited; JSON-serialisable results)."""
        reply = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                               "awaitPromise": True}, timeout)
        if "exceptionDetails" in reply:
            raise BrowserError(f"{expression[:80]}: {reply['exceptionDetails'].get('exception', reply)}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30, interval: float = 0.02):
        """Poll until ``expression`` is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {expression!r}")
            time.sleep(interval)

    def screenshot(self, path, full_page: bool = False) -> Path:
        import base64
        params = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        data = self.send("Page.captureScreenshot", params)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path

    def _events(self, method: str) -> List[Dict]:
        return [e["params"] for e in self.browser.events if e.get("method") == method
                and e.get("sessionId") == self.session]

    @property
    def console_errors(self) -> List[str]:
        """Uncaught exceptions, console.error calls and error log entries (text)."""
        errors = [str(p["exceptionDetails"].get("exception", {}).get("description")
                      or p["exceptionDetails"].get("text")) for p in self._events("Runtime.exceptionThrown")]
        errors += [" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                   for p in self._events("Runtime.consoleAPICalled") if p.get("type") in ("error", "assert")]
        errors += [p["entry"].get("text", "") + " " + p["entry"].get("url", "")
                   for p in self._events("Log.entryAdded") if p["entry"].get("level") == "error"]
        return errors

    @property
    def requests(self) -> List[str]:
        """URLs of every request the page made (the page itself included; inline ``data:`` URLs left out)."""
        return [p["request"]["url"] for p in self._events("Network.requestWillBeSent")
                if not p["request"]["url"].startswith("data:")]
