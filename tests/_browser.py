"""Open an HTML report in headless Chromium and report what a reader would see.

A test helper (``tests/`` is on ``sys.path`` through the root conftest, so any test can
``from _browser import check_report``). It speaks the Chrome DevTools protocol over
``--remote-debugging-pipe`` (file descriptors 3 and 4, NUL-separated JSON): no port, no
proxy, no websocket library.

    result = check_report(html_path, screenshot_path)
    result["headings"]        # text of every <h2> directly under a <section> in <main>
    result["images"]          # [{"alt", "complete", "naturalWidth", "naturalHeight"}]
    result["console_errors"]  # console.error/assert, uncaught exceptions, Log errors (CSP, loads)
    result["requests"]        # URLs the page asked for besides itself and data: URIs

``find_chromium()`` returns the binary (``$CONVLENS_CHROMIUM``, ``chromium``,
``chromium-browser``, ``google-chrome``, ``google-chrome-stable``) or None.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["CHROMIUM_NAMES", "artifact_dir", "check_report", "find_chromium"]

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

_FLAGS = (
    "--headless",
    "--no-sandbox",  # root in CI and containers; the page is our own local file
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--mute-audio",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)

# Runs in the page through DevTools (the report itself has no JavaScript).
_INSPECT = """(() => {
  const text = (e) => (e.innerText ?? e.textContent).replace(/\\s+/g, ' ').trim();
  const all = (sel) => [...document.querySelectorAll(sel)];
  return {
    title: document.title,
    h1: all('h1').map(text),
    headings: all('main section > h2').map(text),
    section_ids: all('main section').map((e) => e.id),
    toc: all('nav a').map(text),
    broken_links: all('a[href^="#"]').map((a) => a.getAttribute('href'))
      .filter((h) => !document.getElementById(decodeURIComponent(h.slice(1)))),
    images: [...document.images].map((i) => ({
      alt: i.alt, complete: i.complete,
      naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
      src: i.getAttribute('src').slice(0, 22),
    })),
    placeholders: all('.figure-missing .placeholder').map(text),
    scripts: document.scripts.length,
  };
})()"""


def find_chromium() -> str | None:
    """The Chromium (or Chrome) binary to use, or None when there is none."""
    env = os.environ.get("CONVLENS_CHROMIUM")
    if env:
        return shutil.which(env) or (env if Path(env).is_file() else None)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def artifact_dir() -> Path:
    """Where tests leave files for people to look at: ``$PYTEST_ARTIFACTS`` or tests/artifacts."""
    folder = Path(os.environ.get("PYTEST_ARTIFACTS") or ARTIFACTS)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class _DevTools:
    """A Chromium process and its DevTools pipe: send commands, collect events."""

    def __init__(self, binary: str, profile: Path, width: int, height: int) -> None:
        cmd_read, self._cmd_write = os.pipe()  # we write commands; Chromium reads fd 3
        self._resp_read, resp_write = os.pipe()  # Chromium writes fd 4; we read
        # Copies at 10+ so that putting them on 3 and 4 in the child cannot clobber each other.
        child_in = fcntl.fcntl(cmd_read, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(resp_write, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(cmd_read)
        os.close(resp_write)

        def onto_3_and_4() -> None:
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self.log_path = profile / "chromium.log"
        args = [
            binary,
            *_FLAGS,
            f"--user-data-dir={profile / 'profile'}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(3, 4),
                preexec_fn=onto_3_and_4,
            )
        os.close(child_in)
        os.close(child_out)
        self._next_id = 0
        self._inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._resp_read, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self._inbox.put(None)
                return
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for m in messages:
                self._inbox.put(json.loads(m))

    def _receive(self, deadline: float) -> dict[str, Any]:
        try:
            msg = self._inbox.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"Chromium did not answer in time\n{self.log_tail()}") from None
        if msg is None:
            self._inbox.put(None)
            raise RuntimeError(f"Chromium closed the DevTools pipe\n{self.log_tail()}")
        return msg

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_write, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"DevTools {method} failed: {reply['error']}")
                return dict(reply.get("result", {}))
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        seen = next((e for e in self.events if e["method"] == method), None)
        deadline = time.monotonic() + timeout
        while seen is None:
            event = self._receive(deadline)
            if "method" in event:
                self.events.append(event)
                if event["method"] == method:
                    seen = event
        return seen

    def drain(self, seconds: float) -> None:
        """Collect the events that arrive in the next ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                event = self._inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return
            if event is None:
                self._inbox.put(None)
                return
            if "method" in event:
                self.events.append(event)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "chromium log:\n" + "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send("Browser.close", timeout=5.0)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)  # ends at EOF, once Chromium has exited
        for fd in (self._cmd_write, self._resp_read):
            with contextlib.suppress(OSError):
                os.close(fd)


def _console_text(params: dict[str, Any]) -> str:
    parts = []
    for arg in params.get("args", []):
        parts.append(str(arg.get("value", arg.get("description", arg.get("type", "")))))
    return " ".join(parts)


def _failures(events: list[dict[str, Any]]) -> list[str]:
    """Every request that failed: ``"URL: error"`` (an answer with status 400 or more
    counts too)."""
    urls = {}
    failed = []
    for e in events:
        p = e.get("params", {})
        if e["method"] == "Network.requestWillBeSent":
            urls[p.get("requestId")] = str(p.get("request", {}).get("url", ""))
        elif e["method"] == "Network.loadingFailed":
            url = urls.get(p.get("requestId"), "?")
            failed.append(
                f"{url}: {p.get('errorText', '')}{' (blocked)' if p.get('blockedReason') else ''}"
            )
        elif e["method"] == "Network.responseReceived":
            status = int(p.get("response", {}).get("status", 0) or 0)
            if status >= 400:
                failed.append(f"{p.get('response', {}).get('url', '?')}: HTTP {status}")
    return failed


