"""Look at `cada serve`'s web page in a real browser: choose images on it in headless Chromium, take a screenshot.

    python benchmarks/serve_page.py RUN IMAGE [IMAGE ...] --out page.png [--chromium PATH]

RUN is a run folder or an exported .onnx file. The script serves it on a free loopback port (as `cada serve`
does), opens the page in headless Chromium, chooses the images in the page's file input as a user's file dialog
would (DevTools' DOM.setFileInputFiles: the page's change handler posts them to /predict?overlay=1), waits for the
result cards and saves a screenshot of the page.
It talks to Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe), so it needs nothing but
Chromium (Debian: `apt-get install chromium`); without one it says so and exits 0. It prints what the page shows
(decisions, scores), so a run without looking at the picture still checks that the page worked.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cada.files import atomic_write
from cada.predict import load_model
from cada.serve import BackgroundServer

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe: JSON messages ending in NUL on fds 3 and 4."""

    def __init__(self, browser: str, profile: str):
        to_browser_read, to_browser_write = os.pipe()
        from_browser_read, from_browser_write = os.pipe()
        # Above 4, so that moving them to 3 and 4 in the child never overwrites one with the other.
        self._child_ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser_read, from_browser_write)]
        os.close(to_browser_read)
        os.close(from_browser_write)

        def child_pipes():
            os.dup2(self._child_ends[0], 3)
            os.dup2(self._child_ends[1], 4)

        self.process = subprocess.Popen(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-pipe",
                "--window-size=1280,1000",
                f"--user-data-dir={profile}",
                "--no-first-run",
                "about:blank",
            ],
            preexec_fn=child_pipes,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in self._child_ends:
            os.close(fd)
        self._write, self._read = to_browser_write, os.fdopen(from_browser_read, "rb")
        self._next_id, self._buffer = 0, b""

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\0" not in self._buffer:
                chunk = self._read.read1(1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]
        raise TimeoutError(f"{method}: no answer in {timeout} s")

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="run folder or .onnx file")
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("serve_page.png"), help="the screenshot (PNG)")
    parser.add_argument(
        "--chromium", help=f"the browser's executable (default: the first of {', '.join(BROWSERS)} on PATH)"
    )
    args = parser.parse_args()
    browser = args.chromium or next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if browser is None:
        print("skipped: no Chromium found (Debian: apt-get install chromium; or pass --chromium PATH)")
        return 0
    if args.out.exists():
        print(f"error: {args.out} exists; choose another --out", file=sys.stderr)
        return 2

    server = BackgroundServer(load_model(args.model), str(args.model))
    url = server.url + "/"
    with tempfile.TemporaryDirectory() as profile:
        tools = DevTools(browser, profile)
        try:
            target = tools.call("Target.createTarget", {"url": url})["targetId"]
            session = tools.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for _ in range(100):  # the page has loaded and read /info
                state = tools.call(
                    "Runtime.evaluate", {"expression": "document.getElementById('info').textContent"}, session
                )["result"].get("value", "")
                if state and not state.startswith("loading"):
                    break
                time.sleep(0.1)
            print(f"page header: {state}")
            document = tools.call("DOM.getDocument", {}, session)["root"]["nodeId"]
            chooser = tools.call("DOM.querySelector", {"nodeId": document, "selector": "#files"}, session)["nodeId"]
            paths = [str(path.resolve()) for path in args.images]
            tools.call("DOM.setFileInputFiles", {"files": paths, "nodeId": chooser}, session)
            for _ in range(3000):  # the page posts them and shows its cards (or an error)
                status = tools.call(
                    "Runtime.evaluate", {"expression": "document.getElementById('status').textContent"}, session
                )["result"]["value"]
                if status.startswith(("scored", "error")):
                    break
                time.sleep(0.1)
            shown = tools.call(
                "Runtime.evaluate",
                {
                    "expression": "Array.from(document.querySelectorAll('.card'))"
                    ".map(c => c.innerText.replace(/\\s+/g, ' ')).join('\\n')"
                },
                session,
            )["result"]["value"]
            print(f"page status: {status}\n{shown}")
            height = tools.call("Runtime.evaluate", {"expression": "document.body.scrollHeight"}, session)["result"][
                "value"
            ]
            tools.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": 1280, "height": min(int(height) + 40, 4000), "deviceScaleFactor": 1, "mobile": False},
                session,
            )
            shot = tools.call("Page.captureScreenshot", {"format": "png"}, session)["data"]
        finally:
            tools.close()
            server.stop()
    atomic_write(args.out, base64.b64decode(shot))
    print(f"wrote {args.out}")
    return 0 if status.startswith("scored") else 1


if __name__ == "__main__":
    raise SystemExit(main())
