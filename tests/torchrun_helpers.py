"""Running a test program on 2 local ranks under torchrun (CPU, gloo): tests/test_tensor_parallel.py and
tests/test_model_families.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run torchrun in its own process group; on a timeout the whole group is killed (its ranks too, which a
    rank waiting in a collective for a failed peer would otherwise outlive)."""
    import signal

    p = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"torchrun timed out after {timeout} s: {err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


# 2 ranks on loopback, one thread each (2 cores), this checkout's package first
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent), "HF_DATASETS_OFFLINE": "1"}


def torchrun(*program: str) -> list[str]:
    """The command that starts ``program`` (a script, or ``-m module``, and its arguments) on 2 local ranks."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return [*launcher, "--master_port", str(free_port()), "--master_addr", "127.0.0.1", *program]
