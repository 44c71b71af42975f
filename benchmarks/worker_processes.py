"""Run a benchmark's worker in several processes joined over loopback, and read process 0's result: the
processes are always stopped, within a time limit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def leader_result(script: str, args: list[str], num: int, timeout: float) -> Any:
    """Start `script --worker 127.0.0.1:PORT NUM *args PROCESS_ID` for every process id; the JSON process 0
    printed after "RESULT "."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.abspath(script), "--worker", f"127.0.0.1:{port}", str(num), *args]
    procs = [
        subprocess.Popen([*cmd, str(i)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) for i in range(num)
    ]
    try:
        out = procs[0].communicate(timeout=timeout)[0].decode(errors="replace")
        for p in procs[1:]:
            p.communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"the leader printed no result:\n{out[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])
