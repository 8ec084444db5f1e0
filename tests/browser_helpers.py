"""A real browser for tests: Debian's headless Chromium driven over the DevTools protocol
(websocket-client, in the dev extra), on 127.0.0.1, always stopped.

`load_page(path, screenshot)` opens a local HTML file, waits for its load event and for
the page to go quiet, and returns what the page logged as errors (console.error,
uncaught exceptions, failed loads) and the number of plotly figures that rendered (a
`.plotly-graph-div` holding plotly's `svg.main-svg`), then saves a PNG screenshot of
the whole page.
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from orchestrate.ray_env import free_port

INSTALL_HINT = "install Debian's Chromium: apt-get update && apt-get install -y chromium"
COUNT_FIGURES = """
Array.from(document.querySelectorAll('.plotly-graph-div'))
     .filter(div => div.querySelector('svg.main-svg') !== null).length
"""
FIGURES_CLAIMED = "document.querySelector(\"meta[name='psdet-figures']\").content"
PAGE_HEIGHT = "Math.ceil(document.documentElement.scrollHeight)"


def chromium() -> str:
    """The Chromium binary; AssertionError saying how to install it when there is none."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError(f"no Chromium on PATH: {INSTALL_HINT}")


class DevTools:
    """One page target of a headless Chromium, over its websocket."""

    def __init__(self, url: str, timeout: float) -> None:
        import websocket

        self.socket = websocket.create_connection(url, timeout=timeout, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)
        raise TimeoutError(f"{method}: no answer in {timeout} s")

    def wait_for(self, event: str, timeout: float) -> dict:
        for message in self.events:
            if message.get("method") == event:
                return message
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self.socket.recv())
            self.events.append(message)
            if message.get("method") == event:
                return message
        raise TimeoutError(f"no {event} in {timeout} s")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"]["value"]

    def errors(self) -> list[str]:
        found = []
        for message in self.events:
            method, params = message.get("method"), message.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append("exception: " + str(details.get("exception", {}).get("description", details.get("text"))))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append("log: " + params["entry"]["text"])
        return found

    def close(self) -> None:
        self.socket.close()


def load_page(page: Path, screenshot: Path, timeout: float = 120) -> dict:
    """{"errors": [...], "figures": rendered plotly figures, "claimed": the page's own count}."""
    binary = chromium()
    port = free_port()
    profile = tempfile.mkdtemp(prefix="psdet-chromium-")
    process = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile}",
         "--window-size=1280,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        target = _page_target(port, process, timeout=60)
        tools = DevTools(target["webSocketDebuggerUrl"], timeout=timeout)
        try:
            for domain in ("Page", "Runtime", "Log"):
                tools.call(f"{domain}.enable")
            tools.call("Page.navigate", url=page.resolve().as_uri())
            tools.wait_for("Page.loadEventFired", timeout=timeout)
            figures = _settled(tools, COUNT_FIGURES, timeout=timeout)
            claimed = int(tools.evaluate(FIGURES_CLAIMED))
            height = int(tools.evaluate(PAGE_HEIGHT))
            tools.call("Emulation.setDeviceMetricsOverride", width=1280, height=min(height, 16000),
                       deviceScaleFactor=1, mobile=False)
            shot = tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            return {"errors": tools.errors(), "figures": figures, "claimed": claimed}
        finally:
            tools.close()
    finally:
        process.kill()
        process.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


def _page_target(port: int, process: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"Chromium exited with {process.returncode}: {process.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as answer:
                pages = [t for t in json.load(answer) if t["type"] == "page"]
            if pages:
                return pages[0]
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"Chromium's DevTools did not answer on 127.0.0.1:{port} in {timeout} s")


def _settled(tools: DevTools, expression: str, timeout: float, quiet_s: float = 1.0):
    """The expression's value once it has stayed the same for `quiet_s` (plotly draws after load)."""
    deadline = time.monotonic() + timeout
    value, since = tools.evaluate(expression), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = tools.evaluate(expression)
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return value
    return value
