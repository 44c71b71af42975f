"""The `loong` command line on the real default model, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loong_jax.cli import main

LOONG = [sys.executable, "-m", "loong_jax.cli"]


def _run(*args, timeout=300):
    return subprocess.run([*LOONG, *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def test_chat_answers_on_the_default_model():
    r = _run("chat", "What is the capital of France?", "--max-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_convert_then_generate_from_orbax(tmp_path):
    out = str(tmp_path / "smol")
    r = _run("convert", "default", out)
    assert r.returncode == 0, r.stderr
    a = _run("generate", "The capital of Italy is", "--max-tokens", "8")
    b = _run("generate", "The capital of Italy is", "--max-tokens", "8", "--model", out)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


@pytest.mark.parametrize(
    "args,message",
    [
        (("generate", "hi", "--temperature", "-1"), "temperature must be in [0, 100], got -1.0"),
        (("generate", "hi", "--model", "/nonexistent.gguf"), "/nonexistent.gguf: no such file"),
        (("generate", "hi", "--max-model-len", "100000"), "max_model_len must be in [1, 8192]"),
        (("generate", "hi", "--memory-utilization", "1.5"), "memory_utilization must be in (0, 1], got 1.5"),
        (("generate", "hi", "--kv-tokens-per-instance", "100000000"), "kv_tokens_per_instance=100,000,000 does not"),
        (("chat", "hi", "--kv-tokens-per-instance", "1024"), "cannot hold one request of max_model_len=8,192"),
        (("serve", "--coordinator", "127.0.0.1:1", "--num-processes", "2"), "needs all of --coordinator"),
        (
            (
                "serve",
                "--num-instances",
                "3",
                "--coordinator",
                "127.0.0.1:1",
                "--num-processes",
                "2",
                "--process-id",
                "0",
            ),
            "(3) must split evenly over the 2 processes",
        ),
        (
            ("serve", "--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"),
            "coordinator must be HOST:PORT",
        ),
        (("serve", "--cache-isolation", "api-key"), "cache isolation per API key needs API keys (--api-key)"),
    ],
)
def test_bad_arguments_fail_with_a_clear_message(args, message, capsys):
    """In this process (the exit status is what `main` returns; a subprocess per case would only add start-up
    time): every case fails before anything large is allocated."""
    assert main(list(args)) == 2
    assert message in capsys.readouterr().err
