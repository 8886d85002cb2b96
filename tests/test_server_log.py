"""The real server's log (`lookalike serve`): access lines and shutdown survive a search."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.test_api import build_catalog

REPO = Path(__file__).resolve().parents[1]
STARTUP_S = 120
SEARCH_S = 300  # the first search builds the model: slow on a small shared CPU


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`lookalike serve` in a subprocess, its stdout and stderr in one log file."""

    def __init__(self, database_url: str, base: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        env = {**os.environ, "LOOKALIKE_DATA_DIR": str(base / "data")}
        command = [sys.executable, "-m", "lookalike.flows.cli", "serve"]
        command += ["--db", database_url, "--port", str(self.port)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                httpx.get(f"{self.url}/health", timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError(f"server did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_line(self, pattern: str, timeout: float = 10) -> str:
        """The first log line matching pattern, waiting for it to be written."""
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.log().splitlines() if re.search(pattern, line)]
            if found or time.monotonic() > deadline:
                assert found, f"no line matching {pattern!r} in:\n{self.log()}"
                return found[0]
            time.sleep(0.1)

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=60)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    catalog = build_catalog(f"sqlite:///{tmp_path / 'lookalike.sqlite'}", tmp_path)
    server = Server(catalog.url, tmp_path)
    try:
        server.wait_until_up()
        yield server, catalog.root
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_access_log_and_shutdown_messages_survive_a_search(
    started: tuple[Server, Path], signum: int
) -> None:
    server, root = started
    photo = (root / "photos/photo_000_00000.jpg").read_bytes()
    found = httpx.post(
        f"{server.url}/api/search",
        files={"file": ("photo.jpg", photo, "image/jpeg")},
        params={"k": 2},
        timeout=SEARCH_S,
    )
    assert found.status_code == 200, found.text
    assert [n["rank"] for n in found.json()] == [1, 2]  # random stand-in features: any two
    server.wait_for_line(r'"POST /api/search\?k=2 HTTP/1\.1" 200')
    assert httpx.get(f"{server.url}/api/stats", timeout=30).status_code == 200
    server.wait_for_line(r'"GET /api/stats HTTP/1\.1" 200')  # logging still works after it
    # After its graceful shutdown uvicorn re-raises SIGTERM, so the exit reports the signal.
    assert server.stop(signum) in (0, -signum)
    server.wait_for_line(r"Shutting down")
    server.wait_for_line(r"Finished server process")
    log = server.log()
    assert "UserWarning" not in log and "prefect" not in log.lower(), log
    # TensorFlow's no-GPU noise stays out of the log (only where there is no GPU device).
    assert "cuInit" not in log and "E0000" not in log, log
