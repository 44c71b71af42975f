"""Start `loong serve` in its own process (from this tree, or from another checkout to compare versions),
wait until it is healthy, and stop it in every outcome."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(args: list[str], tree: str = ROOT, timeout: float = 1800.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """`loong serve ARGS` on a free loopback port, run from the source tree `tree`; yields (url, process)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": tree}
    cmd = [sys.executable, "-m", "loong_jax.cli", "serve", "--port", str(port), *args]
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty server must never block on its log
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the server exited ({proc.returncode}): {log.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become healthy in time")
            time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def rss_bytes(pid: int) -> int:
    """Resident memory of a process now (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
