"""A headless Chromium driven over the DevTools protocol: open a page, wait until it shows what
we expect, take a screenshot. Used by `mgs view --screenshot` (the viewer's page is built by
JavaScript over a websocket, so a plain `chromium --screenshot` would catch it half-loaded).

Flags are those that work on a closed network and without a GPU; WebGL then runs on Chromium's
software rasterizer (SwiftShader), which `--enable-unsafe-swiftshader` allows explicitly.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from mgs.errors import InputError, MgsError

log = logging.getLogger("mgs.view.browser")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-unsafe-swiftshader"]
_DEVTOOLS_LINE = re.compile(r"DevTools listening on (ws://\S+)")


def find_chromium() -> str:
    """The Chromium executable ($MGS_CHROMIUM, else chromium / chromium-browser on PATH)."""
    for candidate in (os.environ.get("MGS_CHROMIUM"), shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and os.path.exists(candidate):
            return candidate
    raise InputError("no Chromium found for the screenshot; install it (Debian: "
                     "`apt-get install chromium`) or set MGS_CHROMIUM to its executable")


class HeadlessPage:
    """One Chromium page, driven synchronously; use as a context manager."""

    def __init__(self, width: int = 1280, height: int = 800, timeout: float = 30.0):
        self.width, self.height, self.timeout = width, height, timeout
        self._ids = itertools.count(1)
        self._profile = tempfile.TemporaryDirectory(prefix="mgs-chromium-")
        self._process = subprocess.Popen(
            [find_chromium(), *FLAGS, f"--user-data-dir={self._profile.name}",
             "--remote-debugging-port=0", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            self._socket = self._connect(self._devtools_url())
            target = self._call("Target.createTarget", url="about:blank")["targetId"]
            self._session = self._call("Target.attachToTarget", targetId=target,
                                       flatten=True)["sessionId"]
            self.call("Page.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    def _devtools_url(self) -> str:
        found: list[str] = []

        def read():  # Chromium prints the address on stderr; keep draining it afterwards
            for line in self._process.stderr:
                if not found and (match := _DEVTOOLS_LINE.search(line)):
                    found.append(match.group(1))

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + self.timeout
        while not found:
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise MgsError(f"Chromium did not start its DevTools endpoint (exit status "
                               f"{self._process.poll()}); try running it by hand with "
                               f"{' '.join(FLAGS)}")
            time.sleep(0.05)
        return found[0]

    @staticmethod
    def _connect(url: str):
        from websockets.sync.client import connect

        return connect(url, max_size=None, open_timeout=10)

    def _call(self, method: str, session: str | None = None, **params) -> dict:
        message = {"id": next(self._ids), "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self._socket.send(json.dumps(message))
        while True:  # events arrive in between; skip them until our answer
            reply = json.loads(self._socket.recv(timeout=self.timeout))
            if reply.get("id") == message["id"]:
                if "error" in reply:
                    raise MgsError(f"Chromium refused {method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def call(self, method: str, **params) -> dict:
        return self._call(method, self._session, **params)

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, what: str, timeout: float | None = None) -> None:
        """Poll a JavaScript expression until it is truthy."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise MgsError(f"the page did not show {what} within {timeout or self.timeout} s")
            time.sleep(0.2)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        socket = getattr(self, "_socket", None)
        if socket is not None:
            try:
                self._call("Browser.close")
            except Exception:  # noqa: BLE001 - the browser may already be gone
                pass
            socket.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._profile.cleanup()

    def __enter__(self) -> "HeadlessPage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_png(data: bytes, path: str | Path) -> Path:
    from mgs.atomic import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return path
