"""A real headless Debian chromium driven over the DevTools protocol, for tests of pages g2is writes.

It opens a page, records console messages, uncaught exceptions, log errors and every network request, runs
a script in the page and takes a full-page screenshot. Each browser gets a fresh profile and no network
services (no sync, updates or background fetches).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import websocket

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
         "--disable-extensions", "--remote-debugging-port=0", "--window-size=1400,1000"]


def chromium_binary() -> str:
    """Debian's chromium; installed here (root + apt-get) when missing, never skipped."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        done = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            done = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, text=True,
                                  env=env)
        found = shutil.which("chromium")
        if found:
            return found
        raise RuntimeError(f"apt-get could not install chromium:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    raise RuntimeError("chromium is not installed and this user cannot install it (needs root and apt-get): "
                       "apt-get install -y chromium, or run scripts/bootstrap as root")


class Browser:
    """One chromium process and one page target attached over a flat DevTools session."""

    def __init__(self, binary: str | None = None, timeout: float = 60.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="g2is-chromium-")
        self.proc = subprocess.Popen([binary or chromium_binary(), *FLAGS, f"--user-data-dir={self.profile}",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        url = self._devtools_url()
        self.ws = websocket.create_connection(url, timeout=timeout, suppress_origin=True)
        self.events: "queue.Queue[dict[str, Any]]" = queue.Queue()
        self.replies: dict[int, dict[str, Any]] = {}
        self._next = 0
        self._lock = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)

    def _devtools_url(self) -> str:
        deadline = time.monotonic() + self.timeout
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            self.stderr.append(line)
            found = re.search(r"DevTools listening on (ws://\S+)", line)
            if found:
                threading.Thread(target=self._drain_stderr, daemon=True).start()
                return found.group(1)
        raise RuntimeError("chromium did not start its DevTools endpoint:\n" + "".join(self.stderr[-30:]))

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def _read(self) -> None:
        while True:
            try:
                message = json.loads(self.ws.recv())
            except Exception:  # noqa: BLE001 - the socket closes when the browser exits
                return
            if "id" in message:
                with self._lock:
                    self.replies[message["id"]] = message
                    self._lock.notify_all()
            else:
                self.events.put(message)

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        with self._lock:
            self._next += 1
            number = self._next
        message: dict[str, Any] = {"id": number, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + self.timeout
        with self._lock:
            while number not in self.replies:
                if not self._lock.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"no reply to {method} within {self.timeout:.0f}s")
            reply = self.replies.pop(number)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def open(self, url: str) -> list[dict[str, Any]]:
        """Navigate and wait for the load event; returns every event seen until then (and a short settle)."""
        self.call("Page.navigate", session=True, url=url)
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + self.timeout
        loaded = False
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.5)
            except queue.Empty:
                if loaded:
                    break
                continue
            seen.append(event)
            if event.get("method") == "Page.loadEventFired":
                loaded = True
        if not loaded:
            raise TimeoutError(f"{url} did not finish loading within {self.timeout:.0f}s")
        return seen

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed in the page: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path, width: int = 1400, max_height: int = 6000) -> Path:
        height = int(min(self.evaluate("document.documentElement.scrollHeight"), max_height))
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:  # noqa: BLE001 - already gone
            pass
        try:
            self.ws.close()
        finally:
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def page_problems(events: list[dict[str, Any]]) -> list[str]:
    """Console errors and warnings, uncaught exceptions and log errors among DevTools events."""
    problems = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
            problems.append(f"console.{params['type']}: " + " ".join(str(a.get("value", a.get("description")))
                                                                 for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            problems.append(f"exception: {params.get('exceptionDetails', {}).get('text')} "
                            f"{params.get('exceptionDetails', {}).get('exception', {}).get('description', '')}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") in ("error", "warning"):
            entry = params["entry"]
            problems.append(f"log {entry.get('level')} ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
    return problems


def requested_urls(events: list[dict[str, Any]]) -> list[str]:
    return [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
