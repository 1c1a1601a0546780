"""A real `streamlit run app.py` on a free loopback port, and Debian's Chromium driving it.

The server runs from the project folder (so `.streamlit/config.toml` applies exactly as for a
user) with its workspaces in a temporary folder. Its log is kept in ``test-artifacts/`` next
to the screenshots, for CI to upload when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
ARTIFACTS = PROJECT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"streamlit did not become healthy in {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def app_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """Start the app; yields ``url``, ``port``, ``workspaces`` (its workspaces folder)."""
    pytest.importorskip("playwright")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    home = tmp_path_factory.mktemp("browser-app")
    workspaces = home / "workspaces"
    port = _free_port()
    env = {
        **os.environ,
        "IMGCLUSTER_WORKSPACES": str(workspaces),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("IMGCLUSTER_ALLOWED_ROOTS", None)  # the defaults: the project folder, sample_data/
    log = ARTIFACTS / "streamlit-server.log"
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlit",
                "run",
                str(PROJECT / "app.py"),
                "--server.port",
                str(port),
                "--server.headless",
                "true",
            ],
            cwd=PROJECT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the UMAP worker dies with it
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log, timeout=90)
        yield {"url": url, "port": port, "workspaces": workspaces, "log": log}
    finally:
        with_group = os.getpgid(proc.pid) if proc.poll() is None else None
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        if with_group is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(with_group, signal.SIGKILL)
        # UMAP workers run in their own session; each names its pid in a lock file.
        for lock in workspaces.glob("*/runs/projection-*.lock"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(lock.read_text().strip()), signal.SIGKILL)


@pytest.fixture(scope="module")
def browser_page(app_server: dict[str, object]) -> Iterator[object]:
    """One Chromium page for the whole flow (a user's tab), 1440x1000."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(60_000)
        try:
            yield page
        finally:
            context.close()
            browser.close()