def _messages(events: list[dict[str, Any]]) -> tuple[list[dict[str, str]], list[str]]:
    """Everything the console showed, and every URL the page requested."""
    console: list[dict[str, str]] = []
    requests: list[str] = []
    for e in events:
        p = e.get("params", {})
        if e["method"] == "Runtime.consoleAPICalled":
            level = {"assert": "error", "warning": "warning"}.get(p.get("type", ""), p.get("type"))
            console.append({"level": str(level), "source": "console", "text": _console_text(p)})
        elif e["method"] == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            text = d.get("exception", {}).get("description") or d.get("text", "")
            console.append({"level": "error", "source": "exception", "text": str(text)})
        elif e["method"] == "Log.entryAdded":
            entry = p.get("entry", {})
            text = entry.get("text", "") + (f" ({entry['url']})" if entry.get("url") else "")
            console.append(
                {"level": str(entry.get("level")), "source": str(entry.get("source")), "text": text}
            )
        elif e["method"] == "Network.requestWillBeSent":
            requests.append(str(p.get("request", {}).get("url", "")))
    return console, requests


def check_report(
    html_path: str | os.PathLike[str],
    screenshot_path: str | os.PathLike[str] | None = None,
    *,
    chromium: str | None = None,
    width: int = 1280,
    height: int = 900,
    timeout: float = 60.0,
    offline: bool = False,
    collect: str | None = None,
) -> dict[str, Any]:
    """Load ``html_path`` in headless Chromium; return what the page showed.

    ``offline=True`` turns the browser's network off before the page loads (DevTools
    network emulation: file:// still loads, anything else fails and is listed in
    ``failed``). ``collect``: a JavaScript expression evaluated in the page, its JSON
    value returned as ``collected``.

    Keys: ``title``, ``h1``, ``headings`` (section <h2> texts, in order), ``section_ids``,
    ``toc`` (contents link texts), ``broken_links`` (``#`` links with no target),
    ``images`` (per <img>: ``alt``, ``complete``, ``naturalWidth``, ``naturalHeight``,
    ``src`` prefix), ``placeholders`` ("figure missing" boxes), ``scripts`` (count of
    <script> elements), ``console`` (every message: ``level``, ``source``, ``text``),
    ``console_errors`` (those at level error), ``failed`` (requests that failed, with the
    error), ``requests`` (URLs other than the page and
    data: URIs), ``screenshot`` (the full-page PNG written, or None), ``seconds`` (wall
    time, browser start included) and ``chromium`` (the binary).

    Raises RuntimeError/TimeoutError when Chromium cannot be started or driven; the
    message ends with the tail of Chromium's own log.
    """
    start = time.monotonic()
    binary = chromium or find_chromium()
    if binary is None:
        raise FileNotFoundError(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)})")
    page_url = Path(html_path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="convlens_chromium_") as tmp:
        browser = _DevTools(binary, Path(tmp), width, height)
        try:
            target = browser.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)
            session = browser.send(
                "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
            )["sessionId"]
            for domain in ("Runtime", "Log", "Page", "Network"):
                browser.send(f"{domain}.enable", session=session)
            if offline:
                browser.send(
                    "Network.emulateNetworkConditions",
                    {
                        "offline": True,
                        "latency": 0,
                        "downloadThroughput": -1,
                        "uploadThroughput": -1,
                    },
                    session=session,
                )
            nav = browser.send("Page.navigate", {"url": page_url}, session=session)
            if nav.get("errorText"):
                raise RuntimeError(f"Chromium could not open {page_url}: {nav['errorText']}")
            browser.wait_for("Page.loadEventFired", timeout=timeout)
            browser.drain(0.3)  # late console messages
            found = browser.send(
                "Runtime.evaluate",
                {"expression": _INSPECT, "returnByValue": True},
                session=session,
            )
            if "exceptionDetails" in found:
                raise RuntimeError(f"inspecting the page failed: {found['exceptionDetails']}")
            result: dict[str, Any] = dict(found["result"]["value"])
            if collect is not None:
                got = browser.send(
                    "Runtime.evaluate",
                    {"expression": collect, "returnByValue": True},
                    session=session,
                )
                if "exceptionDetails" in got:
                    raise RuntimeError(f"collect failed: {got['exceptionDetails']}")
                result["collected"] = got["result"].get("value")
            shot = None
            if screenshot_path is not None:
                size = browser.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
                clip = {
                    "x": 0,
                    "y": 0,
                    "width": max(1, min(int(size["width"]), 4096)),
                    "height": max(1, min(int(size["height"]), 16384)),
                    "scale": 1,
                }
                data = browser.send(
                    "Page.captureScreenshot",
                    {"format": "png", "clip": clip, "captureBeyondViewport": True},
                    session=session,
                    timeout=timeout,
                )["data"]
                shot = Path(screenshot_path)
                shot.parent.mkdir(parents=True, exist_ok=True)
                shot.write_bytes(base64.b64decode(data))
        finally:
            browser.close()
        console, requests = _messages(browser.events)
    result["console"] = console
    result["console_errors"] = [m for m in console if m["level"] == "error"]
    result["failed"] = _failures(browser.events)
    result["requests"] = [u for u in requests if u != page_url and not u.startswith("data:")]
    result["screenshot"] = str(shot) if shot is not None else None
    result["seconds"] = round(time.monotonic() - start, 2)
    result["chromium"] = binary
    return result
