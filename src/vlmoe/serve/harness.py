"""Drive a real `vlmoe serve` from outside, as a user would: start it as a subprocess on a
free loopback port, send it multipart requests, open its page in headless Chromium.

Used by tests/serve, bench/serve_load.py and tools/serve_screenshot.py. Standard library only,
except `chromium_driver`, which needs `selenium` and the system's Chromium and ChromeDriver
(Debian: `chromium`, `chromium-driver`; `tools/system-deps.sh` installs them).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)


@dataclass
class ServerProcess:
    """A running `vlmoe serve`: its base URL ("http://127.0.0.1:PORT/"), the process, and the
    file that receives its stderr."""

    url: str
    proc: subprocess.Popen
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@contextlib.contextmanager
def serve_process(
    checkpoint: str | os.PathLike,
    args: Sequence[str] = (),
    log_dir: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> Iterator[ServerProcess]:
    """Start `python -m vlmoe serve --checkpoint CHECKPOINT --port 0 ARGS` on 127.0.0.1, wait
    for the line that names its URL (at most `timeout` s), yield it; always stop it on exit
    (SIGTERM, then SIGKILL after 10 s)."""
    log_dir = Path(log_dir) if log_dir is not None else Path.cwd()
    stderr_path = log_dir / f"serve-{uuid.uuid4().hex[:8]}.stderr"
    cmd = [sys.executable, "-m", "vlmoe", "serve", "--checkpoint", str(checkpoint)]
    cmd += ["--host", "127.0.0.1", "--port", "0", *args]
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env
        )
    try:
        url = _wait_for_url(proc, timeout, stderr_path)
        yield ServerProcess(url, proc, stderr_path)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_for_url(proc: subprocess.Popen, timeout: float, stderr_path: Path) -> str:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:  # keeps reading so that the pipe never fills up
        for raw in proc.stdout:  # type: ignore[union-attr]
            lines.put(raw.decode(errors="replace"))

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"vlmoe serve exited with {proc.returncode}: "
                    f"{stderr_path.read_text(errors='replace').strip()[-2000:]}"
                ) from None
            continue
        if line.startswith("vlmoe serve: http://"):
            return line.split()[2]
    raise TimeoutError(f"vlmoe serve printed no URL within {timeout:.0f} s")


def multipart(
    fields: dict[str, str], files: dict[str, tuple[str, bytes, str]] | None = None
) -> tuple[bytes, str]:
    """Encode a multipart/form-data body → (body, Content-Type header value). files maps a
    field name to (file name, bytes, content type)."""
    boundary = "vlmoe" + uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
        parts.append(head.encode() + value.encode() + b"\r\n")
    for name, (filename, data, ctype) in (files or {}).items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: {ctype}\r\n\r\n'
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def request(
    url: str,
    body: bytes | None = None,
    content_type: str | None = None,
    timeout: float = 30.0,
) -> tuple[int, Any]:
    """GET (body None) or POST `url` → (status, parsed JSON body, or raw bytes if not JSON)."""
    req = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, data, ctype = r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, data, ctype = e.code, e.read(), e.headers.get("content-type", "")
    return status, json.loads(data) if "json" in ctype else data


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) paths of the system's Chromium and ChromeDriver, or None."""
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = next((p for p in map(shutil.which, DRIVERS) if p), None)
    return (browser, driver) if browser and driver else None


def chromium_driver(width: int = 1400, height: int = 1000) -> Any:
    """A Selenium WebDriver on headless system Chromium (no browser is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise RuntimeError("chromium and chromedriver not found: run tools/system-deps.sh")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)  # no sandbox: CI runs as root, where Chromium refuses one
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(found[1]), options=options)
