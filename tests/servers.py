"""A local server started by a test (mlflow models serve, mlflow server): a free port, waiting for it, stopping it."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_it_answers(url: str, server: subprocess.Popen, seconds: float) -> None:
    """Polls ``url`` until it answers; fails at once when the server died (with its stderr, when piped)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if server.poll() is not None:
                why = server.stderr.read().decode()[-2000:] if server.stderr else ""
                raise AssertionError(f"the server ended before {url} answered: {why}")
            assert time.monotonic() < deadline, f"{url} did not answer in {seconds:.0f} s"
            time.sleep(1)


def stop(server: subprocess.Popen) -> None:
    """The server's own process group (started with start_new_session; uvicorn workers included)."""
    os.killpg(server.pid, 15)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, 9)
        server.wait(timeout=20)
