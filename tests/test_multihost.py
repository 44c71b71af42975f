"""Multi-host on one machine: several processes with virtual CPU devices joined over loopback (gloo).

Each test starts its processes and always stops them, within a wall-clock limit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from loong_jax.multihost import Distributed

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(scenario: str, num: int, local_devices: int, timeout: float = 240) -> list[dict]:
    """Run a scenario of tests/multihost_worker.py in num processes; their results, by process id."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, HERE]))
    coordinator = f"127.0.0.1:{_free_port()}"
    cmd = [sys.executable, os.path.join(HERE, "multihost_worker.py"), scenario, coordinator, str(num)]
    procs = [
        subprocess.Popen([*cmd, str(i), str(local_devices)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        for i in range(num)
    ]
    outputs = []
    try:
        end = time.monotonic() + timeout
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, end - time.monotonic()))
            outputs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for i, (p, out) in enumerate(zip(procs, outputs)):
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert p.returncode == 0 and lines, f"process {i} failed (exit {p.returncode}):\n{out[-3000:]}"
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    return results


def test_settings_from_the_environment_are_checked():
    env = {"LOONG_COORDINATOR": "10.0.0.1:1234", "LOONG_NUM_PROCESSES": "2", "LOONG_PROCESS_ID": "1"}
    assert Distributed.from_env(env) == Distributed("10.0.0.1:1234", 2, 1)
    assert Distributed.from_env({}) is None
    with pytest.raises(ValueError, match="missing LOONG_PROCESS_ID"):
        Distributed.from_env({k: v for k, v in env.items() if k != "LOONG_PROCESS_ID"})
    with pytest.raises(ValueError, match="HOST:PORT"):
        Distributed("10.0.0.1", 2, 0)
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 1\]"):
        Distributed("h:1", 2, 2)


def test_kv_migrates_between_instances_on_different_processes():
    # 2 processes x 4 virtual devices: instances 0-3 on process 0, 4-7 on process 1
    p0, p1 = run_processes("migrate", num=2, local_devices=4)
    assert sorted(p0) == ["0", "1", "2", "3"] and sorted(p1) == ["4", "5", "6", "7"]

    def pool(i: int, moved: dict[int, float] = {}) -> list[float]:  # noqa: B006 (read only)
        return [round(moved.get(s, i + s / 100), 2) for s in range(64)]

    assert p1["6"] == pool(6, {10 + j: 1 + (3 + j) / 100 for j in range(4)})  # from process 0's instance 1
    assert p1["7"] == pool(7, {20 + j: 5 + j / 100 for j in range(4)})  # within process 1
    assert p0["0"] == pool(0, {30 + j: 2 + (8 + j) / 100 for j in range(4)})  # within process 0
    assert p0["1"] == pool(1) and p1["5"] == pool(5)  # sources keep their KV


def test_plans_reach_every_follower_in_order_and_a_silent_leader_is_a_timeout():
    results = run_processes("plan", num=3, local_devices=1)
    assert all(r["steps"] == 100 for r in results)
    assert results[0]["round_trip_ms_median"] < 1000  # measured in benchmarks; here only "it answers"
    for r in results[1:]:
        assert r["timeout"].startswith("process 0 (the leader) sent nothing") and r["waited_s"] < 10
