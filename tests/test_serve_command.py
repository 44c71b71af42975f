"""`loong serve` as a user runs it: start-up log, a real client, and SIGTERM finishing running requests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_stops_accepting_and_finishes_running_requests():
    port = _free_port()
    cmd = [sys.executable, "-m", "loong_jax.cli", "serve", "--num-instances", "1", "--kv-tokens-per-instance", "2048"]
    # small buckets: one instance: the warm-up compiles the fewest programs
    cmd += ["--max-model-len", "256", "--max-prefill-tokens", "64", "--max-num-seqs", "2", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise AssertionError("the server did not start:\n" + "".join(log))
        body = {"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "temperature": 0, "stream": True}
        chunks, finish = [], None
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                if not chunks:
                    proc.send_signal(signal.SIGTERM)  # mid-stream: this request must still finish
                chunk = json.loads(line[6:])
                chunks.append(chunk)
                finish = chunk["choices"][0]["finish_reason"] or finish
        assert finish == "length" and len(chunks) > 1
        # uvicorn re-raises SIGTERM once it has shut down gracefully, so the exit status says "terminated"
        assert proc.wait(timeout=120) in (0, -signal.SIGTERM)
        try:
            httpx.get(f"{url}/health", timeout=2)
            raise AssertionError("the server still accepts connections")
        except httpx.TransportError:
            pass
        text = "".join(log)
        assert "warmed up" in text and f"listening on {url}" in text
    finally:
        if proc.poll() is None:
            proc.kill()
