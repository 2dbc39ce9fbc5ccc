"""Helpers for tests that start a real local server (mlflow, prefect)."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    """Poll ``url`` until it answers; fail early if ``proc`` exits."""
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                raise AssertionError(f"{what} did not come up")
            time.sleep(1)
